"""The main job, locally: a generated model, a coordinator and two node agents that find
each other over mDNS on loopback, and concurrent clinical-note requests through the
client library. Everything is synthetic: no patient data, no network beyond loopback.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from rich.console import Console
from rich.table import Table

from cluster.client import FleetClient, GenerateResult, build_request
from cluster.client.errors import FleetError
from cluster.fleetctl.nodes_cmd import fleet_table
from cluster.localfleet import CoordinatorProcess, NodeProcess
from cluster.security.ca import init_ca
from cluster.security.identity import Role, dns_name

SYSTEM = "You are a clinical documentation assistant. Write concise SOAP notes."
VISITS = [
    "Follow-up for hypertension; BP 138/86; adherent to lisinopril; no chest pain.",
    "Type 2 diabetes review; HbA1c 7.1%; reports occasional fasting glucose above 160.",
    "Post-discharge call after pneumonia; afebrile; finishing antibiotics; mild cough.",
    "COPD check-in; uses inhaler twice daily; walks 200 m before resting.",
    "Heart failure monitoring; weight up 1.5 kg in a week; mild ankle swelling.",
    "Medication reconciliation after a fall at home; no head injury reported.",
    "Asthma review; night symptoms twice a week; peak flow 78% of best.",
    "Chronic kidney disease stage 3 follow-up; eGFR 48; potassium 4.9.",
]


def _request(i: int, max_tokens: int):
    """A structured note: the versioned soap-brief prompt template, its SOAP schema enforced
    while decoding, so even the random demo model's output is a valid SOAP object."""
    visit = VISITS[i % len(VISITS)]
    return build_request(
        template="soap-brief",
        variables={"transcript": f"Synthetic visit {i}: {visit}"},
        max_tokens=max_tokens,
        request_id=f"note-{i:03d}",
        temperature=0.7,
        seed=i,
    )


def run_demo(
    workdir: Path,
    *,
    notes: int = 12,
    concurrency: int = 8,
    max_tokens: int = 0,
    nodes: int = 2,
    vllm_python: str = "",
    keep_running: bool = False,
    vocab: str = "qwen2.5",
    console: Console | None = None,
) -> int:
    """Returns 0 when every note completed and every daemon stopped cleanly. With
    `vllm_python`, one more node agent serves the same model through vLLM (its CPU build
    here: float32, eager, a 1 GiB KV cache). With `keep_running`, the fleet stays up after
    the notes, with the commands to try printed, until Ctrl-C or SIGTERM. `vocab` "qwen2.5"
    (the default) gives the generated model Qwen2.5's real tokenizer (real token counts and
    grammar mask sizes); "trained" a 512-token BPE, about 3x faster on a 2-core CPU, where
    sampling over 151,936 tokens dominates."""
    console = console or Console(width=None if sys.stdout.isatty() else 200)
    stop = _stop_event() if keep_running else None
    model = _demo_model(workdir / "model", vocab, console)

    certs = workdir / "ca"
    if not (certs / "ca.pem").exists():
        init_ca(certs, fleet="demo")
    console.print(
        f"      mTLS from the demo CA in {certs}: each daemon and the app get their own certificate"
    )
    fleet = f"demo-{os.getpid()}"  # this demo's nodes only, whatever else is on the network
    logs = workdir / "logs"
    for old in (
        workdir / "audit",
        workdir / "audit-keys",
    ):  # each run is a new fleet with a chain of its own
        shutil.rmtree(old, ignore_errors=True)
    coordinator = CoordinatorProcess(
        fleet=fleet, name="demo-coordinator", tls_dir=certs, audit_dir=workdir / "audit"
    )
    agents = [
        NodeProcess(
            model,
            "--max-running",
            str(concurrency),
            node_id=f"demo-node-{i + 1}",
            fleet=fleet,
            tls_dir=certs,
        )
        for i in range(nodes)
    ]
    if vllm_python:
        agents.append(
            NodeProcess(
                model,
                "--max-running",
                str(concurrency),
                "--engine",
                "vllm",
                "--vllm-python",
                vllm_python,
                "--vllm-args",
                "--dtype float32 --enforce-eager",
                node_id="demo-vllm-node",
                fleet=fleet,
                tls_dir=certs,
                env={"VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")},
            )
        )
        nodes += 1
    try:
        coordinator.start(logs)
        console.print(
            f"[bold]2/5[/] coordinator on {coordinator.address}, browsing mDNS on 127.0.0.1 "
            f"(fleet {fleet})"
        )
        for agent in agents:
            agent.start(logs)
        console.print(
            f"      {nodes} node agents announcing themselves: "
            + ", ".join(f"{a.node_id} on {a.address}" for a in agents)
        )
        started = time.perf_counter()
        if vllm_python:
            console.print(
                "      the vLLM node starts its vLLM server first (about 30 s on 2 cores)"
            )
        listing = coordinator.wait_routable(nodes, timeout_s=600 if vllm_python else 60)
        console.print(
            f"      all {nodes} discovered, verified and READY in {time.perf_counter() - started:.1f} s"
        )
        console.print(fleet_table(listing))

        console.print(
            f"[bold]3/5[/] sending {notes} clinical-note requests through the coordinator, "
            f"{concurrency} at a time"
        )
        started = time.perf_counter()
        app = coordinator.credentials("demo-notes-app", Role.APP)
        with (
            FleetClient(
                coordinator.address,
                tls=app,
                server_name=dns_name(Role.COORDINATOR, coordinator.name),
            ) as client,
            ThreadPoolExecutor(concurrency) as pool,
        ):

            def one(i):
                try:
                    return client.generate(_request(i, max_tokens), timeout_s=120)
                except FleetError as err:
                    return err

            results = list(pool.map(one, range(notes)))
        wall = time.perf_counter() - started
        console.print(_table(results))
        ok = [r for r in results if isinstance(r, GenerateResult)]
        tokens = sum(r.completion_tokens for r in ok)
        console.print(
            f"      {len(ok)}/{notes} notes, {tokens} tokens in {wall:.2f} s "
            f"= {tokens / wall:.0f} tokens/s aggregate"
        )
        console.print(_per_node(ok, [a.node_id for a in agents]))

        api_ok = _show_openai(console, coordinator, certs)

        console.print(
            "[bold]4/5[/] the fleet as `fleetctl nodes` shows it, and what monitoring saw"
        )
        console.print(fleet_table(coordinator.nodes()))
        _show_monitoring(console, coordinator, certs)
        if stop is not None:
            _show_how_to_try(console, coordinator, certs)
            stop.wait()
            console.print("\n      stopping on request")
        else:
            console.print(
                "      to keep this fleet up and try fleetctl, the dashboard and the OpenAI API against "
                "it, run [bold]scripts/demo --keep-running[/] (Ctrl-C stops it)"
            )
    finally:
        console.print("[bold]5/5[/] stopping (SIGTERM, graceful): nodes, then the coordinator")
        for proc in [*agents, coordinator]:
            proc.stop()
    codes = {p.name: p.proc.returncode if p.proc else None for p in [*agents, coordinator]}
    console.print(
        "      exit codes: "
        + ", ".join(f"{name} {code}" for name, code in codes.items())
        + f"; logs in {logs}"
    )
    audited = _show_audit(console, coordinator.audit_dir, [r.request_id for r in ok])
    return (
        0 if len(ok) == notes and audited and api_ok and all(c == 0 for c in codes.values()) else 1
    )


def _demo_model(model: Path, vocab: str, console: Console) -> Path:
    """The tiny random model with the tokenizer asked for ("trained": a small BPE; "qwen2.5":
    Qwen2.5's real one); a model an earlier demo left with the other tokenizer is made again."""
    import json

    from cluster.tinymodel import TinyModelSpec, make_tiny_model, qwen25_spec

    config = model / "config.json"
    if (
        config.exists()
        and json.loads(config.read_text()).get("studiofleet_tiny", {}).get("vocab", "trained")
        == vocab
    ):
        console.print(f"[bold]1/5[/] using the generated model in {model}")
        return model
    shutil.rmtree(model, ignore_errors=True)
    if vocab == "qwen2.5":
        console.print(
            f"[bold]1/5[/] generating a tiny Qwen2 model with Qwen2.5's tokenizer in {model}"
        )
        return make_tiny_model(model, qwen25_spec())
    console.print(f"[bold]1/5[/] generating a tiny Qwen2 model in {model}")
    return make_tiny_model(model, TinyModelSpec())


def _show_openai(console: Console, coordinator: CoordinatorProcess, certs: Path) -> bool:
    """The same fleet as an OpenAI-compatible API: a token as `fleetctl tokens issue` gets
    it, then one chat completion over HTTPS, the request any OpenAI SDK sends."""
    import json
    import ssl
    import urllib.request

    from cluster.api import fleet_pb2, fleet_pb2_grpc

    issued = fleet_pb2_grpc.FleetStub(coordinator.channel).IssueApiToken(
        fleet_pb2.IssueApiTokenRequest(name="demo-openai-app", ttl_s=3600), timeout=10
    )
    model = coordinator.nodes().nodes[0].status.model.model_id
    body = {
        "model": model,
        "max_tokens": 24,
        "seed": 1,
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": f"Synthetic visit: {VISITS[0]}"},
        ],
    }
    request = urllib.request.Request(
        f"{coordinator.openai_base_url}/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {issued.secret}", "Content-Type": "application/json"},
    )
    context = ssl.create_default_context(cafile=str(certs / "ca.pem"))
    try:
        with urllib.request.urlopen(request, context=context, timeout=60) as reply:
            answer = json.loads(reply.read())
    except OSError as exc:
        console.print(f"      [red]the OpenAI-compatible API failed: {exc}[/]")
        return False
    usage = answer["usage"]
    console.print(
        f"      OpenAI-compatible API on {coordinator.openai_base_url}: chat completion {answer['id']} "
        f"({usage['prompt_tokens']} + {usage['completion_tokens']} tokens, node "
        f"{answer['studiofleet']['nodes'][-1]}) with token {issued.token.id}; an app moves here with "
        f'OpenAI(base_url="{coordinator.openai_base_url}", api_key=<token>)'
    )
    return True


def _show_monitoring(console: Console, coordinator: CoordinatorProcess, certs: Path) -> None:
    """The coordinator's /metrics (as Prometheus reads it, with a monitor certificate) and
    its request log (as `fleetctl requests` reads it): counts and timings, no content."""
    from cluster.api import fleet_pb2, fleet_pb2_grpc
    from cluster.metrics import parse

    status, body, _ = coordinator.http_get("/metrics", "demo-prometheus", Role.MONITOR)
    if status != 200:
        console.print(f"      [red]/metrics answered {status}[/]")
        return
    samples = parse(body.decode())
    done = samples.get(
        ("studiofleet_requests_total", frozenset({"code": "OK", "outcome": "completed"}.items())), 0
    )
    ttft_n = samples.get(("studiofleet_request_ttft_seconds_count", frozenset()), 0)
    ttft_s = samples.get(("studiofleet_request_ttft_seconds_sum", frozenset()), 0)
    console.print(
        f"      /metrics on {coordinator.http_scheme}://{coordinator.http_address}: {done:.0f} requests "
        f"completed, {samples.get(('studiofleet_generation_tokens_total', frozenset()), 0):.0f} tokens, mean TTFT "
        f"{1000 * ttft_s / max(ttft_n, 1):.1f} ms, {len(samples)} series"
    )
    listed = fleet_pb2_grpc.FleetStub(coordinator.channel).ListRequests(
        fleet_pb2.ListRequestsRequest(since_s=3600, limit=1), timeout=10
    )
    console.print(f"      request log: {listed.matched} requests in the last hour")


def _show_how_to_try(console: Console, coordinator: CoordinatorProcess, certs: Path) -> None:
    """The addresses and the exact commands to try while the fleet stays up."""
    env = f"export STUDIOFLEET_TLS_DIR={certs.resolve()} STUDIOFLEET_COORDINATOR={coordinator.address}"
    lines = [
        f"coordinator (gRPC)      {coordinator.address}",
        f"monitoring + dashboard  {coordinator.http_scheme}://{coordinator.http_address}/",
        f"OpenAI-compatible API   {coordinator.openai_base_url}",
        "",
        "in another terminal:",
        f"  {env}",
        "  fleetctl nodes --tls-name operator",
        "  fleetctl top --tls-name operator",
        "  fleetctl requests --tls-name operator --since 1h",
        "  fleetctl dashboard --tls-name operator            # prints a one-time login link",
        "  fleetctl generate --tls-name demo-notes-app --prompt 'Synthetic visit: BP 138/86, no chest pain'",
        "  fleetctl tokens issue my-app --tls-name operator  # then: curl --cacert "
        f"{certs.resolve() / 'ca.pem'} -H 'Authorization: Bearer TOKEN' {coordinator.openai_base_url}/models",
        f"  fleetctl audit query {coordinator.audit_dir.resolve()}",
        "",
        "Ctrl-C (or SIGTERM) stops the fleet cleanly.",
    ]
    console.print("[bold]the fleet stays up[/] (--keep-running):")
    for line in lines:
        console.print(f"      {line}", highlight=False, soft_wrap=True)


def _stop_event() -> threading.Event:
    """Set by Ctrl-C or SIGTERM (instead of either ending the process mid-cleanup)."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    return stop


def _per_node(ok, node_ids: list[str]) -> Table:
    t = Table(title="notes per node")
    for col in ("node", "notes", "tokens", "mean total ms"):
        t.add_column(col, justify="left" if col == "node" else "right")
    for node_id in node_ids:
        mine = [r for r in ok if r.node_id == node_id]
        mean = sum(r.total_ms for r in mine) / len(mine) if mine else 0.0
        t.add_row(
            node_id, str(len(mine)), str(sum(r.completion_tokens for r in mine)), f"{mean:.0f}"
        )
    return t


def _show_audit(console: Console, audit_dir: Path, request_ids: list[str]) -> bool:
    """Verify the chain and show that every note has its record (digests, never text)."""
    from cluster.audit import query, verify

    report = verify(audit_dir)
    records = {r.get("request_id"): r for r in query(audit_dir, type_="request")}
    missing = [rid for rid in request_ids if rid not in records]
    state = "verifies" if report.ok else f"[red]BROKEN[/] {report.first_bad}"
    console.print(
        f"      audit chain {audit_dir}: {report.records} records, {report.checkpoints} signed "
        f"checkpoints, {state}; {len(request_ids) - len(missing)}/{len(request_ids)} notes recorded "
        f"(`fleetctl audit query {audit_dir} --request-id ID`)"
    )
    if request_ids and request_ids[0] in records:
        r = records[request_ids[0]]
        console.print(
            f"      e.g. {r['request_id']}: caller {r['role']}/{r['caller']}, nodes "
            f"{[h['node'] for h in r['nodes']]}, {r['outcome']} {r['code']}, "
            f"{r['completion_tokens']} tokens, prompt {r['prompt_digest'][:40]}..."
        )
    return report.ok and not missing


def _table(results) -> Table:
    t = Table(title="clinical notes (synthetic)")
    for col in (
        "request",
        "node",
        "prompt",
        "cached",
        "tokens",
        "finish",
        "failovers",
        "queue ms",
        "ttft ms",
        "total ms",
        "tok/s",
        "SOAP",
        "quality",
        "template",
    ):
        t.add_column(
            col,
            no_wrap=True,
            justify="left" if col in ("request", "node", "finish", "SOAP", "template") else "right",
        )
    for r in results:
        if isinstance(r, FleetError):
            rule = getattr(r, "rule", "")
            t.add_row(
                getattr(r, "request_id", "") or "?",
                "-",
                "-",
                "-",
                "-",
                f"[red]{r.code}[/]",
                "-",
                "-",
                "-",
                "-",
                "-",
                f"[red]{rule}[/]" if rule else "-",
                "-",
                "-",
            )
            continue
        soap = "valid" if isinstance(r.output, dict) else "-"
        t.add_row(
            r.request_id,
            r.node_id,
            str(r.prompt_tokens),
            str(r.cached_prompt_tokens),
            str(r.completion_tokens),
            r.finish_reason,
            str(r.failovers),
            f"{r.queue_wait_ms:.1f}",
            f"{r.time_to_first_token_ms:.1f}",
            f"{r.total_ms:.1f}",
            f"{r.decode_tokens_per_s:.0f}",
            soap,
            f"{r.quality.total:.2f}" if r.quality else "-",
            r.template,
        )
    return t
