"""`fleetctl eval run|compare`: score a model version on a suite of synthetic encounters,
and put two runs side by side. Reports hold scores, counts and timings, never notes."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from cluster.api import inference_pb2
from cluster.client import AsyncFleetClient
from cluster.fleetctl.connect import PLAINTEXT, TLS_DIR, TLS_NAME, credentials
from cluster.fleetctl.exits import EXIT_BAD_INPUT, EXIT_ERROR
from cluster.quality import evaluation
from cluster.quality.evaluation import Report, SuiteError
from cluster.security.identity import ANY_NODE

app = typer.Typer(
    rich_markup_mode=None,
    help="Evaluate note quality on a suite of synthetic encounters (docs/clinical-notes.md).",
    no_args_is_help=True,
)


def _bad_input(message: str) -> typer.Exit:
    typer.echo(f"fleetctl eval: {message}", err=True)
    return typer.Exit(EXIT_BAD_INPUT)


@app.command("run")
def run(
    target: str = typer.Option(
        ...,
        "--target",
        metavar="HOST:PORT",
        help="HOST:PORT of a coordinator (app certificate) or, with "
        "--node, of a node agent (coordinator certificate).",
    ),
    suite: Path = typer.Option(
        evaluation.STARTER_SUITE,
        "--suite",
        help="Suite file (TOML); default: the starter suite of 24 synthetic encounters.",
    ),
    template: str = typer.Option(
        "", "--template", help="Prompt template instead of the suite's, e.g. soap-brief."
    ),
    version: str = typer.Option(
        "", "--template-version", help="Pin a template version, e.g. qwen2/v1."
    ),
    label: str = typer.Option(
        "", "--label", help="A name for this run in reports (e.g. the model version)."
    ),
    out: Optional[Path] = typer.Option(
        None, "--out", help="Write the report (JSON) here, for `eval compare`."
    ),
    seed: int = typer.Option(
        0, "--seed", help="Seed for every case (runs to compare must share it)."
    ),
    concurrency: int = typer.Option(4, "--concurrency", help="Cases in flight at once."),
    timeout_s: float = typer.Option(300.0, "--timeout-s", help="Deadline per case."),
    min_score: float = typer.Option(
        0.0, "--min-score", help="Exit 1 if the suite's score is under this."
    ),
    node: bool = typer.Option(False, "--node", help="TARGET is a node agent, not a coordinator."),
    output: str = typer.Option("table", "--output", "-o", help="table or json."),
    tls_dir: Optional[Path] = TLS_DIR,
    tls_name: Optional[str] = TLS_NAME,
    plaintext: bool = PLAINTEXT,
) -> None:
    """Send every case of the suite to TARGET as a template request and print per-case and
    aggregate scores, latency and tokens/s; progress goes to stderr."""
    if output not in ("table", "json"):
        raise _bad_input(f"--output must be table or json, not {output!r}")
    if not 1 <= concurrency <= 64:
        raise _bad_input(f"--concurrency must be 1 to 64, not {concurrency}")
    try:
        s = evaluation.load_suite(suite)
    except SuiteError as exc:
        raise _bad_input(str(exc)) from None
    tls = credentials(tls_dir, tls_name, plaintext)

    def progress(done: int, total: int, r: evaluation.CaseResult) -> None:
        status = f"{r.quality:.3f}" if r.ok else f"FAILED ({r.error[:120]})"
        typer.echo(
            f"[{done:>3}/{total}] {r.id:<28} {status:>8}  {r.latency_ms / 1000:6.1f} s  "
            f"{r.completion_tokens:>5} tokens",
            err=True,
        )

    async def go() -> Report:
        async with AsyncFleetClient(
            target, tls=tls, plaintext=tls is None, server_name=ANY_NODE if node and tls else None
        ) as client:

            async def generate(req: inference_pb2.GenerateRequest) -> inference_pb2.FinalInfo:
                return await evaluation.final_of(client.stream(req, timeout_s=timeout_s))

            typer.echo(
                f"fleetctl eval: {len(s.cases)} cases of suite {s.name} v{s.version} on {target}, "
                f"{concurrency} at a time",
                err=True,
            )
            return await evaluation.run_suite(
                s,
                generate,
                target=target,
                label=label,
                template=template,
                version=version,
                seed=seed,
                concurrency=concurrency,
                progress=progress,
            )

    report = asyncio.run(go())
    if out is not None:
        out.write_text(report.to_json())
    if output == "json":
        typer.echo(report.to_json())
    else:
        Console(width=160).print(_cases_table(report))
        _print_summary(report)
        if out is not None:
            typer.echo(f"report written to {out}", err=True)
    if not any(c.ok for c in report.cases):
        typer.echo(
            "fleetctl eval: every case failed; check the target and the errors above", err=True
        )
        raise typer.Exit(EXIT_ERROR)
    if report.summary["score"] < min_score:
        typer.echo(
            f"fleetctl eval: score {report.summary['score']:.3f} is under --min-score {min_score:.3f}",
            err=True,
        )
        raise typer.Exit(1)


@app.command("compare")
def compare(
    a: Path = typer.Argument(..., help="Report of the current version (from `eval run --out`)."),
    b: Path = typer.Argument(..., help="Report of the candidate version."),
    output: str = typer.Option("table", "--output", "-o", help="table or json."),
) -> None:
    """Two runs side by side: aggregate scores, each sub-score, latency, tokens/s, per case."""
    reports = []
    for path in (a, b):
        try:
            reports.append(Report.from_json(path.read_text()))
        except (OSError, ValueError, TypeError) as exc:
            raise _bad_input(f"{path}: not an eval report ({exc})") from None
    rows, warnings = evaluation.compare(*reports)
    for w in warnings:
        typer.echo(f"fleetctl eval: warning: {w}", err=True)
    if output == "json":
        typer.echo(json.dumps({"rows": rows, "warnings": warnings}))
        return
    ra, rb = reports
    t = Table(title=f"suite {ra.suite}: {ra.label or a.name} vs {rb.label or b.name}")
    for col in ("metric", ra.label or "A", rb.label or "B", "B - A"):
        t.add_column(col, no_wrap=True, justify="left" if col == "metric" else "right")
    for metric, va, vb, d in rows:
        t.add_row(
            metric,
            va,
            vb,
            f"[red]{d}[/]" if d.startswith("-") and metric not in _LOWER_IS_BETTER else d,
        )
    Console(width=160, file=sys.stdout).print(t)


_LOWER_IS_BETTER = ("truncated", "latency_p50_ms", "latency_p95_ms")


def _cases_table(r: Report) -> Table:
    t = Table(
        title=f"suite {r.suite} v{r.suite_version} on {r.target}  ({r.model or 'no model answered'}; "
        f"template {r.template or '-'})"
    )
    for col in (
        "case",
        "score",
        "valid",
        "sections",
        "length",
        "truncated",
        "repetition",
        "refusal",
        "mentions",
        "latency s",
        "tokens",
        "tok/s",
        "node",
    ):
        t.add_column(col, no_wrap=True, justify="left" if col in ("case", "node") else "right")
    for c in r.cases:
        if not c.ok:
            t.add_row(
                c.id,
                "[red]0.000[/]",
                "-",
                "-",
                "-",
                "-",
                "-",
                "-",
                "-",
                f"{c.latency_ms / 1000:.1f}",
                "-",
                "-",
                f"[red]{c.error[:60]}[/]",
            )
            continue
        p = c.parts
        rate = c.completion_tokens / (c.latency_ms / 1000) if c.latency_ms else 0.0
        t.add_row(
            c.id,
            f"{c.quality:.3f}",
            "yes" if c.schema_valid else f"[red]no ({c.rule})[/]",
            _p(p, "sections"),
            _p(p, "length"),
            "[red]yes[/]" if c.finish_reason == "length" else "no",
            _p(p, "repetition"),
            _p(p, "no_refusal"),
            "-" if c.mentions is None else f"{c.mentions:.2f}",
            f"{c.latency_ms / 1000:.1f}",
            str(c.completion_tokens),
            f"{rate:.1f}",
            c.node_id,
        )
    return t


def _p(parts: dict, name: str) -> str:
    return f"{parts[name]:.2f}" if name in parts else "-"


def _print_summary(r: Report) -> None:
    s = r.summary
    typer.echo(
        f"score {s['score']:.3f}  schema-valid {s['schema_valid']:.0%}  truncated {s['truncated']}/"
        f"{s['cases']}  completed {s['completed']}/{s['cases']}  mentions "
        f"{'-' if s['mentions'] is None else format(s['mentions'], '.2f')}  latency p50 "
        f"{s['latency_p50_ms'] / 1000:.1f} s p95 {s['latency_p95_ms'] / 1000:.1f} s  "
        f"{s['tokens_per_s']:.1f} tok/s over {r.wall_s:.1f} s  (rubric {r.rubric})"
    )
    typer.echo("sub-scores: " + "  ".join(f"{k} {v:.3f}" for k, v in s["parts"].items()))
