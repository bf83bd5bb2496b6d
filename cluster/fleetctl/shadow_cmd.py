"""`fleetctl shadow start|stop|show|report`: shadow evaluation (docs/shadow.md). A sample of
live requests also runs on a candidate model; the caller gets only the live output, and
the coordinator keeps only both sides' quality scores and timings, never text."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Optional

import typer
from google.protobuf.json_format import MessageToDict
from rich.console import Console
from rich.table import Table

from cluster.api import shadow_pb2, shadow_pb2_grpc
from cluster.fleetctl.connect import (
    COORDINATOR,
    PLAINTEXT,
    TLS_DIR,
    TLS_NAME,
    call,
    credentials,
)
from cluster.fleetctl.exits import EXIT_BAD_INPUT, EXIT_ERROR
from cluster.quality import prompts

app = typer.Typer(rich_markup_mode=None, add_completion=False, no_args_is_help=True, help=__doc__)
OUTPUT = typer.Option("table", "--output", "-o", help="table or json.")


def _bad_input(message: str) -> typer.Exit:
    typer.echo(f"fleetctl shadow: {message}", err=True)
    return typer.Exit(EXIT_BAD_INPUT)


def _call(coordinator: str, creds, method: str, request) -> shadow_pb2.ShadowReport:
    return call(
        coordinator,
        creds,
        lambda channel: getattr(shadow_pb2_grpc.ShadowStub(channel), method)(request, timeout=30),
    )


def _check_output(output: str) -> None:
    if output not in ("table", "json"):
        raise _bad_input(f"--output must be table or json, not {output!r}")


@app.command()
def start(
    model: str = typer.Option(
        ..., "--model", help="The candidate: a model id, or ID@VERSION (`fleetctl nodes`)."
    ),
    fraction: float = typer.Option(
        ..., "--fraction", help="Share of live requests copied to the candidate, over 0 up to 1."
    ),
    template: list[str] = typer.Option(
        [], "--template", help="Only requests of this prompt template (repeatable); default all."
    ),
    margin: float = typer.Option(
        0.05, "--margin", help="How far under the live side the candidate may score and pass."
    ),
    min_samples: int = typer.Option(
        20, "--min-samples", help="Scored samples per template (each side) before a verdict."
    ),
    max_in_flight: int = typer.Option(
        2, "--max-in-flight", help="Copies running at once; more are dropped, never queued."
    ),
    timeout_s: float = typer.Option(300.0, "--timeout-s", help="Deadline of each copy."),
    output: str = OUTPUT,
    coordinator: str = COORDINATOR,
    tls_dir: Optional[Path] = TLS_DIR,
    tls_name: Optional[str] = TLS_NAME,
    plaintext: bool = PLAINTEXT,
) -> None:
    """Start copying a sample of live requests to the candidate (replaces a run in progress)."""
    _check_output(output)
    if not model.strip():
        raise _bad_input("--model must name the candidate's model id (`fleetctl nodes`)")
    if not 0.0 < fraction <= 1.0:
        raise _bad_input(f"--fraction must be over 0 and at most 1 (e.g. 0.05), not {fraction}")
    for t in template:
        if t not in prompts.REGISTRY:
            raise _bad_input(f"--template {t!r} is not one of {', '.join(prompts.names())}")
    if not 0.0 < margin <= 1.0:
        raise _bad_input(f"--margin must be over 0 and at most 1, not {margin}")
    if not 1 <= min_samples <= 100_000:
        raise _bad_input(f"--min-samples must be 1 to 100000, not {min_samples}")
    if not 1 <= max_in_flight <= 1024:
        raise _bad_input(f"--max-in-flight must be 1 to 1024, not {max_in_flight}")
    if not 0.0 < timeout_s <= 3600.0:
        raise _bad_input(f"--timeout-s must be over 0 and at most 3600, not {timeout_s}")
    report = _call(
        coordinator,
        credentials(tls_dir, tls_name, plaintext),
        "StartShadow",
        shadow_pb2.StartShadowRequest(
            model=model,
            fraction=fraction,
            templates=template,
            margin=margin,
            min_samples=min_samples,
            max_in_flight=max_in_flight,
            timeout_s=timeout_s,
        ),
    )
    _show(report, output)


@app.command()
def stop(
    output: str = OUTPUT,
    coordinator: str = COORDINATOR,
    tls_dir: Optional[Path] = TLS_DIR,
    tls_name: Optional[str] = TLS_NAME,
    plaintext: bool = PLAINTEXT,
) -> None:
    """Stop the active run; copies under way are cancelled. Its report stays until the next start."""
    _check_output(output)
    report = _call(
        coordinator,
        credentials(tls_dir, tls_name, plaintext),
        "StopShadow",
        shadow_pb2.StopShadowRequest(),
    )
    _show(report, output)


@app.command()
def show(
    output: str = OUTPUT,
    coordinator: str = COORDINATOR,
    tls_dir: Optional[Path] = TLS_DIR,
    tls_name: Optional[str] = TLS_NAME,
    plaintext: bool = PLAINTEXT,
) -> None:
    """The active (or last) run: its settings, counters and verdict."""
    _check_output(output)
    report = _call(
        coordinator,
        credentials(tls_dir, tls_name, plaintext),
        "GetShadow",
        shadow_pb2.GetShadowRequest(),
    )
    _show(report, output)


@app.command()
def report(
    output: str = OUTPUT,
    out: Optional[Path] = typer.Option(None, "--out", help="Also write the report (JSON) here."),
    check: bool = typer.Option(
        False, "--check", help="Exit 1 unless the verdict is pass (for scripts)."
    ),
    coordinator: str = COORDINATOR,
    tls_dir: Optional[Path] = TLS_DIR,
    tls_name: Optional[str] = TLS_NAME,
    plaintext: bool = PLAINTEXT,
) -> None:
    """Live and candidate side by side per template: quality score, schema validity,
    sub-scores and latency, and the verdict against the run's margin."""
    _check_output(output)
    r = _call(
        coordinator,
        credentials(tls_dir, tls_name, plaintext),
        "GetShadow",
        shadow_pb2.GetShadowRequest(),
    )
    if out is not None:
        try:
            out.write_text(_json(r) + "\n")
        except OSError as exc:
            raise _bad_input(f"--out {out}: cannot write it ({exc})") from None
    if output == "json":
        typer.echo(_json(r))
    else:
        _summary(r)
        if r.by_template:
            Console(width=160).print(_table(r))
    if check and r.verdict != "pass":
        typer.echo(f"fleetctl shadow: verdict {r.verdict}: {r.reason}", err=True)
        raise typer.Exit(EXIT_ERROR)


def _json(r: shadow_pb2.ShadowReport) -> str:
    return json.dumps(
        MessageToDict(
            r, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
        ),
        indent=2,
        sort_keys=True,
    )


def _when(unix_s: float) -> str:
    return datetime.fromtimestamp(unix_s).strftime("%Y-%m-%d %H:%M:%S") if unix_s else "-"


def _show(r: shadow_pb2.ShadowReport, output: str) -> None:
    if output == "json":
        typer.echo(_json(r))
    else:
        _summary(r)


def _summary(r: shadow_pb2.ShadowReport) -> None:
    if not r.shadow_id:
        typer.echo(f"no shadow run on coordinator {r.coordinator_id} (`fleetctl shadow start`)")
        return
    state = "active" if r.active else f"stopped {_when(r.stopped_unix_s)}"
    typer.echo(
        f"shadow {r.shadow_id} on coordinator {r.coordinator_id}: {state}; candidate {r.model}, "
        f"fraction {r.fraction:g}, templates {', '.join(r.templates) or 'all'}, margin "
        f"{r.margin:g}, min samples {r.min_samples}, max in flight {r.max_in_flight}; started "
        f"{_when(r.started_unix_s)} by {r.started_by}"
    )
    if r.figures_pooled:
        typer.echo(
            "scores and latencies: every coordinator's sharing the state database; request "
            f"counts: coordinator {r.coordinator_id}'s"
        )
    elif r.figures_since_unix_s > r.started_unix_s:
        typer.echo(
            f"figures since {_when(r.figures_since_unix_s)}: when coordinator {r.coordinator_id} "
            "took the run up from the state database (a restart, or a start through its pair)"
        )
    typer.echo(
        f"requests: {r.eligible} eligible, {r.sampled} sampled, {r.sent} copied, dropped "
        f"{r.dropped_busy} (candidate busy) {r.dropped_no_node} (no node) {r.dropped_phi} "
        f"(remote without --phi-allowed); {r.in_flight} copies running"
    )
    typer.echo(f"verdict: {r.verdict} ({r.reason})")


_PARTS = ("schema_valid", "sections", "not_truncated", "repetition", "length", "no_refusal")


def _table(r: shadow_pb2.ShadowReport) -> Table:
    t = Table(title=f"shadow {r.shadow_id}: live vs candidate {r.model}")
    for col in ("metric", "live", "candidate", "cand - live"):
        t.add_column(col, no_wrap=True, justify="left" if col == "metric" else "right")
    for row in r.by_template:
        live, cand = row.live, row.candidate
        t.add_row(f"[bold]{row.template or '(no template)'}[/]", "", "", f"[bold]{row.verdict}[/]")
        t.add_row("  models", ", ".join(live.models) or "-", ", ".join(cand.models) or "-", "")
        t.add_row("  scored / completed / failed", *_counts(live, cand), "")
        t.add_row("  score", f"{live.score:.3f}", f"{cand.score:.3f}", _d(cand.score - live.score))
        t.add_row(
            "  schema-valid",
            f"{live.schema_valid:.0%}",
            f"{cand.schema_valid:.0%}",
            _d(cand.schema_valid - live.schema_valid),
        )
        for name in [p for p in _PARTS if p in live.parts or p in cand.parts]:
            a, b = live.parts.get(name), cand.parts.get(name)
            t.add_row(
                f"  {name}",
                "-" if a is None else f"{a:.3f}",
                "-" if b is None else f"{b:.3f}",
                _d(b - a) if a is not None and b is not None else "",
            )
        for label, a, b in (
            ("  latency p50 ms", live.latency_p50_ms, cand.latency_p50_ms),
            ("  latency p95 ms", live.latency_p95_ms, cand.latency_p95_ms),
            ("  TTFT p50 ms", live.ttft_p50_ms, cand.ttft_p50_ms),
        ):
            t.add_row(label, f"{a:.0f}", f"{b:.0f}", f"{b - a:+.0f}")
        t.add_row("  why", "", "", row.reason[:100])
    return t


def _counts(live: shadow_pb2.ShadowSide, cand: shadow_pb2.ShadowSide) -> tuple[str, str]:
    return tuple(f"{s.scored} / {s.completed} / {s.failed}" for s in (live, cand))


def _d(x: float) -> str:
    return f"[red]{x:+.3f}[/]" if x < -0.0005 else f"{x:+.3f}"
