from __future__ import annotations

import itertools
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from tests.loop_guard import no_blocking_on_event_loop  # noqa: E402,F401 - autouse: fails blocking calls on a loop
from tests.procs import CoordinatorProcess, NodeProcess  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def fleet_ca(tmp_path_factory) -> Path:
    """Every test fleet runs with mTLS (the default) from one test CA: daemons get their
    certificates issued here on demand; the test process calls as `app` (inference) and
    `operator` (admin), the identities the client library and harness read from the env."""
    from cluster.localfleet import HARNESS_NODE_CALLER
    from cluster.security.ca import init_ca, issue
    from cluster.security.identity import Role
    from cluster.security.tls import ENV_DIR, ENV_NAME

    directory = tmp_path_factory.mktemp("fleet-ca")
    init_ca(directory, fleet="tests")
    issue(directory, Role.APP, "app")
    issue(directory, Role.OPERATOR, "operator")
    issue(directory, Role.COORDINATOR, HARNESS_NODE_CALLER)
    saved = {k: os.environ.get(k) for k in (ENV_DIR, ENV_NAME)}
    os.environ[ENV_DIR], os.environ[ENV_NAME] = str(directory), "app"
    yield directory
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture
def as_node_caller(monkeypatch):
    """Client-library calls in this test go straight to node agents, which serve inference
    to coordinators only: call with the harness's coordinator certificate."""
    from cluster.localfleet import HARNESS_NODE_CALLER
    from cluster.security.tls import ENV_NAME

    monkeypatch.setenv(ENV_NAME, HARNESS_NODE_CALLER)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """The default generated Qwen2 model (hidden 128, 2 layers, head_dim 64)."""
    from cluster.tinymodel import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-qwen2")


@pytest.fixture(scope="session")
def qwen_tiny_model(tmp_path_factory) -> Path:
    """A generated Qwen2 model with Qwen2.5's real tokenizer and chat template (hidden 64,
    2 layers, 151,936 tied embedding rows): real token counts and grammar mask sizes."""
    from cluster.tinymodel import make_tiny_model, qwen25_spec

    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-qwen2.5-vocab", qwen25_spec())


@pytest.fixture(scope="module")
def node(tiny_model, tmp_path_factory):
    """One READY node agent shared by a module's tests (they must leave it serving)."""
    proc = NodeProcess(
        tiny_model, "--max-running", "32", "--max-queued", "64", node_id="shared-node"
    )
    with proc:
        proc.start(tmp_path_factory.mktemp("logs"))
        proc.wait_serving()
        yield proc
        # Every accepted request ended exactly once, and nothing is left running.
        st, _ = proc.wait_until(
            lambda s: s.load.running == s.load.queued == s.load.engine_sequences == 0,
            timeout_s=5,
            what="idle after the module",
        )
        load = st.load
        ended = (
            load.requests_completed_total
            + load.requests_cancelled_total
            + load.requests_deadline_total
            + load.requests_failed_total
        )
        assert load.requests_accepted_total == ended, f"outcomes do not add up: {load}"


@pytest.fixture(scope="session")
def vllm_python() -> str:
    from tests.vllm_support import find_vllm_python

    return find_vllm_python()


@pytest.fixture(scope="session")
def vllm_node(tiny_model, vllm_python, tmp_path_factory):
    """One vLLM node agent for the vLLM tests (tests/test_vllm_*.py), stopped at the end of
    the session; on the way out no vLLM process may be left and every request ended once."""
    from tests.vllm_support import START_TIMEOUT_S, VLLM_ENV, group_alive, vllm_node_args

    proc = NodeProcess(
        tiny_model,
        *vllm_node_args(vllm_python, "--max-running", "16", "--max-queued", "32"),
        node_id="vllm-node",
        env=VLLM_ENV,
    )
    with proc:
        proc.start(tmp_path_factory.mktemp("vllm-logs"))
        proc.wait_serving(START_TIMEOUT_S)
        yield proc
        st = proc.status()
        pgid = st.engine_server.pid
        load = st.load
        ended = (
            load.requests_completed_total
            + load.requests_cancelled_total
            + load.requests_deadline_total
            + load.requests_failed_total
        )
        assert load.requests_accepted_total == ended, f"outcomes do not add up: {load}"
        proc.stop()
        # SIGTERM to the agent stops the server and its engine-core and worker processes.
        assert pgid and not group_alive(pgid), (
            f"vLLM processes left after the agent stopped: {group_alive(pgid)}"
        )


@pytest.fixture
def start_node(tiny_model, tmp_path):
    """Start extra node agents with their own flags; all are stopped after the test."""
    started: list[NodeProcess] = []

    def start(
        *args: str,
        node_id: str = "node-under-test",
        model: Path | None = None,
        wait: bool = True,
        env: dict | None = None,
        fleet: str | None = None,
    ) -> NodeProcess:
        proc = NodeProcess(model or tiny_model, *args, node_id=node_id, env=env, fleet=fleet)
        started.append(proc)
        proc.start(tmp_path / "logs")
        if wait:
            proc.wait_serving()
        return proc

    yield start
    for proc in started:
        proc.stop()


@pytest.fixture
def fleet_name() -> str:
    """An mDNS fleet name no other test (or stray node on this host) announces."""
    return f"t{os.getpid()}-{next(_FLEETS)}"


_FLEETS = itertools.count()


@pytest.fixture
def start_coordinator(tmp_path):
    """Start coordinators (mDNS on loopback when given a fleet); all stopped after the test."""
    started: list[CoordinatorProcess] = []

    def start(
        *args: str, nodes=(), fleet: str | None = None, name: str = "coordinator"
    ) -> CoordinatorProcess:
        proc = CoordinatorProcess(*args, nodes=nodes, fleet=fleet, name=name)
        started.append(proc)
        proc.start(tmp_path / "logs")
        proc.wait_serving()
        return proc

    yield start
    for proc in started:
        proc.stop()


# -- the audit chain tests (tests/test_audit.py, tests/test_audit_tamper.py) ---------------


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """A closed 300-record audit chain with checkpoints, built once per module."""
    from tests.audit_helpers import EVERY, fill

    directory = tmp_path_factory.mktemp("pristine") / "audit"
    fill(directory, checkpoint_every=EVERY)
    return directory


@pytest.fixture
def chain(pristine, tmp_path) -> Path:
    """A private copy of a closed 300-record chain (and its keys) to tamper with."""
    import shutil

    from cluster.audit.chain import default_key_dir

    shutil.copytree(default_key_dir(pristine), default_key_dir(tmp_path / "audit"))
    return Path(shutil.copytree(pristine, tmp_path / "audit"))


# -- coordinator state on PostgreSQL (tests/pg.py; docs/state.md) -----------------------


@pytest.fixture(scope="session")
def postgres():
    """A throwaway PostgreSQL cluster for the session (scripts/bootstrap-postgres installs it)."""
    from tests.pg import PostgresCluster, find_bindir

    bindir = find_bindir()
    if bindir is None:
        if os.environ.get("STUDIOFLEET_REQUIRE_POSTGRES") == "1":
            pytest.fail("PostgreSQL 15+ is not installed: run scripts/bootstrap-postgres (as root)")
        pytest.skip("PostgreSQL 15+ is not installed (scripts/bootstrap-postgres)")
    with PostgresCluster(bindir) as cluster:
        yield cluster


@pytest.fixture
def pg_url(postgres) -> str:
    """A fresh, empty PostgreSQL database for this test: its postgresql:// URL."""
    return postgres.database()
