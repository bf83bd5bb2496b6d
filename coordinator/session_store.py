"""Dashboard links and sessions in the coordinator's state database (coordinator/state/:
SQLite or PostgreSQL): the SessionBook of cluster/dashboard_sessions.py, so coordinators
sharing the database accept each other's sessions, and a logout or an expiry on one ends a
session on all. Rows hold the SHA-256 of each secret, never the secret, and the operator's
identity (role, name, certificate serial and expiry: the monitoring port checks those on
every request as for a certificate). Blocking: called in a thread.
"""

from __future__ import annotations

import contextlib
import datetime as dt
from pathlib import Path
from typing import Optional, Union

import sqlalchemy as sa

from cluster.dashboard_sessions import SessionsUnavailable
from cluster.security.identity import Identity, Role
from coordinator.state import StateDB
from coordinator.state.schema import dashboard_links as DL
from coordinator.state.schema import dashboard_sessions as DS


def _row(identity: Identity) -> dict:
    return {
        "role": identity.role.value,
        "name": identity.name,
        "serial": format(identity.serial, "x") if identity.serial else "",
        "not_after": identity.not_after.timestamp() if identity.not_after else None,
    }


def _identity(r) -> Identity:
    return Identity(
        Role(r.role),
        r.name,
        int(r.serial, 16) if r.serial else 0,
        dt.datetime.fromtimestamp(r.not_after, dt.UTC) if r.not_after is not None else None,
    )


class SessionStore:
    blocking = True

    def __init__(self, state: Union[StateDB, str, Path]):
        self._state, self._owned = StateDB.of(state)

    def close(self) -> None:
        if self._owned:
            self._state.close()

    @contextlib.contextmanager
    def _begin(self, **kw):
        """A state transaction whose database errors become SessionsUnavailable (a 503 that
        names the redacted URL)."""
        try:
            with self._state.begin(**kw) as db:
                yield db
        except sa.exc.SQLAlchemyError as exc:
            raise SessionsUnavailable(
                f"dashboard sessions are kept in the state database {self._state.shown}, which "
                f"does not answer ({type(getattr(exc, 'orig', None) or exc).__name__}); try "
                "again when it is back (a client certificate works meanwhile)"
            ) from None

    def add_link(self, key: str, identity: Identity, expires: float) -> None:
        with self._begin() as db:
            db.execute(DL.insert().values(digest=key, expires=expires, **_row(identity)))

    def take_link(self, key: str, now: float) -> Optional[Identity]:
        with self._begin(immediate=True) as db:
            r = db.execute(
                sa.select(DL.c.role, DL.c.name, DL.c.serial, DL.c.not_after, DL.c.expires)
                .where(DL.c.digest == key)
                .with_for_update()
            ).first()
            if r is None:
                return None
            # One use, also between coordinators: of two taking it at once, one deletes it.
            taken = db.execute(DL.delete().where(DL.c.digest == key)).rowcount == 1
        return _identity(r) if taken and r.expires >= now else None

    def add_session(self, key: str, identity: Identity, now: float) -> None:
        with self._begin() as db:
            db.execute(DS.insert().values(digest=key, created=now, last_used=now, **_row(identity)))

    def session(
        self, key: str, now: float, idle_s: float, max_s: float, touch: bool
    ) -> Optional[Identity]:
        # Immediate: this read may write (touch, expire). A page's script, stylesheet and
        # poll check one session at once; on SQLite's WAL a deferred read that then writes
        # fails at once (SQLITE_BUSY) when another wrote first, where BEGIN IMMEDIATE waits.
        with self._begin(immediate=True) as db:
            r = db.execute(
                sa.select(
                    DS.c.role, DS.c.name, DS.c.serial, DS.c.not_after, DS.c.created, DS.c.last_used
                ).where(DS.c.digest == key)
            ).first()
            if r is None:
                return None
            if now - r.last_used > idle_s or now - r.created > max_s:
                db.execute(DS.delete().where(DS.c.digest == key))
                return None
            if touch:
                db.execute(
                    DS.update()
                    .where(DS.c.digest == key, DS.c.last_used < now)
                    .values(last_used=now)
                )
        return _identity(r)

    def end(self, key: str) -> None:
        with self._begin() as db:
            db.execute(DS.delete().where(DS.c.digest == key))

    def purge(self, now: float, idle_s: float, max_s: float) -> None:
        with self._begin() as db:
            db.execute(DL.delete().where(DL.c.expires < now))
            db.execute(
                DS.delete().where(sa.or_(DS.c.last_used < now - idle_s, DS.c.created < now - max_s))
            )
