"""The coordinator's state database: a SQLAlchemy Engine from `--state-url` (docs/state.md).

`sqlite:///PATH` is the embedded default (one file per coordinator, or one file several
coordinators on one host share); `postgresql://USER:PASSWORD@HOST:PORT/DB` is the shared
database of coordinators on several hosts. Opening one brings its schema to the newest
revision (coordinator/state/migrate.py) before any store reads it.

A URL's password never reaches a log line or an error: `redact` is what is shown.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from cluster.state_url import parse, redact
from coordinator.state.errors import StateError
from coordinator.state.migrate import upgrade

SQLITE_TIMEOUT_S = 10.0  # a writer waits this long for another's transaction (busy timeout)
CONNECT_TIMEOUT_S = 10  # PostgreSQL: a connection attempt gives up after this


class StateDB:
    """An Engine on the state database, its schema at the newest revision. Stores share one
    (the coordinator opens it once) or open their own from a path or URL (tests, tools)."""

    def __init__(self, url: str | Path):
        if isinstance(url, Path):
            url = f"sqlite:///{url}"
        self.url = parse(str(url))
        self.shown = redact(self.url)  # what logs and errors say
        self.backend = "sqlite" if self.url.drivername == "sqlite" else "postgresql"
        self.path: Path | None = Path(self.url.database) if self.backend == "sqlite" else None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.engine = sa.create_engine(
                self.url,
                hide_parameters=True,
                connect_args={"timeout": SQLITE_TIMEOUT_S, "check_same_thread": False},
            )
            _sqlite_transactions(self.engine)
        else:
            self.engine = sa.create_engine(
                self.url,
                hide_parameters=True,
                pool_pre_ping=True,
                pool_size=4,
                max_overflow=8,
                connect_args={
                    "connect_timeout": CONNECT_TIMEOUT_S,
                    "application_name": "studiofleet-coordinator",
                },
            )
        try:
            upgrade(self)
        except sa.exc.SQLAlchemyError as exc:
            self.engine.dispose()
            raise StateError(
                f"state database {self.shown}: cannot open or migrate it "
                f"({type(exc.orig or exc).__name__}: {_first_line(exc)}); check that it is "
                "reachable and that this user may create tables"
            ) from None

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
        conn.exec_driver_sql(
            "BEGIN IMMEDIATE" if conn.get_execution_options().get("sqlite_immediate") else "BEGIN"
        )
