"""The records the audit log writes itself (`open`, `checkpoint`, `recovered`), typed. Each
becomes the chain's dict of fields only as it is encoded (`to_dict`), with the keys the
chain has always held, so its format and hashes are unchanged. The records callers write
are theirs to type (the coordinator's: coordinator/records.py); the log takes their dicts."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class OpenRecord:
    """A writer opened the log: which process, under which key, in which format."""

    time: str
    source: str
    pid: int
    key: str  # the signing key's fingerprint
    format: int

    def to_dict(self) -> dict:
        return {"type": "open", **asdict(self)}


@dataclass(frozen=True)
class CheckpointRecord:
    """A signature over the chain up to `head`, covering records covers[0]..covers[1]."""

    time: str
    source: str
    head: str
    covers: list
    sig: str
    key: str

    def to_dict(self) -> dict:
        return {"type": "checkpoint", **asdict(self)}


@dataclass(frozen=True)
class RecoveredRecord:
    """Bytes a crash left half-written were cut from the end of `file` on open."""

    time: str
    source: str
    file: str
    offset: int
    discarded_bytes: int
    reason: str

    def to_dict(self) -> dict:
        return {"type": "recovered", **asdict(self)}
