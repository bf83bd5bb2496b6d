"""A node group's heartbeat, independent of the collectives: a rank whose engine thread is
stuck in a collective still answers here, and a rank that is stopped or cut off does not.

UDP on each rank's --group port (the collective backend uses TCP on it). Rank 0 pings every
follower each period; a follower answers with its host and memory, and how the stages rank 0
passed on to it went (node_agent/group_ops.py: rank 0's stage ends once every rank's has). Rank 0 calls a follower
silent after `timeout_s` without an answer, a follower calls rank 0 silent after as long
without a ping. Datagrams carry no request content; each is accepted only from the address
the group lists for its sender.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from typing import Callable, Optional

from node_agent.group import GroupSpec, _ring_hostfile
from node_agent.telemetry import host_memory

log = logging.getLogger(__name__)

_MAX_DATAGRAM = 2048


def period_of(timeout_s: float) -> float:
    return max(0.05, min(1.0, timeout_s / 5))


class Heartbeat:
    """Start after the group formed; `on_silent(rank, cause)` once per silent rank; `tick()`
    runs every period on the heartbeat thread (the engine's stuck-collective check)."""

    def __init__(
        self,
        spec: GroupSpec,
        *,
        on_silent: Callable[[int, str], None],
        tick: Callable[[], None] = lambda: None,
        stages: Callable[[], dict] = dict,
    ):
        self._spec = spec
        self._on_silent = on_silent
        self._tick = tick
        self._stages = stages  # a follower's: {operation id: [state, message]}, sent in each pong
        self.period_s = period_of(spec.timeout_s)
        addresses = [a[0].rpartition(":") for a in _ring_hostfile(spec.addresses)]
        self._peers = [(h.strip("[]"), int(p)) for h, _, p in addresses]
        self._host = socket.gethostname()
        now = time.monotonic()
        self._last = {r: now for r in range(spec.size) if r != spec.rank}
        self._info: dict[int, dict] = {}
        self._silent: set[int] = set()
        self._heard: set[int] = set()
        self._armed = False  # judge silence only once the group has formed
        self.everyone = threading.Event()  # every rank is up (the rendezvous before forming)
        self._stop = threading.Event()
        self._sock: Optional[socket.socket] = None
        self._thread: Optional[threading.Thread] = None

    def start(self) -> None:
        host, port = self._peers[self._spec.rank]
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._sock = socket.socket(family, socket.SOCK_DGRAM)
        self._sock.bind((host, port))
        self._sock.settimeout(self.period_s / 2)
        self._thread = threading.Thread(target=self._run, name="group-heartbeat", daemon=True)
        self._thread.start()

    def rendezvous(self, timeout_s: Optional[float] = None) -> bool:
        """Wait until every rank answers here. mx.distributed.init holds the GIL while it
        waits for its peers, which would freeze this agent's gRPC server and event loop:
        it is called only once every rank is known to be about to call it too."""
        return self.everyone.wait(timeout_s)

    def arm(self) -> None:
        """The group loaded: from now on a rank silent past the timeout fails it."""
        if not self._armed:
            self._last = dict.fromkeys(self._last, time.monotonic())
            self._armed = True

    @property
    def heard(self) -> set[int]:
        """The ranks heard from since start (the rendezvous)."""
        return set(self._heard)

    @property
    def armed(self) -> bool:
        return self._armed

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
        if self._sock is not None:
            self._sock.close()

    def watched(self) -> list[int]:
        """The ranks this one judges: every follower from rank 0, rank 0 from a follower."""
        return [r for r in self._last if self._spec.rank == 0 or r == 0]

    def age(self, rank: int) -> float:
        """Seconds since `rank` was last heard (0 for this rank)."""
        last = self._last.get(rank)
        return 0.0 if last is None else time.monotonic() - last

    def stale(self, within_s: float) -> list[int]:
        """Watched ranks not heard for `within_s` (to name a peer after a collective fails)."""
        return [r for r in self.watched() if self.age(r) > within_s]

    def info(self, rank: int) -> dict:
        return self._info.get(rank, {})

    def _run(self) -> None:
        next_ping = 0.0
        told = 0
        while not self._stop.is_set():
            now = time.monotonic()
            if self._spec.rank == 0 and now >= next_ping:
                next_ping = now + self.period_s
                everyone = self._heard >= set(self._last)
                for r in self._last:
                    self._send(r, {"kind": "ping", "from": 0, "all": everyone})
                # Rank 0 goes on after telling the others three times (a datagram may be lost,
                # and once in init it holds the GIL and sends nothing until all have joined).
                told = told + 1 if everyone else 0
                if told >= 3:
                    self.everyone.set()
            self._receive()
            for r in self.watched() if self._armed else ():
                age = self.age(r)
                if age > self._spec.timeout_s and r not in self._silent:
                    self._silent.add(r)
                    self._on_silent(r, f"sent no heartbeat for {age:.1f}s")
            try:
                self._tick()
            except Exception:  # noqa: BLE001 - the heartbeat must keep running
                log.exception("group heartbeat tick failed")

    def _send(self, rank: int, body: dict) -> None:
        try:
            self._sock.sendto(json.dumps(body).encode(), self._peers[rank])
        except OSError:
            pass  # an unreachable peer shows as silence

    def _receive(self) -> None:
        try:
            data, (ip, port, *_) = self._sock.recvfrom(_MAX_DATAGRAM)
            body = json.loads(data)
            sender = int(body["from"])
        except (OSError, ValueError, KeyError, TypeError):
            return
        if not 0 <= sender < self._spec.size or self._peers[sender] != (ip, port):
            return  # only the address the group lists for that rank
        self._last[sender] = time.monotonic()
        self._heard.add(sender)
        if body.get("all") is True and sender == 0:
            self.everyone.set()
        if body.get("kind") == "ping" and self._spec.rank != 0:
            mem = host_memory()
            self._send(
                sender,
                {
                    "kind": "pong",
                    "from": self._spec.rank,
                    "host": self._host,
                    "total": mem.total_bytes,
                    "avail": mem.available_bytes,
                    "rss": mem.process_rss_bytes,
                    "stages": self._stages(),
                },
            )
        elif body.get("kind") == "pong":
            self._info[sender] = {
                k: body[k] for k in ("host", "total", "avail", "rss", "stages") if k in body
            }
