"""Coordinators sharing their state on one PostgreSQL (docs/state.md "Two coordinators on
one database"): real coordinator processes (mTLS) over a real node, a real PostgreSQL
cluster (tests/pg.py). A token issued through one works on the other and its revocation
holds at once on both; the request log and `fleetctl requests` show every coordinator's
requests; the rollout lease has one holder and a fencing token that only grows."""

from __future__ import annotations

import json
import threading
import time

import openai
import pytest

from cluster.api import fleet_pb2
from cluster.client import build_request
from coordinator.rollout_store import LeaseLost, NodeRow, RolloutRow, RolloutStore
from coordinator.state import StateDB
from tests.fleet_helpers import collect
from tests.test_fleetctl import fleetctl as fleetctl_any
from tests.test_openai_api import M, chat, fleetctl, issue, sdk

PASSWORD = "pw-synthetic-7731"  # trust authentication ignores it; it must never be shown


def with_password(url: str) -> str:
    return url.replace("postgresql://fleet@", f"postgresql://fleet:{PASSWORD}@")


def test_two_coordinators_on_one_postgresql_share_tokens_and_the_request_log(
    node, start_coordinator, pg_url
):
    url = with_password(pg_url)
    a = start_coordinator("--state-url", url, nodes=[node.address], name="pg-a")
    b = start_coordinator("--state-url", url, nodes=[node.address], name="pg-b")
    a.wait_routable(1)
    b.wait_routable(1)

    key = issue(a, "shared-app")
    assert sdk(b, key).chat.completions.create(**chat(M, max_tokens=2)).usage.completion_tokens >= 1
    token_id = key.split(".")[0]
    listed = json.loads(fleetctl("tokens", "list", "--coordinator", b.address, "-o", "json").stdout)
    assert token_id in [t["id"] for t in listed]

    revoked = fleetctl(
        "tokens", "revoke", token_id, "--coordinator", b.address, "--reason", "rotated"
    )
    assert revoked.returncode == 0, revoked.stderr
    started = time.monotonic()
    with pytest.raises(openai.AuthenticationError) as gone:
        sdk(a, key, max_retries=0).chat.completions.create(**chat(M, max_tokens=2))
    assert "revoked" in gone.value.message and time.monotonic() - started < 1.0

    for co, rid in ((a, "via-pg-a"), (b, "via-pg-b")):
        done = collect(
            co.inference,
            build_request(
                messages=[("user", "Synthetic note.")],
                max_tokens=3,
                temperature=0.0,
                request_id=rid,
            ),
        )
        assert done.final is not None, done.error
    for co in (a, b):
        out = fleetctl_any(
            "requests", "-c", co.address, "--tls-name", "operator", "--since", "1h", "-o", "json"
        )
        assert out.returncode == 0, out.stderr
        ids = {r["request_id"] for r in json.loads(out.stdout)["requests"]}
        assert {"via-pg-a", "via-pg-b"} <= ids, (co.name, ids)

    for co in (a, b):
        co.stop()
        text = co.stderr_path.read_text()
        assert PASSWORD not in text and f"fleet:***@127.0.0.1:{url.rsplit(':', 1)[1]}" in text, (
            co.name
        )


def test_the_rollout_lease_on_postgresql_has_one_holder_and_a_growing_fencing_token(pg_url):
    # Two stores on their own engines: two coordinators on one database.
    a, b = RolloutStore(StateDB(pg_url)), RolloutStore(StateDB(pg_url))
    target = fleet_pb2.RolloutTarget(model_path="/m", weights_digest="sha256:" + "1" * 64)
    first = a.acquire("co-a", ttl_s=30)
    assert first.held and first.token == 1
    refused = b.acquire("co-b", ttl_s=30)
    assert not refused.held and "co-a holds the rollout lease" in refused.refused
    assert a.acquire("co-a", ttl_s=30).token == 1  # a renewal keeps the token
    a.create(
        RolloutRow(
            id="r1",
            state="RUNNING",
            target=target,
            max_unavailable=1,
            drain_timeout_s=30,
            owner="co-a",
            nodes=[NodeRow("n1")],
        )
    )
    a.release("co-a")
    second = b.acquire("co-b", ttl_s=30)
    assert second.held and second.token == 2
    assert not a.acquire("co-a", ttl_s=30).held
    with pytest.raises(LeaseLost):
        a.set_step("r1", NodeRow("n1", step="failed"), fence=first)
    b.set_step("r1", NodeRow("n1", step="done"), fence=second)
    assert a.get("r1").nodes[0].step == "done"
    b.release("co-b")

    # Many coordinators racing for it: a token is never given to two holders, a holder never
    # sees it shrink (it grows each time the lease changes hands; a holder taking it back
    # straight after its own release keeps it), and while held no one else can write under it.
    tokens: list[tuple[int, str]] = []
    errors: list[BaseException] = []

    def contend(me: str) -> None:
        store = RolloutStore(StateDB(pg_url))
        try:
            seen = 0
            for _ in range(15):
                lease = store.acquire(me, ttl_s=60)
                if not lease.held:
                    continue
                assert lease.token >= seen
                seen = lease.token
                store.set_state(
                    "r1", "RUNNING", f"held by {me}", fence=lease
                )  # LeaseLost if shared
                tokens.append((lease.token, me))
                store.release(me)
        except BaseException as exc:  # noqa: BLE001 - reported by the test thread
            errors.append(exc)
        finally:
            store.close()

    threads = [threading.Thread(target=contend, args=(f"co-{i}",)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert errors == []
    holders: dict[int, set[str]] = {}
    for token, me in tokens:
        holders.setdefault(token, set()).add(me)
    assert all(len(h) == 1 for h in holders.values()), holders
    assert len(holders) >= 6 and a.lease()[2] == max(holders) > 2, holders


@pytest.fixture(scope="module")
def new_model(tmp_path_factory):
    from cluster.tinymodel import TinyModelSpec, make_tiny_model

    return make_tiny_model(
        tmp_path_factory.mktemp("models") / "tiny-qwen2-pg", TinyModelSpec(seed=12)
    )


def test_rollouts_through_two_coordinators_on_postgresql_hand_the_lease_and_its_fencing_token_on(
    start_node, start_coordinator, new_model, tiny_model, pg_url
):
    from cluster.api import fleet_pb2 as K
    from tests.adversarial.test_lease_and_witness import run_rollout

    node = start_node(node_id="pg-fenced")
    a = start_coordinator("--state-url", pg_url, nodes=[node.address], name="pg-roll-a")
    b = start_coordinator("--state-url", pg_url, nodes=[node.address], name="pg-roll-b")
    a.wait_routable(1)
    b.wait_routable(1)
    lease = RolloutStore(pg_url)  # its own engine: what a third coordinator would read
    try:
        first = run_rollout(a, new_model, "pg-r-a")
        assert first.state == K.ROLLOUT_STATE_SUCCEEDED, first
        holder_a, _, token_a = lease.lease()
        assert first.owner == holder_a and holder_a.startswith("pg-roll-a@") and token_a >= 1
        assert node.status().fencing_token == token_a

        second = run_rollout(b, tiny_model, "pg-r-b")
        assert second.state == K.ROLLOUT_STATE_SUCCEEDED, second
        holder_b, _, token_b = lease.lease()
        assert holder_b.startswith("pg-roll-b@") and token_b > token_a
        assert node.status().fencing_token == token_b
        # Each sees the other's rollout: one plan, in one database.
        assert lease.get("pg-r-a").owner == holder_a and lease.get("pg-r-b").owner == holder_b
    finally:
        lease.close()


def test_a_coordinator_whose_database_is_unreachable_exits_naming_it_without_the_password(tmp_path):
    from tests.procs import CoordinatorProcess

    co = CoordinatorProcess(
        "--state-url", f"postgresql://fleet:{PASSWORD}@127.0.0.1:1/state", name="pg-down"
    )
    with co, pytest.raises(RuntimeError, match="exited before listening"):
        co.start(tmp_path / "logs")
    assert co.proc.wait(10) == 1
    text = co.stderr_path.read_text()
    assert PASSWORD not in text and "fleet:***@127.0.0.1:1/state" in text, text[-2000:]


def test_the_request_log_on_postgresql_answers_as_on_sqlite(pg_url):
    """The same filters as tests/test_request_log.py (caller matched exactly, not LIKE), on
    PostgreSQL; a row with a schema verdict and quality parts round-trips."""
    from dataclasses import replace

    import tests.test_request_log as on_sqlite
    from coordinator.request_log import RequestLog

    clock = [1_800_000_000.0]
    log = RequestLog(pg_url, retention_days=30, clock=lambda: clock[0])
    try:
        on_sqlite.test_filters_since_slow_failed_caller_and_limit(log, clock)
        log.record(
            replace(
                on_sqlite.summary(7, ended=clock[0] - 10),
                template="soap",
                output_format="json",
                schema_valid=True,
                quality_score=0.9,
                quality_parts={"sections": 1.0},
            )
        )
        reply = log.list_reply(
            fleet_pb2.ListRequestsRequest(since_s=60), slow_ttft_ms=1e9, slow_latency_ms=1e9
        )
        row = reply.requests[0]
        assert (row.request_id, row.template, row.schema_valid, dict(row.quality_parts)) == (
            "r-7",
            "soap",
            True,
            {"sections": 1.0},
        )
    finally:
        log.close()
