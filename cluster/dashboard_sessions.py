"""Dashboard login links and the browser sessions they open (coordinator only; the monitoring
port checks them, cluster/http_server.py).

A link (`fleetctl dashboard`) is good for TOKEN_TTL_S and one use; a session ends after
`idle_s` without a user's request, after `max_s` whatever happens, or at logout. Neither
secret is ever kept: a link and a session are found by the SHA-256 of their secret (256
random bits, so a plain hash suffices, as for API tokens).

Where they are kept is a SessionBook: in this process's memory (MemorySessionBook), or the
coordinator's state database (coordinator/session_store.py), so coordinators sharing that
database accept each other's sessions and a logout or an expiry ends a session on all of
them. A book whose calls block (a database) is called off the event loop.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import secrets
import time
from dataclasses import dataclass
from typing import Callable, Optional, Protocol

from cluster.security.identity import Identity

TOKEN_TTL_S = 60.0
# A link token or a session id (secrets.token_urlsafe(32)); anything else is not looked up.
SECRET = re.compile(r"[A-Za-z0-9_-]{43}")
PURGE_S = 30.0  # expired links and sessions are deleted at most this often


class SessionsUnavailable(Exception):
    """Where sessions are kept does not answer (the state database is down): 503."""


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class SessionBook(Protocol):
    """Links and sessions by the digest of their secret; raises SessionsUnavailable."""

    blocking: bool  # its calls block (a database): DashboardSessions runs them in a thread

    def add_link(self, key: str, identity: Identity, expires: float) -> None: ...

    def take_link(self, key: str, now: float) -> Optional[Identity]:
        """The link's operator, and the link deleted (one use, even between processes);
        None for an unknown or expired one."""

    def add_session(self, key: str, identity: Identity, now: float) -> None: ...

    def session(
        self, key: str, now: float, idle_s: float, max_s: float, touch: bool
    ) -> Optional[Identity]:
        """The session's operator (its last use set to `now` if `touch`); None for an unknown
        one, and None, the session deleted, for one idle past `idle_s` or older than `max_s`."""

    def end(self, key: str) -> None: ...

    def purge(self, now: float, idle_s: float, max_s: float) -> None: ...


@dataclass
class _Session:
    identity: Identity
    created: float
    last_used: float


class MemorySessionBook:
    """Sessions of this process only (a restart asks operators to open a link again)."""

    blocking = False

    def __init__(self) -> None:
        self._links: dict[str, tuple[Identity, float]] = {}
        self._sessions: dict[str, _Session] = {}

    def add_link(self, key: str, identity: Identity, expires: float) -> None:
        self._links[key] = (identity, expires)

    def take_link(self, key: str, now: float) -> Optional[Identity]:
        identity, expires = self._links.pop(key, (None, 0.0))
        return identity if expires >= now else None

    def add_session(self, key: str, identity: Identity, now: float) -> None:
        self._sessions[key] = _Session(identity, now, now)

    def session(
        self, key: str, now: float, idle_s: float, max_s: float, touch: bool
    ) -> Optional[Identity]:
        s = self._sessions.get(key)
        if s is None:
            return None
        if now - s.last_used > idle_s or now - s.created > max_s:
            del self._sessions[key]
            return None
        if touch:
            s.last_used = now
        return s.identity

    def end(self, key: str) -> None:
        self._sessions.pop(key, None)

    def purge(self, now: float, idle_s: float, max_s: float) -> None:
        for key, (_, until) in list(self._links.items()):
            if until < now:
                del self._links[key]
        for key, s in list(self._sessions.items()):
            if now - s.last_used > idle_s or now - s.created > max_s:
                del self._sessions[key]


class DashboardSessions:
    """Issues links, exchanges them for sessions and checks sessions, in a SessionBook. The
    clock is the wall clock: coordinators on several hosts compare its times."""

    def __init__(
        self,
        idle_s: float,
        max_s: float = 12 * 3600.0,
        clock: Callable[[], float] = time.time,
        book: Optional[SessionBook] = None,
    ):
        self.idle_s, self.max_s, self._clock = idle_s, max_s, clock
        self.book: SessionBook = book if book is not None else MemorySessionBook()
        self._purged = float("-inf")

    async def _call(self, method, *args):
        if self.book.blocking:
            return await asyncio.to_thread(method, *args)
        return method(*args)

    async def _purge(self, now: float) -> None:
        if now - self._purged >= PURGE_S:
            self._purged = now
            await self._call(self.book.purge, now, self.idle_s, self.max_s)

    async def issue(self, identity: Identity) -> str:
        now = self._clock()
        await self._purge(now)
        token = secrets.token_urlsafe(32)
        await self._call(self.book.add_link, digest(token), identity, now + TOKEN_TTL_S)
        return token

    async def redeem(self, token: str) -> Optional[str]:
        """A new session id for a valid, unused token; None otherwise."""
        if not SECRET.fullmatch(token or ""):
            return None
        now = self._clock()
        await self._purge(now)
        identity = await self._call(self.book.take_link, digest(token), now)
        if identity is None:
            return None
        sid = secrets.token_urlsafe(32)
        await self._call(self.book.add_session, digest(sid), identity, now)
        return sid

    async def identity(self, sid: str, *, touch: bool = True) -> Optional[Identity]:
        """The session's operator; `touch` (a user's request, not a background poll)
        restarts its idle clock."""
        if not SECRET.fullmatch(sid or ""):
            return None
        return await self._call(
            self.book.session, digest(sid), self._clock(), self.idle_s, self.max_s, touch
        )

    async def end(self, sid: str) -> None:
        if SECRET.fullmatch(sid or ""):
            await self._call(self.book.end, digest(sid))
