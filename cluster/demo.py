"""The main job, locally: a generated model, a node agent, concurrent clinical-note requests.

Everything is synthetic: no patient data, no network beyond loopback.
"""

from __future__ import annotations

import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from rich.console import Console
from rich.table import Table

from cluster.client import FleetClient, GenerateResult, build_request
from cluster.client.errors import FleetError
from cluster.localfleet import NodeProcess

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
    visit = VISITS[i % len(VISITS)]
    return build_request(messages=[("system", SYSTEM), ("user", f"Synthetic visit {i}: {visit}")],
                         max_tokens=max_tokens, request_id=f"note-{i:03d}", temperature=0.7, seed=i)


def run_demo(workdir: Path, *, notes: int = 12, concurrency: int = 8, max_tokens: int = 96,
             console: Console | None = None) -> int:
    """Returns 0 when every note completed and the node stopped cleanly."""
    console = console or Console(width=None if sys.stdout.isatty() else 120)
    model = workdir / "model"
    if not (model / "config.json").exists():
        from cluster.tinymodel import make_tiny_model

        console.print(f"[bold]1/4[/] generating a tiny Qwen2 model in {model}")
        make_tiny_model(model)
    else:
        console.print(f"[bold]1/4[/] using the generated model in {model}")

    with NodeProcess(model, "--max-running", str(concurrency), node_id="demo-node-1") as node:
        node.start(workdir / "logs")
        console.print(f"[bold]2/4[/] node agent {node.node_id} listening on {node.address}; waiting for READY")
        node.wait_serving()
        st = node.status()
        console.print(f"      READY: {st.model.model_id} {st.model.weights_digest[:19]} on {st.model.engine_version}")

        console.print(f"[bold]3/4[/] sending {notes} clinical-note requests, {concurrency} at a time")
        started = time.perf_counter()
        results: list[GenerateResult | FleetError] = []
        with FleetClient(node.address) as client, ThreadPoolExecutor(concurrency) as pool:
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
        console.print(f"      {len(ok)}/{notes} notes, {tokens} tokens in {wall:.2f} s "
                      f"= {tokens / wall:.0f} tokens/s aggregate")

        console.print(f"[bold]4/4[/] stopping {node.node_id} (SIGTERM, graceful)")
        node.stop()
        code = node.proc.returncode
        console.print(f"      exited with {code}; node log: {node.stderr_path}")
    return 0 if len(ok) == notes and code == 0 else 1


def _table(results) -> Table:
    t = Table(title="clinical notes (synthetic)")
    for col in ("request", "node", "prompt", "cached", "tokens", "finish", "queue ms", "ttft ms", "total ms",
                "tok/s"):
        t.add_column(col, no_wrap=True,
                     justify="left" if col in ("request", "node", "finish") else "right")
    for r in results:
        if isinstance(r, FleetError):
            t.add_row("?", "-", "-", "-", "-", f"[red]{r.code}[/]", "-", "-", "-", "-")
            continue
        t.add_row(r.request_id, r.node_id, str(r.prompt_tokens), str(r.cached_prompt_tokens),
                  str(r.completion_tokens), r.finish_reason,
                  f"{r.queue_wait_ms:.1f}", f"{r.time_to_first_token_ms:.1f}", f"{r.total_ms:.1f}",
                  f"{r.decode_tokens_per_s:.0f}")
    return t
