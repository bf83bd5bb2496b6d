"""One node call of a request: evicted when its node is ejected or leaves, or when it
stalls (no token for too long), so the request moves on instead of hanging.

The watchdog counts only time spent waiting on the node: while the relay holds a chunk
(the caller has not read the previous one yet) it is paused, so a slow reader is never
blamed on the node. It is armed at the first-token timeout and re-armed at the stall
limit after every chunk."""

from __future__ import annotations

import asyncio
import time
from typing import AsyncIterator, Optional


class Attempt:
    __slots__ = (
        "entry",
        "call",
        "evicted",
        "penalise",
        "last",
        "tokens",
        "_first_s",
        "_stall_s",
        "_timer",
        "_due",
        "_paused_at",
    )

    def __init__(self, entry, *, first_token_s: float, stall_s: float):
        self.entry = entry
        self.call = None
        self.evicted: Optional[str] = None
        self.penalise = False
        self.last = time.monotonic()
        self.tokens = 0
        self._first_s = first_token_s
        self._stall_s = stall_s
        self._timer: Optional[asyncio.TimerHandle] = None
        self._due = 0.0
        self._paused_at: Optional[float] = None
        self._arm(first_token_s)

    async def chunks(self) -> AsyncIterator:
        """The node call's chunks; the watchdog counts only the time spent awaiting them."""
        stream = self.call.__aiter__()
        while True:
            try:
                chunk = await stream.__anext__()
            except StopAsyncIteration:
                return
            self.progress(len(chunk.token_ids))
            self._paused_at = time.monotonic()
            yield chunk  # the relay forwards it: the caller may take its time to read it
            self._resume()

    def progress(self, tokens: int) -> None:
        """Called per chunk: the idle clock restarts (before the first token, only a token
        restarts it). Cheap: the timer is moved only when it must fire sooner."""
        if tokens or self.tokens:
            self.last = time.monotonic()
        self.tokens += tokens

    def _resume(self) -> None:
        """Back to awaiting the node: the pause is not idle time. The watchdog fires at the
        latest `limit` after the last token (the stall limit once one came, so a node that
        goes silent mid-stream is caught then, not at the first-token timeout)."""
        now = time.monotonic()
        self.last += now - self._paused_at
        self._paused_at = None
        due = self.last + self._limit()
        if self.evicted is None and (self._timer is None or due < self._due):
            self._arm(max(0.0, due - now))

    def _limit(self) -> float:
        return self._stall_s if self.tokens else self._first_s

    def _arm(self, after_s: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._due = time.monotonic() + after_s
        self._timer = asyncio.get_running_loop().call_later(after_s, self._check)

    def _check(self) -> None:
        self._timer = None
        if self._paused_at is not None:
            return  # waiting on the caller, not the node: `_resume` re-arms
        limit = self._limit()
        idle = time.monotonic() - self.last
        if idle < limit:
            self._arm(limit - idle)
            return
        what = "no token" if self.tokens else "no first token"
        # A stall mid-stream is the node's failure; a slow first token may be its queue.
        self.evict(
            f"{what} from node {self.entry.node_id} for {idle:.0f}s", penalise=bool(self.tokens)
        )

    def evict(self, reason: str, *, penalise: bool = False) -> None:
        if self.evicted is None:
            self.evicted, self.penalise = reason, penalise
            if self.call is not None:
                self.call.cancel()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self.call is not None and not self.call.done():  # failover, or the caller left
            self.call.cancel()
