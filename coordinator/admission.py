"""Admission: place a request on a node now, or queue it (bounded depth, bounded wait).

Resumes of interrupted streams go first, then interactive, then batch; FIFO within a
class. A place is reserved (in_flight, outstanding tokens) until `release`. Admission is
the only writer of each node's load ledger (coordinator/ledger.py): the relay reports
tokens delivered, node calls and failovers through its methods. Everything runs on the
event loop: no locks.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
from dataclasses import dataclass, field
from typing import Optional

from cluster.routing import Want, pick
from coordinator.fleet import Fleet, NodeEntry

log = logging.getLogger(__name__)

RESUME, INTERACTIVE, BATCH = 0, 1, 2


class QueueFull(Exception):
    """Beyond the queue's depth: answer RESOURCE_EXHAUSTED with a retry hint."""


class WaitExpired(Exception):
    """Waited the queue's limit (or the caller's deadline) for a node; `routable` says if any existed."""

    def __init__(self, waited_s: float, routable: int):
        super().__init__(f"waited {waited_s:.1f}s")
        self.waited_s = waited_s
        self.routable = routable


@dataclass(order=True)
class _Waiter:
    priority: int
    seq: int
    want: Want = field(compare=False)
    tokens: int = field(compare=False)
    future: asyncio.Future = field(compare=False)
    since: float = field(compare=False, default=0.0)  # loop time it joined the queue


class Admission:
    def __init__(
        self,
        *,
        fleet: Fleet,
        max_depth: int,
        max_wait_s: float,
        load_factor: float,
        traffic=None,
    ):
        self._fleet = fleet
        self._traffic = traffic  # coordinator/traffic.TrafficControl (docs/traffic.md)
        self._max_depth = max_depth
        self._max_wait_s = max_wait_s
        self._load_factor = load_factor
        self._heap: list[_Waiter] = []
        self._seq = itertools.count()

    @property
    def depth(self) -> int:
        return sum(1 for w in self._heap if not w.future.done())

    def waiting(self):
        """(want, loop time it joined) of each request waiting in the queue."""
        return [(w.want, w.since) for w in self._heap if not w.future.done()]

    def _place(self, want: Want, tokens: int, live: bool = True) -> Optional[NodeEntry]:
        """Reserve a place on the node `pick` chooses (`live`: counted in the traffic shares)."""
        entries = {e.node_id: e for e in self._fleet.routable()}
        candidates = [e.candidate() for e in entries.values()]
        node_id = pick(candidates, want, load_factor=self._load_factor)
        if node_id is None and want.node_class and self._traffic is not None:
            node_id = self._traffic.elsewhere(candidates, want, self._load_factor)
        if node_id is None:
            return None
        entry = entries[node_id]
        if self._traffic is not None and live:
            self._traffic.placed(entry.node_class)
        load = entry.load
        load.in_flight += 1
        load.outstanding_tokens += tokens
        load.routed_total += 1
        return entry

    async def acquire(
        self, want: Want, *, priority: int, tokens: int, timeout_s: Optional[float]
    ) -> NodeEntry:
        """A node with a reserved place; raises QueueFull or WaitExpired. A new request (not a
        retry or resume) goes to the class the traffic policy chooses; the others to any."""
        if self._traffic is not None and priority != RESUME and not want.exclude:
            want = self._traffic.route(want)
        if not self._heap:
            entry = self._place(want, tokens)
            if entry is not None:
                return entry
        if priority != RESUME and self.depth >= self._max_depth:
            raise QueueFull()
        loop = asyncio.get_running_loop()
        waiter = _Waiter(priority, next(self._seq), want, tokens, loop.create_future(), loop.time())
        heapq.heappush(self._heap, waiter)
        self.dispatch()
        wait = self._max_wait_s if timeout_s is None else min(self._max_wait_s, timeout_s)
        start = loop.time()
        try:
            # asyncio.wait, not wait_for: on Python 3.11 wait_for can return a result that
            # arrived together with the caller's cancel, and swallow the cancel.
            await asyncio.wait((waiter.future,), timeout=wait)
        except asyncio.CancelledError:
            self._abandon(waiter)
            raise
        if waiter.future.done():
            return waiter.future.result()
        self._abandon(waiter)
        raise WaitExpired(loop.time() - start, len(self._fleet.routable()))

    def try_acquire(self, want: Want, tokens: int) -> Optional[NodeEntry]:
        """A place now, or None: never a wait, and nothing while requests are queued (best-effort
        work, such as shadow copies, must not go ahead of them; docs/shadow.md)."""
        return None if self.depth else self._place(want, tokens, live=False)

    def _abandon(self, waiter: _Waiter) -> None:
        """The waiter leaves the queue; a place it was given meanwhile goes back."""
        if waiter.future.done() and not waiter.future.cancelled():
            self.release(waiter.future.result(), waiter.tokens)
        waiter.future.cancel()

    def release(self, entry: NodeEntry, unused_tokens: int) -> None:
        """The request left the node; `unused_tokens` of its reservation are returned."""
        load = entry.load
        load.in_flight -= 1
        load.outstanding_tokens = max(0, load.outstanding_tokens - unused_tokens)
        self.dispatch()

    # -- what the relay reports of a placed request ------------------------------------
    def delivered(self, entry: NodeEntry, tokens: int) -> None:
        """The node generated `tokens` of the request's reservation."""
        entry.load.outstanding_tokens -= tokens

    def call_started(self, entry: NodeEntry, attempt) -> None:
        """A node call (coordinator/attempt.py) runs on the place: evicted if the node is ejected or leaves."""
        entry.load.attempts.add(attempt)

    def call_ended(self, entry: NodeEntry, attempt) -> None:
        entry.load.attempts.discard(attempt)

    def failed_over(self, entry: NodeEntry) -> None:
        """A node call failed there and the request moved on."""
        entry.load.failovers_total += 1

    def dispatch(self) -> None:
        """Place queued requests in priority order while nodes have room."""
        if not self._heap:
            return
        kept = []
        while self._heap:
            waiter = heapq.heappop(self._heap)
            if waiter.future.done():
                continue
            entry = self._place(waiter.want, waiter.tokens)
            if entry is None:
                kept.append(waiter)
            else:
                waiter.future.set_result(entry)
        for waiter in kept:
            heapq.heappush(self._heap, waiter)
