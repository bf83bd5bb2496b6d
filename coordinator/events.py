"""The fleet's event stream: joins, state changes, ejections, departures, failovers, restarts.

Each event is logged once (key=value, never payloads), kept in a bounded history and
pushed to every WatchEvents subscriber. A subscriber that falls behind is dropped.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import time
from typing import AsyncIterator, Callable

from cluster.api import fleet_pb2
from cluster.logs import fields

log = logging.getLogger(__name__)

HISTORY = 1000
SUBSCRIBER_BUFFER = 1000


class EventLog:
    def __init__(self) -> None:
        self._seq = itertools.count(1)
        self._history: collections.deque[fleet_pb2.FleetEvent] = collections.deque(maxlen=HISTORY)
        self._subscribers: set[asyncio.Queue] = set()
        self.listeners: list[
            Callable[[fleet_pb2.FleetEvent], None]
        ] = []  # e.g. the metrics' counters

    def emit(
        self, kind: int, *, node_id: str = "", address: str = "", reason: str = "", **extra
    ) -> fleet_pb2.FleetEvent:
        event = fleet_pb2.FleetEvent(
            seq=next(self._seq),
            time_unix_s=time.time(),
            kind=kind,
            node_id=node_id,
            address=address,
            reason=reason,
            **extra,
        )
        self._history.append(event)
        name = fleet_pb2.EventKind.Name(kind).removeprefix("EVENT_KIND_").lower()
        log.info(
            "event=%s node=%s address=%s%s reason=%r",
            name,
            node_id or "-",
            address or "-",
            "".join(f" {k}={v}" for k, v in extra.items()),
            reason,
            extra=fields(
                event=f"fleet.{name}", node_id=node_id, address=address, reason=reason, **extra
            ),
        )
        for listener in self.listeners:
            listener(event)
        for queue in list(self._subscribers):
            try:
                queue.put_nowait(event)
            except asyncio.QueueFull:
                self._subscribers.discard(queue)  # it drains what it has, then its stream ends
        return event

    def history(self) -> list[fleet_pb2.FleetEvent]:
        return list(self._history)

    async def subscribe(self, replay: bool) -> AsyncIterator[fleet_pb2.FleetEvent]:
        """Events from now on (after the history, if `replay`); ends if the reader falls behind."""
        queue: asyncio.Queue = asyncio.Queue(SUBSCRIBER_BUFFER)
        backlog = self.history() if replay else []
        self._subscribers.add(queue)
        try:
            for event in backlog:
                yield event
            while queue in self._subscribers or not queue.empty():
                yield await queue.get()
        finally:
            self._subscribers.discard(queue)
