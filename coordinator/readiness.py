"""Is this coordinator ready for new requests? (docs/ha.md "Readiness")

Ready means its state database answers and at least one node is routable. The database is
probed with `SELECT 1` every `readiness_interval_s` in a worker thread (never on the event
loop, never per request); a probe slower than `readiness_timeout_s` counts as a failure.
The verdict drives `grpc.health.v1` for the Inference service (the empty service stays
SERVING while the process lives: it is liveness, and `fleetctl` keeps working), the front
door's GET /ready, and two gauges. While the database is unreachable, new Generate calls
get UNAVAILABLE (a client with several addresses moves on); streams in flight finish.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Callable, Optional

import grpc
import sqlalchemy as sa

log = logging.getLogger(__name__)

READY = "ready"
STATE_DOWN = "state_store_unreachable"
NO_NODE = "no_routable_node"
STOPPING = "shutting_down"


class Readiness:
    """The verdict and what keeps it current: `run()` probes, `refresh()` re-reads the fleet."""

    def __init__(
        self,
        *,
        state,
        fleet,
        interval_s: float,
        timeout_s: float,
        on_change: Callable[[bool, str], object],
        metrics=None,
        where: str = "coordinator",
    ):
        self._state, self._fleet = state, fleet
        self._interval_s, self._timeout_s = interval_s, timeout_s
        self._on_change = on_change  # (ready, reason), called on every change of the verdict
        self._metrics = metrics
        self._where = where
        self.state_up = True  # the database answered at start (StateDB migrated it)
        self.stopping = False
        self._shown: Optional[tuple[bool, str]] = None
        self._probe: Optional[asyncio.Future] = None  # a probe still running in its thread
        self._task: Optional[asyncio.Task] = None

    @property
    def reason(self) -> str:
        if self.stopping:
            return STOPPING
        if not self.state_up:
            return STATE_DOWN
        if not self._fleet.routable():
            return NO_NODE
        return READY

    @property
    def ready(self) -> bool:
        return self.reason == READY

    def refresh(self) -> None:
        """Re-evaluate (the fleet changed, a probe ended); tells `on_change` if the verdict moved."""
        verdict = (self.ready, self.reason)
        if verdict == self._shown:
            return
        self._shown = verdict
        if self._metrics is not None:
            self._metrics.ready.set(int(verdict[0]))
            self._metrics.state_store_up.set(int(self.state_up))
        log.info("%s readiness: %s", self._where, verdict[1])
        self._on_change(*verdict)

    def start(self) -> None:
        self.refresh()
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)  # the probe's period, not a synchronisation
            try:
                await self.probe()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the loop outlives any one probe's failure
                log.exception("%s readiness probe failed unexpectedly", self._where)

    async def probe(self) -> bool:
        """One `SELECT 1`; True when it answered within the timeout. A probe still stuck in
        its thread (a connect that hangs) counts as a failure and is not doubled."""
        if self._probe is None or self._probe.done():
            self._probe = asyncio.ensure_future(asyncio.to_thread(self._select_one))
        try:
            up = await asyncio.wait_for(asyncio.shield(self._probe), self._timeout_s)
        except TimeoutError:
            up = False
        if up != self.state_up:
            log.warning(
                "%s state database %s %s",
                self._where,
                self._state.shown,
                "answers again"
                if up
                else "does not answer: new requests are refused until it does",
            )
        self.state_up = up
        if self._metrics is not None:
            self._metrics.state_store_up.set(int(up))
        self.refresh()
        return up

    def _select_one(self) -> bool:
        try:
            with self._state.engine.connect() as conn:
                conn.exec_driver_sql("SELECT 1").scalar()
            return True
        except sa.exc.SQLAlchemyError as exc:
            log.debug("state probe: %s", type(exc.orig or exc).__name__)
            return False

    async def close(self) -> None:
        self.stopping = True
        self.refresh()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None


class ReadinessGate(grpc.aio.ServerInterceptor):
    """Refuses new calls of `service` with UNAVAILABLE while the state database is down;
    calls already running are not touched."""

    def __init__(self, readiness: Readiness, service: str, where: str):
        self._readiness, self._prefix, self._where = readiness, f"/{service}/", where

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if (
            handler is None
            or self._readiness.state_up
            or not handler_call_details.method.startswith(self._prefix)
        ):
            return handler
        message = (
            f"{self._where} cannot reach its state database; it takes no new requests until it does "
            "(retry another coordinator)"
        )

        async def refuse(_request, context):
            await context.abort(grpc.StatusCode.UNAVAILABLE, message)

        if handler.response_streaming:

            async def refuse_stream(request, context):
                await refuse(request, context)
                yield  # pragma: no cover - abort raises

            return _like(handler, refuse_stream)
        return _like(handler, refuse)


def _like(handler: grpc.RpcMethodHandler, behaviour) -> grpc.RpcMethodHandler:
    """A handler of the same shape (unary or stream, same serializers) running `behaviour`."""
    kinds = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }
    make = kinds[(handler.request_streaming, handler.response_streaming)]
    return make(
        behaviour,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )
