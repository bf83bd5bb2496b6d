"""Rollout traps a new operator hit (issue 20): a rollout that renamed the served model (an
outage for every OpenAI-API client), and one that waited forever behind a drained node.
Real coordinator, real node agents, the real fleetctl."""

from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.request

import grpc
import pytest

from cluster.api import fleet_pb2, fleet_pb2_grpc
from cluster.client import build_request
from tests.fleet_helpers import collect
from tests.test_rollout import fleet_with, fleetctl, rollout


@pytest.fixture(scope="module")
def v2_model(tmp_path_factory):
    from cluster.tinymodel import TinyModelSpec, make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-v2", TinyModelSpec(seed=7))


@pytest.fixture(scope="module")
def v3_model(tmp_path_factory):
    from cluster.tinymodel import TinyModelSpec, make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-v3", TinyModelSpec(seed=8))


def _pinned(model: str):
    req = build_request(prompt="Plan:", max_tokens=2)
    req.model = model
    return req


def _ids(co) -> set[str]:
    return {n.status.model.model_id for n in co.nodes().nodes}


def test_a_rollout_keeps_the_model_id_and_a_rename_must_be_confirmed(
    start_node, start_coordinator, tiny_model, v2_model, v3_model
):
    nodes = [start_node(node_id=n, wait=False) for n in ("keep-a", "keep-b")]
    co = fleet_with(start_coordinator, nodes)
    served = tiny_model.name
    assert _ids(co) == {served}

    out = fleetctl(
        co,
        "rollout",
        "start",
        "--model",
        str(v2_model),
        "--version",
        "v2",
        "--rollout-id",
        "r-keep",
        "--wait",
    )
    assert out.exit_code == 0, out.output
    assert "(kept)" in out.output and "RENAME" not in out.output
    assert _ids(co) == {served}, "the rollout renamed the model its clients ask for"
    assert {n.status.model.version for n in co.nodes().nodes} == {"v2"}

    # An app may pin a version (ID@VERSION) as well as ask for the id.
    ok = collect(co.inference, _pinned(f"{served}@v2"))
    assert ok.final is not None and ok.error is None
    other = collect(co.inference, _pinned(f"{served}@v1"))
    assert other.error is not None and other.error.code() == grpc.StatusCode.UNAVAILABLE
    token = (
        fleet_pb2_grpc.FleetStub(co.channel)
        .IssueApiToken(fleet_pb2.IssueApiTokenRequest(name="pin-app", ttl_s=600), timeout=10)
        .secret
    )
    context = ssl.create_default_context(cafile=str(co.tls_dir / "ca.pem"))

    def get(path):
        req = urllib.request.Request(
            f"{co.openai_base_url}{path}", headers={"Authorization": f"Bearer {token}"}
        )
        try:
            with urllib.request.urlopen(req, context=context, timeout=10) as reply:
                return reply.status, json.loads(reply.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read())

    assert get(f"/models/{served}@v2")[0] == 200 and get(f"/models/{served}")[0] == 200
    assert get(f"/models/{served}@v9")[0] == 404

    # A different id is a rename: refused unless confirmed, by the coordinator itself too.
    stub = fleet_pb2_grpc.FleetStub(co.channel)
    with pytest.raises(grpc.RpcError) as err:
        stub.StartRollout(
            fleet_pb2.StartRolloutRequest(
                target=fleet_pb2.RolloutTarget(model_path=str(v3_model), model_id="tiny-renamed")
            ),
            timeout=60,
        )
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "rename" in err.value.details() and "404" in err.value.details()
    unconfirmed = fleetctl(
        co, "rollout", "start", "--model", str(v3_model), "--model-id", "tiny-renamed"
    )
    assert (
        unconfirmed.exit_code == 2
        and "RENAME" in unconfirmed.output
        and "--yes" in unconfirmed.output
    )
    assert _ids(co) == {served}
    same = fleetctl(
        co, "rollout", "start", "--model", str(v2_model), "--model-id", "tiny-renamed", "--yes"
    )
    assert (
        same.exit_code == 2 and "already serves these weights" in same.output
    )  # no silent no-op rename
    confirmed = fleetctl(
        co,
        "rollout",
        "start",
        "--model",
        str(v3_model),
        "--model-id",
        "tiny-renamed",
        "--yes",
        "--rollout-id",
        "r-rename",
        "--wait",
    )
    assert confirmed.exit_code == 0, confirmed.output
    assert _ids(co) == {"tiny-renamed"}


def test_a_drained_node_is_updated_first_and_a_blocked_wait_pauses_naming_it(
    start_node, start_coordinator, v2_model
):
    a, b = (start_node(node_id=n, wait=False) for n in ("held-a", "held-b"))
    co = fleet_with(start_coordinator, [a, b])
    assert fleetctl(co, "drain", "held-b").exit_code == 0

    out = fleetctl(
        co,
        "rollout",
        "start",
        "--model",
        str(v2_model),
        "--rollout-id",
        "r-held",
        "--wait-timeout",
        "3",
        "--wait",
    )
    assert out.exit_code == 9, out.output  # paused, not waiting forever
    r = rollout(co, "r-held")
    assert r.state == fleet_pb2.ROLLOUT_STATE_PAUSED
    assert [n.node_id for n in r.nodes] == [
        "held-b",
        "held-a",
    ]  # the drained one first: it costs no capacity
    done, waiting = r.nodes
    assert done.step == "done" and "left out of service" in done.message
    assert waiting.step == "wait"
    assert (
        "node held-b is cordoned" in r.message and "fleetctl uncordon held-b" in r.message
    )  # still out
    assert "fleetctl rollout resume r-held" in r.message
    status = fleetctl(co, "rollout", "status", "r-held")
    assert "fleetctl uncordon held-b" in status.output

    assert fleetctl(co, "uncordon", "held-b").exit_code == 0
    co.wait_routable(2)
    assert fleetctl(co, "rollout", "resume", "r-held").exit_code == 0
    end = fleetctl(co, "rollout", "status", "r-held", "--watch")
    assert end.exit_code == 0, end.output
    assert {n.step for n in rollout(co, "r-held").nodes} == {"done"}
    assert len({n.status.model.weights_digest for n in co.nodes().nodes}) == 1
