"""Refusals on an HTTP(S) port, per source (docs/security.md): how many are recorded one
by one, and when a source's unauthenticated attempts are answered 429 instead.

Per client address and window (`window_s`, from a source's first refusal): the first
`burst` refusals are recorded one by one (each durable before its answer, as before);
the rest are counted per kind (path entry, status, caller) and recorded when the window
ends as one record each, with the count. Past `limit` unauthenticated attempts a source
gets 429 with Retry-After until its window ends. Memory is bounded: past `max_sources`
addresses, new ones share one entry.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

from cluster.security.identity import Identity

OVERFLOW = "(many sources)"


@dataclass(frozen=True)
class Held:
    """Refusals of one kind from one source in one window, recorded together."""

    source: str
    entry: str
    status: int
    identity: Optional[Identity]
    reason: str
    count: int
    window_s: float


@dataclass
class _Window:
    start: float
    attempts: int = 0  # unauthenticated attempts
    recorded: int = 0  # refusals recorded one by one
    held: dict = field(default_factory=dict)  # (entry, status, caller) -> [identity, reason, count]


class DenialLedger:
    """Per-source refusal counts over a window; not thread-safe (one event loop)."""

    def __init__(
        self,
        *,
        window_s: float,
        burst: int,
        limit: int,
        max_sources: int = 4096,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.window_s, self.burst, self.limit = window_s, burst, limit
        self._max_sources = max_sources
        self._clock = clock
        self._windows: dict[str, _Window] = {}
        self._ended: list[Held] = []  # windows rolled over before the flush took them

    def retry_after(self, source: str) -> int:
        """Seconds until `source` may try again without a credential; 0 if it may now."""
        w = self._window(source)
        if w.attempts < self.limit:
            return 0
        return max(1, math.ceil(w.start + self.window_s - self._clock()))

    def refused(
        self, source: str, entry: str, status: int, identity: Optional[Identity], reason: str
    ) -> bool:
        """Count one refusal; True when it is to be recorded now, False when it is held
        for its window's record (`due`)."""
        w = self._window(source)
        if status in (401, 429):
            w.attempts += 1
        if w.recorded < self.burst:
            w.recorded += 1
            return True
        key = (entry, status, identity.name if identity else "")
        held = w.held.setdefault(key, [identity, reason, 0])
        held[2] += 1
        return False

    def due(self, *, everything: bool = False) -> list[Held]:
        """The held refusals of windows that have ended (or of all, on close)."""
        now = self._clock()
        out, self._ended = self._ended, []
        for source, w in list(self._windows.items()):
            if everything or now - w.start >= self.window_s:
                out.extend(self._held(source, w))
                del self._windows[source]
        return out

    def _window(self, source: str) -> _Window:
        if source not in self._windows and len(self._windows) >= self._max_sources:
            source = OVERFLOW
        now = self._clock()
        w = self._windows.get(source)
        if w is not None and now - w.start >= self.window_s:
            self._ended.extend(self._held(source, w))
            w = None
        if w is None:
            w = self._windows[source] = _Window(now)
        return w

    def _held(self, source: str, w: _Window) -> list[Held]:
        return [
            Held(source, entry, status, ident, reason, count, self.window_s)
            for (entry, status, _), (ident, reason, count) in w.held.items()
        ]
