"""Who may call what: a server interceptor that checks every call's certificate and role.

The method table is default-deny: a method not listed is refused for every role. The
caller's identity comes from the client certificate TLS verified (the URI SAN), parsed
once per certificate and cached; revoked or expired certificates are refused with
UNAUTHENTICATED, a role not allowed with PERMISSION_DENIED. In plaintext development
mode there is no certificate: every caller is DEVELOPER and everything is allowed.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import time
from typing import Awaitable, Callable, Mapping, Optional

import grpc
from cryptography import x509

from cluster.security.identity import DEVELOPER, Identity, Role, identity_of
from cluster.security.tls import Revocations

log = logging.getLogger(__name__)

ALL_ROLES = frozenset(Role)
HEALTH = (
    "/grpc.health.v1.Health/Check",
    "/grpc.health.v1.Health/Watch",
    "/grpc.health.v1.Health/List",
)
REFLECTION = (
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
)

# Denials: (identity or None, method, status code name, reason) -> None, or an awaitable
# the refusal waits for (the coordinator's audit record).
OnDenied = Callable[[Optional[Identity], str, str, str], Optional[Awaitable[None]]]


def policy(table: Mapping[str, frozenset]) -> dict[str, frozenset]:
    """A daemon's table plus what every daemon allows: health for any fleet identity
    (readiness is no secret), reflection for operators."""
    out = {m: ALL_ROLES for m in HEALTH}
    out.update({m: frozenset({Role.OPERATOR}) for m in REFLECTION})
    out.update(table)
    return out


@functools.lru_cache(maxsize=4096)
def _identity_from_pem(pem: bytes) -> Identity:
    return identity_of(x509.load_pem_x509_certificate(pem))


def caller(context) -> Optional[Identity]:
    """The verified identity of the peer of `context`; None without a client certificate."""
    pem = context.auth_context().get("x509_pem_cert")
    if not pem:
        return None
    try:
        return _identity_from_pem(pem[0])
    except ValueError:
        return None


class Authorizer(grpc.aio.ServerInterceptor):
    def __init__(
        self,
        table: Mapping[str, frozenset],
        *,
        revocations: Optional[Revocations],
        plaintext: bool = False,
        on_denied: Optional[OnDenied] = None,
        where: str = "this server",
    ):
        self._table = policy(table)
        self._revocations = revocations
        self._plaintext = plaintext
        self._on_denied = on_denied
        self._where = where

    def identify(self, context) -> Identity:
        """The caller, or raises _Denied."""
        if self._plaintext:
            return DEVELOPER
        ident = caller(context)
        if ident is None:
            raise _Denied(
                None,
                grpc.StatusCode.UNAUTHENTICATED,
                f"{self._where} requires a client certificate with a StudioFleet identity "
                "(URI SAN studiofleet://ROLE/NAME); issue one with `fleetctl certs issue`",
            )
        if self._revocations is not None and self._revocations.revoked(ident.serial):
            raise _Denied(
                ident,
                grpc.StatusCode.UNAUTHENTICATED,
                f"certificate of {ident} (serial {ident.serial:x}) was revoked; ask an operator "
                "for a new one",
            )
        if ident.not_after is not None and ident.not_after.timestamp() < time.time():
            raise _Denied(
                ident,
                grpc.StatusCode.UNAUTHENTICATED,
                f"certificate of {ident} expired at {ident.not_after:%Y-%m-%d %H:%M} UTC; "
                "re-issue it and reconnect",
            )
        return ident

    def peer(self, context) -> Identity:
        """The caller as the interceptor already admitted it (no second revocation or
        expiry check: one that ticked over mid-call must not fail a handler)."""
        if self._plaintext:
            return DEVELOPER
        return caller(context) or DEVELOPER

    def check(self, context, method: str) -> Identity:
        ident = self.identify(context)
        if self._plaintext:
            return ident
        allowed = self._table.get(method, frozenset())
        if ident.role not in allowed:
            who = ", ".join(sorted(r.value for r in allowed)) or "no role"
            raise _Denied(
                ident,
                grpc.StatusCode.PERMISSION_DENIED,
                f"{ident} ({ident.role.value}) may not call {method} on {self._where}; "
                f"allowed: {who}",
            )
        return ident

    async def _refuse(self, context, method: str, denied: "_Denied") -> None:
        log.warning(
            "denied caller=%s method=%s code=%s", denied.identity or "-", method, denied.code.name
        )
        if self._on_denied is not None:
            recorded = self._on_denied(denied.identity, method, denied.code.name, denied.message)
            if inspect.isawaitable(recorded):  # e.g. the audit record: down before the caller hears
                await recorded
        await context.abort(denied.code, denied.message)

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None:
            return None
        return self.guard(handler, details.method)

    def guard(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        """`handler` behind the check, whatever its kind: all four (unary or streamed
        request, unary or streamed response) are wrapped; a handler of any other shape is
        replaced by one that refuses every caller (default deny holds for kinds too)."""
        kinds = [k for k in _KINDS if getattr(handler, k, None)]
        if len(kinds) != 1:
            log.error(
                "refusing %s: its handler has no known call kind (%s)", method, kinds or "none"
            )
            return grpc.unary_unary_rpc_method_handler(self._unknown_kind(method))
        kind = kinds[0]
        inner = getattr(handler, kind)
        wrap = self._guard_streaming if kind.endswith("_stream") else self._guard_unary
        return getattr(grpc, f"{kind}_rpc_method_handler")(
            wrap(inner, method), handler.request_deserializer, handler.response_serializer
        )

    async def _admit(self, context, method: str) -> None:
        """Returns when the caller may call `method`; else the refusal aborts the call."""
        try:
            self.check(context, method)
        except _Denied as denied:
            await self._refuse(context, method, denied)

    def _guard_unary(self, inner, method: str):
        """A handler with one response (its request unary or a stream): checked before it
        runs, so a streamed request is not read at all for a caller refused."""
        admit = self._admit

        async def unary(request, context):
            await admit(context, method)
            out = inner(request, context)
            return await out if inspect.isawaitable(out) else out

        return unary

    def _guard_streaming(self, inner, method: str):
        """A handler streaming its response; keeps its shape (an async generator, or a
        coroutine writing with context.write, as grpc's health Watch is)."""
        admit = self._admit

        if inspect.iscoroutinefunction(inner):

            async def writer(request, context):
                await admit(context, method)
                await inner(request, context)

            return writer

        async def generator(request, context):
            await admit(context, method)
            async with contextlib.aclosing(
                inner(request, context)
            ) as items:  # its finally runs now
                async for item in items:
                    yield item

        return generator

    def _unknown_kind(self, method: str):
        async def refuse(request, context):
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"{method} on {self._where} has no authorization rule for its call kind; "
                "refused for every caller",
            )

        return refuse


_KINDS = ("unary_unary", "unary_stream", "stream_unary", "stream_stream")


class _Denied(Exception):
    def __init__(self, identity: Optional[Identity], code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.identity, self.code, self.message = identity, code, message
