"""The coordinator's dashboard in a real browser (Debian's Chromium driven by Playwright),
its access rules, and `fleetctl top` / `fleetctl dashboard` (docs/monitoring.md)."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time

import pytest

from cluster.client import build_request
from cluster.security.identity import Role
from tests.fleet_helpers import collect
from tests.procs import ROOT, CoordinatorProcess
from tests.test_fleetctl import fleetctl

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = ROOT / "test-artifacts"
OPERATOR = ("--tls-name", "operator")


def _browser():
    """Playwright on the system Chromium (Playwright's own browser downloads are never used)."""
    missing = None
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing = "the playwright package (scripts/bootstrap installs it)"
    if missing is None and not os.path.exists(CHROMIUM):
        missing = "Chromium at /usr/bin/chromium (scripts/bootstrap-monitoring installs it)"
    if missing:
        if os.environ.get("STUDIOFLEET_REQUIRE_MONITORING_TOOLS") == "1":
            pytest.fail(f"the dashboard's browser test needs {missing}")
        pytest.skip(f"needs {missing}")
    return sync_playwright


@pytest.fixture(scope="module")
def fleet(tiny_model, tmp_path_factory):
    from tests.procs import NodeProcess

    logs = tmp_path_factory.mktemp("dashboard")
    nodes = [NodeProcess(tiny_model, node_id=f"dash-node-{i}") for i in (1, 2)]
    try:
        for n in nodes:
            n.start(logs)
        for n in nodes:
            n.wait_serving()
        with CoordinatorProcess(nodes=[n.address for n in nodes], name="dash-coordinator") as co:
            co.start(logs)
            co.wait_routable(2)
            for i in range(4):  # some traffic for the charts
                assert (
                    collect(
                        co.inference,
                        build_request(prompt=f"Note {i}:", max_tokens=16, request_id=f"dash-{i}"),
                    ).final
                    is not None
                )
            yield co, nodes
    finally:
        for n in nodes:
            n.stop()


def link(co) -> str:
    out = fleetctl("dashboard", "-c", co.address, *OPERATOR)
    assert out.returncode == 0, out.stderr
    url = out.stdout.strip()
    assert url.startswith(f"https://{co.http_address}/login?token=")
    return url


@pytest.mark.allow_blocking(
    "Playwright's sync API runs an event loop of its own in this process and does "
    "file I/O on it; the dashboard under test runs in the coordinator's process"
)
def test_the_dashboard_shows_the_fleet_live_and_follows_a_cordon(fleet):
    co, nodes = fleet
    sync_playwright = _browser()
    ARTIFACTS.mkdir(exist_ok=True)
    errors: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        # The test CA is not in Chromium's trust store; a real operator's browser trusts
        # the fleet CA (docs/monitoring.md). Everything else about TLS is real.
        page = browser.new_context(
            ignore_https_errors=True, viewport={"width": 1400, "height": 1000}
        ).new_page()
        page.on(
            "console",
            lambda m: errors.append(f"console {m.type}: {m.text}") if m.type == "error" else None,
        )
        page.on("pageerror", lambda exc: errors.append(f"page error: {exc}"))
        try:
            page.goto(link(co))
            assert (
                page.url == f"https://{co.http_address}/"
            )  # the token was exchanged for a session
            for n in nodes:
                page.wait_for_selector(
                    f'tr[data-node-id="{n.node_id}"][data-state="READY"]', timeout=15_000
                )
            page.wait_for_selector("#conn.live", timeout=10_000)
            assert page.inner_text("#t-routable") == "2 / 2"
            assert "dash-coordinator" in page.inner_text("#coordinator")
            assert (
                page.locator("#c-tps polyline").count() == 1
                and page.locator("#c-req rect").count() >= 1
            )
            assert "joined" in page.inner_text("#events")
            page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)

            victim = nodes[0].node_id
            out = fleetctl(
                "cordon", victim, "-c", co.address, *OPERATOR, "--reason", "dashboard test"
            )
            assert out.returncode == 0, out.stderr
            # No reload: the page's own polling must show it.
            page.wait_for_selector(
                f'tr[data-node-id="{victim}"][data-cordoned="true"]', timeout=10_000
            )
            assert "cordoned" in page.inner_text(f'tr[data-node-id="{victim}"]')
            page.wait_for_function(
                "document.getElementById('t-routable').textContent === '1 / 2'", timeout=10_000
            )
            assert "operation" in page.inner_text("#events")
            page.screenshot(path=str(ARTIFACTS / "dashboard-cordoned.png"), full_page=True)
            # The coordinator's own in-flight count, and a footer in view in a short window (issue 20).
            assert "in flight" in page.inner_text("#nodes thead")
            page.set_viewport_size({"width": 1440, "height": 600})
            box = page.evaluate(
                "(() => { const r = document.querySelector('footer').getBoundingClientRect(); "
                "return [r.top, r.bottom, window.innerHeight]; })()"
            )
            assert 0 <= box[0] and box[1] <= box[2], f"footer out of view at 600 px: {box}"
            # A shadow run shows in its card without a reload (docs/shadow.md).
            assert page.inner_text("#t-shadow-sub") == "no shadow run"
            model = nodes[1].status().model.model_id
            out = fleetctl("shadow", "start", "--model", model, "--fraction", "1", "-c", co.address,
                           *OPERATOR)  # fmt: skip
            assert out.returncode == 0, out.stderr
            req = build_request(prompt="Note:", max_tokens=4, request_id="dash-shadow-1")
            req.model = model
            assert collect(co.inference, req).final is not None
            # (a selector, not wait_for_function: the page's CSP forbids eval once it waits)
            page.wait_for_selector("#t-shadow-sub:has-text('1 sent, 0 dropped')", timeout=10_000)
            assert page.inner_text("#t-shadow") == "insufficient"
            assert model in page.inner_text("#t-shadow-sub")
            assert "100%" in page.inner_text("#t-shadow-sub")
            assert fleetctl("shadow", "stop", "-c", co.address, *OPERATOR).returncode == 0
            page.wait_for_selector("#t-shadow:has-text('(stopped)')", timeout=10_000)
        except Exception:
            page.screenshot(path=str(ARTIFACTS / "dashboard-failure.png"), full_page=True)
            raise
        finally:
            fleetctl("uncordon", nodes[0].node_id, "-c", co.address, *OPERATOR)
            browser.close()
    assert errors == [], errors


def test_only_operators_get_the_page_and_a_link_works_once(fleet):
    co, nodes = fleet
    co.credentials("app", Role.APP)
    status, body, _ = co.http_get("/api/snapshot", None)
    assert status == 401 and b"fleetctl dashboard" in body
    assert co.http_get("/api/snapshot", "app", Role.APP)[0] == 403
    status, body, _ = co.http_get("/api/snapshot")
    snap = json.loads(body)
    assert status == 200 and {n["id"] for n in snap["nodes"]} == {n.node_id for n in nodes}
    assert len(snap["traffic"]) == 60 and sum(b["requests"] for b in snap["traffic"]) >= 4
    assert all(
        k in snap["nodes"][0]
        for k in ("state", "model", "running", "queued", "tokens_per_s", "memory_used")
    )

    url = link(co)
    path = url.split(co.http_address, 1)[1]
    status, _, headers = co.http_get(path, None, follow_redirects=False)
    assert status == 303
    cookie = headers["Set-Cookie"].split(";", 1)[0]
    assert "HttpOnly" in headers["Set-Cookie"] and "Secure" in headers["Set-Cookie"]
    assert "SameSite=Strict" in headers["Set-Cookie"]
    status, body, headers = co.http_get("/", None, headers={"Cookie": cookie})
    assert status == 200 and b"/static/dashboard.js" in body and b"<script>" not in body
    assert "script-src 'self'" in headers["Content-Security-Policy"]
    assert co.http_get("/api/snapshot", None, headers={"Cookie": cookie})[0] == 200
    assert co.http_get(path, None, follow_redirects=False)[0] == 401  # a link works once
    assert (
        co.http_get("/api/snapshot", None, headers={"Cookie": "studiofleet_session=forged"})[0]
        == 401
    )
    assert fleetctl("dashboard", "-c", co.address, "--tls-name", "app").returncode == 1
    # /metrics is for scrapers (monitor) and operators, not for apps
    assert co.http_get("/metrics", "app", Role.APP)[0] == 403
    assert co.http_get("/metrics")[0] == 200


def test_fleetctl_top_draws_the_fleet_once_and_live(fleet):
    co, nodes = fleet
    once = fleetctl("top", "-c", co.address, *OPERATOR, "--once")
    assert once.returncode == 0, once.stderr
    for n in nodes:
        assert n.node_id in once.stdout
    assert (
        "nodes routable" in once.stdout
        and "tokens/s" in once.stdout
        and "recent events" in once.stdout
    )
    assert "joined" in once.stdout
    # Live: refreshed in place; --iterations stops it for the test (Ctrl-C for a person).
    live = subprocess.run(
        [
            sys.executable,
            "-m",
            "cluster.fleetctl.app",
            "top",
            "-c",
            co.address,
            *OPERATOR,
            "--interval",
            "0.3",
            "--iterations",
            "3",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert live.returncode == 0, live.stderr
    assert live.stdout.count("nodes routable") >= 3, live.stdout[-2000:]
    # In a terminal (a real pty): rich's live screen, redrawn in place.
    tty = subprocess.run(
        [
            "script",
            "-qec",
            " ".join(
                [
                    sys.executable,
                    "-m",
                    "cluster.fleetctl.app",
                    "top",
                    "-c",
                    co.address,
                    *OPERATOR,
                    "--interval",
                    "0.3",
                    "--iterations",
                    "3",
                ]
            ),
            "/dev/null",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "220"},
    )
    assert tty.returncode == 0, tty.stdout[-2000:]
    assert (
        "\x1b[?1049h" in tty.stdout and tty.stdout.count("nodes routable") >= 3
    )  # alternate screen, 3 frames


def test_fleetctl_top_leaves_on_ctrl_c_and_restores_the_terminal(fleet):
    co, _ = fleet
    leader, follower = os.openpty()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cluster.fleetctl.app",
            "top",
            "-c",
            co.address,
            *OPERATOR,
            "--interval",
            "0.3",
        ],
        cwd=ROOT,
        stdin=follower,
        stdout=follower,
        stderr=follower,
        env={**os.environ, "COLUMNS": "220", "LINES": "60"},
    )
    os.close(follower)
    seen = b""
    try:
        deadline = time.monotonic() + 60
        while seen.count(b"nodes routable") < 2:  # two frames drawn: it is live
            assert proc.poll() is None and time.monotonic() < deadline, seen[-2000:]
            if select.select([leader], [], [], 0.5)[0]:
                seen += os.read(leader, 65536)
        proc.send_signal(signal.SIGINT)  # what Ctrl-C sends
        # Keep reading while it exits, as a terminal does: a frame larger than the pty's
        # buffer would otherwise block its write, and the exit with it.
        deadline = time.monotonic() + 20
        while proc.poll() is None and time.monotonic() < deadline:
            if select.select([leader], [], [], 0.1)[0]:
                try:
                    seen += os.read(leader, 65536)
                except OSError:
                    break
        assert proc.wait(timeout=5) == 0
        while select.select([leader], [], [], 0.2)[0]:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: the pty's other end is closed
                break
            if not chunk:
                break
            seen += chunk
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        os.close(leader)
    assert b"\x1b[?1049l" in seen and b"Traceback" not in seen  # back from the alternate screen


def test_the_dashboard_page_has_no_external_or_inline_code():
    """CSP is `script-src 'self'`: anything inline or from elsewhere would be blocked and
    the product never calls out to the internet."""
    static = ROOT / "coordinator" / "static"
    html = (static / "dashboard.html").read_text()
    assert (
        "<script>" not in html
        and "style=" not in html
        and "http" not in html.replace("http://www.w3.org", "")
    )
    js = (static / "dashboard.js").read_text()
    assert "innerHTML" not in js and "https://" not in js
