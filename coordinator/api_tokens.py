"""Bearer tokens for the OpenAI-compatible front door (docs/openai-api.md).

`fleetctl tokens issue NAME` asks the coordinator (Fleet.IssueApiToken, operator only,
audited) for a token: `sft_<id>.<secret>`. The caller sees the secret once; the
coordinator's state database keeps the id, the SHA-256 of the whole token, its holder's
name, role, expiry and revocation. A token is 256 random bits, so a plain hash is enough
(no salt or stretching: there is nothing to guess). Every request looks its token up
again, so a revocation holds from the next request on, on every coordinator sharing the
database.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import sqlalchemy as sa

from cluster.api import fleet_pb2
from cluster.security.identity import Identity, Role, check_name
from coordinator.state import StateDB
from coordinator.state.schema import api_tokens as T

PREFIX = "sft_"
TOKEN_RE = re.compile(r"^sft_([0-9a-f]{12})\.([A-Za-z0-9_-]{43})$")
ID_RE = re.compile(r"^[0-9a-f]{12}$")
ROLES = (Role.APP, Role.MONITOR)  # app: inference and models; monitor: models only
DEFAULT_TTL_S = 90 * 86400.0
MAX_TTL_S = 366 * 86400.0


class TokenRefused(Exception):
    """A token that does not admit its bearer; the message says what to do (401)."""


class TokenRequestError(ValueError):
    """An issue or revoke request that cannot be carried out; `code` is the gRPC status name."""

    def __init__(self, message: str, code: str = "INVALID_ARGUMENT"):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class TokenHolder:
    """Who a valid token speaks for."""

    id: str
    identity: Identity


def public_id(text: str) -> str:
    """The id part of a token or token id (what may be logged); the secret part is dropped."""
    return text.split(".", 1)[0][:40]


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class TokenStore:
    """The api_tokens table in the coordinator's state database (coordinator/state/; SQLite
    or PostgreSQL); called from the event loop (a lookup is one indexed read). An issued or
    revoked token is committed (on disk) when the call returns."""

    def __init__(self, state: Union[StateDB, str, Path], clock=time.time):
        self._state, self._owned = StateDB.of(state)
        self._clock = clock

    def close(self) -> None:
        if self._owned:
            self._state.close()

    def issue(
        self, name: str, role: str = "", ttl_s: float = 0.0, created_by: str = ""
    ) -> tuple[fleet_pb2.ApiToken, str]:
        """(the token's record, the bearer secret: shown once)."""
        try:
            check_name(name)
        except ValueError as exc:
            raise TokenRequestError(str(exc).replace("certificate name", "token name")) from None
        try:
            role_ = Role(role or Role.APP.value)
        except ValueError:
            role_ = None
        if role_ not in ROLES:
            raise TokenRequestError(
                f"token role must be one of {', '.join(r.value for r in ROLES)}; got "
                f"{role[:32]!r} (operators use their client certificates)"
            )
        if not 0 <= ttl_s <= MAX_TTL_S:  # NaN included: it would never expire
            raise TokenRequestError(
                f"ttl must be between 1 second and {MAX_TTL_S / 86400:.0f} days"
            )
        token_id = secrets.token_hex(6)
        secret = f"{PREFIX}{token_id}.{secrets.token_urlsafe(32)}"
        now = self._clock()
        expires = now + (ttl_s or DEFAULT_TTL_S)
        with self._state.begin() as db:
            db.execute(
                T.insert().values(
                    id=token_id,
                    hash=_digest(secret),
                    name=name,
                    role=role_.value,
                    created=now,
                    expires=expires,
                    created_by=created_by,
                )
            )
        return self.get(PREFIX + token_id), secret

    def revoke(self, token_id: str, reason: str = "") -> fleet_pb2.ApiToken:
        """By id; a whole token (a leaked key pasted as is) is taken by its id part."""
        raw = public_id(token_id).removeprefix(PREFIX)
        if not ID_RE.match(raw):
            raise TokenRequestError(
                "a token id is sft_ and 12 hex digits, as `fleetctl tokens list` shows it"
            )
        with self._state.begin(immediate=True) as db:  # read, then write: SQLite's write lock first
            row = db.execute(sa.select(T.c.revoked).where(T.c.id == raw)).first()
            if row is None:
                raise TokenRequestError(
                    f"no API token {PREFIX}{raw}; `fleetctl tokens list --all` shows them",
                    code="NOT_FOUND",
                )
            if not row[0]:
                db.execute(
                    T.update()
                    .where(T.c.id == raw, T.c.revoked == 0)
                    .values(revoked=self._clock(), revoked_reason=reason[:200])
                )
        return self.get(PREFIX + raw)

    def get(self, token_id: str) -> Optional[fleet_pb2.ApiToken]:
        with self._state.begin() as db:
            row = db.execute(
                sa.select(*_FIELDS).where(T.c.id == token_id.removeprefix(PREFIX))
            ).first()
        return _proto(row) if row else None

    def list(self, include_inactive: bool = False) -> list[fleet_pb2.ApiToken]:
        query = sa.select(*_FIELDS).order_by(T.c.created)
        if not include_inactive:
            query = query.where(T.c.revoked == 0, T.c.expires > self._clock())
        with self._state.begin() as db:
            return [_proto(r) for r in db.execute(query)]

    def verify(self, bearer: str) -> TokenHolder:
        """The holder of a valid token; TokenRefused (never naming the secret) otherwise."""
        m = TOKEN_RE.match(bearer)
        if m is None:
            raise TokenRefused(
                "the bearer token is not a StudioFleet API token (sft_...); "
                "ask an operator for one (`fleetctl tokens issue NAME`)"
            )
        with self._state.begin() as db:
            row = db.execute(
                sa.select(T.c.hash, T.c.name, T.c.role, T.c.expires, T.c.revoked).where(
                    T.c.id == m.group(1)
                )
            ).first()
        tid = PREFIX + m.group(1)
        if row is None or not hmac.compare_digest(row[0], _digest(bearer)):
            raise TokenRefused(
                f"API token {tid} is not known to this fleet; ask an operator for one "
                "(`fleetctl tokens issue NAME`)"
            )
        digest_, name, role, expires, revoked = row
        if revoked:
            raise TokenRefused(f"API token {tid} was revoked; ask an operator for a new one")
        if expires <= self._clock():
            raise TokenRefused(f"API token {tid} expired; ask an operator for a new one")
        return TokenHolder(tid, Identity(Role(role), name))


_FIELDS = (
    T.c.id,
    T.c.name,
    T.c.role,
    T.c.created,
    T.c.expires,
    T.c.revoked,
    T.c.revoked_reason,
    T.c.created_by,
)  # what _proto reads


def _proto(row) -> fleet_pb2.ApiToken:
    token_id, name, role, created, expires, revoked, reason, created_by = row
    return fleet_pb2.ApiToken(
        id=PREFIX + token_id,
        name=name,
        role=role,
        created_unix_s=created,
        expires_unix_s=expires,
        revoked_unix_s=revoked,
        revoked_reason=reason,
        created_by=created_by,
    )
