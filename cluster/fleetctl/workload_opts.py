"""The workload flags `fleetctl plan` and `fleetctl replay` share (docs/capacity.md "The workload"),
and the one function that turns them into a Workload or exits 2 naming the flag at fault."""

from __future__ import annotations

from pathlib import Path

import typer

from cluster.capacity.workload import DEFAULT_NOTES_PER_DAY, Workload, WorkloadError, build_workload
from cluster.fleetctl.exits import EXIT_BAD_INPUT

NOTES_PER_DAY = typer.Option(
    None,
    "--notes-per-day",
    help=f"Notes a day (default {DEFAULT_NOTES_PER_DAY:g}, or the --arrivals-csv total).",
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
    try:
        return build_workload(
            notes_per_day=notes_per_day,
            hours=hours,
            peak_factor=peak_factor,
            arrivals_csv=arrivals_csv,
            prompt_tokens=prompt_tokens,
            output_tokens=output_tokens,
            tokens_from=tokens_from,
            shared_prefix_tokens=shared_prefix_tokens,
        )
    except WorkloadError as exc:
        text = str(exc)
        if exc.flag not in ("--arrivals-csv", "--tokens-from"):  # a file's errors keep its name
            text = (
                text.split(": ", 1)[-1]
                if text.startswith(("hours:", "prompt tokens:", "output tokens:"))
                else text
            )
        raise bad(command, exc.flag or "workload", text) from None
