"""`fleetctl replay`: a synthetic day, compressed in time, sent to a real fleet through the
client library; measured time per note beside the planner's prediction (docs/capacity.md
"Replaying a day")."""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from cluster.capacity import replay as rp
from cluster.client import AsyncFleetClient
from cluster.client.errors import FleetError
from cluster.fleetctl import workload_opts as wo
from cluster.fleetctl.connect import COORDINATOR, PLAINTEXT, TLS_DIR, TLS_NAME, credentials
from cluster.fleetctl.exits import fail

PROGRESS_LINE_S = 2.0


def _bad(flag: str, message: str) -> typer.Exit:
    return wo.bad("replay", flag, message)


def _clock(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        h, m = text.split(":")
        start = int(h) * 3600 + int(m) * 60
        if not (0 <= int(h) < 24 and 0 <= int(m) < 60):
            raise ValueError
    except ValueError:
        raise _bad("--start", f"expected HH:MM (00:00-23:59), not {text!r}") from None
    return float(start)


def replay(
    coordinator: str = COORDINATOR,
    time_scale: float = typer.Option(
        60.0,
        "--time-scale",
        help="Day seconds per real second: 60 replays an hour "
        "of the day in a minute, at 60x its rate.",
    ),
    duration: float = typer.Option(
        60.0,
        "--duration",
        help="Real seconds of sending (the day's window is duration x time-scale long).",
    ),
    start: str | None = typer.Option(
        None,
        "--start",
        metavar="HH:MM",
        help="Where in the day the window starts. [default: the window with the most arrivals]",
    ),
    notes_per_day: float | None = wo.NOTES_PER_DAY,
    hours: str = wo.HOURS,
    peak_factor: float = wo.PEAK_FACTOR,
    arrivals_csv: Path | None = wo.ARRIVALS_CSV,
    prompt_tokens: str = wo.PROMPT_TOKENS,
    output_tokens: str = wo.OUTPUT_TOKENS,
    tokens_from: Path | None = wo.TOKENS_FROM,
    shared_prefix_tokens: int = wo.SHARED_PREFIX,
    seed: int = wo.SEED,
    predict_with: list[str] = typer.Option(
        [],
        "--predict-with",
        metavar="PROFILE[=COUNT]",
        help="The fleet as profiles (a file or a shipped profile's name, "
        "COUNT nodes of it; repeatable): the planner's prediction for "
        "the same traffic is shown beside the measurement.",
    ),
    nodes_per_host: int = typer.Option(
        1,
        "--nodes-per-host",
        metavar="N",
        help="For --predict-with: the fleet's nodes run N to a host and share its compute "
        "(a test rig of several agents on one machine; a Mac or a GPU runs one node).",
    ),
    host_parallelism: float = typer.Option(
        1.0,
        "--host-parallelism",
        metavar="P",
        help="With --nodes-per-host: how many of a host's nodes run at full speed at once "
        "(a node's step time alone x nodes busy / its step time while they all run); 1: one "
        "node alone keeps the whole host busy.",
    ),
    timeout_s: float = typer.Option(300.0, "--timeout-s", help="Deadline for each note."),
    output: str = typer.Option("table", "--output", "-o", help="table or json."),
    tls_dir: Path | None = TLS_DIR,
    tls_name: str | None = TLS_NAME,
    plaintext: bool = PLAINTEXT,
) -> None:
    """Send a synthetic day's notes (made-up transcripts, never patient data) to the fleet at
    the plan's arrival shape and token distributions, compressed in time, one request per note
    (no client retries). Reports p50/p95/p99 time per note, time to first token, throughput
    and the notes that failed, by gRPC status; with --predict-with, the planner's prediction
    and its error in percent. Request ids start with the run id (replay-XXXXXXXX), so
    `fleetctl requests` singles the run out. Exit 0 once the report is printed, whatever the
    notes' outcomes; 2 on bad flags; 3 when the fleet cannot be reached."""
    if output not in ("table", "json"):
        raise _bad("--output", f"must be table or json, not {output!r}")
    if not (timeout_s > 0 and math.isfinite(timeout_s)):
        raise _bad("--timeout-s", f"must be a number of seconds > 0, not {timeout_s:g}")
    if not (time_scale > 0 and math.isfinite(time_scale)):
        raise _bad("--time-scale", f"must be a number > 0, not {time_scale:g}")
    if not (0 < duration <= 86_400):
        raise _bad("--duration", f"must be 0 < seconds <= 86400, not {duration:g}")
    if nodes_per_host < 1:
        raise _bad("--nodes-per-host", f"must be a whole number >= 1, not {nodes_per_host}")
    if not (host_parallelism > 0 and math.isfinite(host_parallelism)):
        raise _bad("--host-parallelism", f"must be a number > 0, not {host_parallelism:g}")
    start_s = _clock(start)
    workload = wo.workload_from_flags(
        "replay",
        notes_per_day=notes_per_day,
        hours=hours,
        peak_factor=peak_factor,
        arrivals_csv=arrivals_csv,
        prompt_tokens=prompt_tokens,
        output_tokens=output_tokens,
        tokens_from=tokens_from,
        shared_prefix_tokens=shared_prefix_tokens,
    )
    fleet = (
        rp.parse_fleet(predict_with, lambda flag, msg: _bad(flag, msg)) if predict_with else None
    )
    notes, window_start, window_s = rp.plan_notes(
        workload, time_scale=time_scale, duration_s=duration, seed=seed, start_s=start_s
    )
    if not notes:
        raise _bad(
            "--duration",
            f"the window ({window_s:g} day seconds from {_hhmm(window_start)}) has no notes "
            f"at {workload.notes_per_day:g} notes/day: lengthen --duration or raise --time-scale",
        )
    tls = credentials(tls_dir, tls_name, plaintext)
    err_console = Console(stderr=True)
    try:
        report = asyncio.run(
            _run(
                coordinator,
                tls,
                workload,
                notes,
                window_start,
                window_s,
                time_scale,
                timeout_s,
                err_console,
            )
        )
    except FleetError as err:
        raise fail(err, coordinator) from None
    if fleet is not None:
        rp.add_prediction(report, fleet, notes, nodes_per_host, host_parallelism)
    if output == "json":
        typer.echo(json.dumps(report.as_dict()))
        return
    Console(width=160).print(report_table(report))
    for line in report_notes(report):
        typer.echo(line)


def _hhmm(seconds: float) -> str:
    return f"{int(seconds // 3600) % 24:02d}:{int(seconds % 3600 // 60):02d}"


async def _run(
    coordinator: str,
    tls,
    workload,
    notes,
    window_start: float,
    window_s: float,
    time_scale: float,
    timeout_s: float,
    console: Console,
) -> rp.ReplayReport:
    run_id = rp.new_run_id()
    async with AsyncFleetClient(
        coordinator, tls=tls, plaintext=tls is None, max_attempts=1
    ) as client:
        builder = rp.PromptBuilder(
            shared_prefix_tokens=workload.shared_prefix_tokens, request_prefix=f"{run_id}-cal"
        )
        calls = await builder.calibrate(client)
        console.print(
            f"replay {run_id}: {len(notes)} notes from the day's {_hhmm(window_start)}-"
            f"{_hhmm(window_start + window_s)} in {window_s / time_scale:.0f} s ({time_scale:g}x); prompts "
            f"calibrated with {calls} requests (fixed part {builder.base_tokens} tokens)",
            highlight=False,
        )
        outcomes, wall = await _with_progress(console, client, builder, notes, run_id, timeout_s)
    return rp.build_report(
        run_id,
        coordinator,
        outcomes,
        wall,
        notes,
        time_scale=time_scale,
        window_start_s=window_start,
        window_s=window_s,
        calibration_requests=calls,
    )


async def _with_progress(console: Console, client, builder, notes, run_id: str, timeout_s: float):
    """run_notes with a progress bar on a terminal, else a line every PROGRESS_LINE_S (logs)."""

    def status(p: rp.Progress) -> str:
        return f"sent {p.sent}, in flight {p.sent - p.ended}, failed {p.failed}"

    if console.is_terminal:
        with Progress(
            TextColumn("notes ended"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total}"),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
            console=console,
        ) as bar:
            task = bar.add_task("replay", total=len(notes), status="")
            return await rp.run_notes(
                client,
                builder,
                notes,
                run_id=run_id,
                timeout_s=timeout_s,
                on_progress=lambda p: bar.update(task, completed=p.ended, status=status(p)),
            )
    last = [-PROGRESS_LINE_S, -1]  # when the last line was printed, and its count of ended notes

    def line(p: rp.Progress) -> None:
        if p.elapsed_s - last[0] >= PROGRESS_LINE_S or (
            p.ended == p.planned and last[1] != p.ended
        ):
            last[:] = [p.elapsed_s, p.ended]
            console.print(
                f"{p.elapsed_s:6.1f} s  notes ended {p.ended}/{p.planned}, {status(p)}",
                highlight=False,
            )

    return await rp.run_notes(
        client, builder, notes, run_id=run_id, timeout_s=timeout_s, on_progress=line
    )


def report_table(report: rp.ReplayReport) -> Table:
    m, p = report.measured, report.predicted
    t = Table(
        title=f"replay {report.run_id}: {m.completed}/{m.notes} notes completed in {report.wall_s:.1f} s"
    )
    t.add_column("")
    t.add_column("measured", justify="right")
    if p is not None:
        t.add_column("predicted", justify="right")
        t.add_column("error", justify="right")
    rows = (
        ("time per note p50", "p50_s", " s"),
        ("time per note p95", "p95_s", " s"),
        ("time per note p99", "p99_s", " s"),
        ("first token p50", "ttft_p50_s", " s"),
        ("first token p95", "ttft_p95_s", " s"),
        ("notes/s", "notes_per_s", ""),
        ("output tokens/s", "output_tokens_per_s", ""),
    )
    for label, key, unit in rows:
        cells = [label, f"{getattr(m, key):.2f}{unit}"]
        if p is not None:
            err = report.error_pct.get(key)
            cells += [f"{getattr(p, key):.2f}{unit}", "-" if err is None else f"{err:+.1f} %"]
        t.add_row(*cells)
    return t


def report_notes(report: rp.ReplayReport) -> list[str]:
    out = ["outcomes: " + ", ".join(f"{k} {v}" for k, v in sorted(report.outcomes.items()))]
    out.append(
        f"prompt tokens: planned mean {report.prompt_tokens_planned_mean:.0f}, sent mean "
        f"{report.prompt_tokens_sent_mean:.0f} (the fleet's count); driver lag p99 "
        f"{report.send_late_p99_s * 1000:.0f} ms"
    )
    if report.fleet:
        out.append("predicted for: " + ", ".join(report.fleet))
    return out
