"""The alert rules and Grafana dashboard in monitoring/, checked with the real promtool,
and a real Prometheus server (Debian's package) scraping a test fleet over HTTPS with a
`monitor` certificate and evaluating the rules (docs/monitoring.md)."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from cluster.client import build_request
from cluster.security.identity import Role
from tests.fleet_helpers import collect
from tests.procs import ROOT, CoordinatorProcess

RULES = ROOT / "monitoring" / "prometheus" / "studiofleet-rules.yml"
RULE_TESTS = ROOT / "monitoring" / "prometheus" / "studiofleet-rules.test.yml"
EXAMPLE = ROOT / "monitoring" / "prometheus" / "prometheus.example.yml"
GRAFANA = ROOT / "monitoring" / "grafana" / "studiofleet-dashboard.json"
NAME = re.compile(r"\b(studiofleet_[a-z_]+|vllm:[a-z_]+|process_[a-z_]+|up)\b")
SYNTHETIC = {"up"}  # written by Prometheus for each scrape, not exported by a daemon
PANELS = (
    "Routable nodes",
    "Requests/s by outcome",
    "Tokens/s",
    "Time to first token",
    "Inter-token latency",
    "End-to-end latency p95",
    "Queue depth",
    "In flight per node",
    "Node states",
    "Failovers / retries / ejections (1h)",
    "Rollout progress",
    "Audit write failures (1h)",
    "Memory",
)
HISTOGRAM_PARTS = ("_bucket", "_sum", "_count")


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        why = f"{name} is not installed (Debian package prometheus; scripts/bootstrap-monitoring installs it)"
        if os.environ.get("STUDIOFLEET_REQUIRE_MONITORING_TOOLS") == "1":
            pytest.fail(why)
        pytest.skip(why)
    return path


def test_promtool_accepts_the_rules_and_their_unit_tests_pass():
    checked = subprocess.run(
        [tool("promtool"), "check", "rules", str(RULES)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert checked.returncode == 0 and "SUCCESS" in checked.stdout, checked.stdout + checked.stderr
    tested = subprocess.run(
        [tool("promtool"), "test", "rules", RULE_TESTS.name],
        cwd=RULE_TESTS.parent,
        capture_output=True,
        text=True,
        check=False,
    )
    assert tested.returncode == 0 and "SUCCESS" in tested.stdout, tested.stdout + tested.stderr
    alerts = set(re.findall(r"alert: (\w+)", RULES.read_text()))
    assert {
        "StudioFleetNodeDown",
        "StudioFleetNoReadyNode",
        "StudioFleetTTFTHigh",
        "StudioFleetQueueGrowing",
        "StudioFleetErrorRate",
        "StudioFleetAuditWriteFailures",
    } <= alerts
    assert alerts <= set(re.findall(r"alertname: (\w+)", RULE_TESTS.read_text())), (
        "every alert has a unit test"
    )


def test_promtool_accepts_the_example_config(tmp_path):
    """The example as shipped, its certificate paths pointed at placeholders (promtool
    checks that they exist) and the rules file beside it."""
    for name in ("ca.pem", "prometheus.pem", "prometheus.key"):
        (tmp_path / name).touch()
    shutil.copy(RULES, tmp_path / RULES.name)
    config = tmp_path / "prometheus.yml"
    config.write_text(EXAMPLE.read_text().replace("/etc/prometheus/studiofleet/", f"{tmp_path}/"))
    checked = subprocess.run(
        [tool("promtool"), "check", "config", str(config)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert checked.returncode == 0 and "1 rule files found" in checked.stdout, (
        checked.stdout + checked.stderr
    )


@pytest.fixture(scope="module")
def coordinator(node, tmp_path_factory):
    proc = CoordinatorProcess(nodes=[node.address], name="rules-coordinator")
    with proc:
        proc.start(tmp_path_factory.mktemp("rules-logs"))
        proc.wait_routable(1)
        assert collect(
            proc.inference, build_request(prompt="Note:", max_tokens=4, request_id="rules")
        ).final
        yield proc


def scrape(daemon) -> str:
    status, body, _ = daemon.http_get("/metrics", "prometheus", Role.MONITOR)
    assert status == 200, body
    return body.decode()


def exported(text: str) -> set[str]:
    names = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            names.add(line.split()[2])
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def base(name: str) -> str:
    for part in HISTOGRAM_PARTS:
        if name.endswith(part):
            return name[: -len(part)]
    return name


def test_every_series_the_rules_and_the_dashboard_use_is_exported(coordinator, node):
    names = exported(scrape(coordinator)) | exported(scrape(node))
    dashboard = json.loads(GRAFANA.read_text())
    assert dashboard["schemaVersion"] >= 36 and dashboard["panels"]
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {base(n) for text in [RULES.read_text(), *exprs] for n in NAME.findall(text)} - SYNTHETIC
    missing = sorted(n for n in used if n not in names and base(n) not in {base(x) for x in names})
    assert {"studiofleet_requests_total", "studiofleet_nodes_routable"} <= used
    assert not missing, f"the rules or the dashboard use series no daemon exports: {missing}"
    assert all(p["datasource"]["uid"] == "${DS_PROMETHEUS}" for p in dashboard["panels"])
    assert [i["name"] for i in dashboard["__inputs"]] == ["DS_PROMETHEUS"]
    assert "DS_PROMETHEUS" in [v["name"] for v in dashboard["templating"]["list"]]
    titles = {p["title"] for p in dashboard["panels"]}
    assert not [t for t in PANELS if t not in titles], f"panels missing: {set(PANELS) - titles}"


def test_promtool_check_metrics_finds_nothing_but_the_vllm_names(coordinator, node):
    """promtool lints every name with a colon; the vLLM-compatible names have one on
    purpose (vLLM's own server fails the same lint). Anything else is a real problem."""
    for daemon in (coordinator, node):
        out = subprocess.run(
            [tool("promtool"), "check", "metrics"],
            input=scrape(daemon),
            capture_output=True,
            text=True,
            check=False,
        )
        problems = [line for line in (out.stdout + out.stderr).splitlines() if line.strip()]
        other = [
            p
            for p in problems
            if not re.fullmatch(r"vllm:\w+ metric names should not contain ':'", p)
        ]
        assert not other, f"{daemon.name}: {other}"
        if daemon is node:
            assert problems, "the node exports vLLM's names"


def example_config(tls_dir: Path, coordinators: list[str], nodes: list[str]) -> str:
    """monitoring/prometheus/prometheus.example.yml with this fleet's certificate directory,
    addresses and 1 s intervals; everything else as shipped."""
    text = EXAMPLE.read_text().replace("/etc/prometheus/studiofleet/", f"{tls_dir}/")
    text = re.sub(r"(scrape_interval|evaluation_interval): 15s", r"\1: 1s", text)
    targets = iter([coordinators, nodes])
    text, count = re.subn(
        r"- targets: \[.*\]", lambda _: f"- targets: {json.dumps(next(targets))}", text
    )
    assert count == 2 and text.count(": 1s") == 2, (
        "the example config's layout changed; update example_config"
    )
    return text


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as reply:
        return json.loads(reply.read())


def _wait(what: str, check, timeout_s: float, period_s: float = 0.25):
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        try:
            last = check()
            if last:
                return last
        except OSError as exc:  # Prometheus not up yet
            last = exc
        time.sleep(period_s)
    raise AssertionError(f"{what} not seen within {timeout_s}s; last: {last}")


def test_a_real_prometheus_scrapes_the_fleet_and_raises_node_down(start_node, tmp_path, fleet_ca):
    prometheus = tool("prometheus")
    nodes = [start_node(node_id=f"prom-node-{i}") for i in (1, 2)]
    with CoordinatorProcess(nodes=[n.address for n in nodes], name="prom-coordinator") as co:
        co.start(tmp_path / "logs")
        co.wait_routable(2)
        co.credentials("prometheus", Role.MONITOR)
        # The shipped rules with every `for: Nm` rewritten by a regex to `for: 1s`, so the
        # test waits seconds, not the 1-10 minutes the shipped rules hold an alert pending.
        rules = tmp_path / RULES.name
        rules.write_text(re.sub(r"for: \d+m", "for: 1s", RULES.read_text()))
        assert "for: 1s" in rules.read_text() and not re.search(r"for: \d+m", rules.read_text())
        # The shipped example config itself: its TLS settings (and the nodes' server_name)
        # must work against a real fleet. Only paths, addresses and intervals change.
        config = tmp_path / "prometheus.yml"
        config.write_text(
            example_config(fleet_ca, [co.http_address], [n.http_address for n in nodes])
        )
        checked = subprocess.run(
            [tool("promtool"), "check", "config", str(config)],
            capture_output=True,
            text=True,
            check=False,
        )
        assert checked.returncode == 0, checked.stdout + checked.stderr
        port = _free_port()
        api = f"http://127.0.0.1:{port}"
        log = tmp_path / "prometheus.log"
        with open(log, "wb") as err:
            proc = subprocess.Popen(
                [
                    prometheus,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                ],
                stdout=subprocess.DEVNULL,
                stderr=err,
            )
        try:
            _wait(
                "Prometheus ready",
                lambda: urllib.request.urlopen(f"{api}/-/ready", timeout=2).status == 200,
                60,
            )

            def targets():
                return _get(f"{api}/api/v1/targets")["data"]["activeTargets"]

            _wait(
                "3 targets up over mTLS", lambda: [t["health"] for t in targets()] == ["up"] * 3, 30
            )

            for i in range(3):
                assert (
                    collect(
                        co.inference,
                        build_request(prompt=f"Note {i}:", max_tokens=6, request_id=f"prom-{i}"),
                    ).final
                    is not None
                )
            query = urllib.parse.quote('sum(studiofleet_requests_total{outcome="completed"})')
            _wait(
                "the requests in Prometheus",
                lambda: (
                    (r := _get(f"{api}/api/v1/query?query={query}")["data"]["result"])
                    and float(r[0]["value"][1]) >= 3
                ),
                20,
            )

            def active(name: str) -> list:
                return [
                    a
                    for a in _get(f"{api}/api/v1/alerts")["data"]["alerts"]
                    if a["labels"]["alertname"] == name and a["state"] in ("pending", "firing")
                ]

            # TTFTHigh aside: a cold first token on a slow CI machine may well take 2 s.
            raised = [
                a
                for a in _get(f"{api}/api/v1/alerts")["data"]["alerts"]
                if a["state"] != "inactive" and a["labels"]["alertname"] != "StudioFleetTTFTHigh"
            ]
            assert not raised, f"a healthy fleet raised alerts: {raised}"
            victim = nodes[0]
            victim.proc.kill()
            down = _wait("StudioFleetNodeDown", lambda: active("StudioFleetNodeDown"), 45)
            assert any(
                victim.http_address == a["labels"].get("instance")
                or victim.node_id == a["labels"].get("node")
                for a in down
            ), down
            assert not active("StudioFleetNoReadyNode"), "the other node is still READY"
            assert not active("StudioFleetAuditWriteFailures")
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    assert Path(tmp_path / "prometheus.log").exists()
