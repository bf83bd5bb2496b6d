"""The state database's migrations (coordinator/state/, docs/state.md): an empty database on
SQLite and on PostgreSQL, and the SQLite file of the release before migrations, all reach
the newest revision in place with their rows kept; the result is schema.py exactly."""

from __future__ import annotations

import json
import shutil
import sqlite3
import time
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from cluster.api import fleet_pb2
from cluster.config import CoordinatorSettings
from coordinator.api_tokens import TokenRefused, TokenStore
from coordinator.request_log import RequestLog
from coordinator.rollout_store import RolloutStore
from coordinator.state import StateDB, StateError
from coordinator.state.migrate import HEAD, VERSION_TABLE, current, head
from coordinator.state.schema import metadata

FIXTURES = Path(__file__).parent / "state_fixtures"
RELEASE = json.loads((FIXTURES / "release-92239ae.json").read_text())
SECRET = "s3cret-synthetic-pw"


def differences(db: StateDB, *, legacy_keys: bool = False) -> list:
    """What the migrated database lacks or has beyond schema.py (types, defaults, indexes).
    `legacy_keys`: the release's SQLite tables declared `id TEXT PRIMARY KEY` without NOT
    NULL, which SQLite (unlike PostgreSQL) then lets hold NULL; the stores never write one,
    so those key columns are adopted as they are rather than rebuilt."""
    with db.engine.connect() as conn:
        ctx = MigrationContext.configure(
            conn, opts={"compare_type": True, "compare_server_default": True}
        )
        found = []
        for diff in compare_metadata(ctx, metadata):
            if (
                not isinstance(diff, list)
                and diff[0] == "remove_table"
                and diff[1].name == VERSION_TABLE
            ):
                continue
            if (
                legacy_keys
                and isinstance(diff, list)
                and [d[0] for d in diff] == ["modify_nullable"]
                and (diff[0][2], diff[0][3])
                in (("api_tokens", "id"), ("rollouts", "id"), ("lease", "name"))
            ):
                continue
            found.append(diff)
        return found


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'state.db'}"
    return request.getfixturevalue("pg_url")


def _at_revision(url: str, revision: str) -> StateDB:
    """The database at `url` migrated only as far as `revision` (an older coordinator's)."""
    from coordinator.state import engine, migrate

    real = engine.upgrade
    engine.upgrade = lambda db: migrate.upgrade(db, revision)
    try:
        db = StateDB(url)
    finally:
        engine.upgrade = real
    with db.engine.connect() as conn:
        assert current(conn) == revision
    return db


def _at_head(url: str) -> StateDB:
    """The database at `url` opened by this coordinator: at the newest revision, as schema.py."""
    db = StateDB(url)
    with db.engine.connect() as conn:
        assert current(conn) == head()
    assert differences(db) == []
    return db


def test_an_empty_database_gets_the_newest_schema(empty_url):
    assert HEAD == head(), "migrate.HEAD names the newest file in migrations/versions/"
    db = _at_head(empty_url)
    try:
        # Opening it again (another coordinator, a restart) changes nothing.
        StateDB(empty_url).close()
        tokens = TokenStore(db)
        _, secret = tokens.issue("notes-app")
        assert tokens.verify(secret).identity.name == "notes-app"
    finally:
        db.close()


def test_two_coordinators_opening_one_empty_postgresql_at_once_migrate_it_once(pg_url):
    import threading

    opened, errors = [], []

    def open_one():
        try:
            opened.append(StateDB(pg_url))
        except Exception as exc:  # noqa: BLE001 - the test reports it
            errors.append(exc)

    threads = [threading.Thread(target=open_one) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == [] and len(opened) == 4
    for db in opened:
        db.close()


def test_a_database_of_the_previous_revision_upgrades_in_place(empty_url):
    """A database a coordinator of the previous release (revision 0001: no dashboard sessions
    or eval baselines in the database) made gains those tables, its rows kept."""
    import asyncio

    from coordinator.baseline_store import BaselineStore
    from coordinator.session_store import SessionStore
    from tests.test_state_sessions import DANA, _report

    old = _at_revision(empty_url, "0001")
    try:
        with old.engine.connect() as conn:
            assert not sa.inspect(conn).has_table("dashboard_sessions")
        _, secret = TokenStore(old).issue("notes-app")
        RolloutStore(old).acquire("old-co", ttl_s=5)
    finally:
        old.close()

    db = _at_head(empty_url)
    try:
        assert TokenStore(db).verify(secret).identity.name == "notes-app"
        assert RolloutStore(db).lease()[0] == "old-co"
        sessions, baselines = SessionStore(db), BaselineStore(db)
        sessions.add_session("k", DANA, time.time())
        assert sessions.session("k", time.time(), 60, 3600, True) == DANA
        asyncio.run(baselines.put("r1", "sha256:x", _report(0.7)))
        assert asyncio.run(baselines.get("r1")).summary["score"] == 0.7
    finally:
        db.close()


def test_a_database_at_revision_0003_gains_shadow_runs_in_place(empty_url):
    """A database of the traffic-policy revision (0003) gains the shadow_runs table (0004),
    its traffic policies kept; the shadow store then keeps a run's definition."""
    import dataclasses

    from cluster.traffic import Policy
    from coordinator.shadow_store import Row, ShadowStore
    from coordinator.traffic_store import TrafficStore

    old = _at_revision(empty_url, "0003")
    try:
        with old.engine.connect() as conn:
            assert not sa.inspect(conn).has_table("shadow_runs")
        policy = Policy.parse("notes", {"macs": 90, "upstream": 10}, "upstream")
        TrafficStore(old).save("notes", policy, "dana", 100.0)
    finally:
        old.close()

    db = _at_head(empty_url)
    try:
        (row,) = TrafficStore(db).load()
        assert (row.policy, row.set_by, row.set_at) == (policy, "dana", 100.0)
        shadows = ShadowStore(db)
        assert shadows.latest() is None
        run = Row("shadow-1", "cand", 0.05, frozenset({"soap-note"}), 0.1, 20, 2, 300.0, "dana",
                  200.0, 0.0)  # fmt: skip
        shadows.started(run)
        assert shadows.latest() == run
        shadows.started(dataclasses.replace(run, id="shadow-2", started_at=300.0))
        latest = shadows.latest()
        assert latest.id == "shadow-2" and latest.stopped_at == 0.0
        shadows.stopped("shadow-2", 350.0)
        assert shadows.latest().stopped_at == 350.0
        with db.engine.connect() as conn:  # the replaced run was marked stopped as it was
            first = conn.execute(sa.text("SELECT stopped_at FROM shadow_runs WHERE id='shadow-1'"))
            assert first.scalar() == 300.0
    finally:
        db.close()


def test_a_database_at_revision_0004_gains_shadow_outcomes_in_place(empty_url, monkeypatch):
    """A database of the shadow-runs revision (0004) gains shadow_outcomes (0005), its run
    kept; outcomes round-trip (NULLs as None, sub-scores as pairs), read from an id on, and
    go with their run when it is pruned."""
    from coordinator import shadow_store
    from coordinator.shadow_report import Outcome
    from coordinator.shadow_store import Row, ShadowStore

    run = Row("shadow-1", "cand", 0.05, frozenset(), 0.1, 20, 2, 300.0, "dana", 200.0, 0.0)
    old = _at_revision(empty_url, "0004")
    try:
        with old.engine.connect() as conn:
            assert not sa.inspect(conn).has_table("shadow_outcomes")
        with old.begin() as conn:  # as a coordinator of revision 0004 wrote it
            conn.execute(
                sa.text(
                    "INSERT INTO shadow_runs (id, model, fraction, templates, margin, min_samples,"
                    " max_in_flight, timeout_s, started_by, started_at, stopped_at) VALUES"
                    " ('shadow-1', 'cand', 0.05, '[]', 0.1, 20, 2, 300.0, 'dana', 200.0, 0.0)"
                )
            )
    finally:
        old.close()

    db = _at_head(empty_url)
    try:
        store = ShadowStore(db)
        assert store.latest() == run
        scored = Outcome(
            True, 120.5, 30.0, 0.8, True, (("length", 0.5), ("sections", 1.0)), "m@1", "sha256:a"
        )
        failed = Outcome(False, 40.0)
        store.add_outcomes("co-a/1", [("shadow-1", "soap-note", "live", scored, 201.0)])
        store.add_outcomes("co-b/2", [("shadow-1", "soap-note", "candidate", failed, 202.0)])
        got = store.outcomes("shadow-1")
        assert [(o.instance, o.template, o.side, o.outcome) for o in got] == [
            ("co-a/1", "soap-note", "live", scored),
            ("co-b/2", "soap-note", "candidate", failed),
        ]
        assert [o.outcome for o in store.outcomes("shadow-1", after_id=got[0].id)] == [failed]
        assert store.outcomes("shadow-other") == []
        monkeypatch.setattr(shadow_store, "KEEP", 1)  # the next start prunes run 1, and its rows
        store.started(
            Row("shadow-2", "cand", 0.05, frozenset(), 0.1, 20, 2, 300.0, "dana", 300.0, 0.0)
        )
        assert store.outcomes("shadow-1") == []
    finally:
        db.close()


def test_the_sqlite_file_of_the_release_before_migrations_upgrades_in_place(tmp_path):
    path = tmp_path / "coordinator.db"
    shutil.copy(FIXTURES / "release-92239ae.db", path)
    with sqlite3.connect(path) as c:
        assert VERSION_TABLE not in {r[0] for r in c.execute("SELECT name FROM sqlite_master")}
    db = StateDB(path)
    try:
        with db.engine.connect() as conn:
            assert current(conn) == head()
        assert differences(db, legacy_keys=True) == []

        tokens = TokenStore(db)
        assert tokens.verify(RELEASE["token"]).id == RELEASE["token_id"]
        with pytest.raises(TokenRefused, match="revoked"):
            tokens.verify(RELEASE["revoked_token"])
        assert tokens.get(RELEASE["revoked_id"]).revoked_reason == "rotated"

        store = RolloutStore(db)
        row = store.get("r-release")
        assert (row.state, row.owner, row.started_by) == (
            "PAUSED",
            RELEASE["lease_holder"],
            "operator/alice",
        )
        assert row.target.weights_digest == "sha256:" + "2" * 64
        assert [(n.node_id, n.step, n.kept_out) for n in row.nodes] == [
            ("mac-01", "done", False),
            ("mac-02", "pending", True),
        ]
        assert store.active().id == "r-release"
        holder, _, token = store.lease()
        assert (holder, token) == (RELEASE["lease_holder"], RELEASE["lease_token"])
        store.release(holder)
        assert (
            store.acquire("co-new", ttl_s=5).token == RELEASE["lease_token"] + 1
        )  # the fence keeps growing

        log = RequestLog(db, retention_days=100000, clock=lambda: RELEASE["now"] + 10)
        try:
            reply = log.list_reply(
                fleet_pb2.ListRequestsRequest(since_s=3600), slow_ttft_ms=1, slow_latency_ms=1
            )
            assert sorted(r.request_id for r in reply.requests) == [
                "release-0",
                "release-1",
                "release-2",
            ]
            assert reply.requests[0].caller == "app/notes-app"
        finally:
            log.close()
    finally:
        db.close()


def test_a_file_with_some_tables_and_older_columns_is_completed(tmp_path):
    """The release made a table when its feature first opened the file and added columns to
    older files on open: a file from a coordinator without the front door and from before
    the request log's template columns still upgrades, rows kept."""
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as c:
        c.executescript("""
          CREATE TABLE lease (name TEXT PRIMARY KEY, holder TEXT NOT NULL, expires REAL NOT NULL);
          INSERT INTO lease VALUES ('rollouts', 'old-co', 0);
          CREATE TABLE requests (
            request_id TEXT NOT NULL, caller TEXT NOT NULL, priority TEXT NOT NULL, started_at REAL NOT NULL,
            ended_at REAL NOT NULL, outcome TEXT NOT NULL, code TEXT NOT NULL, queue_ms REAL, ttft_ms REAL,
            decode_ms REAL NOT NULL, latency_ms REAL NOT NULL, prompt_tokens INTEGER NOT NULL,
            completion_tokens INTEGER NOT NULL, nodes TEXT NOT NULL, failovers INTEGER NOT NULL,
            retries INTEGER NOT NULL, restarts INTEGER NOT NULL, finish_reason TEXT NOT NULL, quality_score REAL);
          INSERT INTO requests VALUES ('old-1', 'app/a', 'interactive', 1, 2, 'completed', 'OK', 1, 1, 1, 1, 1, 1,
                                       '[]', 0, 0, 0, 'stop', NULL);
        """)
    db = StateDB(path)
    try:
        assert differences(db, legacy_keys=True) == []
        assert RolloutStore(db).lease() is None or RolloutStore(db).lease()[0] == "old-co"
        assert RolloutStore(db).acquire("new-co", ttl_s=5).token == 1
        with db.engine.connect() as conn:
            assert conn.execute(sa.text("SELECT request_id, template FROM requests")).all() == [
                ("old-1", "")
            ]
    finally:
        db.close()


def test_a_database_a_newer_release_migrated_is_refused_with_what_to_do(tmp_path):
    path = tmp_path / "newer.db"
    StateDB(path).close()
    with sqlite3.connect(path) as c:
        c.execute(f"UPDATE {VERSION_TABLE} SET version_num='9999'")
    with pytest.raises(StateError, match="revision 9999.*newer release"):
        StateDB(path)


def test_urls_are_checked_and_never_show_their_password(tmp_path):
    for bad in (
        f"mysql://fleet:{SECRET}@db/state",
        f"postgresql://fleet:{SECRET}@db",
        "sqlite://",
        f"not a url {SECRET}",
    ):
        with pytest.raises(Exception) as err:
            CoordinatorSettings(state_url=bad)
        assert SECRET not in err.value.errors()[0]["msg"], bad
        assert "--state-url" in err.value.errors()[0]["msg"]
    settings = CoordinatorSettings(state_url=f"postgresql://fleet:{SECRET}@127.0.0.1:1/state")
    assert SECRET not in repr(settings) and SECRET not in str(settings.model_dump())
    # Nothing listens on port 1: the error names the database without its password.
    started = time.monotonic()
    with pytest.raises(StateError) as err:
        StateDB(settings.state_url.get_secret_value())
    assert SECRET not in str(
        err.value
    ) and "postgresql+psycopg://fleet:***@127.0.0.1:1/state" in str(err.value)
    assert time.monotonic() - started < 30
