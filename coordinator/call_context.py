"""What a request's run uses of the caller's call, whichever door it came through: the
gRPC servicer context satisfies `CallContext` as it is, and so do the HTTP front door's
`HttpCall` and the audit's `AuditedCall` wrapper. The caller's identity is not part of
it: each door finds the caller its own way and hands it to the relay."""

from __future__ import annotations

from typing import NoReturn, Optional, Protocol, Sequence, runtime_checkable

import grpc

PUSHBACK_KEY = "grpc-retry-pushback-ms"


@runtime_checkable
class CallContext(Protocol):
    def peer(self) -> str:
        """Where the call came from, as the audit records it."""

    def code(self) -> Optional[grpc.StatusCode]:
        """The status the call was ended with (None while it runs)."""

    def time_remaining(self) -> Optional[float]:
        """Seconds left before the caller's deadline; None: it set none."""

    async def abort(
        self,
        code: grpc.StatusCode,
        details: str = "",
        trailing_metadata: Sequence[tuple[str, str]] = (),
    ) -> NoReturn:
        """End the call with this status (raises grpc.aio.AbortError)."""


async def busy(context: CallContext, retry_after_ms: int, message: str) -> NoReturn:
    """RESOURCE_EXHAUSTED with the retry hint in the trailer and the message."""
    await context.abort(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        f"{message}; retry after {retry_after_ms} ms",
        trailing_metadata=((PUSHBACK_KEY, str(retry_after_ms)),),
    )
