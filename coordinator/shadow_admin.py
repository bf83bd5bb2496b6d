"""The Shadow service (what `fleetctl shadow` calls; docs/shadow.md). Audited as the Fleet
admin calls are (coordinator/admin.py): a start or stop writes an `accepted` record before
it acts and its outcome after; a read writes one record; a call that cannot be audited is
refused."""

from __future__ import annotations

import logging
import uuid

import grpc

from cluster.api import shadow_pb2, shadow_pb2_grpc
from cluster.validation import serves
from coordinator.fleet import Fleet
from coordinator.shadow import Shadow, ShadowConfig, ShadowRefused, remote_unsafe

log = logging.getLogger(__name__)


class ShadowAdmin(shadow_pb2_grpc.ShadowServicer):
    def __init__(self, *, shadow: Shadow, fleet: Fleet, identify, audit):
        self._shadow = shadow
        self._fleet = fleet
        self._identify = identify
        self._audit = audit

    async def _record(self, context, ident, action: str, *, done: bool = False, **fields) -> None:
        """Durable before the call goes on; else UNAVAILABLE naming the cause."""
        await self._audit.admin_or_abort(
            context, ident, context.peer(), action, done=done, **fields
        )

    async def _refuse(self, context, ident, action: str, code, message: str, **fields) -> None:
        await self._audit.write_or_log(
            self._audit.admin_record(
                ident, context.peer(), action, outcome="refused", code=code.name, **fields
            )
        )
        await context.abort(code, message)

    async def StartShadow(self, request, context) -> shadow_pb2.ShadowReport:
        ident = self._identify(context)
        fields = {
            "model": request.model[:200],
            "fraction": request.fraction,
            "templates": [t[:64] for t in request.templates[:16]],
            "operation_id": f"op-{uuid.uuid4().hex[:12]}",
        }
        try:
            config = ShadowConfig.of(request)
        except ShadowRefused as exc:
            await self._refuse(
                context,
                ident,
                "shadow.start",
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{exc.field}: {exc}",
                **fields,
            )
        why = self._unservable(config.model)
        if why:
            await self._refuse(
                context,
                ident,
                "shadow.start",
                grpc.StatusCode.FAILED_PRECONDITION,
                f"model: {why}",
                **fields,
            )
        await self._record(context, ident, "shadow.start", outcome="accepted", code="", **fields)
        try:
            run = await self._shadow.start(config, ident.name if ident else "plaintext operator")
        except Exception as exc:  # noqa: BLE001 - the state database: say so, never UNKNOWN
            await self._unsaved(context, ident, "shadow.start", exc, **fields)
        await self._record(context, ident, "shadow.start", done=True, shadow_id=run.id, **fields)
        return self._shadow.report()

    async def _unsaved(self, context, ident, action: str, exc: Exception, **fields) -> None:
        """The state database did not take the change: nothing changed; audited, then aborts."""
        log.error("%s: the state database did not take it: %s", action, exc)
        await self._audit.write_or_log(
            self._audit.admin_record(
                ident, context.peer(), action, outcome="failed", code="UNAVAILABLE", **fields
            )
        )
        await context.abort(
            grpc.StatusCode.UNAVAILABLE,
            f"{action} was not carried out: the state database did not take it "
            f"({type(exc).__name__}); check it (docs/state.md) and retry",
        )

    def _unservable(self, model: str) -> str:
        """Why no copy could go anywhere now ("" when some READY node could take one)."""
        serving = [
            e for e in self._fleet.routable() if serves(e.model_id, e.status.model.version, model)
        ]
        if not serving:
            served = ", ".join(sorted({e.model_id for e in self._fleet.routable()})) or "none"
            return (
                f"no READY node serves {model!r} (READY nodes serve: {served}); start a node "
                "with the candidate model first (`fleetctl nodes`)"
            )
        unsafe = sorted(e.node_id for e in serving if remote_unsafe(e))
        if len(unsafe) == len(serving):
            return (
                f"the nodes serving {model!r} ({', '.join(unsafe)}) are remote endpoints not "
                "declared covered for PHI; restart them with --phi-allowed if a BAA covers them "
                "(docs/upstream.md), or shadow to a local node"
            )
        return ""

    async def StopShadow(self, request, context) -> shadow_pb2.ShadowReport:
        ident = self._identify(context)
        op = f"op-{uuid.uuid4().hex[:12]}"
        run = self._shadow.run
        if run is None or not run.active:
            await self._refuse(
                context,
                ident,
                "shadow.stop",
                grpc.StatusCode.FAILED_PRECONDITION,
                "no shadow run is active on this coordinator (`fleetctl shadow show`)",
                operation_id=op,
            )
        await self._record(
            context, ident, "shadow.stop", outcome="accepted", code="", operation_id=op
        )
        try:
            await self._shadow.stop()
        except Exception as exc:  # noqa: BLE001 - the state database: say so, never UNKNOWN
            await self._unsaved(context, ident, "shadow.stop", exc, operation_id=op)
        await self._record(
            context, ident, "shadow.stop", done=True, operation_id=op, shadow_id=run.id
        )
        return self._shadow.report()

    async def GetShadow(self, request, context) -> shadow_pb2.ShadowReport:
        await self._record(context, self._identify(context), "shadow.get")
        return self._shadow.report()
