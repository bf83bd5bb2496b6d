"""The node's staging area: new weights land here while the node keeps serving.

`ROOT/<digest hex>/` is a staged model (its files plus `staged.json`); pushed data still
arriving lives in `ROOT/.incoming-<digest hex>/` and is renamed into place only once its
digest matches: a mismatch is an error and the data is deleted, never swapped in.
Incoming directories survive an agent restart, which is what makes a push resumable.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import threading
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Optional

from cluster.api import node_pb2
from cluster.digest import DIGEST_FORMAT, compute_digest, digest_files, model_files, remember

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")
META, MANIFEST = "staged.json", ".manifest.json"
MAX_FAILED = 16  # failed stagings GetStatus keeps showing (in memory only)
_HEX = "[0-9a-f]" * 64
_CHUNK = 8 << 20
RECEIVING, VERIFYING, STAGED, FAILED = (
    node_pb2.STAGE_STATE_RECEIVING,
    node_pb2.STAGE_STATE_VERIFYING,
    node_pb2.STAGE_STATE_STAGED,
    node_pb2.STAGE_STATE_FAILED,
)


class StagingError(Exception):
    """Weights that cannot be staged; the message names the file or digest and what to do."""


class StagingFull(StagingError):
    """Weights refused for room: the node's staging quota or its disk (RESOURCE_EXHAUSTED)."""


@dataclass
class StagedInfo:
    digest: str
    model_id: str
    version: str
    state: int
    bytes_done: int = 0
    bytes_total: int = 0
    message: str = ""
    path: str = ""

    def to_proto(self) -> node_pb2.StagedModel:
        fields = asdict(self)
        return node_pb2.StagedModel(weights_digest=fields.pop("digest"), **fields)


class StagingArea:
    """Thread-safe: copies and pushes run in worker threads while GetStatus calls `list` on the loop."""

    def __init__(self, root: Path, max_bytes: int = 1 << 40, reserve_bytes: int = 0):
        """`max_bytes`: staged and incoming weights together; `reserve_bytes`: disk space a
        staging must leave free (logs, the audit of other daemons, the OS)."""
        self.root, self._max, self._reserve = root, max_bytes, reserve_bytes
        self._lock = threading.Lock()  # guards _live
        self._write = threading.Lock()  # one chunk appended (or one push reset) at a time
        self._live: dict[str, StagedInfo] = {}  # receiving, verifying or failed
        for stale in root.glob(".copy-*"):  # a path copy cut by a restart: not resumable
            shutil.rmtree(stale, ignore_errors=True)
        for p in root.glob(".incoming-" + _HEX):  # a push cut by a restart: shown until resumed
            if (m := _json(p / MANIFEST)) is not None:
                self._track(
                    f"sha256:{p.name[10:]}",
                    m,
                    sum(min(_size(p / n), s) for n, s in m["files"]),
                    "paused by an agent restart; a BeginPush with the same manifest resumes it",
                )

    def path_for(self, digest: str, prefix: str = "") -> Path:
        """Where `digest` is staged (with prefix ".incoming-": where its push arrives)."""
        if not DIGEST_FORMAT.fullmatch(digest):
            raise StagingError(
                f"digest {digest[:80]!r} is not sha256: followed by 64 lowercase hex digits"
            )
        return self.root / f"{prefix}{digest[7:]}"

    def get(self, digest: str) -> Optional[StagedInfo]:
        """The staged model, or the staging under way or failed; None if unknown or malformed."""
        with self._lock:
            live = replace(self._live[digest]) if digest in self._live else None
        return live or (_read(self.root / digest[7:]) if DIGEST_FORMAT.fullmatch(digest) else None)

    def list(self) -> list[StagedInfo]:
        """Staged models, then the stagings under way or failed (with their progress)."""
        staged = [i for p in sorted(self.root.glob(_HEX)) if (i := _read(p)) is not None]
        with self._lock:
            live = [replace(i) for i in self._live.values()]
        return staged + [i for i in live if i.digest not in {s.digest for s in staged}]

    def stage_from_path(
        self,
        source: Path,
        *,
        model_id: str,
        version: str,
        expected_digest: str,
        progress: Optional[Callable[[int, int], None]] = None,
    ) -> StagedInfo:
        """Copy `source`'s model files, hashing them on the way (one read of each byte)."""
        if expected_digest and (done := _read(self.path_for(expected_digest))) is not None:
            return done  # already staged: nothing to copy
        if not source.is_dir() or not digest_files(source):
            raise StagingError(
                f"{source} is not a model directory (no config.json or *.safetensors) on this host"
            )
        files, hashed = model_files(source), set(digest_files(source))
        meta = {
            "model_id": model_id,
            "version": version,
            "files": [[p.name, p.stat().st_size] for p in files],
        }
        self._check_room(expected_digest, sum(s for _n, s in meta["files"]), held=0)
        info = self._track(key := expected_digest or f"path:{source}", meta)
        tmp, h = self.root / f".copy-{os.getpid()}-{threading.get_ident()}", hashlib.sha256()
        try:
            tmp.mkdir(parents=True)  # unique to this thread; a leftover one was deleted at start
            for p in files:
                with open(p, "rb") as src, open(tmp / p.name, "wb") as dst:
                    if p in hashed:
                        h.update(f"{p.name}\0{os.fstat(src.fileno()).st_size}\0".encode())
                    while chunk := src.read(_CHUNK):
                        if p in hashed:
                            h.update(chunk)
                        dst.write(chunk)
                        info.bytes_done += len(chunk)
                        if progress:
                            progress(info.bytes_done, info.bytes_total)
            if expected_digest and (digest := f"sha256:{h.hexdigest()}") != expected_digest:
                raise StagingError(
                    f"{source} hashes to {digest}, not the expected {expected_digest}; "
                    "nothing was staged (check the path and the digest)"
                )
            return self._finalize(tmp, f"sha256:{h.hexdigest()}", meta, key)
        except BaseException as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            self._update(key, FAILED, message=str(exc) or type(exc).__name__)
            raise

    def begin_push(self, manifest: node_pb2.WeightsManifest) -> node_pb2.PushOffsets:
        """Check the manifest; say how much of each file is already here (resume)."""
        digest, names = manifest.expected_digest, [f.name for f in manifest.files]
        incoming = self.path_for(digest, ".incoming-")
        bad = next((n for n in names if not NAME.fullmatch(n) or n == META), None)
        if bad is not None or not names or len(set(names)) != len(names):
            raise StagingError(
                f"file names must be plain, unique names (no '/', no leading '.'): {bad!r}"
            )
        if "config.json" not in names:
            raise StagingError("the manifest has no config.json; it is not a model")
        if _read(self.path_for(digest)) is not None:
            return node_pb2.PushOffsets(complete=True)
        held = sum(min(_size(incoming / f.name), f.size) for f in manifest.files)
        self._check_room(digest, sum(f.size for f in manifest.files), held)
        meta = {
            "model_id": manifest.model_id,
            "version": manifest.version,
            "files": [[f.name, f.size] for f in manifest.files],
        }
        with self._write:
            if _json(incoming / MANIFEST) not in (None, meta):
                shutil.rmtree(incoming)  # the same digest announced with other files: start over
            incoming.mkdir(parents=True, exist_ok=True)
            (incoming / MANIFEST).write_text(json.dumps(meta))
            for f in (
                manifest.files
            ):  # create each file (a 0-byte one gets no chunk); never past its size
                with open(incoming / f.name, "ab") as out:
                    out.truncate(min(out.tell(), f.size))
            held = [
                node_pb2.WeightsFile(name=f.name, size=_size(incoming / f.name))
                for f in manifest.files
            ]
        self._track(digest, meta, sum(f.size for f in held))
        return node_pb2.PushOffsets(held=held)

    def write_chunk(self, digest: str, chunk: node_pb2.WeightsChunk) -> None:
        """Append `chunk` to its file; its offset must be what the node holds of that file."""
        with self._write:
            incoming, meta = self._pushing(digest)
            sizes = dict(meta["files"])
            if chunk.file not in sizes:
                raise StagingError(f"{chunk.file!r} is not in the manifest of {digest[:19]}")
            if chunk.offset != (held := _size(incoming / chunk.file)):
                raise StagingError(
                    f"{chunk.file} chunk at offset {chunk.offset}, but the node holds {held} bytes "
                    "of it; call BeginPush again to resume from there"
                )
            if held + len(chunk.data) > sizes[chunk.file]:
                raise StagingError(
                    f"{chunk.file} would exceed its declared {sizes[chunk.file]} bytes"
                )
            with open(incoming / chunk.file, "ab") as f:
                f.write(chunk.data)
        self._update(digest, add_bytes=len(chunk.data))

    def finish_push(self, digest: str) -> StagedInfo:
        """Every byte arrived: stage it if it hashes to `digest`; else delete it and raise."""
        if (done := _read(self.path_for(digest))) is not None:
            return done
        incoming, meta = self._pushing(digest)
        for n, size in meta["files"]:
            if (have := _size(incoming / n)) != size:
                raise StagingError(
                    f"{n} has {have} of {size} bytes; call BeginPush to resume the push"
                )
        self._update(digest, state=VERIFYING)
        if (actual := compute_digest(incoming, digest_files(incoming))) != digest:
            shutil.rmtree(incoming, ignore_errors=True)
            err = StagingError(
                f"the pushed files hash to {actual}, not the expected {digest}; they were deleted, "
                "nothing was staged"
            )
            self._update(digest, FAILED, message=str(err))
            raise err
        return self._finalize(incoming, digest, meta, digest)

    def remove(self, digest: str) -> None:
        """Forget `digest`: its staged copy, its partial push and any failure shown."""
        with self._lock:
            self._live.pop(digest, None)
        for p in (self.path_for(digest), self.path_for(digest, ".incoming-")):
            shutil.rmtree(p, ignore_errors=True)

    def prune(self, keep: set[str]) -> list[str]:
        """Delete staged models whose digest is not in `keep` (the active and previous ones)."""
        removed = [p.name for p in self.root.glob(_HEX) if f"sha256:{p.name}" not in keep]
        for name in removed:
            shutil.rmtree(self.root / name, ignore_errors=True)
        return removed

    def used_bytes(self, *, besides: str = "") -> int:
        """Bytes the staging area holds or has promised: staged models and the declared size
        of every push under way, except `besides` (the digest being checked)."""
        staged = [
            i for p in self.root.glob(_HEX) if (i := _read(p)) is not None and i.digest != besides
        ]
        incoming = [
            m
            for p in self.root.glob(".incoming-" + _HEX)
            if f"sha256:{p.name[10:]}" != besides and (m := _json(p / MANIFEST)) is not None
        ]
        return sum(i.bytes_total for i in staged) + sum(s for m in incoming for _n, s in m["files"])

    def _check_room(self, digest: str, total: int, held: int) -> None:
        """Refuse (StagingFull) weights of `total` bytes, `held` of them already here, that
        would take the area past its quota or leave the disk with less than the reserve."""
        if (used := self.used_bytes(besides=digest)) + total > self._max:
            raise StagingFull(
                f"staging {total} bytes would hold {used + total} of this node's {self._max}-byte "
                "staging quota; activate or remove staged models (a rollout prunes all but the "
                "active and previous ones) or raise --max-staged-gb"
            )
        free = shutil.disk_usage(_existing(self.root)).free
        if total - held > free - self._reserve:
            raise StagingFull(
                f"staging needs {total - held} more bytes and the disk holding {self.root} has "
                f"{free} free, {self._reserve} of them kept in reserve; free disk space first"
            )

    def _pushing(self, digest: str) -> tuple[Path, dict]:
        incoming = self.path_for(digest, ".incoming-")
        if (meta := _json(incoming / MANIFEST)) is None:
            raise StagingError(f"no push of {digest[:19]} is under way; call BeginPush first")
        return incoming, meta

    def _finalize(self, tmp: Path, digest: str, meta: dict, key: str) -> StagedInfo:
        (tmp / MANIFEST).unlink(missing_ok=True)
        for p in tmp.iterdir():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
        (tmp / META).write_text(
            json.dumps(
                {
                    "model_id": meta["model_id"],
                    "version": meta["version"],
                    "digest": digest,
                    "bytes": sum(s for _n, s in meta["files"]),
                }
            )
        )
        final = self.path_for(digest)
        try:
            tmp.rename(final)  # atomic: a model is staged whole or not at all
        except OSError:
            if _read(final) is None:
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # staged meanwhile by another operation
        with self._lock:
            self._live = {k: i for k, i in self._live.items() if k not in (key, digest)}
        remember(final, digest)  # loading it will not hash it again
        return _read(final)

    def _track(self, key: str, meta: dict, done: int = 0, message: str = "") -> StagedInfo:
        info = StagedInfo(
            key,
            meta["model_id"],
            meta["version"],
            RECEIVING,
            done,
            sum(s for _n, s in meta["files"]),
            message,
        )
        with self._lock:
            self._live[key] = info
        return info

    def _update(self, key: str, state: int = 0, add_bytes: int = 0, message: str = "") -> None:
        with self._lock:
            if (info := self._live.get(key)) is not None:
                info.state, info.bytes_done, info.message = (
                    state or info.state,
                    info.bytes_done + add_bytes,
                    message,
                )
            for k in [k for k, i in self._live.items() if i.state == FAILED][:-MAX_FAILED]:
                del self._live[k]  # keep the latest failures only


def _json(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _read(path: Path) -> Optional[StagedInfo]:
    m = _json(path / META)
    return (
        None
        if m is None
        else StagedInfo(
            m["digest"],
            m["model_id"],
            m["version"],
            STAGED,
            m["bytes"],
            m["bytes"],
            "staged",
            str(path),
        )
    )


def _existing(path: Path) -> Path:
    """`path`, or its nearest ancestor that exists (the disk the staging area will be on)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else 0
