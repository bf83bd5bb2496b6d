"""The coordinator's state database: a SQLAlchemy Engine from `--state-url` (docs/state.md).

`sqlite:///PATH` is the embedded default (one file per coordinator, or one file several
coordinators on one host share); `postgresql://USER:PASSWORD@HOST:PORT/DB` is the shared
database of coordinators on several hosts. Opening one brings its schema to the newest
revision (coordinator/state/migrate.py) before any store reads it.

A URL's password never reaches a log line or an error: `redact` is what is shown.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import URL, Connection, Engine, make_url

from coordinator.state.errors import StateError
from coordinator.state.migrate import upgrade

SCHEMES = ("sqlite", "postgresql")
SQLITE_TIMEOUT_S = 10.0        # a writer waits this long for another's transaction (busy timeout)
CONNECT_TIMEOUT_S = 10         # PostgreSQL: a connection attempt gives up after this


def redact(url: str | URL) -> str:
    """The URL with its password replaced by ***, safe for logs and errors."""
    try:
        parsed = url if isinstance(url, URL) else make_url(str(url))
        return parsed.render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - not a URL at all: hide anything between :// and @
        return re.sub(r"(://[^/@:]*:)[^/@]*@", r"\1***@", str(url))


def parse(url: str) -> URL:
    """A --state-url checked: sqlite:///PATH or postgresql://...; ValueError (redacted) otherwise."""
    try:
        parsed = make_url(url)
    except Exception:  # noqa: BLE001 - SQLAlchemy's message would repeat the URL
        raise ValueError("--state-url is not a URL (not repeated here: it may hold a password): give sqlite:///PATH or "
                         "postgresql://USER:PASSWORD@HOST:PORT/DATABASE") from None
    backend, _, driver = parsed.drivername.partition("+")
    if backend == "postgres":
        backend = "postgresql"
    if backend not in SCHEMES or (backend == "postgresql" and driver not in ("", "psycopg")) \
            or (backend == "sqlite" and driver not in ("", "pysqlite")):
        raise ValueError(f"--state-url {redact(url)!r}: the state database is sqlite:///PATH or "
                         "postgresql://USER:PASSWORD@HOST:PORT/DATABASE (PostgreSQL 15+)")
    if backend == "sqlite" and parsed.database in (None, "", ":memory:"):
        raise ValueError("--state-url sqlite:///PATH needs a file path (coordinators and restarts share it)")
    if backend == "postgresql" and not parsed.database:
        raise ValueError(f"--state-url {redact(url)!r} names no database: postgresql://USER@HOST:PORT/DATABASE")
    return parsed.set(drivername="sqlite" if backend == "sqlite" else "postgresql+psycopg")


def url_for(state_url, state_db: Path) -> str:
    """What the coordinator opens: --state-url (a str or pydantic SecretStr), else --state-db
    as sqlite:///PATH, so configs from before --state-url keep their file."""
    if state_url is not None and hasattr(state_url, "get_secret_value"):
        state_url = state_url.get_secret_value()
    return state_url or f"sqlite:///{Path(state_db)}"


class StateDB:
    """An Engine on the state database, its schema at the newest revision. Stores share one
    (the coordinator opens it once) or open their own from a path or URL (tests, tools)."""

    def __init__(self, url: str | Path):
        if isinstance(url, Path):
            url = f"sqlite:///{url}"
        self.url = parse(str(url))
        self.shown = redact(self.url)      # what logs and errors say
        self.backend = "sqlite" if self.url.drivername == "sqlite" else "postgresql"
        self.path: Path | None = Path(self.url.database) if self.backend == "sqlite" else None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.engine = sa.create_engine(self.url, hide_parameters=True,
                                           connect_args={"timeout": SQLITE_TIMEOUT_S,
                                                                   "check_same_thread": False})
            _sqlite_transactions(self.engine)
        else:
            self.engine = sa.create_engine(self.url, hide_parameters=True, pool_pre_ping=True, pool_size=4, max_overflow=8,
                                           connect_args={"connect_timeout": CONNECT_TIMEOUT_S,
                                                         "application_name": "studiofleet-coordinator"})
        try:
            upgrade(self)
        except sa.exc.SQLAlchemyError as exc:
            self.engine.dispose()
            raise StateError(f"state database {self.shown}: cannot open or migrate it "
                             f"({type(exc.orig or exc).__name__}: {_first_line(exc)}); check that it is "
                             "reachable and that this user may create tables") from None

    @classmethod
    def of(cls, target: StateDB | str | Path) -> tuple[StateDB, bool]:
        """(the database, whether the caller opened it and so closes it)."""
        return (target, False) if isinstance(target, StateDB) else (cls(target), True)

    @contextlib.contextmanager
    def begin(self, *, immediate: bool = False) -> Iterator[Connection]:
        """A transaction. `immediate`: one that will write after reading (the lease, fenced
        writes): SQLite takes its write lock first (BEGIN IMMEDIATE), so two coordinators
        cannot both read "free"; on PostgreSQL the statements lock rows (FOR UPDATE)."""
        with self.engine.connect() as conn:
            if immediate:
                conn = conn.execution_options(sqlite_immediate=True)
            with conn.begin():
                yield conn

    def close(self) -> None:
        self.engine.dispose()


def _first_line(exc: Exception) -> str:
    text = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    return text[0][:300] if text else ""


def _sqlite_transactions(engine: Engine) -> None:
    """pysqlite left to itself opens transactions late and never for DDL; SQLAlchemy's recipe:
    autocommit at the driver, BEGIN emitted here (IMMEDIATE when asked). WAL lets readers
    run beside the writer; synchronous=FULL: a token or a rollout step is on disk when we answer."""

    @sa.event.listens_for(engine, "connect")
    def _connect(dbapi_conn, _record):
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=FULL")
        cur.close()

    @sa.event.listens_for(engine, "begin")
    def _begin(conn):
        conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get("sqlite_immediate") else "BEGIN")
