"""The workload flags `fleetctl plan` and `fleetctl replay` share (docs/capacity.md "Workload"),
and the one function that turns them into a Workload or exits 2 naming the flag at fault."""

from __future__ import annotations

from pathlib import Path

import typer

from cluster.capacity.workload import (
    ArrivalShape,
    TokenDist,
    Workload,
    WorkloadError,
    parse_hours,
    read_arrivals_csv,
    read_request_log,
)
from cluster.fleetctl.exits import EXIT_BAD_INPUT

DEFAULT_NOTES_PER_DAY = 6000.0

NOTES_PER_DAY = typer.Option(
    None, "--notes-per-day", help="Notes a day (default 6000, or the --arrivals-csv total)."
)
HOURS = typer.Option("8-18", "--hours", help="Busy hours START-END (0-24, may wrap past midnight).")
PEAK_FACTOR = typer.Option(
    2.0,
    "--peak-factor",
    help="Arrival rate inside --hours as a multiple of the rate "
    "outside; the day still totals --notes-per-day.",
)
ARRIVALS_CSV = typer.Option(
    None,
    "--arrivals-csv",
    help="Arrivals per minute of the day instead of --hours: "
    "1440 rows of COUNT, or rows of MINUTE,COUNT or HH:MM,COUNT.",
)
PROMPT_TOKENS = typer.Option(
    "500", "--prompt-tokens", help="Prompt tokens per note: N or LO:HI (uniform)."
)
OUTPUT_TOKENS = typer.Option(
    "400:600", "--output-tokens", help="Output tokens per note: N or LO:HI (uniform)."
)
TOKENS_FROM = typer.Option(
    None,
    "--tokens-from",
    help="Draw (prompt, output) token pairs from a request-log "
    "export (fleetctl requests -o json > FILE) instead.",
)
SHARED_PREFIX = typer.Option(
    0,
    "--shared-prefix-tokens",
    help="Prompt tokens every note shares (the system "
    "prompt), served from the node's prompt cache.",
)
SEED = typer.Option(1, "--seed", help="Random seed for arrivals and token draws.")


def bad(command: str, flag: str, message: str) -> typer.Exit:
    typer.echo(f"fleetctl {command}: {flag}: {message}", err=True)
    return typer.Exit(EXIT_BAD_INPUT)


def workload_from_flags(
    command: str,
    *,
    notes_per_day: float | None,
    hours: str,
    peak_factor: float,
    arrivals_csv: Path | None,
    prompt_tokens: str,
    output_tokens: str,
    tokens_from: Path | None,
    shared_prefix_tokens: int,
) -> Workload:
    """The Workload the flags describe; exits 2 with a message naming the flag on nonsense."""

    def check(flag: str, fn, *args):
        try:
            return fn(*args)
        except (
            WorkloadError
        ) as exc:  # file errors keep the file's name; the others drop their own label
            text = str(exc)
            raise bad(
                command,
                flag,
                text if flag in ("--arrivals-csv", "--tokens-from") else text.split(": ", 1)[-1],
            ) from None

    if notes_per_day is not None and not (notes_per_day > 0 and notes_per_day < float("inf")):
        raise bad(command, "--notes-per-day", f"must be a number > 0, not {notes_per_day:g}")
    if shared_prefix_tokens < 0:
        raise bad(command, "--shared-prefix-tokens", f"must be >= 0, not {shared_prefix_tokens}")
    if arrivals_csv is not None:
        counts, total = check("--arrivals-csv", read_arrivals_csv, arrivals_csv)
        shape = ArrivalShape.per_minute(counts, f"arrivals per minute from {arrivals_csv.name}")
        notes = total if notes_per_day is None else notes_per_day
    else:
        start, end = check("--hours", parse_hours, hours)
        if not (peak_factor > 0 and peak_factor < float("inf")):
            raise bad(command, "--peak-factor", f"must be a number > 0, not {peak_factor:g}")
        shape = ArrivalShape.hours(start, end, peak_factor)
        notes = DEFAULT_NOTES_PER_DAY if notes_per_day is None else notes_per_day
    prompt = check("--prompt-tokens", TokenDist.parse, prompt_tokens, "prompt tokens")
    output = check("--output-tokens", TokenDist.parse, output_tokens, "output tokens")
    if output.hi < 1:
        raise bad(command, "--output-tokens", "a note has at least 1 output token")
    pairs: tuple[tuple[int, int], ...] = ()
    label = ""
    if tokens_from is not None:
        pairs = tuple(check("--tokens-from", read_request_log, tokens_from))
        prompt = TokenDist.empirical([p for p, _ in pairs])
        output = TokenDist.empirical([o for _, o in pairs])
        label = (
            f"tokens from {len(pairs)} logged requests in {tokens_from.name} (prompt mean "
            f"{prompt.mean:.0f}, output mean {output.mean:.0f})"
        )
    return Workload(notes, shape, prompt, output, shared_prefix_tokens, pairs, label)
