"""A daemon's monitoring port: HTTPS (aiohttp) beside its gRPC port, with the same
certificates and the same rules (docs/monitoring.md).

- TLS with the daemon's own certificate pair, re-read on the next handshake after the
  files change (as gRPC's dynamic credentials); 1.2 minimum.
- Every path is in a role table (cluster/security/roles.py, default deny). The caller is
  the StudioFleet identity of its client certificate (checked against the fleet CA, the
  revocation list and its expiry on every request), or, on the coordinator, a dashboard
  session a browser got from a one-time link (`fleetctl dashboard`), which acts as the
  operator who asked for it and idles out (HIPAA automatic logoff; cluster/dashboard_sessions.py,
  kept in the coordinator's state database: 503 while it does not answer).
- No certificate: 401; wrong role: 403; both say what to do. Refusals are logged (and, on
  the coordinator, audited) with the client's address and nothing the caller sent but the
  path; past a small burst per source they are counted and recorded once per window, and a
  source's unauthenticated attempts past a limit get 429 (cluster/http_denials.py).
- Connections have deadlines (handshake, header, idle) and caps (cluster/http_guard.py).
- A dashboard poll marked background (BACKGROUND_HEADER) does not extend its session.
- Plaintext (loopback development) serves plain HTTP with no roles, as gRPC does.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import ssl
import time
from typing import Awaitable, Callable, Mapping, Optional

from aiohttp import web
from cryptography import x509

from cluster.config import split_host_port
from cluster.dashboard_sessions import TOKEN_TTL_S, DashboardSessions, SessionsUnavailable
from cluster.http_denials import DenialLedger, Held
from cluster.http_guard import ConnectionGuard, GuardedSite, HttpLimits
from cluster.logs import fields
from cluster.security.identity import Identity, identity_of

log = logging.getLogger(__name__)

SESSION_COOKIE = "studiofleet_session"
BACKGROUND_HEADER = (
    "X-StudioFleet-Background"  # "1": a poll, not the user: the session's idle clock runs on
)
RECHECK_S = 1.0
SECURITY_HEADERS = {
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
}
# (identity, action, code, reason, peer=..., and count=/window_s= for a window's record)
OnDenied = Callable[..., Optional[Awaitable[None]]]


class MonitorHTTP:
    """The monitoring HTTPS server of one daemon; routes are added before start()."""

    what, flag = "monitoring", "--http-listen"  # in logs and errors
    cancel_on_disconnect = False  # cancel a handler whose client left

    def __init__(
        self,
        *,
        listen: str,
        security,
        table: Mapping[str, frozenset],
        where: str,
        sessions: Optional[DashboardSessions] = None,
        on_denied: Optional[OnDenied] = None,
        max_body: int = 64 * 1024,
        limits: HttpLimits = HttpLimits(),
    ):
        self._listen = listen
        self._security = security
        self._table = sorted(table.items(), key=lambda kv: -len(kv[0]))  # longest prefix first
        self._where = where
        self.sessions = sessions
        self._on_denied = on_denied
        self.limits = limits.within_file_limit()
        self.connections = ConnectionGuard(self.limits, self.what)
        self._denials = DenialLedger(
            window_s=self.limits.denial_window_s,
            burst=self.limits.denial_burst,
            limit=self.limits.unauthenticated_per_window,
        )
        self._flushing: Optional[asyncio.Task] = None
        self.app = web.Application(
            middlewares=[self.connections.middleware, self._guard], client_max_size=max_body
        )
        self._runner: Optional[web.AppRunner] = None
        self._ssl: Optional[ssl.SSLContext] = None
        self._stamp = None
        self._checked = 0.0
        self.port = 0
        if sessions is not None:
            self.app.router.add_get("/login", self._login)
            self.app.router.add_post("/logout", self._logout)

    @property
    def scheme(self) -> str:
        return "http" if self._security.plaintext else "https"

    @property
    def address(self) -> str:
        host, _ = split_host_port(self._listen)
        return f"{host}:{self.port}"

    # -- TLS ---------------------------------------------------------------------------
    def _context(self) -> ssl.SSLContext:
        files = self._security.server.files
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(files.cert, files.key)
        ctx.load_verify_locations(cafile=str(files.ca))
        # Optional at the handshake: a browser holding a dashboard session has no
        # certificate; every path that needs one refuses in _guard.
        ctx.verify_mode = ssl.CERT_OPTIONAL
        ctx.sni_callback = self._reload
        return ctx

    def _reload(self, sock: ssl.SSLObject, _server_name, _ctx) -> None:
        """On a handshake, at most once a second: new files -> a new context (a bad new
        pair is logged and the old one kept, as for gRPC)."""
        now = time.monotonic()
        if now - self._checked < RECHECK_S:
            return None
        self._checked = now
        stamp = self._security.server.files.stamp()
        if stamp != self._stamp:
            try:
                self._security.server.files.load(self._security.server.role)
                fresh = self._context()
            except Exception as exc:  # noqa: BLE001 - TLSConfigError, ssl.SSLError, OSError
                log.error(
                    "%s port: certificate reload skipped: %s: %s",
                    self.what,
                    type(exc).__name__,
                    exc,
                )
                self._stamp = stamp
                return None
            self._stamp, self._ssl = stamp, fresh
        if self._ssl is not None:
            sock.context = self._ssl
        return None

    # -- serving -------------------------------------------------------------------------
    async def start(self) -> int:
        host, port = split_host_port(self._listen)
        if not self._security.plaintext:
            self._stamp = self._security.server.files.stamp()
            self._ssl = self._context()
        self._runner = web.AppRunner(
            self.app,
            access_log=None,
            handle_signals=False,
            handler_cancellation=self.cancel_on_disconnect,
            keepalive_timeout=self.limits.idle_timeout_s,
        )
        await self._runner.setup()
        site = GuardedSite(self._runner, host, port, guard=self.connections, ssl_context=self._ssl)
        try:
            await site.start()
        except OSError as exc:
            await self._runner.cleanup()
            raise OSError(
                f"{self._where}: cannot open the {self.what} port {self._listen} ({exc.strerror or exc}); "
                f"choose another with {self.flag} HOST:PORT, or {self.flag} off"
            ) from None
        self.port = site.port
        self._flushing = asyncio.get_running_loop().create_task(self._flush_denials())
        log.info("%s on %s://%s (%s)", self.what, self.scheme, self.address, self.serves())
        return self.port

    def serves(self) -> str:
        return "/metrics" + (", dashboard" if self.sessions is not None else "")

    async def close(self, grace_s: float = 1.0) -> None:
        """Stop listening; handlers still running get about `grace_s` to finish, then are
        cancelled (aiohttp reads a timeout of 0 as none: it is kept above 0)."""
        if self._runner is not None:
            self._runner._shutdown_timeout = max(grace_s, 0.01)  # noqa: SLF001 - fixed at construction in aiohttp's API
            await self._runner.cleanup()
            self._runner = None
        if self._flushing is not None:
            self._flushing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flushing
            self._flushing = None
            for held in self._denials.due(everything=True):
                await self._record_held(held)

    async def _flush_denials(self) -> None:
        """Record the refusals held back in windows that have ended, as they end."""
        while True:
            await asyncio.sleep(min(max(self.limits.denial_window_s / 4, 0.05), 5.0))
            for held in self._denials.due():
                await self._record_held(held)

    # -- access ----------------------------------------------------------------------------
    def _allowed(self, path: str) -> tuple[str, frozenset]:
        """(the table entry that covers `path`, its roles); ("other", none) if none does.
        The entry, never the path itself, names the refusal in logs, metrics and audit:
        a caller's path is free text."""
        for prefix, roles in self._table:
            if path == prefix or path.startswith(prefix if prefix.endswith("/") else prefix + "/"):
                return prefix, roles
        return "other", frozenset()

    def _certificate(self, request: web.Request) -> Optional[Identity]:
        sslobj = request.transport.get_extra_info("ssl_object") if request.transport else None
        der = sslobj.getpeercert(binary_form=True) if sslobj is not None else None
        if not der:
            return None
        try:
            return identity_of(x509.load_der_x509_certificate(der))
        except ValueError:
            return None

    @web.middleware
    async def _guard(self, request: web.Request, handler):
        if self._security.plaintext or request.path in ("/login", "/logout"):
            if self._security.plaintext:
                self.connections.authenticated(request)  # no roles in development: nobody to prove
            response = await handler(request)
        else:
            entry, allowed = self._allowed(request.path)
            ident = self._certificate(request)
            if ident is None and self.sessions is not None:
                try:
                    ident = await self.sessions.identity(
                        request.cookies.get(SESSION_COOKIE, ""),
                        touch=request.headers.get(BACKGROUND_HEADER) != "1",
                    )
                except SessionsUnavailable as exc:
                    return _unavailable(request, exc)
            refusal = self._limited(request, self._check(ident, allowed, entry))
            if refusal is not None:
                status, message, headers = refusal
                await self._denied(request, ident, entry, status, message)
                response = _error(
                    status, message, browser="text/html" in request.headers.get("Accept", "")
                )
                response.headers.update(headers)
                return response
            self.connections.authenticated(request)
            response = await handler(request)
        response.headers.update(SECURITY_HEADERS)
        return response

    def _check(
        self, ident: Optional[Identity], allowed: frozenset, path: str
    ) -> Optional[tuple[int, str]]:
        if ident is None:
            how = "a client certificate from the fleet CA (`fleetctl certs issue`)" + (
                ", or a dashboard session: run `fleetctl dashboard` and open the link it prints"
                if self.sessions is not None
                else ""
            )
            return 401, f"{self._where} requires {how}"
        revocations = self._security.server.revocations
        if ident.serial and revocations.revoked(ident.serial):
            return (
                401,
                f"certificate of {ident} (serial {ident.serial:x}) was revoked; ask an operator for a new one",
            )
        if ident.not_after is not None and ident.not_after.timestamp() < time.time():
            return 401, f"certificate of {ident} expired; re-issue it"
        if ident.role not in allowed:
            who = ", ".join(sorted(r.value for r in allowed)) or "no role"
            what = "this path" if path == "other" else path
            return (
                403,
                f"{ident} ({ident.role.value}) may not read {what} on {self._where}; allowed: {who}",
            )
        return None

    def _limited(
        self, request: web.Request, refusal: Optional[tuple[int, str]]
    ) -> Optional[tuple[int, str, dict]]:
        """(status, message, headers) of a refusal: a 401 from a source past its limit of
        unauthenticated attempts becomes 429 with Retry-After; None when allowed."""
        if refusal is None:
            return None
        status, message = refusal
        if status == 401:
            wait = self._denials.retry_after(source_of(request))
            if wait:
                return (
                    429,
                    (
                        f"too many unauthenticated requests from this address; retry after {wait} s with "
                        f"credentials ({message})"
                    ),
                    {"Retry-After": str(wait)},
                )
        return status, message, {}

    async def _denied(
        self, request: web.Request, ident: Optional[Identity], entry: str, status: int, message: str
    ) -> None:
        """A refusal: recorded now (logged, and audited on the coordinator) within the
        source's burst, else held for its window's record."""
        source = source_of(request)
        if not self._denials.refused(source, entry, status, ident, message):
            return
        peername = request.transport.get_extra_info("peername") if request.transport else None
        peer = f"http:{source}:{peername[1]}" if peername else f"http:{source}"
        log.warning(
            "denied caller=%s path=%s status=%d peer=%s",
            ident or "-",
            entry,
            status,
            peer,
            extra=fields(
                event="http.denied", caller=str(ident or ""), path=entry, status=status, peer=peer
            ),
        )
        await self._report_denied(ident, entry, status, message, peer=peer)

    async def _record_held(self, held: Held) -> None:
        log.warning(
            "denied caller=%s path=%s status=%d peer=http:%s count=%d window_s=%g",
            held.identity or "-",
            held.entry,
            held.status,
            held.source,
            held.count,
            held.window_s,
            extra=fields(
                event="http.denied",
                caller=str(held.identity or ""),
                path=held.entry,
                status=held.status,
                peer=f"http:{held.source}",
                count=held.count,
            ),
        )
        await self._report_denied(
            held.identity,
            held.entry,
            held.status,
            held.reason,
            peer=f"http:{held.source}",
            count=held.count,
            window_s=held.window_s,
        )

    async def _report_denied(
        self, ident: Optional[Identity], entry: str, status: int, message: str, **details
    ) -> None:
        if self._on_denied is not None:
            code = {401: "UNAUTHENTICATED", 429: "RESOURCE_EXHAUSTED"}.get(
                status, "PERMISSION_DENIED"
            )
            done = self._on_denied(ident, f"http {entry}", code, message, **details)
            if inspect.isawaitable(done):
                await done

    async def _login(self, request: web.Request) -> web.StreamResponse:
        refusal = self._limited(
            request,
            (
                401,
                "this dashboard link is used up or expired (links work once, for "
                f"{TOKEN_TTL_S:.0f} s); run `fleetctl dashboard` for a new one",
            ),
        )
        if refusal[0] == 429:  # no guessing of links at speed
            await self._denied(request, None, "/login", *refusal[:2])
            response = _error(*refusal[:2], browser=True)
            response.headers.update(refusal[2])
            return response
        try:
            sid = (
                await self.sessions.redeem(request.query.get("token", ""))
                if self.sessions is not None
                else None
            )
        except SessionsUnavailable as exc:
            return _unavailable(request, exc)
        if sid is None:
            await self._denied(request, None, "/login", *refusal[:2])
            return _error(*refusal[:2], browser=True)
        self.connections.authenticated(request)
        response = web.HTTPSeeOther("/")
        response.set_cookie(
            SESSION_COOKIE,
            sid,
            httponly=True,
            secure=not self._security.plaintext,
            samesite="Strict",
            path="/",
        )
        log.info("dashboard session opened for %s", await self.sessions.identity(sid, touch=False))
        return response

    async def _logout(self, request: web.Request) -> web.StreamResponse:
        if self.sessions is not None:
            try:
                await self.sessions.end(request.cookies.get(SESSION_COOKIE, ""))
            except SessionsUnavailable as exc:
                return _unavailable(request, exc)
        response = web.HTTPSeeOther("/")
        response.del_cookie(SESSION_COOKIE, path="/")
        return response


def source_of(request: web.Request) -> str:
    """The client's address (no port): the unit of per-source limits."""
    peer = request.transport.get_extra_info("peername") if request.transport else None
    return str(peer[0]) if peer else "-"


def _unavailable(request: web.Request, exc: SessionsUnavailable) -> web.Response:
    response = _error(503, str(exc), browser="text/html" in request.headers.get("Accept", ""))
    response.headers.update(SECURITY_HEADERS)
    return response


def _error(status: int, message: str, *, browser: bool) -> web.Response:
    if browser:
        from html import escape

        body = (
            f"<!doctype html><meta charset=utf-8><title>StudioFleet: {status}</title>"
            f"<h1>{status}</h1><p>{escape(message)}</p>"
        )
        response = web.Response(status=status, text=body, content_type="text/html")
    else:
        response = web.Response(status=status, text=message + "\n", content_type="text/plain")
    response.headers.update(SECURITY_HEADERS)
    return response


def metrics_route(app: web.Application, registry) -> None:
    """GET /metrics: the registry in Prometheus' text format."""
    from cluster.metrics import CONTENT_TYPE, exposition

    async def metrics(_request: web.Request) -> web.Response:
        response = web.Response(body=exposition(registry))
        response.headers["Content-Type"] = CONTENT_TYPE
        return response

    app.router.add_get("/metrics", metrics)
