"""The node's lifecycle state machine: the only source of truth for its state."""

from __future__ import annotations

import enum
import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable

from cluster.logs import fields

log = logging.getLogger(__name__)


class State(enum.Enum):
    STARTING = "STARTING"
    LOADING = "LOADING"
    WARMING = "WARMING"
    READY = "READY"
    DRAINING = "DRAINING"
    DRAINED = "DRAINED"
    FAILED = "FAILED"


_ALLOWED: dict[State, frozenset[State]] = {
    State.STARTING: frozenset({State.LOADING, State.FAILED}),
    State.LOADING: frozenset({State.WARMING, State.FAILED}),
    State.WARMING: frozenset(
        {State.READY, State.DRAINED, State.FAILED}
    ),  # DRAINED: kept across a restart
    State.READY: frozenset({State.DRAINING, State.LOADING, State.FAILED}),
    State.DRAINING: frozenset({State.DRAINED, State.READY, State.FAILED}),
    State.DRAINED: frozenset({State.READY, State.LOADING, State.FAILED}),
    State.FAILED: frozenset({State.LOADING}),
}


class IllegalTransition(RuntimeError):
    """A transition the lifecycle does not allow."""


@dataclass(frozen=True)
class Snapshot:
    state: State
    reason: str
    since: float  # time.monotonic() of the transition


class Lifecycle:
    """Thread-safe state holder; listeners run synchronously on each transition."""

    def __init__(self, *, node_id: str, clock: Callable[[], float] = time.monotonic):
        self._node_id = node_id
        self._clock = clock
        self._lock = threading.Lock()
        self._snapshot = Snapshot(State.STARTING, "agent starting", clock())
        self._listeners: list[Callable[[Snapshot], None]] = []

    @property
    def snapshot(self) -> Snapshot:
        return self._snapshot

    @property
    def state(self) -> State:
        return self._snapshot.state

    def subscribe(self, listener: Callable[[Snapshot], None]) -> None:
        self._listeners.append(listener)
        listener(self._snapshot)

    def transition(self, to: State, reason: str) -> Snapshot:
        with self._lock:
            current = self._snapshot.state
            if to is not current and to not in _ALLOWED[current]:
                raise IllegalTransition(
                    f"node {self._node_id}: {current.value} -> {to.value} is not allowed"
                )
            self._snapshot = Snapshot(to, reason, self._clock())
            snap = self._snapshot
        log.info(
            "node=%s state %s -> %s reason=%s",
            self._node_id,
            current.value,
            to.value,
            reason,
            extra=fields(
                event="node.state",
                node_id=self._node_id,
                state=to.value,
                previous=current.value,
                reason=reason,
            ),
        )
        for listener in self._listeners:
            listener(snap)
        return snap
