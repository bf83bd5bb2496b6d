"""The node's staging area: new weights land here while the node keeps serving.

`ROOT/<digest hex>/` is a staged model (its files plus `staged.json`); data still
arriving lives in `ROOT/.incoming-<digest hex>/` and is renamed into place only once
its digest matches: a mismatch is an error and the data is deleted, never swapped in.
Incoming directories survive an agent restart, which is what makes a push resumable.
Thread-safe: copies and pushes run in worker threads while GetStatus reads progress.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from cluster.api import node_pb2
from cluster.digest import digest_files, model_files, remember

DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")
META, MANIFEST = "staged.json", ".manifest.json"
_CHUNK = 8 << 20
S = node_pb2


class StagingError(Exception):
    """Weights that cannot be staged; the message names the file or digest and what to do."""


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
        return node_pb2.StagedModel(weights_digest=self.digest, model_id=self.model_id, version=self.version,
                                    state=self.state, bytes_done=self.bytes_done, bytes_total=self.bytes_total,
                                    message=self.message, path=self.path)


class StagingArea:
    def __init__(self, root: Path, max_bytes: int = 1 << 40):
        self.root = root
        self._max = max_bytes
        self._lock = threading.Lock()
        self._live: dict[str, StagedInfo] = {}   # receiving, verifying or failed (in memory only)

    # -- reads --------------------------------------------------------------------------
    def path_for(self, digest: str) -> Path:
        return self.root / digest.removeprefix("sha256:")

    def _incoming(self, digest: str) -> Path:
        return self.root / f".incoming-{digest.removeprefix('sha256:')}"

    def get(self, digest: str) -> Optional[StagedInfo]:
        with self._lock:
            if digest in self._live:
                return self._live[digest]
        try:
            meta = json.loads((self.path_for(digest) / META).read_text())
        except (OSError, ValueError):
            return None
        return StagedInfo(digest, meta["model_id"], meta["version"], S.STAGE_STATE_STAGED, meta["bytes"],
                          meta["bytes"], "staged", str(self.path_for(digest)))

    def list(self) -> list[StagedInfo]:
        found = [self.get(f"sha256:{p.name}") for p in sorted(self.root.glob("[0-9a-f]" * 8 + "*"))]
        with self._lock:
            live = [i for d, i in self._live.items() if not self.path_for(d).is_dir()]
        return [i for i in found if i is not None] + live

    # -- from a path ----------------------------------------------------------------------
    def stage_from_path(self, source: Path, *, model_id: str, version: str, expected_digest: str,
                        progress: Optional[Callable[[int, int], None]] = None) -> StagedInfo:
        """Copy `source`'s model files, hashing them on the way (one read of each byte)."""
        if expected_digest:
            self._check_digest(expected_digest)
            done = self.get(expected_digest)
            if done is not None and done.state == S.STAGE_STATE_STAGED:
                return done
        if not source.is_dir() or not digest_files(source):
            raise StagingError(f"{source} is not a model directory (no config.json or *.safetensors) on this host")
        files = model_files(source)
        hashed = set(digest_files(source))
        total = sum(p.stat().st_size for p in files)
        key = expected_digest or f"path:{source}"
        info = self._track(key, model_id, version, total)
        tmp = self.root / f".incoming-copy-{os.getpid()}-{threading.get_ident()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        h = hashlib.sha256()
        try:
            for p in files:
                if p in hashed:
                    h.update(f"{p.name}\0{p.stat().st_size}\0".encode())
                with open(p, "rb") as src, open(tmp / p.name, "wb") as dst:
                    while chunk := src.read(_CHUNK):
                        if p in hashed:
                            h.update(chunk)
                        dst.write(chunk)
                        info.bytes_done += len(chunk)
                        if progress:
                            progress(info.bytes_done, total)
            digest = f"sha256:{h.hexdigest()}"
            if expected_digest and digest != expected_digest:
                raise StagingError(f"{source} hashes to {digest}, not the expected {expected_digest}; "
                                   "nothing was staged (check the path and the digest)")
            return self._finalize(tmp, digest, model_id, version, total)
        except BaseException as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            self._fail(key, exc)
            raise
        finally:
            with self._lock:
                if self._live.get(key) is info and info.state != S.STAGE_STATE_FAILED:
                    del self._live[key]

    # -- pushed in chunks -----------------------------------------------------------------
    def begin_push(self, manifest: node_pb2.WeightsManifest) -> node_pb2.PushOffsets:
        """Check the manifest; say how much of each file is already here (resume)."""
        digest = manifest.expected_digest
        self._check_digest(digest)
        names = [f.name for f in manifest.files]
        bad = next((n for n in names if not NAME.fullmatch(n)), None)
        if bad is not None or not names or len(set(names)) != len(names):
            raise StagingError(f"file names must be plain, unique names (no '/', no leading '.'): {bad!r}")
        if "config.json" not in names:
            raise StagingError("the manifest has no config.json; it is not a model")
        total = sum(f.size for f in manifest.files)
        if total > self._max:
            raise StagingError(f"the model is {total} bytes; this node stages at most {self._max}")
        done = self.get(digest)
        if done is not None and done.state == S.STAGE_STATE_STAGED:
            return node_pb2.PushOffsets(complete=True)
        incoming = self._incoming(digest)
        wanted = json.dumps({"files": [[f.name, f.size] for f in manifest.files], "model_id": manifest.model_id,
                             "version": manifest.version})
        try:
            if (incoming / MANIFEST).read_text() != wanted:
                shutil.rmtree(incoming)   # the same digest announced with other files: start over
        except OSError:
            pass
        incoming.mkdir(parents=True, exist_ok=True)
        (incoming / MANIFEST).write_text(wanted)
        held = [node_pb2.WeightsFile(name=f.name, size=min(_size(incoming / f.name), f.size))
                for f in manifest.files]
        info = self._track(digest, manifest.model_id, manifest.version, total)
        info.bytes_done = sum(f.size for f in held)
        return node_pb2.PushOffsets(held=held)

    def write_chunk(self, digest: str, chunk: node_pb2.WeightsChunk) -> None:
        incoming = self._incoming(digest)
        try:
            sizes = dict(json.loads((incoming / MANIFEST).read_text())["files"])
        except (OSError, ValueError):
            raise StagingError(f"no push of {digest[:19]} is under way; call BeginPush first") from None
        if chunk.file not in sizes:
            raise StagingError(f"{chunk.file!r} is not in the manifest of {digest[:19]}")
        path = incoming / chunk.file
        held = _size(path)
        if chunk.offset != held:
            raise StagingError(f"{chunk.file} chunk at offset {chunk.offset}, but the node holds {held} bytes "
                               "of it; call BeginPush again to resume from there")
        if held + len(chunk.data) > sizes[chunk.file]:
            raise StagingError(f"{chunk.file} would exceed its declared {sizes[chunk.file]} bytes")
        with open(path, "ab") as f:
            f.write(chunk.data)
        with self._lock:
            if digest in self._live:
                self._live[digest].bytes_done += len(chunk.data)

    def finish_push(self, digest: str) -> StagedInfo:
        """Every byte arrived: stage it if it hashes to `digest`; else delete it and raise."""
        done = self.get(digest)
        if done is not None and done.state == S.STAGE_STATE_STAGED:
            return done
        incoming = self._incoming(digest)
        try:
            meta = json.loads((incoming / MANIFEST).read_text())
        except (OSError, ValueError):
            raise StagingError(f"no push of {digest[:19]} is under way; call BeginPush first") from None
        short = [(n, _size(incoming / n), size) for n, size in meta["files"] if _size(incoming / n) != size]
        if short:
            n, have, size = short[0]
            raise StagingError(f"{n} has {have} of {size} bytes; call BeginPush to resume the push")
        with self._lock:
            if digest in self._live:
                self._live[digest].state = S.STAGE_STATE_VERIFYING
        from cluster.digest import compute_digest

        actual = compute_digest(incoming, digest_files(incoming))
        if actual != digest:
            shutil.rmtree(incoming, ignore_errors=True)
            err = StagingError(f"the pushed files hash to {actual}, not the expected {digest}; "
                               "they were deleted, nothing was staged")
            self._fail(digest, err)
            raise err
        (incoming / MANIFEST).unlink()
        total = sum(size for _n, size in meta["files"])
        return self._finalize(incoming, digest, meta["model_id"], meta["version"], total)

    # -- housekeeping -----------------------------------------------------------------------
    def prune(self, keep: set[str]) -> list[str]:
        """Delete staged models whose digest is not in `keep` (the active and previous ones)."""
        removed = []
        for p in self.root.glob("[0-9a-f]" * 8 + "*"):
            if f"sha256:{p.name}" not in keep:
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p.name)
        return removed

    def _finalize(self, tmp: Path, digest: str, model_id: str, version: str, total: int) -> StagedInfo:
        for p in tmp.iterdir():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
        (tmp / META).write_text(json.dumps({"model_id": model_id, "version": version, "digest": digest,
                                            "bytes": total}))
        final = self.path_for(digest)
        if final.is_dir():       # staged meanwhile by another operation
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.rename(final)
        remember(final, digest)  # loading it will not hash it again
        with self._lock:
            self._live.pop(digest, None)
        return self.get(digest)

    def _track(self, key: str, model_id: str, version: str, total: int) -> StagedInfo:
        info = StagedInfo(key, model_id, version, S.STAGE_STATE_RECEIVING, 0, total)
        with self._lock:
            self._live[key] = info
        return info

    def _fail(self, key: str, exc: BaseException) -> None:
        with self._lock:
            info = self._live.get(key)
            if info is not None:
                info.state, info.message = S.STAGE_STATE_FAILED, str(exc)

    @staticmethod
    def _check_digest(digest: str) -> None:
        if not DIGEST.fullmatch(digest):
            raise StagingError(f"expected digest {digest[:80]!r} is not sha256: followed by 64 lowercase hex digits")


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0
