"""AsyncFleetClient: the asyncio client (grpc.aio), with FleetClient's API and retry rules."""

from __future__ import annotations

import asyncio
import contextlib
import os
from typing import AsyncIterator, Optional, Sequence, Union

import grpc
import grpc.aio

from studiofleet_client.api import inference_pb2, inference_pb2_grpc
from studiofleet_client.connect import resolve_tls
from studiofleet_client.results import GenerateResult, ResultBuilder, build_request, with_request_id
from studiofleet_client.resume import StreamState
from studiofleet_client.retry import Attempts, RetryPolicy, client_setup
from studiofleet_client.tls import ENV_DIR, ClientTLS, open_channel

__all__ = ["AsyncFleetClient"]


class AsyncFleetClient:
    """An asyncio client of one or more Inference endpoints (coordinators or nodes).

        async with AsyncFleetClient(["10.0.0.1:7700", "10.0.0.2:7700"]) as client:
            result = await client.generate(prompt="...", max_tokens=400, timeout_s=60)
            async for chunk in client.stream(request, timeout_s=60): ...

    Retries, and resumes a stream broken mid-way on the next coordinator, as FleetClient
    does. Cancelling the task that awaits a call cancels the RPC:
    the server sees the cancel and frees the slot. Channels are made on first use, in the
    running event loop; use one client per event loop.
    """

    def __init__(
        self,
        targets: Union[str, Sequence[str]],
        *,
        channel: Optional[grpc.aio.Channel] = None,
        max_attempts: Optional[int] = None,
        retry_policy: Optional[RetryPolicy] = None,
        channel_options: Sequence[tuple] = (),
        tls: Optional[ClientTLS] = None,
        plaintext: bool = False,
        server_name: Optional[str] = None,
    ):
        self.targets, self.retry_policy = client_setup(targets, channel, retry_policy, max_attempts)
        # Certificate files are read off the event loop: STUDIOFLEET_TLS_DIR/NAME on first use.
        self._tls_from_env = (
            channel is None and tls is None and not plaintext and bool(os.environ.get(ENV_DIR))
        )
        self._tls = (
            None if channel is not None or self._tls_from_env else resolve_tls(tls, plaintext)
        )
        self._server_name = server_name
        self._options = list(channel_options)
        self._channels: list[Optional[grpc.aio.Channel]] = (
            [channel] if channel is not None else [None] * len(self.targets)
        )
        self._stubs: list[Optional[inference_pb2_grpc.InferenceStub]] = [None] * len(self.targets)
        self._preferred = 0

    @property
    def target(self) -> str:
        """The address the next call starts with: the one that last worked."""
        return self.targets[self._preferred]

    async def _stub(self, index: int) -> inference_pb2_grpc.InferenceStub:
        if self._channels[index] is None:
            if self._tls_from_env:
                tls = await asyncio.to_thread(resolve_tls, None, False)
                self._tls, self._tls_from_env = self._tls or tls, False
            # The files' change check (a stat, a re-read) runs in a thread; the channel is
            # made here, in the loop it belongs to.
            creds = (
                await asyncio.to_thread(self._tls.credentials) if self._tls is not None else None
            )
            if self._channels[index] is None:  # another task may have made it meanwhile
                self._channels[index] = open_channel(
                    self.targets[index],
                    self._tls,
                    server_name=self._server_name,
                    options=self._options,
                    aio=True,
                    credentials=creds,
                )
        if self._stubs[index] is None:
            self._stubs[index] = inference_pb2_grpc.InferenceStub(self._channels[index])
        return self._stubs[index]

    async def close(self) -> None:
        channels, self._channels = self._channels, [None] * len(self.targets)
        self._stubs = [None] * len(self.targets)
        for channel in channels:
            if channel is not None:
                await channel.close()

    async def __aenter__(self) -> "AsyncFleetClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    def _attempts(
        self, request: inference_pb2.GenerateRequest, timeout_s: Optional[float]
    ) -> Attempts:
        return Attempts(
            self.targets, self._preferred, self.retry_policy, timeout_s, request.request_id
        )

    def stream(
        self, request: inference_pb2.GenerateRequest, *, timeout_s: Optional[float] = None
    ) -> AsyncIterator[inference_pb2.GenerateChunk]:
        """`async for` over the chunks as they arrive; raises a FleetError subclass on
        failure. The deadline starts now. To stop early, break inside
        `async with contextlib.aclosing(client.stream(...))` so the RPC is cancelled at
        once rather than when the generator is collected. With allow_restart, a chunk with
        `restarted` set voids every chunk before it."""
        request = with_request_id(request)
        return self._stream(request, self._attempts(request, timeout_s))

    async def _stream(
        self, request: inference_pb2.GenerateRequest, attempts: Attempts
    ) -> AsyncIterator[inference_pb2.GenerateChunk]:
        stream = StreamState(request, max_failovers=self.retry_policy.max_coordinator_failovers)
        while True:
            timeout = attempts.begin()
            index = attempts.index
            call = (await self._stub(index)).Generate(stream.request, timeout=timeout)
            received = False
            delay = 0.0
            try:
                async for chunk in call:
                    if not received:
                        received = True
                        self._preferred = index
                    yield stream.observe(chunk)
                return
            except grpc.RpcError as err:  # grpc.aio.AioRpcError included
                if received:  # mid-stream: continue it on the next coordinator, or raise why not
                    attempts.broke(err, stream)
                else:
                    delay = attempts.failed(
                        err, received_chunk=False, stream=stream
                    )  # raises if none is left
            finally:
                call.cancel()  # no-op when done; on task cancellation, tells the server
            await asyncio.sleep(delay)

    async def generate(
        self,
        request: Optional[inference_pb2.GenerateRequest] = None,
        *,
        timeout_s: Optional[float] = None,
        **kwargs,
    ) -> GenerateResult:
        """Run one request to the end; as FleetClient.generate."""
        request = with_request_id(request if request is not None else build_request(**kwargs))
        attempts = self._attempts(request, timeout_s)
        builder = ResultBuilder(request.request_id)
        async with contextlib.aclosing(self._stream(request, attempts)) as chunks:
            async for chunk in chunks:
                builder.add(chunk)
        return builder.result(target=attempts.target, attempts=attempts.attempt)
