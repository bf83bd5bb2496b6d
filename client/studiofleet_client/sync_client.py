"""FleetClient: the blocking client, over one channel per coordinator (or node) address."""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Iterator, Optional, Sequence, Union

import grpc

from studiofleet_client.api import inference_pb2, inference_pb2_grpc
from studiofleet_client.connect import resolve_tls
from studiofleet_client.results import GenerateResult, ResultBuilder, build_request, with_request_id
from studiofleet_client.resume import StreamState
from studiofleet_client.retry import Attempts, RetryPolicy, client_setup
from studiofleet_client.tls import ClientTLS, open_channel

__all__ = ["FleetClient"]


class FleetClient:
    """A synchronous client of one or more Inference endpoints (coordinators or nodes).

        client = FleetClient(["10.0.0.1:7800", "10.0.0.2:7800"], tls=ClientTLS("/etc/studiofleet", "notes-app"))
        result = client.generate(prompt="...", max_tokens=400, timeout_s=60)

    mTLS with an app certificate: `tls=`, or STUDIOFLEET_TLS_DIR + STUDIOFLEET_TLS_NAME;
    `plaintext=True` reaches a loopback development fleet only. `server_name`: the name
    the server's certificate must carry, when it is not the address's host.

    A call that fails before its first chunk is retried as `retry.decide_retry` says:
    UNAVAILABLE on the next address, RESOURCE_EXHAUSTED after the server's hint; at most
    `max_attempts` attempts within the one `timeout_s`. A stream that breaks after it
    (UNAVAILABLE: a coordinator killed, a reset) is resumed on the next coordinator and
    spliced, each token once (resume.py); `GenerateResult.coordinator_failovers` counts
    the moves. Safe to share between threads.
    """

    def __init__(
        self,
        targets: Union[str, Sequence[str]],
        *,
        channel: Optional[grpc.Channel] = None,
        max_attempts: Optional[int] = None,
        retry_policy: Optional[RetryPolicy] = None,
        channel_options: Sequence[tuple] = (),
        tls: Optional[ClientTLS] = None,
        plaintext: bool = False,
        server_name: Optional[str] = None,
    ):
        self.targets, self.retry_policy = client_setup(targets, channel, retry_policy, max_attempts)
        self._tls = None if channel is not None else resolve_tls(tls, plaintext)
        self._server_name = server_name
        self._channels = (
            [channel]
            if channel is not None
            else [
                open_channel(t, self._tls, server_name=server_name, options=channel_options)
                for t in self.targets
            ]
        )
        self._stubs = [inference_pb2_grpc.InferenceStub(c) for c in self._channels]
        self._preferred = 0
        self._lock = threading.Lock()

    @property
    def target(self) -> str:
        """The address the next call starts with: the one that last worked."""
        return self.targets[self._preferred]

    def close(self) -> None:
        for channel in self._channels:
            channel.close()

    def __enter__(self) -> "FleetClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def stream(
        self, request: inference_pb2.GenerateRequest, *, timeout_s: Optional[float] = None
    ) -> Iterator[inference_pb2.GenerateChunk]:
        """Iterate over the chunks as they arrive; raises a FleetError subclass on failure.
        The deadline starts now. A request without request_id gets one here, so every
        attempt and error names it. Stop early with `contextlib.closing(...)` to cancel at once.
        With allow_restart, a chunk with `restarted` set voids every chunk before it. A
        stream broken mid-way continues from the next coordinator, without repeats; after
        such a failover the final chunk's usage counts the whole completion."""
        request = with_request_id(request)
        return self._stream(request, self._attempts(request, timeout_s))

    def _attempts(
        self, request: inference_pb2.GenerateRequest, timeout_s: Optional[float]
    ) -> Attempts:
        with self._lock:
            start = self._preferred
        return Attempts(self.targets, start, self.retry_policy, timeout_s, request.request_id)

    def _stream(
        self, request: inference_pb2.GenerateRequest, attempts: Attempts
    ) -> Iterator[inference_pb2.GenerateChunk]:
        stream = StreamState(request, max_failovers=self.retry_policy.max_coordinator_failovers)
        while True:
            timeout = attempts.begin()
            index = attempts.index
            call = self._stubs[index].Generate(stream.request, timeout=timeout)
            received = False
            delay = 0.0
            try:
                for chunk in call:
                    if not received:
                        received = True
                        with self._lock:
                            self._preferred = index
                    yield stream.observe(chunk)
                return
            except grpc.RpcError as err:
                if received:  # mid-stream: continue it on the next coordinator, or raise why not
                    attempts.broke(err, stream)
                else:
                    delay = attempts.failed(
                        err, received_chunk=False, stream=stream
                    )  # raises if none is left
            finally:
                call.cancel()
            time.sleep(delay)

    def generate(
        self,
        request: Optional[inference_pb2.GenerateRequest] = None,
        *,
        timeout_s: Optional[float] = None,
        **kwargs,
    ) -> GenerateResult:
        """Run one request to the end and return its text and metadata; raises
        GenerationInterruptedError (with the partial result) if the node ended it early.
        Without `request`, the keyword arguments go to build_request (allow_restart among
        them); after a restart the result holds only the text generated since it."""
        request = with_request_id(request if request is not None else build_request(**kwargs))
        attempts = self._attempts(request, timeout_s)
        builder = ResultBuilder(request.request_id)
        with contextlib.closing(self._stream(request, attempts)) as chunks:
            for chunk in chunks:
                builder.add(chunk)
        return builder.result(target=attempts.target, attempts=attempts.attempt)
