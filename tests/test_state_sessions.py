"""Dashboard sessions and the eval gate's baselines in the state database (docs/state.md):
the same rules as in memory on SQLite and on a real PostgreSQL (tests/pg.py), shared by two
stores on one database, no secret stored in the clear, and two real coordinator processes
(mTLS) on one PostgreSQL accepting each other's dashboard sessions, a logout through one
ending the session on both."""

from __future__ import annotations

import asyncio
import ssl
import threading
import urllib.error
import urllib.request

import pytest
import sqlalchemy as sa

from cluster.dashboard_sessions import TOKEN_TTL_S, DashboardSessions
from cluster.quality import evaluation
from cluster.security.identity import Identity, Role
from coordinator.baseline_store import BaselineStore
from coordinator.session_store import SessionStore
from coordinator.state import StateDB
from tests.test_dashboard import OPERATOR
from tests.test_fleetctl import fleetctl

DANA = Identity(Role.OPERATOR, "dana", serial=0x1F2E3D4C5B6A79880123456789ABCDEF)


async def links_and_sessions(book) -> None:
    """HIPAA automatic logoff: a session ends after the idle timeout or its maximum age; a
    login link works once and only for a minute. `book`: None (in memory) or a store."""
    now = [1000.0]
    sessions = DashboardSessions(idle_s=900, max_s=3600, clock=lambda: now[0], book=book)
    token = await sessions.issue(DANA)
    sid = await sessions.redeem(token)
    assert sid and await sessions.identity(sid) == DANA
    assert await sessions.redeem(token) is None  # single use
    late = await sessions.issue(DANA)
    now[0] += TOKEN_TTL_S + 1
    assert await sessions.redeem(late) is None  # expired unused
    assert await sessions.identity(sid) == DANA  # used within the idle timeout: kept
    now[0] += 899
    assert await sessions.identity(sid, touch=False) == DANA  # a background poll...
    now[0] += 2
    assert await sessions.identity(sid) is None  # ...did not extend it: idle too long
    other = await sessions.redeem(await sessions.issue(DANA))
    for _ in range(5):
        now[0] += 800
        alive = await sessions.identity(other)
    assert alive is None  # past max_s even while in use
    assert await sessions.redeem("") is None and await sessions.identity("") is None
    assert await sessions.identity("x" * 10_000) is None
    assert await sessions.identity("A" * 43) is None  # well formed, unknown
    assert await sessions.redeem(sid) is None  # a session id is not a link
    ended = await sessions.redeem(await sessions.issue(DANA))
    await sessions.end(ended)
    assert await sessions.identity(ended) is None


@pytest.fixture(params=["sqlite", "postgresql"])
def state_url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'state.db'}"
    return request.getfixturevalue("pg_url")


def test_sessions_in_the_state_database_follow_the_same_rules(state_url):
    store = SessionStore(state_url)
    try:
        asyncio.run(links_and_sessions(store))
    finally:
        store.close()


def test_two_stores_on_one_database_share_sessions_and_keep_only_hashes(state_url):
    """Coordinator A's session works on B; B's use restarts the idle clock A checks; a
    logout through B ends it on A; a link is taken once even by two at the same moment."""
    db_a, db_b = StateDB(state_url), StateDB(state_url)
    now = [5000.0]
    a = DashboardSessions(idle_s=60, clock=lambda: now[0], book=SessionStore(db_a))
    b = DashboardSessions(idle_s=60, clock=lambda: now[0], book=SessionStore(db_b))

    async def scenario() -> None:
        token = await a.issue(DANA)
        sid = await a.redeem(token)
        assert await b.identity(sid) == DANA  # the operator, serial included, on B
        now[0] += 50
        assert await b.identity(sid) == DANA  # used on B...
        now[0] += 50
        assert await a.identity(sid) == DANA  # ...so not idle on A
        await b.end(sid)
        assert await a.identity(sid) is None  # logged out everywhere
        idle = await b.redeem(await b.issue(DANA))
        now[0] += 61
        assert await a.identity(idle) is None and await b.identity(idle) is None

    try:
        asyncio.run(scenario())
        # No secret in the clear: neither a link nor a session id is in any row.
        token = asyncio.run(a.issue(DANA))
        sid = asyncio.run(a.redeem(asyncio.run(a.issue(DANA))))
        with db_a.engine.connect() as conn:
            rows = [
                repr(tuple(r))
                for t in ("dashboard_links", "dashboard_sessions")
                for r in conn.execute(sa.text(f"SELECT * FROM {t}"))
            ]
        assert rows and not any(token in r or sid in r for r in rows)

        # One link, two coordinators redeeming it at once: one session, not two.
        link = asyncio.run(a.issue(DANA))
        won: list = []
        barrier = threading.Barrier(2)

        def redeem(sessions):
            barrier.wait()
            won.append(asyncio.run(sessions.redeem(link)))

        threads = [threading.Thread(target=redeem, args=(s,)) for s in (a, b)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert len(won) == 2 and sum(w is not None for w in won) == 1, won
    finally:
        db_a.close()
        db_b.close()


def test_a_page_and_its_assets_checking_one_session_at_once_all_get_through(state_url):
    """A browser loads the page's script and stylesheet and polls at the same moment: each
    request checks (and touches) the one session. On SQLite's WAL a read that then writes
    lost to a concurrent writer at once (SQLITE_BUSY, no busy wait): a 503 for the script
    and a dashboard stuck at "connecting" (seen under load in CI)."""
    stores = [SessionStore(state_url) for _ in range(2)]
    try:
        now = 7000.0
        stores[0].add_session("k", DANA, now)
        barrier = threading.Barrier(8)
        results: list = []

        def check(i: int) -> None:
            store = stores[i % 2]
            barrier.wait()
            for j in range(20):
                try:
                    results.append(store.session("k", now + i + j / 100, 900, 3600, touch=True))
                except Exception as exc:  # noqa: BLE001 - the failure under test
                    results.append(exc)

        threads = [threading.Thread(target=check, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        failed = [r for r in results if r != DANA]
        assert len(results) == 160 and not failed, failed[:3]
    finally:
        for s in stores:
            s.close()


def _report(score: float) -> evaluation.Report:
    return evaluation.Report(
        suite="synthetic",
        suite_version=1,
        suite_digest="sha256:" + "0" * 64,
        target="127.0.0.1:1",
        label="n1 baseline",
        cases=[
            evaluation.CaseResult(id="c1", ok=True, quality=score, schema_valid=True),
            evaluation.CaseResult(id="c2", ok=True, quality=score, finish_reason="length"),
        ],
    )


def test_eval_baselines_are_shared_by_coordinators_on_one_database(state_url):
    """A rollout's baseline measured under coordinator A is the one B compares with after
    taking the rollout over; the first report per (rollout, digest) is kept, and a new
    rollout's baseline replaces the previous rollout's."""
    a, b = BaselineStore(state_url), BaselineStore(state_url)

    async def scenario():
        assert await b.get("r1") is None and not await b.has("r1", "sha256:new")
        await a.put("r1", "sha256:new", _report(0.8))
        await b.put("r1", "sha256:new", _report(0.1))  # a second measurement: the first kept
        assert await b.has("r1", "sha256:new")
        got = await b.get("r1")
        assert got is not None and got.summary == _report(0.8).summary
        assert evaluation.gate_verdict(_report(0.5), got, margin=0.1, min_score=0.0)
        assert evaluation.gate_verdict(_report(0.75), got, margin=0.1, min_score=0.0) is None
        await b.put("r2", "sha256:newer", _report(0.9))
        assert await a.get("r1") is None and (await a.get("r2")).summary["score"] == 0.9

    try:
        asyncio.run(scenario())
    finally:
        a.close()
        b.close()


def _https(co, path: str, cookie: str = "", method: str = "GET", follow: bool = True):
    """(status, headers) of a browser-like request (no client certificate) to `co`."""
    context = ssl.create_default_context(cafile=str(co.tls_dir / "ca.pem"))

    class Stay(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *_args, **_kwargs):
            return None

    handlers = [urllib.request.HTTPSHandler(context=context)] + ([] if follow else [Stay()])
    request = urllib.request.Request(
        f"https://{co.http_address}{path}",
        method=method,
        headers={"Cookie": cookie} if cookie else {},
        data=b"" if method == "POST" else None,
    )
    try:
        with urllib.request.build_opener(*handlers).open(request, timeout=10) as reply:
            return reply.status, dict(reply.headers)
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers)


def test_two_coordinators_on_one_postgresql_share_dashboard_sessions(
    node, start_coordinator, pg_url
):
    a = start_coordinator("--state-url", pg_url, nodes=[node.address], name="dash-pg-a")
    b = start_coordinator("--state-url", pg_url, nodes=[node.address], name="dash-pg-b")
    out = fleetctl("dashboard", "-c", a.address, *OPERATOR)
    assert out.returncode == 0, out.stderr
    url = out.stdout.strip()
    status, headers = _https(a, url.split(a.http_address, 1)[1], follow=False)
    assert status == 303, status
    cookie = headers["Set-Cookie"].split(";", 1)[0]
    assert _https(b, "/api/snapshot")[0] == 401  # no session, no certificate
    assert _https(b, "/api/snapshot", cookie)[0] == 200  # A's session on B
    assert _https(a, "/api/snapshot", cookie)[0] == 200
    assert _https(b, "/logout", cookie, method="POST", follow=False)[0] == 303
    assert _https(a, "/api/snapshot", cookie)[0] == 401  # logged out through B: over on A
    assert _https(b, "/api/snapshot", cookie)[0] == 401
    for co in (a, b):
        co.stop()
        assert cookie.split("=", 1)[1] not in co.stderr_path.read_text()
