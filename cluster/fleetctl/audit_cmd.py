"""`fleetctl audit ...`: check audit chains and search their records (read only; no daemon needed).

Each coordinator keeps its own chain; both commands take one directory or several (one per
coordinator): verify checks each chain on its own, query interleaves their records by time."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from cluster.audit import AuditError, VerifyReport, parse_when, query, query_chains, verify
from cluster.fleetctl.connect import PLAINTEXT, TLS_DIR, TLS_NAME
from cluster.fleetctl.exits import EXIT_BAD_INPUT, EXIT_ERROR
from cluster.fleetctl.witness import WitnessError, gather

app = typer.Typer(
    rich_markup_mode=None,
    add_completion=False,
    no_args_is_help=True,
    help="The tamper-evident audit log: verify the chain, search its records.",
)

DIRECTORY = typer.Argument(
    ...,
    help="The audit log directory (audit-*.jsonl and HEAD); several, one per "
    "coordinator, for the chains of a cluster.",
)
COLUMNS = (
    "time",
    "seq",
    "type",
    "caller",
    "role",
    "action",
    "request_id",
    "outcome",
    "code",
    "nodes",
    "tokens",
)
CHAIN_COLUMNS = ("chain", "coordinator", *COLUMNS, "resumed_from", "resumed_after_tokens")


def _bad_input(command: str, message: object) -> typer.Exit:
    typer.echo(f"fleetctl: audit {command}: {message}", err=True)
    return typer.Exit(EXIT_BAD_INPUT)


@app.command("verify")
def verify_cmd(
    directories: List[Path] = DIRECTORY,
    public_key: List[Path] = typer.Option(
        [],
        "--public-key",
        help="The log's signing.pub (default: DIR-keys/signing.pub); use a copy "
        "the log's host cannot write. With several directories, one per directory, "
        "in the same order.",
    ),
    output: str = typer.Option("text", "--output", "-o", help="text or json."),
    witness: List[str] = typer.Option(
        [],
        "--witness",
        "-w",
        help="A witness of the chain's newest HEAD (repeatable): a node's HOST:PORT "
        "(asked with your operator certificate), or a file holding a saved HEAD or "
        "`fleetctl node status -o json` output. With several chains, each uses the "
        "witnesses signed by its own key.",
    ),
    min_seq: int = typer.Option(
        0,
        "--min-seq",
        min=0,
        help="The chain must reach this record (your own note "
        "of how far it went); one directory only.",
    ),
    tls_dir: Optional[Path] = TLS_DIR,
    tls_name: Optional[str] = TLS_NAME,
    plaintext: bool = PLAINTEXT,
) -> None:
    """Check every record, checkpoint signature and the signed HEAD, and that the chain reaches
    the newest HEAD any witness holds. Several directories: each chain on its own, reported
    per chain. Exit 0 if every chain is intact, 1 at the first bad record (or a cut tail) of
    any chain, naming the chain, 2 if there is nothing to check (no directory or key) or a
    witness cannot be read."""
    if output not in ("text", "json"):
        raise _bad_input("verify", f"--output must be text or json, not {output!r}")
    several = len(directories) > 1
    if public_key and len(public_key) != len(directories):
        raise _bad_input(
            "verify",
            f"--public-key is given {len(public_key)} times for {len(directories)} "
            "directories: give none (each DIR-keys/signing.pub) or one per directory, "
            "in the same order",
        )
    if several and min_seq:
        raise _bad_input(
            "verify", "--min-seq names a record of one chain: verify that chain on its own"
        )
    keys = public_key or [None] * len(directories)
    reports: list[tuple[Path, VerifyReport]] = []
    try:
        heads = gather(witness, tls_dir, tls_name, plaintext) if witness else []
        for directory, key in zip(directories, keys):
            reports.append(
                (
                    directory,
                    verify(
                        directory,
                        key,
                        witnesses=heads,
                        min_seq=min_seq,
                        progress=_progress(directory if several else None),
                    ),
                )
            )
    except (AuditError, WitnessError) as exc:
        raise _bad_input("verify", exc) from None
    failed = [str(directory) for directory, report in reports if not report.ok]
    if output == "json":
        if several:
            typer.echo(
                json.dumps(
                    {
                        "ok": not failed,
                        "failed": failed,
                        "chains": [{"chain": str(d), **asdict(r)} for d, r in reports],
                    }
                )
            )
        else:
            typer.echo(json.dumps(asdict(reports[0][1])))
    else:
        for directory, report in reports:
            if several:
                typer.echo(f"chain {directory}:")
            _print_report(report, bool(witness), indent="  " if several else "")
        if several:
            typer.echo(
                f"{len(reports)} chains OK"
                if not failed
                else f"{len(failed)} of {len(reports)} chains FAILED: {', '.join(failed)}"
            )
    raise typer.Exit(EXIT_ERROR if failed else 0)


def _progress(chain: Optional[Path]):
    prefix = f"{chain}: " if chain is not None else ""
    return lambda n: typer.echo(f"{prefix}verified {n:,} records ...", err=True)


def _print_report(report: VerifyReport, witnessed: bool, indent: str) -> None:
    def say(line: str) -> None:
        typer.echo(indent + line)

    names = report.files
    say(
        f"files: {len(names)}"
        + (f" ({names[0]} .. {names[-1]})" if len(names) > 1 else f" ({names[0]})" if names else "")
    )
    say(f"records: {report.records}")
    say(f"checkpoints: {report.checkpoints}")
    say(f"HEAD: record {report.head_seq}" if report.head_seq is not None else "HEAD: none")
    if witnessed:
        say(
            f"witnesses: newest HEAD at record {report.witness_seq}"
            if report.witness_seq is not None
            else "witnesses: none holds a HEAD signed by this key"
        )
    for warning in report.warnings:
        say(f"warning: {warning}")
    bad = report.first_bad
    say(
        "chain OK"
        if report.ok
        else f"FIRST BAD RECORD: seq {bad.seq_expected} (file {bad.file} line {bad.line}): {bad.reason}"
    )


def _cell(value: object) -> str:
    """A field as one short cell: a list of hops shows each hop's node (or name)."""
    if value is None or value == "":
        return "-"
    if isinstance(value, list):
        return ",".join(_cell(v) for v in value)
    if isinstance(value, dict):
        named = value.get("node") or value.get("name")
        return str(named) if named else " ".join(f"{k}={v}" for k, v in value.items())
    return str(value)


def _tokens(record: dict) -> str:
    """`tokens` if the record has it, else prompt+completion counts."""
    if "tokens" in record:
        return _cell(record["tokens"])
    prompt, completion = record.get("prompt_tokens"), record.get("completion_tokens")
    if prompt is None and completion is None:
        return "-"
    return f"{_cell(prompt)}+{_cell(completion)}"


def _chain_labels(directories: List[Path]) -> dict[str, str]:
    """Each directory as the table's chain column shows it: its last name if that tells them apart."""
    names = [Path(d).name for d in directories]
    unique = len(set(names)) == len(names)
    return {str(d): name if unique else str(d) for d, name in zip(directories, names)}


@app.command("query")
def query_cmd(
    directories: List[Path] = DIRECTORY,
    since: Optional[str] = typer.Option(
        None, "--since", help="30m, 1h, 7d (before now) or an ISO 8601 time."
    ),
    until: Optional[str] = typer.Option(
        None, "--until", help="Same forms as --since; records before it."
    ),
    caller: Optional[str] = typer.Option(None, "--caller", help="Identity name of the caller."),
    request_id: Optional[str] = typer.Option(None, "--request-id", help="One request's records."),
    action: Optional[str] = typer.Option(
        None, "--action", help="e.g. generate, drain, break-glass."
    ),
    type_: Optional[str] = typer.Option(
        None, "--type", help="request, admin, shadow, checkpoint, open or recovered."
    ),
    output: str = typer.Option(
        "table", "--output", "-o", help="table or json (one record per line)."
    ),
) -> None:
    """Records matching every filter given, in chain order. Several directories (one chain per
    coordinator): their records interleaved by time, each naming its chain, so a request
    resumed on another coordinator shows its records from both. Does not check the chains:
    run verify."""
    if output not in ("table", "json"):
        raise _bad_input("query", f"--output must be table or json, not {output!r}")
    try:
        lo = parse_when(since) if since else None
        hi = parse_when(until) if until else None
        filters = dict(
            since=lo, until=hi, caller=caller, request_id=request_id, action=action, type_=type_
        )
        several = len(directories) > 1
        records = (
            query_chains(directories, **filters) if several else query(directories[0], **filters)
        )
        columns = CHAIN_COLUMNS if several else COLUMNS
        label = _chain_labels(directories)
        if output == "json":
            for record in records:
                typer.echo(json.dumps(record, ensure_ascii=False))
            return
        table = Table()
        for col in columns:
            table.add_column(
                col.replace("_", " "),
                justify="right" if col in ("seq", "code", "tokens") else "left",
                no_wrap=col in ("chain", "time", "seq"),
            )
        for record in records:
            if several:
                record = {**record, "chain": label[record["chain"]]}
            table.add_row(
                *(_tokens(record) if col == "tokens" else _cell(record.get(col)) for col in columns)
            )
    except (ValueError, AuditError) as exc:
        raise _bad_input("query", exc) from None
    Console(width=200).print(table)
