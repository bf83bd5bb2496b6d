"""Versioned migrations of the state database (Alembic; revisions in migrations/versions/).

Every coordinator brings the database to the newest revision when it opens it, under a lock
(SQLite's write lock, PostgreSQL's advisory lock), so two coordinators starting together
migrate it once. A database from before migrations (the SQLite file of the release before
them) has no version table: the baseline revision adopts its tables, rows kept. A database
a newer coordinator already migrated further is refused with what to do.

To add a revision: change schema.py, add versions/NNNN_what.py (revision = "NNNN",
down_revision = the previous one; script.py.mako is the template) with its upgrade in
Alembic operations (op.add_column ...: one file for both backends), and
tests/test_state_migrations.py checks the result matches schema.py on both.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import sqlalchemy as sa

from coordinator.state.errors import StateError

log = logging.getLogger("coordinator.state")
logging.getLogger("alembic").setLevel(logging.WARNING)  # our own line says what changed

VERSION_TABLE = "studiofleet_schema_version"
SCRIPTS = Path(__file__).parent / "migrations"
PG_LOCK_KEY = 0x5346_5354_4154_45  # pg_advisory_xact_lock: "SFSTATE"
# The newest revision in migrations/versions/ (the migrations test checks they agree): a
# database already there is opened without importing Alembic (0.6 s of every start).
HEAD = "0005"


def config(connection=None):
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(SCRIPTS))
    cfg.attributes["connection"] = connection
    return cfg


@functools.cache
def scripts():
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(config())


def head() -> str:
    return scripts().get_current_head()


def current(connection) -> str | None:
    """The revision the database is at (None: empty, or from before migrations)."""
    from alembic.runtime.migration import MigrationContext

    return MigrationContext.configure(
        connection, opts={"version_table": VERSION_TABLE}
    ).get_current_revision()


def _stored(connection) -> str | None:
    """The version table's revision, read with plain SQL (None: no table or no row)."""
    if not sa.inspect(connection).has_table(VERSION_TABLE):
        return None
    return connection.execute(sa.text(f"SELECT version_num FROM {VERSION_TABLE}")).scalar()


def upgrade(db, target: str = "head") -> None:
    """Bring the database (engine.StateDB: its begin() and shown URL) to `target`, the newest
    revision, in one transaction, under the lock."""
    with db.begin(immediate=True) as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": PG_LOCK_KEY})
        at = _stored(conn)
        if at == (HEAD if target == "head" else target):
            return
        from alembic import command

        want = head() if target == "head" else target
        if at == want:
            return
        known = {s.revision for s in scripts().walk_revisions()}
        if at is not None and at not in known:
            raise StateError(
                f"state database {db.shown} is at schema revision {at}, which this coordinator "
                f"does not know (its newest is {head()}): a newer release migrated it; run that "
                "release here too"
            )
        command.upgrade(config(conn), target)
        log.info("state database %s: schema revision %s -> %s", db.shown, at or "none", want)
