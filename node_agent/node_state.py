"""What a node remembers across agent restarts: its cordon and drain, the model it was told
to serve (and the one before, for rollback), its recent operations (DESIGN invariant 1:
the node owns this state, so it must outlive the process and any coordinator), the newest
rollout-lease fencing token it accepted, and the newest signed audit HEAD of each
coordinator signing key (this node is a witness against a truncated audit chain).

One small JSON file, replaced atomically (write, fsync, rename) on every change.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

log = logging.getLogger(__name__)

STATE_FILE = "node-state.json"
KEEP_OPERATIONS = 50
KEEP_AUDIT_HEADS = 16  # signing keys (coordinators) whose newest HEAD is kept


@dataclass(frozen=True)
class ModelRef:
    """A model directory and the names it is served under."""

    path: str
    model_id: str
    version: str = ""
    digest: str = ""


@dataclass
class OperationRecord:
    """One operation (cordon, drain, stage, activate, restart) under its id, as the state
    file keeps it: running, then done or failed with the message the operator sees."""

    operation_id: str
    kind: str
    state: str = "running"  # running | done | failed
    message: str = ""
    started: float = 0.0  # unix seconds
    finished: float = 0.0

    @classmethod
    def from_dict(cls, raw: dict) -> "OperationRecord":
        rec = cls(**{f: raw[f] for f in cls.__dataclass_fields__ if f in raw})
        if rec.state == "running":  # the agent stopped under it: it will never finish now
            rec.state = "failed"
            rec.message = (
                "interrupted: the node agent stopped while it ran; retry with a new operation id"
            )
        return rec


@dataclass
class NodeState:
    cordoned: bool = False
    cordon_reason: str = ""
    drained: bool = False
    # The --model the activations below were made over: a changed --model (the operator
    # edited the service) wins over an activation made for another configuration.
    configured_path: str = ""
    active: Optional[ModelRef] = None
    previous: Optional[ModelRef] = None
    operations: list[OperationRecord] = field(default_factory=list)
    fencing_token: int = 0
    audit_heads: dict[str, dict] = field(
        default_factory=dict
    )  # key fingerprint -> {seq, hash, sig, key}

    @classmethod
    def load(cls, state_dir: Path) -> "NodeState":
        path = state_dir / STATE_FILE
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            return cls()
        except (OSError, ValueError) as exc:
            # Refuse to guess: a node that forgot a cordon would take traffic it was told not to.
            raise RuntimeError(
                f"{path} is unreadable ({type(exc).__name__}: {exc}); fix or remove it "
                "(removing it forgets the node's cordon, drain and activated model)"
            ) from None
        models = {k: ModelRef(**raw[k]) if raw.get(k) else None for k in ("active", "previous")}
        heads = raw.get("audit_heads") or {}
        if not (isinstance(heads, dict) and isinstance(raw.get("fencing_token", 0), int)):
            raise RuntimeError(
                f"{path}: fencing_token or audit_heads was altered; restore the file from backup "
                "(removing it also forgets the node's cordon, drain and activated model)"
            )
        heads = {k: h for k, h in heads.items() if _head_ok(h)}
        try:
            operations = [OperationRecord.from_dict(r) for r in raw.get("operations", [])][
                -KEEP_OPERATIONS:
            ]
        except (TypeError, AttributeError):
            raise RuntimeError(
                f"{path}: its operations list was altered; restore the file from backup or remove "
                "it (removing it forgets the node's cordon, drain and activated model)"
            ) from None
        return cls(
            cordoned=bool(raw.get("cordoned")),
            cordon_reason=str(raw.get("cordon_reason", "")),
            drained=bool(raw.get("drained")),
            configured_path=str(raw.get("configured_path", "")),
            operations=operations,
            fencing_token=int(raw.get("fencing_token", 0)),
            audit_heads=dict(heads),
            **models,
        )

    def dump(self) -> str:
        """The state file's text (taken on the event loop, so no change lands half-way)."""
        self.operations = self.operations[-KEEP_OPERATIONS:]
        return json.dumps(asdict(self), indent=1)

    @staticmethod
    def write(state_dir: Path, text: str) -> None:
        """Replace the state file with `text`, fsynced, rename included (blocking: run it in a thread)."""
        state_dir.mkdir(parents=True, exist_ok=True)
        path = state_dir / STATE_FILE
        tmp = path.with_suffix(".tmp")
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
        fd = os.open(state_dir, os.O_RDONLY)
        try:
            os.fsync(fd)  # the rename itself survives a power cut
        finally:
            os.close(fd)

    def model_to_serve(self, configured: ModelRef) -> ModelRef:
        """The activated model if it was activated over this same --model, else --model
        (and the activation history is forgotten)."""
        if (
            self.active is not None
            and self.configured_path == configured.path
            and Path(self.active.path).is_dir()
        ):
            return self.active
        if self.active is not None:
            log.warning(
                "activated model %s is not used: --model is now %s (was %s)",
                self.active.path,
                configured.path,
                self.configured_path or "unset",
            )
        self.configured_path, self.active, self.previous = configured.path, None, None
        return configured


def _head_ok(head: object) -> bool:
    """A kept audit HEAD as node_agent.audit_witness writes it (others are dropped at load)."""
    return (
        isinstance(head, dict)
        and isinstance(head.get("seq"), int)
        and all(isinstance(head.get(k), str) for k in ("hash", "sig", "key"))
    )
