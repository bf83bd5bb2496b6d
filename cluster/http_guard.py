"""Connection limits of an HTTP(S) port (docs/security.md): every connection gets a
deadline, and the port holds a bounded number of them, so slow or idle clients cannot
take the file descriptors the gRPC port needs.

- Accepting is ours (`GuardedSite`): over a cap, a new connection is closed at once,
  before its TLS handshake. Caps: `max_connections` in all, `max_unauthenticated` for
  connections none of whose requests has yet proved a caller (certificate, token or
  dashboard session), of which one client address may hold half. Both caps are also kept
  under a quarter of the process's file limit.
- The TLS handshake gets `handshake_timeout_s`; a new connection must deliver a whole
  request header within `header_timeout_s`; after an answer the connection may idle
  `idle_timeout_s` for the next request, whose header then gets `header_timeout_s` from its
  first byte. A connection past its deadline is aborted. A request being handled has no
  deadline here (a stream may be long); its body has `body_timeout_s` (the caller's part).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from dataclasses import dataclass, fields, replace
from typing import Optional

from aiohttp import web

log = logging.getLogger(__name__)

REPORT_EVERY_S = 60.0  # refused or timed-out connections are logged at most this often


@dataclass(frozen=True)
class HttpLimits:
    """The settings `http_*` of a daemon (cluster/config.py), without the prefix."""

    handshake_timeout_s: float = 10.0
    header_timeout_s: float = 10.0
    idle_timeout_s: float = 30.0
    body_timeout_s: float = 60.0
    max_connections: int = 256
    max_unauthenticated: int = 128
    denial_window_s: float = 60.0
    denial_burst: int = 5
    unauthenticated_per_window: int = 30

    @classmethod
    def of(cls, settings) -> "HttpLimits":
        return cls(**{f.name: getattr(settings, "http_" + f.name) for f in fields(cls)})

    def within_file_limit(self) -> "HttpLimits":
        """These limits with both caps under a quarter of RLIMIT_NOFILE (the rest is for
        gRPC, node channels, the audit log and the databases)."""
        try:
            import resource

            soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        except (ImportError, OSError, ValueError):
            return self
        if soft == resource.RLIM_INFINITY:
            return self
        most = max(4, soft // 4)
        if self.max_connections <= most:
            return self
        log.warning(
            "HTTP port connection cap %d lowered to %d: the file limit is %d",
            self.max_connections,
            most,
            soft,
        )
        return replace(
            self, max_connections=most, max_unauthenticated=min(self.max_unauthenticated, most)
        )


class _Conn:
    """One accepted connection: its transport once the handshake is done, its state."""

    __slots__ = (
        "peer",
        "transport",
        "handler",
        "authenticated",
        "busy",
        "reading",
        "timer",
        "counted",
    )

    def __init__(self, peer: str):
        self.peer = peer
        self.transport: Optional[asyncio.BaseTransport] = None
        self.handler = None  # aiohttp's RequestHandler
        self.authenticated = False
        self.busy = False  # a request is being handled
        self.reading = False  # bytes of the next request header have arrived
        self.timer: Optional[asyncio.TimerHandle] = None
        self.counted = True  # in the guard's counts until closed


class ConnectionGuard:
    """Counts, caps and deadlines for the connections of one port."""

    def __init__(self, limits: HttpLimits, what: str):
        self.limits = limits
        self.what = what
        self._conns: set[_Conn] = set()
        self._by_handler: dict[object, _Conn] = {}
        self._unauthenticated = 0
        self._unauthenticated_by_peer: dict[str, int] = {}
        self.refused_total = 0  # closed at accept: over a cap
        self.timed_out_total = 0  # aborted past a deadline
        self._reported = (0.0, 0, 0)

    @property
    def open(self) -> int:
        return len(self._conns)

    @property
    def unauthenticated(self) -> int:
        return self._unauthenticated

    def admit(self, peer: str) -> Optional[_Conn]:
        """A slot for a new connection, or None when a cap is reached (close it)."""
        share = max(1, self.limits.max_unauthenticated // 2)
        if (
            len(self._conns) >= self.limits.max_connections
            or self._unauthenticated >= self.limits.max_unauthenticated
            or self._unauthenticated_by_peer.get(peer, 0) >= share
        ):
            self.refused_total += 1
            self._report()
            return None
        conn = _Conn(peer)
        self._conns.add(conn)
        self._count(conn, 1)
        return conn

    def _count(self, conn: _Conn, n: int) -> None:
        """Add `n` to the unauthenticated counts (of the port and of the connection's peer)."""
        self._unauthenticated += n
        left = self._unauthenticated_by_peer.get(conn.peer, 0) + n
        if left:
            self._unauthenticated_by_peer[conn.peer] = left
        else:
            self._unauthenticated_by_peer.pop(conn.peer, None)

    def closed(self, conn: _Conn) -> None:
        if not conn.counted:
            return
        conn.counted = False
        self._conns.discard(conn)
        self._by_handler.pop(conn.handler, None)
        if not conn.authenticated:
            self._count(conn, -1)
        if conn.timer is not None:
            conn.timer.cancel()

    def connected(self, conn: _Conn, handler, transport: asyncio.BaseTransport) -> None:
        conn.handler, conn.transport = handler, transport
        self._by_handler[handler] = conn
        self._arm(conn, self.limits.header_timeout_s)

    def data(self, conn: _Conn) -> None:
        """Bytes arrived: the first of a request header starts its header deadline."""
        if not conn.busy and not conn.reading:
            conn.reading = True
            self._arm(conn, self.limits.header_timeout_s, sooner_only=True)

    def authenticated(self, request: web.Request) -> None:
        """A request on this connection proved its caller: the lower cap no longer applies."""
        conn = self._by_handler.get(request.protocol)
        if conn is not None and conn.counted and not conn.authenticated:
            conn.authenticated = True
            self._count(conn, -1)

    @web.middleware
    async def middleware(self, request: web.Request, handler):
        """No deadline while a request is handled; the idle one once it is answered."""
        conn = self._by_handler.get(request.protocol)
        if conn is None:
            return await handler(request)
        conn.busy = True
        if conn.timer is not None:
            conn.timer.cancel()
            conn.timer = None
        try:
            return await handler(request)
        finally:
            conn.busy = conn.reading = False
            if conn.counted:
                self._arm(conn, self.limits.idle_timeout_s)

    def _arm(self, conn: _Conn, seconds: float, *, sooner_only: bool = False) -> None:
        loop = asyncio.get_running_loop()
        when = loop.time() + seconds
        if conn.timer is not None:
            if sooner_only and conn.timer.when() <= when:
                return
            conn.timer.cancel()
        conn.timer = loop.call_at(when, self._expire, conn)

    def _expire(self, conn: _Conn) -> None:
        conn.timer = None
        if conn.busy or not conn.counted or conn.transport is None:
            return
        self.timed_out_total += 1
        self._report()
        conn.transport.abort()

    def _report(self) -> None:
        last, refused, timed_out = self._reported
        now = time.monotonic()
        if now - last < REPORT_EVERY_S:
            return
        self._reported = (now, self.refused_total, self.timed_out_total)
        log.warning(
            "%s port: %d connections refused at the caps (%d open, %d unauthenticated; caps %d/%d), "
            "%d closed past their deadline since the last report",
            self.what,
            self.refused_total - refused,
            len(self._conns),
            self._unauthenticated,
            self.limits.max_connections,
            self.limits.max_unauthenticated,
            self.timed_out_total - timed_out,
        )


class _Guarded(asyncio.Protocol):
    """aiohttp's protocol for one connection, with the guard told of its bytes and end."""

    def __init__(self, inner: asyncio.Protocol, conn: _Conn, guard: ConnectionGuard):
        self._inner, self._conn, self._guard = inner, conn, guard

    def connection_made(self, transport) -> None:
        self._inner.connection_made(transport)
        self._guard.connected(self._conn, self._inner, transport)

    def data_received(self, data: bytes) -> None:
        self._guard.data(self._conn)
        self._inner.data_received(data)

    def eof_received(self):
        return self._inner.eof_received()

    def connection_lost(self, exc) -> None:
        self._guard.closed(self._conn)
        self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()


class GuardedSite(web.BaseSite):
    """An aiohttp site that accepts connections itself, through a ConnectionGuard."""

    def __init__(
        self,
        runner: web.BaseRunner,
        host: str,
        port: int,
        *,
        guard: ConnectionGuard,
        ssl_context=None,
    ):
        super().__init__(runner, ssl_context=ssl_context)
        self._host, self._port = host, port
        self._guard = guard
        self._sock: Optional[socket.socket] = None
        self._accepting: Optional[asyncio.Task] = None
        self._handshakes: set[asyncio.Task] = set()
        self.port = 0

    @property
    def name(self) -> str:
        return f"{'https' if self._ssl_context else 'http'}://{self._host}:{self.port}"

    async def start(self) -> None:
        await super().start()
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(
            self._host or None, self._port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        family, address = infos[0][0], infos[0][4]
        try:
            self._sock = socket.create_server(address, family=family, backlog=self._backlog)
        except OSError:
            self._runner._unreg_site(self)  # noqa: SLF001 - as BaseSite.stop does
            raise
        self._sock.setblocking(False)
        self.port = self._sock.getsockname()[1]
        self._accepting = loop.create_task(self._accept())

    async def stop(self) -> None:
        self._runner._check_site(self)  # noqa: SLF001 - aiohttp's own sites do this
        if self._accepting is not None:
            self._accepting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._accepting
        for task in list(self._handshakes):
            task.cancel()
        if self._sock is not None:
            self._sock.close()
        self._runner._unreg_site(self)  # noqa: SLF001

    async def _accept(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, addr = await loop.sock_accept(self._sock)
            except OSError as exc:  # EMFILE and the like: wait, then go on
                log.error("%s port: accept failed: %s", self._guard.what, exc)
                await asyncio.sleep(0.1)
                continue
            conn = self._guard.admit(str(addr[0]))
            if conn is None:
                sock.close()
                continue
            task = loop.create_task(self._open(sock, conn))
            self._handshakes.add(task)
            task.add_done_callback(self._handshakes.discard)

    async def _open(self, sock: socket.socket, conn: _Conn) -> None:
        """The handshake (within its timeout), then aiohttp's protocol, guarded."""
        loop = asyncio.get_running_loop()
        server = self._runner.server
        tls = {}
        if self._ssl_context is not None:
            tls = dict(
                ssl=self._ssl_context,
                ssl_handshake_timeout=self._guard.limits.handshake_timeout_s,
                ssl_shutdown_timeout=self._guard.limits.handshake_timeout_s,
            )
        try:
            await loop.connect_accepted_socket(
                lambda: _Guarded(server(), conn, self._guard), sock, **tls
            )
        except (
            BaseException
        ) as exc:  # a failed or timed-out handshake, or stop(): the transport closes the socket
            self._guard.closed(conn)
            if asyncio.current_task().cancelling():
                raise
            log.debug(
                "%s port: handshake with %s failed: %s",
                self._guard.what,
                conn.peer,
                type(exc).__name__,
            )
