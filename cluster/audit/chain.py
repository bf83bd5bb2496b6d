"""The audit chain's on-disk format, and `verify()`, which checks a chain without its writer.

Files `audit-000001.jsonl`, `audit-000002.jsonl`, ... hold one JSON object per line.
Each record has `seq` (1, 2, ... across all files), `time`, `type`, `prev` (the previous
record's `hash`; 64 zeros for record 1) and `hash`: the sha256 of the record's canonical
JSON without `hash`. Checkpoints sign `f"{seq}:{prev}"` with Ed25519, and the `HEAD` file
signs `f"{seq}:{hash}"` of the last acknowledged record, so an edit that rehashes the rest
of the chain, or a cut of its tail, is still caught. Nothing here reads or prints the
fields callers put in records, other than `seq`, `type` and the chain fields.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

ZERO_HASH = "0" * 64
CALLER_TYPES = ("request", "admin", "shadow")  # shadow: a copy of a live request (docs/shadow.md)
RECORD_TYPES = CALLER_TYPES + ("checkpoint", "open", "recovered")
RESERVED_FIELDS = ("seq", "time", "prev", "hash")
HEAD_NAME = "HEAD"
_FILE_RE = re.compile(r"^audit-(\d{6,})\.jsonl$")
PROGRESS_EVERY = 100_000
HASH_FAULT = "hash does not match the record's contents: the record was altered"


class AuditError(Exception):
    """The audit log cannot be opened, read or trusted; the message names the file and the next step."""


class AuditWriteError(AuditError):
    """Records could not be made durable (disk full, permissions, I/O error); they were not acknowledged."""


def file_name(number: int) -> str:
    return f"audit-{number:06d}.jsonl"


def list_files(directory: Path) -> list[tuple[int, Path]]:
    """The chain's files, in chain order (by number, not by name: 1000000 sorts after 999999)."""
    found = []
    for path in Path(directory).iterdir():
        m = _FILE_RE.match(path.name)
        if m and path.is_file():
            found.append((int(m.group(1)), path))
    return sorted(found)


def canonical(obj: dict) -> bytes:
    """The bytes a record's hash is taken over (without its `hash` key)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def record_hash(record: dict) -> str:
    return hashlib.sha256(canonical({k: v for k, v in record.items() if k != "hash"})).hexdigest()


def encode_record(fields: dict, seq: int, prev: str) -> tuple[dict, bytes]:
    """The record as written (with seq, prev and hash) and its line; one JSON encoding per record."""
    record = dict(fields, seq=seq, prev=prev)
    body = json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    digest = hashlib.sha256(body.encode()).hexdigest()
    record["hash"] = digest
    # The line is the canonical body with `hash` appended last: still valid JSON, hashed as written.
    return record, (body[:-1] + ',"hash":"' + digest + '"}\n').encode()


def checkpoint_message(seq: int, prev: str) -> bytes:
    return f"{seq}:{prev}".encode()


def head_message(seq: int, digest: str) -> bytes:
    return f"{seq}:{digest}".encode()


def fingerprint(public_key: Ed25519PublicKey) -> str:
    """First 16 hex characters of the sha256 of the raw public key: names the key in records."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def default_key_dir(log_dir: Path) -> Path:
    """Where a log's keys live unless told otherwise: beside the log, not in it
    (`/var/db/studiofleet/audit` -> `/var/db/studiofleet/audit-keys`), so the log can be
    copied, archived or handed to an auditor without its keys (HIPAA: keys kept apart)."""
    log_dir = Path(log_dir)
    return log_dir.with_name(log_dir.name + "-keys")


def load_public_key(path: Path) -> Ed25519PublicKey:
    """An Ed25519 public key from a PEM file, or AuditError naming the file."""
    path = Path(path)
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except FileNotFoundError:
        raise AuditError(
            f"public key {path} not found: pass the log's signing.pub (its key directory)"
        ) from None
    except (OSError, ValueError) as exc:
        raise AuditError(
            f"public key {path} cannot be read ({type(exc).__name__}): "
            "pass the PEM file signing.pub from the log's key directory"
        ) from None
    if not isinstance(key, Ed25519PublicKey):
        raise AuditError(
            f"public key {path} is not an Ed25519 key: pass the audit log's signing.pub"
        )
    return key


def signature_ok(public_key: Ed25519PublicKey, sig_hex: object, message: bytes) -> bool:
    if not isinstance(sig_hex, str):
        return False
    try:
        public_key.verify(bytes.fromhex(sig_hex), message)
    except (ValueError, InvalidSignature):
        return False
    return True


def parse_line(raw: bytes) -> tuple[Optional[dict], str]:
    """(record, fault): fault is "" for a complete line holding a JSON object whose hash
    recomputes. An incomplete line, bad JSON or a wrong hash is all a crash mid-write can
    leave; record is the parsed object whenever the line is one, even with a wrong hash."""
    if not raw.endswith(b"\n"):
        return None, f"incomplete line ({len(raw)} bytes, no newline)"
    try:
        record = json.loads(raw)
    except ValueError:  # UnicodeDecodeError and JSONDecodeError are both ValueErrors
        return None, "not valid JSON"
    if not isinstance(record, dict):
        return None, "not a JSON object"
    try:
        good = isinstance(record.get("hash"), str) and record_hash(record) == record["hash"]
    except (
        ValueError,
        TypeError,
    ):  # e.g. a lone surrogate ("\ud800") cannot be re-encoded: tampered
        good = False
    return (record, "") if good else (record, HASH_FAULT)


def lines_backwards(data: bytes) -> Iterator[bytes]:
    """The lines of `data`, last first (the last may lack its newline)."""
    end = len(data)
    while end > 0:
        start = data.rfind(b"\n", 0, end - 1) + 1
        yield data[start:end]
        end = start


def last_whole_record(data: bytes) -> tuple[int, Optional[dict], str]:
    """(end of the last whole record, that record, why the bytes after it are not one)."""
    end, fault = len(data), ""
    for line in lines_backwards(data):
        record, why = parse_line(line)
        if not why and isinstance(record.get("seq"), int):
            return end, record, fault
        end, fault = end - len(line), why or "no seq"
    return 0, None, fault


def clean_fields(record: dict) -> dict:
    """A copy of the caller's fields, checked so the record hashes the same when read back.
    Messages name the field, never its value."""
    if not isinstance(record, dict):
        raise TypeError(f"an audit record is a dict of fields, not a {type(record).__name__}")
    reserved = [k for k in RESERVED_FIELDS if k in record]
    if reserved:
        raise ValueError(
            f"record fields {', '.join(reserved)} are set by the audit log; leave them out"
        )
    if record.get("type") not in CALLER_TYPES:
        raise ValueError(
            "record type must be 'request', 'admin' or 'shadow' (the log writes checkpoint, open and "
            "recovered records itself)"
        )
    out = {}
    for key, value in record.items():
        if not isinstance(key, str):
            raise TypeError(f"record field names must be str, not {type(key).__name__}")
        out[key] = _copy(value, key)
    try:
        canonical(out)
    except UnicodeEncodeError:
        raise ValueError(
            "a record field name or string is not valid Unicode (a lone surrogate)"
        ) from None
    return out


def _copy(value, name: str):
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(
                f"record field {name!r} holds a non-finite number; JSON cannot carry it"
            )
        return value
    if isinstance(value, (list, tuple)):
        return [_copy(v, name) for v in value]
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise TypeError(f"record field {name!r} holds a dict with a non-str key")
        return {k: _copy(v, name) for k, v in value.items()}
    raise TypeError(
        f"record field {name!r} holds a {type(value).__name__}; audit fields are str, int, float, "
        "bool, None, lists and dicts"
    )


def read_head(directory: Path) -> Optional[dict]:
    """The HEAD document, None when there is none, AuditError when it is unreadable."""
    path = Path(directory) / HEAD_NAME
    try:
        doc = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise AuditError(
            f"{path} cannot be read ({type(exc).__name__}): it was altered or damaged"
        ) from None
    if not (
        isinstance(doc, dict)
        and isinstance(doc.get("seq"), int)
        and isinstance(doc.get("hash"), str)
    ):
        raise AuditError(f"{path} lacks seq or hash: it was altered or damaged")
    return doc


@dataclass(frozen=True)
class Problem:
    """The first place the chain fails: the record that should be there and where it is (or would be)."""

    seq_expected: int
    file: str
    line: int
    reason: str


@dataclass
class VerifyReport:
    ok: bool
    records: int = 0
    files: list[str] = field(default_factory=list)
    checkpoints: int = 0
    first_bad: Optional[Problem] = None
    warnings: list[str] = field(default_factory=list)
    head_seq: Optional[int] = None
    witness_seq: Optional[int] = None  # the newest record a witness's signed HEAD names


class _Walk:
    """Walks the records in order, keeping what the next record must link to."""

    def __init__(
        self,
        public_key: Ed25519PublicKey,
        head: Optional[dict],
        progress,
        anchors: Optional[dict[int, list[tuple[str, str]]]] = None,
    ):
        self.anchors = anchors or {}  # seq -> [(hash, witness name)]: witnesses' signed HEADs
        self.key = public_key
        self.key_fp = fingerprint(public_key)
        self.head = head
        self.progress = progress
        self.expected = 1
        self.prev = ZERO_HASH
        self.last_checkpoint = 0
        self.report = VerifyReport(ok=True)

    def fail(self, file: str, line: int, reason: str, seq: Optional[int] = None) -> None:
        self.report.ok = False
        self.report.first_bad = Problem(self.expected if seq is None else seq, file, line, reason)

    def file(self, path: Path, last: bool, missing_before: list[str]) -> bool:
        """Check one file; False once a problem is found."""
        offset = 0
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                record, fault = parse_line(raw)
                if fault and last and self._torn_tail(path, lineno, offset, fault):
                    return True
                if record is None:
                    self.fail(path.name, lineno, self._fault_reason(fault))
                    return False
                if not self.record(
                    record, fault, path.name, lineno, missing_before if lineno == 1 else []
                ):
                    return False
                offset += len(raw)
        return True

    def _fault_reason(self, fault: str) -> str:
        head_seq = self.head["seq"] if self.head else 0
        if fault.startswith("incomplete") and head_seq >= self.expected:
            return (
                f"record {self.expected} is cut short ({fault}): the file was truncated; the signed HEAD "
                f"says records up to {head_seq} were written"
            )
        return f"line is {fault}: the file was altered or cut"

    def _torn_tail(self, path: Path, lineno: int, offset: int, fault: str) -> bool:
        """True (and a warning) when this line and all after it are what a crash mid-write leaves,
        and all of it lies past the last record HEAD acknowledged."""
        if self.head is None or self.expected <= self.head["seq"]:
            return False
        with open(path, "rb") as f:
            f.seek(offset)
            if not all(parse_line(raw)[1] for raw in f):
                return False
        size = path.stat().st_size
        self.report.warnings.append(
            f"{path.name}: the last {size - offset} bytes (from line {lineno}, offset {offset}) are not a "
            f"complete record ({fault}): a write torn by a crash. HEAD ends at record {self.head['seq']}, "
            "so these bytes were never acknowledged; opening the log truncates them"
        )
        return True

    def record(self, rec: dict, fault: str, name: str, line: int, missing_files: list[str]) -> bool:
        """Checks in order: seq, prev, hash, type, checkpoint signature, HEAD's hash."""
        seq = rec.get("seq")
        if not isinstance(seq, int) or isinstance(seq, bool):
            self.fail(name, line, "record has no integer seq: it was altered")
            return False
        if seq != self.expected:
            self.fail(name, line, self._seq_reason(seq, rec.get("prev"), missing_files))
            return False
        if rec.get("prev") != self.prev:
            self.fail(
                name,
                line,
                f"prev does not match the hash of record {seq - 1}: record {seq - 1} "
                "or this record was altered, or a record was removed or inserted here",
            )
            return False
        if fault:
            self.fail(name, line, fault)
            return False
        kind = rec.get("type")
        if kind not in RECORD_TYPES:
            self.fail(
                name,
                line,
                "type is not one of " + ", ".join(RECORD_TYPES) + ": the record was altered",
            )
            return False
        if kind == "checkpoint" and not self._checkpoint(rec, name, line):
            return False
        if self.head is not None and seq == self.head["seq"] and rec["hash"] != self.head["hash"]:
            self.fail(
                name,
                line,
                f"record {seq} differs from the one the signed HEAD names: a record at or "
                f"before it was altered and the chain rehashed (after checkpoint "
                f"{self.last_checkpoint or 'none'})",
            )
            return False
        for want, who in self.anchors.get(seq, ()):
            if rec["hash"] != want:
                self.fail(
                    name,
                    line,
                    f"record {seq} differs from the one witness {who}'s signed HEAD names: the "
                    "chain was cut back to before it and rewritten from there",
                )
                return False
        self.prev = rec["hash"]
        self.expected += 1
        self.report.records += 1
        if self.progress and self.report.records % PROGRESS_EVERY == 0:
            self.progress(self.report.records)
        return True

    def _seq_reason(self, seq: int, prev: object, missing_files: list[str]) -> str:
        e = self.expected
        head = f"expected record {e}, found {seq}"
        if missing_files:
            return f"{head}: {', '.join(missing_files)} missing (records {e}-{seq - 1})"
        if prev == self.prev:
            return f"{head}: the seq field was altered (the record links to record {e - 1})"
        if seq == e + 1:
            return f"{head}: record {e} was deleted or moved"
        if seq > e:
            return f"{head}: records {e}-{seq - 1} were deleted or moved"
        return (
            f"{head}: record {seq} appears again or out of order (records reordered or duplicated)"
        )

    def _checkpoint(self, rec: dict, name: str, line: int) -> bool:
        seq = rec["seq"]
        covers = [self.last_checkpoint + 1, seq - 1]
        if rec.get("head") != rec["prev"]:
            self.fail(
                name, line, "checkpoint head differs from its prev: the checkpoint was altered"
            )
        elif rec.get("covers") != covers:
            self.fail(
                name,
                line,
                f"checkpoint covers {rec.get('covers')} but the records since the previous "
                f"checkpoint are {covers[0]}-{covers[1]}: the checkpoint was altered",
            )
        elif rec.get("key") != self.key_fp:
            self.fail(
                name,
                line,
                f"checkpoint was signed by key {rec.get('key')}, not by the given public key "
                f"{self.key_fp}: pass the key the log was written with",
            )
        elif not signature_ok(self.key, rec.get("sig"), checkpoint_message(seq, rec["prev"])):
            self.fail(
                name,
                line,
                f"checkpoint signature does not verify: a record after checkpoint "
                f"{self.last_checkpoint or '(none)'} and before record {seq} was altered "
                "and the chain rehashed",
            )
        else:
            self.last_checkpoint = seq
            self.report.checkpoints += 1
            return True
        return False


def _count_lines(path: Path) -> int:
    with open(path, "rb") as f:
        return sum(1 for _ in f)


def _missing_between(before: Optional[int], number: int) -> list[str]:
    start = 1 if before is None else before + 1
    return [file_name(n) for n in range(start, number)]


def witness_anchors(
    key: Ed25519PublicKey, witnesses, warnings: list[str]
) -> dict[int, list[tuple[str, str]]]:
    """seq -> [(hash, witness name)] for each witness HEAD (`(name, {seq, hash, sig, key})`)
    signed by `key`; the others are named in `warnings` and not used."""
    anchors: dict[int, list[tuple[str, str]]] = {}
    fp = fingerprint(key)
    for name, doc in witnesses:
        if not (
            isinstance(doc, dict)
            and isinstance(doc.get("seq"), int)
            and isinstance(doc.get("hash"), str)
        ):
            warnings.append(f"witness {name}: not a HEAD (seq and hash); not used")
        elif doc.get("key") != fp:
            warnings.append(
                f"witness {name}: its HEAD was signed by key {doc.get('key')}, not {fp}; not used"
            )
        elif not signature_ok(key, doc.get("sig"), head_message(doc["seq"], doc["hash"])):
            warnings.append(
                f"witness {name}: its HEAD (record {doc['seq']}) has a signature that does not "
                "verify; not used"
            )
        else:
            anchors.setdefault(doc["seq"], []).append((doc["hash"], name))
    return anchors


def verify(
    directory: Path,
    public_key: Optional[Path] = None,
    *,
    progress: Optional[Callable[[int], None]] = None,
    witnesses=(),
    min_seq: int = 0,
) -> VerifyReport:
    """Check every record, checkpoint and the HEAD of the chain in `directory`.

    `public_key` defaults to `DIRECTORY-keys/signing.pub` (keys.default_key_dir); pass a copy you trust (the key
    directory given to `AuditKeys.load_or_create`), since whoever can write the log may also
    replace a key kept beside it. Raises AuditError when there is nothing to check (no
    directory, no key); tampering is reported in the VerifyReport, not raised.
    `progress(records)` is called every 100,000 records. Safe while the log is being written:
    HEAD is read first and only ever names records already on disk.
    `witnesses`: `(name, HEAD document)` pairs kept off this host (nodes, saved copies): the
    chain must hold each record they name, unchanged. `min_seq`: the chain must reach this
    record (the operator's own note of how far it went). Both catch a cut tail with an
    old HEAD put back, which the HEAD file alone cannot.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise AuditError(f"{directory} is not a directory: pass the audit log's directory")
    key = load_public_key(
        public_key if public_key is not None else default_key_dir(directory) / "signing.pub"
    )
    try:
        head, head_error = read_head(directory), ""
    except AuditError as exc:  # an unreadable HEAD is a finding, not a usage error
        head, head_error = None, str(exc)
    files = list_files(directory)
    warnings: list[str] = []
    anchors = witness_anchors(key, witnesses, warnings)
    walk = _Walk(key, head, progress, anchors)
    report = walk.report
    report.warnings.extend(warnings)
    report.witness_seq = max(anchors) if anchors else None
    report.files = [p.name for _, p in files]
    report.head_seq = head["seq"] if head else None
    if not files:
        walk.fail(HEAD_NAME, 0, f"no audit-*.jsonl files in {directory}")
        return report
    before = None
    for i, (number, path) in enumerate(files):
        if not walk.file(path, i == len(files) - 1, _missing_between(before, number)):
            return report
        before = number
    last_name = files[-1][1].name
    if head_error:
        walk.fail(HEAD_NAME, 0, head_error)
    elif head is None:
        walk.fail(
            HEAD_NAME,
            0,
            f"HEAD is missing: the end of the chain (record {walk.expected - 1}) is not "
            "signed, so a cut tail cannot be ruled out",
        )
    elif head.get("key") != walk.key_fp:
        walk.fail(
            HEAD_NAME,
            0,
            f"HEAD was signed by key {head.get('key')}, not by the given public key "
            f"{walk.key_fp}: pass the key the log was written with",
        )
    elif not signature_ok(key, head.get("sig"), head_message(head["seq"], head["hash"])):
        walk.fail(
            HEAD_NAME,
            0,
            f"HEAD signature does not verify: HEAD (record {head['seq']}) was altered",
            seq=head["seq"],
        )
    elif head["seq"] > walk.expected - 1:
        gone = (
            ""
            if any(p.name == head.get("file") for _, p in files)
            else f"; {head.get('file')} is missing"
        )
        walk.fail(
            last_name,
            _count_lines(files[-1][1]) + 1,
            f"the chain ends at record {walk.expected - 1} but the signed HEAD says record {head['seq']} "
            f"was written and acknowledged: records {walk.expected}-{head['seq']} are missing "
            f"(truncated or deleted{gone})",
        )
    elif head["seq"] < walk.expected - 1:
        report.warnings.append(
            f"records {head['seq'] + 1}-{walk.expected - 1} follow the signed HEAD (record {head['seq']}): written, "
            "but the writer stopped before acknowledging them, so their removal could not be detected"
        )
    if report.ok:
        _check_reach(walk, files[-1][1], min_seq)
    return report


def _check_reach(walk: _Walk, last_file: Path, min_seq: int) -> None:
    """The chain must reach the newest record a witness names, and `min_seq`."""
    last = walk.expected - 1
    reach = [
        (
            seq,
            f"witness {', '.join(who for _, who in walk.anchors[seq])} holds a signed HEAD for it",
        )
        for seq in walk.anchors
    ] + ([(min_seq, f"--min-seq is {min_seq}")] if min_seq else [])
    seq, why = max(reach, default=(0, ""))
    if seq > last:
        walk.fail(
            last_file.name,
            _count_lines(last_file) + 1,
            f"the chain ends at record {last} but {why}: records {last + 1}-{seq} were cut from the chain "
            "(an older HEAD was put back, so the HEAD file alone cannot show it)",
            seq=last + 1,
        )
