"""`AuditLog`: appends records to the hash chain from one writer thread, with group commit.

Each batch (all that was queued while the previous one was being written) is appended,
fsynced once, and then HEAD is replaced and signed (and fsynced at checkpoints); only then are the batch's futures
resolved. So an acknowledged record survives a SIGKILL or a power cut, and hundreds of
concurrent writers share one fsync. Record contents are never logged.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import threading
import time
import traceback
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Callable, Optional

from cluster.audit.chain import (
    HEAD_NAME,
    ZERO_HASH,
    AuditError,
    AuditWriteError,
    canonical,
    checkpoint_message,
    clean_fields,
    encode_record,
    file_name,
    head_message,
    last_whole_record,
    lines_backwards,
    list_files,
    parse_line,
    read_head,
    signature_ok,
)
from cluster.audit.keys import AuditKeys, make_private_dir
from cluster.audit.records import CheckpointRecord, OpenRecord, RecoveredRecord

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
_FULLFSYNC = getattr(
    fcntl, "F_FULLFSYNC", None
)  # macOS: plain fsync does not flush the drive's cache


@dataclass
class AuditStats:
    """Counters the writer thread updates; read them from any thread."""

    records_written: int = 0
    batches: int = 0
    write_errors: int = 0
    last_error: str = ""
    failing: str = ""  # why the last batch failed (no paths); "" while writes succeed


@dataclass
class _Item:
    fields: dict
    future: Future


@dataclass(frozen=True)
class _Tip:
    """Where the chain stands; a failed append goes back to it."""

    seq: int
    hash: str
    file: str
    since_checkpoint: int
    checkpoint_from: int
    checkpoint_at: float


class AuditLog:
    """The writer of one audit directory (one process at a time: `LOCK` is held while open).

    `submit()` is thread-safe; `write()` runs on an event loop; `open()` and `close()` block.
    """

    def __init__(
        self,
        directory: Path,
        *,
        keys: AuditKeys,
        source: str,
        checkpoint_every: int = 1000,
        checkpoint_interval_s: float = 60.0,
        max_file_bytes: int = 64 << 20,
        clock: Callable[[], float] = time.time,
    ):
        if checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be >= 1; got {checkpoint_every}")
        if not checkpoint_interval_s > 0:
            raise ValueError(f"checkpoint_interval_s must be > 0; got {checkpoint_interval_s}")
        if max_file_bytes < 4096:
            raise ValueError(f"max_file_bytes must be >= 4096; got {max_file_bytes}")
        self.directory = Path(directory)
        self._keys = keys
        self._source = source
        self._every = checkpoint_every
        self._interval_s = checkpoint_interval_s
        self._max_bytes = max_file_bytes
        self._clock = clock
        self.stats = AuditStats()
        self._cond = threading.Condition()
        self._queue: list[_Item] = []
        self._state = "new"  # new -> open -> closing -> closed
        self._thread: Optional[threading.Thread] = None
        # Owned by the writer thread once open() has started it.
        self._fd: Optional[int] = None
        self._dir_fd: Optional[int] = None
        self._lock_fd: Optional[int] = None
        self._file_no = 1
        self._size = 0
        self._needs_truncate = False
        self._tip = _Tip(0, ZERO_HASH, "", 0, 1, time.monotonic())
        self._head_written = 0
        self._retry_at = 0.0
        self._failing = False
        self._reserve = len(
            encode_record(
                self._checkpoint_fields(10**18, ZERO_HASH, [10**18, 10**18]), 10**18, ZERO_HASH
            )[1]
        )

    # -- public surface ---------------------------------------------------------------------

    @property
    def keys(self) -> AuditKeys:
        return self._keys

    @property
    def failing(self) -> str:
        """Why the last write failed ("" while writes succeed); the writer retries on its own."""
        return self.stats.failing

    def digest(self, data: bytes | str) -> str:
        """A keyed digest of a sensitive value (see AuditKeys.digest)."""
        return self._keys.digest(data)

    def open(self, timeout_s: float = 60.0) -> None:
        """Recover the tail after a crash, write an `open` record and start the writer thread."""
        with self._cond:
            if self._state != "new":
                raise AuditError(
                    f"audit log {self.directory} was already opened; create a new AuditLog"
                )
            self._state = "opening"
        try:
            make_private_dir(self.directory)
            mode = self.directory.stat().st_mode & 0o777
            if mode & 0o077:
                logger.warning(
                    "audit: %s is open to group or others (mode %04o): chmod 700 it",
                    self.directory,
                    mode,
                )
            self._lock_fd = _lock(self.directory)
            self._dir_fd = os.open(self.directory, os.O_RDONLY)
            recovered = self._recover()
        except BaseException as exc:
            self._release()
            with self._cond:
                self._state = "closed"
            if isinstance(exc, OSError):
                raise AuditError(
                    f"cannot open the audit log in {self.directory}: [Errno {exc.errno}] "
                    f"{exc.strerror} ({exc.filename}); fix its permissions or free space"
                ) from None
            raise
        self._thread = threading.Thread(target=self._run, name="audit-writer", daemon=True)
        with self._cond:
            self._state = "open"
        self._thread.start()
        try:
            first = [self._enqueue(recovered.to_dict())] if recovered else []
            first.append(
                self._enqueue(
                    OpenRecord(
                        self._now(),
                        self._source,
                        os.getpid(),
                        self._keys.fingerprint,
                        FORMAT_VERSION,
                    ).to_dict()
                )
            )
            for future in first:
                future.result(timeout=timeout_s)
        except BaseException:
            self.close(timeout_s)
            raise

    def submit(self, record: dict) -> Future:
        """Queue a record; the future resolves to the record as written once it is durable,
        or fails with AuditWriteError. Raises at once if the record is malformed or the log closed."""
        fields = clean_fields(record)
        fields["time"] = self._now()
        return self._enqueue(fields)

    async def write(self, record: dict) -> dict:
        """The record as written (with seq and hash), once durable. If the caller is cancelled
        while waiting, the record is still written: an audit trail must not depend on it."""
        inner = asyncio.wrap_future(self.submit(record))
        inner.add_done_callback(
            lambda f: f.cancelled() or f.exception()
        )  # retrieved even if we are cancelled
        return await asyncio.shield(inner)

    def close(self, timeout_s: float = 60.0) -> None:
        """Write everything queued and a final checkpoint, then stop the writer. Idempotent."""
        with self._cond:
            if self._state in ("new", "closed"):
                self._state = "closed"
                return
            self._state = "closing"
            self._cond.notify()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout_s)
            if thread.is_alive():
                raise AuditError(
                    f"the audit writer for {self.directory} did not finish within {timeout_s:g} s "
                    "(storage stalled?): records still queued are not durable"
                )
        with self._cond:
            self._state = "closed"

    def __enter__(self) -> "AuditLog":
        self.open()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- queue -------------------------------------------------------------------------------

    def _now(self) -> str:
        return datetime.fromtimestamp(self._clock(), UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")

    def _enqueue(self, fields: dict) -> Future:
        future: Future = Future()
        with self._cond:
            if self._state != "open":
                raise AuditError(
                    f"audit log {self.directory} is {self._state}: open() it before writing, "
                    "and write nothing after close()"
                )
            self._queue.append(_Item(fields, future))
            self._cond.notify()
        return future

    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    while not self._queue and self._state == "open":
                        wait = self._checkpoint_wait()
                        if wait is not None and wait <= 0:
                            break
                        self._cond.wait(wait)
                    items, self._queue = self._queue, []
                    final = self._state != "open"
                self._batch(items, final)
                if final:
                    return
        finally:
            self._release()

    def _checkpoint_wait(self) -> Optional[float]:
        if self._failing:  # retry with a checkpoint after a pause, so recovery needs no caller
            return self._retry_at - time.monotonic()
        if not self._tip.since_checkpoint:
            return None
        return max(self._tip.checkpoint_at + self._interval_s, self._retry_at) - time.monotonic()

    # -- one batch: append, fsync once, HEAD, then acknowledge ---------------------------------

    def _batch(self, items: list[_Item], final: bool) -> None:
        items = [it for it in items if it.future.set_running_or_notify_cancel()]
        start, size, file_no = self._tip, self._size, self._file_no
        try:
            done, error = self._append(items, final)
            if self._tip.seq != self._head_written:
                try:
                    self._write_head(durable=final or self._tip.since_checkpoint == 0)
                except AuditWriteError as exc:
                    # A record HEAD does not cover is not acknowledged: fail the batch and cut
                    # its records off again, so none is left that `verify` would call
                    # unacknowledged (and that could be deleted undetected).
                    done, error = [], exc
                    self._cut_back(start, size, file_no)
        except Exception as exc:  # a bug: fail this batch, keep the writer alive for the next
            logger.error(
                "audit writer: unexpected %s in a batch of %d records\n%s",
                type(exc).__name__,
                len(items),
                "".join(traceback.format_tb(exc.__traceback__)),
            )
            done, error = (
                [],
                AuditWriteError(f"audit writer for {self.directory} failed ({type(exc).__name__})"),
            )
            self._failing = True
            self.stats.failing = f"unexpected {type(exc).__name__} in the writer"
        if error is not None:
            self._retry_at = (
                time.monotonic() + 1.0
            )  # an idle checkpoint retries after a pause, not in a spin
        elif self._failing:
            logger.warning(
                "audit: writes to %s succeed again (%d errors so far)",
                self.directory,
                self.stats.write_errors,
            )
            self._failing = False
            self.stats.failing = ""
        for item, record in done:
            item.future.set_result(record)
        for item in items[len(done) :]:
            item.future.set_exception(error)

    def _append(self, items: list[_Item], final: bool) -> tuple[list, Optional[AuditWriteError]]:
        """Append the items (and any checkpoints due) in chunks, one per file; returns the
        written prefix of `items` with their records, and the error that stopped it."""
        done: list[tuple[_Item, dict]] = []
        chunk: list[tuple[_Item, dict]] = []
        buf = bytearray()
        start = self._tip
        try:
            for item in items:
                record, line = encode_record(item.fields, self._tip.seq + 1, self._tip.hash)
                if (
                    self._size + len(buf) > 0
                    and self._size + len(buf) + len(line) + self._reserve > self._max_bytes
                ):
                    if self._tip.since_checkpoint:
                        self._checkpoint(buf)
                    self._flush(buf, start)
                    done += chunk
                    chunk, buf, start = [], bytearray(), self._tip
                    self._rotate()
                    record, line = encode_record(item.fields, self._tip.seq + 1, self._tip.hash)
                self._advance(record, line, buf)
                chunk.append((item, record))
                if self._tip.since_checkpoint >= self._every:
                    self._checkpoint(buf)
            wait = self._checkpoint_wait()
            if (self._tip.since_checkpoint or self._failing) and (
                final or (wait is not None and wait <= 0)
            ):
                self._checkpoint(
                    buf
                )  # while failing, a checkpoint (perhaps covering nothing) probes the disk
            if buf:
                self._flush(buf, start)
        except AuditWriteError as exc:  # _flush went back to `start`
            return done, exc
        except Exception:
            self._tip = start  # nothing after `start` reached the disk
            raise
        return done + chunk, None

    def _advance(self, record: dict, line: bytes, buf: bytearray) -> None:
        buf += line
        t = self._tip
        checkpoint = record["type"] == "checkpoint"
        self._tip = _Tip(
            record["seq"],
            record["hash"],
            file_name(self._file_no),
            0 if checkpoint else t.since_checkpoint + 1,
            record["seq"] + 1 if checkpoint else t.checkpoint_from,
            time.monotonic() if checkpoint else t.checkpoint_at,
        )

    def _checkpoint_fields(self, seq: int, prev: str, covers: list[int]) -> dict:
        return CheckpointRecord(
            self._now(),
            self._source,
            prev,
            covers,
            self._keys.sign(checkpoint_message(seq, prev)),
            self._keys.fingerprint,
        ).to_dict()

    def _checkpoint(self, buf: bytearray) -> None:
        seq, prev = self._tip.seq + 1, self._tip.hash
        fields = self._checkpoint_fields(seq, prev, [self._tip.checkpoint_from, self._tip.seq])
        self._advance(*encode_record(fields, seq, prev), buf)

    def _flush(self, buf: bytearray, start: _Tip) -> None:
        """Append and fsync `buf`; on failure cut the file back and return the chain to `start`."""
        path = self.directory / file_name(self._file_no)
        try:
            if self._fd is None:
                self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL, 0o600)
                os.fsync(self._dir_fd)
            if self._needs_truncate:
                os.ftruncate(self._fd, self._size)
                self._needs_truncate = False
            view = memoryview(buf)
            while view:
                view = view[os.write(self._fd, view) :]
            _fsync(self._fd)
        except OSError as exc:
            self._needs_truncate = self._fd is not None
            self._tip = start
            raise self._error(f"could not append to {path}", exc, "audit file") from None
        self._size += len(buf)
        self.stats.batches += 1
        self.stats.records_written += self._tip.seq - start.seq

    def _cut_back(self, start: _Tip, size: int, file_no: int) -> None:
        """Return the chain to `start` after a failed batch: the file is cut to `size` now or
        before the next append. A batch that rotated keeps its earlier files' records (closed
        and fsynced): they stay beyond HEAD until a later HEAD covers them."""
        self.stats.records_written -= self._tip.seq - start.seq
        if self._file_no != file_no:
            logger.error(
                "audit: records %d-%d were appended across a file rotation and HEAD could not cover "
                "them; they were not acknowledged",
                start.seq + 1,
                self._tip.seq,
            )
            return
        self._tip, self._size = start, size
        try:
            if self._fd is not None:
                os.ftruncate(self._fd, size)
        except OSError:
            self._needs_truncate = True

    def _rotate(self) -> None:
        logger.info(
            "audit: %s reached %d bytes; the chain continues in %s at record %d",
            file_name(self._file_no),
            self._size,
            file_name(self._file_no + 1),
            self._tip.seq + 1,
        )
        fd, self._fd = self._fd, None
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass  # its contents are fsynced; nothing more to lose
        self._file_no += 1
        self._size = 0
        self._needs_truncate = False

    def _write_head(self, durable: bool = True) -> None:
        """Replace HEAD atomically: what it names is durable, so a shorter chain is a cut, not a crash.

        HEAD itself is fsynced (with its directory) only at checkpoints and at close: the
        records are already durable, and a HEAD that a power cut leaves one batch behind only
        turns the records after it into a warning. Every batch still replaces it, so a process
        crash (which keeps the page cache) loses nothing and a cut tail is caught."""
        t = self._tip
        doc = {
            "file": t.file,
            "seq": t.seq,
            "hash": t.hash,
            "sig": self._keys.sign(head_message(t.seq, t.hash)),
            "key": self._keys.fingerprint,
        }
        tmp = self.directory / (HEAD_NAME + ".tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.write(fd, canonical(doc) + b"\n")
                if durable:
                    _fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.directory / HEAD_NAME)
        except OSError as exc:
            raise self._error(
                f"{tmp} could not be written, so HEAD cannot cover records up to {t.seq}: they "
                "are cut off again and not acknowledged",
                exc,
                "HEAD",
            ) from None
        self._head_written = t.seq
        if not durable:
            return
        try:
            os.fsync(self._dir_fd)
        except (
            OSError
        ) as exc:  # the records are durable; HEAD may revert to the previous one after a crash
            self._error(f"fsync of {self.directory} after replacing HEAD", exc)

    def _error(self, what: str, exc: OSError, part: str = "") -> AuditWriteError:
        """Log (once per outage) and count a write error; with `part`, the batch fails for it."""
        msg = f"{what}: [Errno {exc.errno}] {exc.strerror}"
        if not self._failing or msg != self.stats.last_error:
            logger.error("audit: %s", msg)
        self.stats.write_errors += 1
        self.stats.last_error = msg
        if part:
            self._failing = True
            self.stats.failing = f"the {part} write failed: [Errno {exc.errno}] {exc.strerror}"
        return AuditWriteError(msg)

    # -- recovery ------------------------------------------------------------------------------

    def _recover(self) -> Optional[RecoveredRecord]:
        """Find the last good record, cut a torn tail, and refuse a chain shorter than HEAD.
        Returns a `recovered` record when bytes were cut."""
        files = list_files(self.directory)
        head = read_head(self.directory)
        if head is not None and not (
            head.get("key") == self._keys.fingerprint
            and signature_ok(
                self._keys.public_key, head.get("sig"), head_message(head["seq"], head["hash"])
            )
        ):
            raise AuditError(
                f"{self.directory / HEAD_NAME} is not signed by this log's key "
                f"{self._keys.fingerprint}: pass the key directory the log was written with, "
                f"or run `fleetctl audit verify {self.directory}`"
            )
        if not files:
            if head is not None:
                raise AuditError(
                    f"{self.directory} has a HEAD at record {head['seq']} ({head.get('file')}) but no "
                    "audit files: they were deleted or moved; restore them before writing again"
                )
            return None
        self._file_no, path = files[-1]
        data = path.read_bytes()
        good_end, last, fault = last_whole_record(data)
        for _, earlier in reversed(
            files[:-1]
        ):  # the last file holds no whole record: look further back
            if last is not None:
                break
            earlier_data = earlier.read_bytes()
            end, last, _ = last_whole_record(earlier_data)
            if end != len(earlier_data):
                raise AuditError(
                    f"{earlier.name} ends with bytes that are not a whole record, and a crash cannot "
                    f"leave those before the last file: run `fleetctl audit verify {self.directory}`"
                )
        last_seq = last["seq"] if last else 0
        if head is not None and (
            last_seq < head["seq"] or (last_seq == head["seq"] and last["hash"] != head["hash"])
        ):
            raise AuditError(
                f"{path.name} ends at record {last_seq} but the signed HEAD says record {head['seq']} "
                f"({head.get('file')}) was written and acknowledged: records are missing or altered. That is "
                f"truncation or tampering, not a crash: run `fleetctl audit verify {self.directory}` and restore "
                "the files from backup before writing again"
            )
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        recovered = None
        if good_end < len(data):
            os.ftruncate(self._fd, good_end)
            _fsync(self._fd)
            recovered = RecoveredRecord(
                self._now(),
                self._source,
                path.name,
                good_end,
                len(data) - good_end,
                f"the last line was not a whole record ({fault}): a write torn by a crash, "
                "never acknowledged",
            )
            logger.warning(
                "audit: %s: cut %d bytes at offset %d after a crash (%s); nothing acknowledged was lost",
                path.name,
                len(data) - good_end,
                good_end,
                fault,
            )
        self._size = good_end
        last_checkpoint = _last_checkpoint(files, data[:good_end])
        self._tip = _Tip(
            last_seq,
            last["hash"] if last else ZERO_HASH,
            path.name,
            last_seq - last_checkpoint,
            last_checkpoint + 1,
            time.monotonic(),
        )
        self._head_written = head["seq"] if head else 0
        return recovered

    def _release(self) -> None:
        for name in ("_fd", "_dir_fd", "_lock_fd"):
            fd = getattr(self, name)
            setattr(self, name, None)
            if fd is not None:
                os.close(fd)  # closing the lock file releases the flock


def _last_checkpoint(files: list[tuple[int, Path]], last_data: bytes) -> int:
    """The seq of the last checkpoint (0 if none); rotation ends each earlier file with one."""
    for i in range(len(files) - 1, -1, -1):
        data = last_data if i == len(files) - 1 else files[i][1].read_bytes()
        for line in lines_backwards(data):
            if b'"type":"checkpoint"' in line:
                record, fault = parse_line(line)
                if not fault and record.get("type") == "checkpoint":
                    return record["seq"]
    return 0


def _lock(directory: Path) -> int:
    fd = os.open(directory / "LOCK", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise AuditError(
            f"{directory} is being written by another AuditLog (its LOCK is held): one writer per "
            "directory; give each process its own audit directory"
        ) from None
    return fd


def _fsync(fd: int) -> None:
    if _FULLFSYNC is not None:
        try:
            fcntl.fcntl(fd, _FULLFSYNC)
            return
        except OSError:
            pass  # not supported by this file system: plain fsync
    os.fsync(fd)
