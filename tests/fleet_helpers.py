"""Helpers for tests that drive a coordinator: collect streams, follow events."""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

import grpc

from cluster.api import fleet_pb2, fleet_pb2_grpc, inference_pb2
from cluster.client import build_request

NOTE = [
    ("system", "You are a clinical documentation assistant."),
    ("user", "Write a SOAP note for a synthetic follow-up visit."),
]


@dataclass
class Stream:
    """One request's stream as the caller saw it."""

    request: inference_pb2.GenerateRequest
    ids: list = field(default_factory=list)
    text: str = ""
    final: Optional[inference_pb2.FinalInfo] = None
    error: Optional[grpc.RpcError] = None
    times: list = field(default_factory=list)
    started: threading.Event = field(default_factory=threading.Event)
    restarted_at: list = field(
        default_factory=list
    )  # (len(ids), len(text)) where a `restarted` chunk came


@contextlib.contextmanager
def serving_coordinator(node, logs: Path, name: str, *args: str) -> Iterator:
    """A coordinator routing to `node` (a module's shared node), started and routable;
    stopped on exit."""
    from tests.procs import CoordinatorProcess

    with CoordinatorProcess(*args, nodes=[node.address], name=name) as co:
        co.start(logs)
        co.wait_serving()
        co.wait_routable(1)
        yield co


def note(i: int, max_tokens: int, **kw) -> inference_pb2.GenerateRequest:
    kw.setdefault("temperature", 0.0)
    return build_request(
        messages=[NOTE[0], ("user", f"{NOTE[1][1]} Visit {i}.")],
        max_tokens=max_tokens,
        request_id=kw.pop("request_id", f"note-{i}"),
        **kw,
    )


def collect(
    stub, request, timeout_s: float = 120.0, on_chunk: Callable[[Stream], None] = None
) -> Stream:
    s = Stream(request)
    try:
        for chunk in stub.Generate(request, timeout=timeout_s):
            s.times.append(time.monotonic())
            if chunk.restarted:
                s.restarted_at.append((len(s.ids), len(s.text)))
            s.ids.extend(chunk.token_ids)
            s.text += chunk.text
            if chunk.token_ids:
                s.started.set()
            if chunk.HasField("final"):
                assert s.final is None, "only the last chunk carries final"
                s.final = chunk.final
            if on_chunk:
                on_chunk(s)
    except grpc.RpcError as err:
        s.error = err
    s.started.set()
    return s


def wait_queued(co, count: int, timeout_s: float = 10.0) -> None:
    """Re-read the coordinator's listing until `count` requests wait in its queue."""
    deadline = time.monotonic() + timeout_s
    while co.nodes().queued < count:
        assert time.monotonic() < deadline, f"{count} queued requests not seen in {timeout_s}s"
        time.sleep(0.01)


def in_threads(fn, items) -> list:
    out = [None] * len(items)

    def run(i, item):
        out[i] = fn(item)

    threads = [
        threading.Thread(target=run, args=(i, it), daemon=True) for i, it in enumerate(items)
    ]
    for t in threads:
        t.start()
    return out, threads


def start_streams(stub, count: int, max_tokens: int, tag: str) -> tuple[list, list]:
    """`count` notes sent at once, one thread each; join the threads, then read the streams."""
    return in_threads(
        lambda i: collect(stub, note(i, max_tokens, request_id=f"{tag}-{i}"), timeout_s=120),
        list(range(count)),
    )


class EventWatch:
    """Follow a coordinator's events in a thread; wait for one that matches."""

    def __init__(self, coordinator):
        self._channel = coordinator.dial()  # as the harness's operator
        self._call = fleet_pb2_grpc.FleetStub(self._channel).WatchEvents(
            fleet_pb2.WatchEventsRequest(replay=True)
        )
        self.events: list[fleet_pb2.FleetEvent] = []
        self._cond = threading.Condition()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        try:
            for ev in self._call:
                with self._cond:
                    self.events.append(ev)
                    self._cond.notify_all()
        except grpc.RpcError:
            pass

    def wait_for(
        self,
        kind: int,
        node_id: str = "",
        timeout_s: float = 30.0,
        after: float = 0.0,
        address: str = "",
    ):
        """The first event of `kind` (for `node_id`, at `address`) at or after unix time `after`."""
        return self.wait_until(
            lambda e: (
                e.kind == kind
                and (not node_id or e.node_id == node_id)
                and (not address or e.address == address)
                and e.time_unix_s >= after
            ),
            timeout_s,
            f"{fleet_pb2.EventKind.Name(kind)} for {node_id or 'any node'}",
        )

    def wait_until(self, wanted, timeout_s: float = 30.0, what: str = "matching event"):
        """The first event (replayed history included) for which `wanted(event)` holds."""

        def match():
            return next((e for e in self.events if wanted(e)), None)

        with self._cond:
            if not self._cond.wait_for(match, timeout=timeout_s):
                kinds = [
                    (fleet_pb2.EventKind.Name(e.kind), e.node_id, e.step, e.reason)
                    for e in self.events[-15:]
                ]
                raise AssertionError(f"no {what} in {timeout_s}s; recent events: {kinds}")
            return match()

    def close(self) -> None:
        self._call.cancel()
        self._channel.close()
