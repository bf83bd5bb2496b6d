"""One node call of a request: evicted when its node is ejected or leaves, or when it
stalls (no token for too long), so the request moves on instead of hanging."""

from __future__ import annotations

import asyncio
import time
from typing import Optional


class Attempt:
    __slots__ = ("entry", "call", "evicted", "penalise", "last", "tokens", "_first_s", "_stall_s", "_timer")

    def __init__(self, entry, *, first_token_s: float, stall_s: float):
        self.entry = entry
        self.call = None
        self.evicted: Optional[str] = None
        self.penalise = False
        self.last = time.monotonic()
        self.tokens = 0
        self._first_s = first_token_s
        self._stall_s = stall_s
        self._timer = asyncio.get_running_loop().call_later(first_token_s, self._check)

    def progress(self, tokens: int) -> None:
        """Called per chunk; cheap (the watchdog reads it lazily)."""
        self.last = time.monotonic()
        self.tokens += tokens

    def _check(self) -> None:
        limit = self._stall_s if self.tokens else self._first_s
        idle = time.monotonic() - self.last
        if idle < limit:
            self._timer = asyncio.get_running_loop().call_later(limit - idle, self._check)
            return
        what = "no token" if self.tokens else "no first token"
        # A stall mid-stream is the node's failure; a slow first token may be its queue.
        self.evict(f"{what} from node {self.entry.node_id} for {idle:.0f}s", penalise=bool(self.tokens))

    def evict(self, reason: str, *, penalise: bool = False) -> None:
        if self.evicted is None:
            self.evicted, self.penalise = reason, penalise
            if self.call is not None:
                self.call.cancel()

    def close(self) -> None:
        self._timer.cancel()
        if self.call is not None and not self.call.done():  # failover, or the caller left
            self.call.cancel()
