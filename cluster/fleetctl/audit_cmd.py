"""`fleetctl audit ...`: check an audit chain and search its records (read only; no daemon needed)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from cluster.audit import AuditError, parse_when, query, verify
from cluster.fleetctl.connect import PLAINTEXT, TLS_DIR, TLS_NAME
from cluster.fleetctl.exits import EXIT_BAD_INPUT, EXIT_ERROR
from cluster.fleetctl.witness import WitnessError, gather

app = typer.Typer(rich_markup_mode=None, add_completion=False, no_args_is_help=True,
                  help="The tamper-evident audit log: verify the chain, search its records.")

DIRECTORY = typer.Argument(..., help="The audit log directory (audit-*.jsonl and HEAD).")
COLUMNS = ("time", "seq", "type", "caller", "role", "action", "request_id", "outcome", "code", "nodes", "tokens")


def _bad_input(command: str, message: object) -> typer.Exit:
    typer.echo(f"fleetctl: audit {command}: {message}", err=True)
    return typer.Exit(EXIT_BAD_INPUT)


@app.command("verify")
def verify_cmd(
    directory: Path = DIRECTORY,
    public_key: Optional[Path] = typer.Option(
        None, "--public-key", help="The log's signing.pub (default: DIR-keys/signing.pub); use a copy "
                                   "the log's host cannot write."),
    output: str = typer.Option("text", "--output", "-o", help="text or json."),
    witness: List[str] = typer.Option(
        [], "--witness", "-w", help="A witness of the chain's newest HEAD (repeatable): a node's HOST:PORT "
                                    "(asked with your operator certificate), or a file holding a saved HEAD or "
                                    "`fleetctl node status -o json` output."),
    min_seq: int = typer.Option(0, "--min-seq", min=0, help="The chain must reach this record (your own note "
                                                             "of how far it went)."),
    tls_dir: Optional[Path] = TLS_DIR, tls_name: Optional[str] = TLS_NAME, plaintext: bool = PLAINTEXT,
) -> None:
    """Check every record, checkpoint signature and the signed HEAD, and that the chain reaches
    the newest HEAD any witness holds. Exit 0 if the chain is intact, 1 at the first bad
    record (or a cut tail), 2 if there is nothing to check (no directory or key) or a
    witness cannot be read."""
    if output not in ("text", "json"):
        raise _bad_input("verify", f"--output must be text or json, not {output!r}")
    try:
        heads = gather(witness, tls_dir, tls_name, plaintext) if witness else []
        report = verify(directory, public_key, witnesses=heads, min_seq=min_seq,
                        progress=lambda n: typer.echo(f"verified {n:,} records ...", err=True))
    except (AuditError, WitnessError) as exc:
        raise _bad_input("verify", exc) from None
    if output == "json":
        typer.echo(json.dumps(asdict(report)))
    else:
        names = report.files
        typer.echo(f"files: {len(names)}" + (f" ({names[0]} .. {names[-1]})" if len(names) > 1 else
                                             f" ({names[0]})" if names else ""))
        typer.echo(f"records: {report.records}")
        typer.echo(f"checkpoints: {report.checkpoints}")
        typer.echo(f"HEAD: record {report.head_seq}" if report.head_seq is not None else "HEAD: none")
        if witness:
            typer.echo(f"witnesses: newest HEAD at record {report.witness_seq}" if report.witness_seq is not None
                       else "witnesses: none holds a HEAD signed by this key")
        for warning in report.warnings:
            typer.echo(f"warning: {warning}")
        bad = report.first_bad
        typer.echo("chain OK" if report.ok else
                   f"FIRST BAD RECORD: seq {bad.seq_expected} (file {bad.file} line {bad.line}): {bad.reason}")
    raise typer.Exit(0 if report.ok else EXIT_ERROR)


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


@app.command("query")
def query_cmd(
    directory: Path = DIRECTORY,
    since: Optional[str] = typer.Option(None, "--since", help="30m, 1h, 7d (before now) or an ISO 8601 time."),
    until: Optional[str] = typer.Option(None, "--until", help="Same forms as --since; records before it."),
    caller: Optional[str] = typer.Option(None, "--caller", help="Identity name of the caller."),
    request_id: Optional[str] = typer.Option(None, "--request-id", help="One request's records."),
    action: Optional[str] = typer.Option(None, "--action", help="e.g. generate, drain, break-glass."),
    type_: Optional[str] = typer.Option(None, "--type", help="request, admin, checkpoint, open or recovered."),
    output: str = typer.Option("table", "--output", "-o", help="table or json (one record per line)."),
) -> None:
    """Records matching every filter given, in chain order. Does not check the chain: run verify."""
    if output not in ("table", "json"):
        raise _bad_input("query", f"--output must be table or json, not {output!r}")
    try:
        lo = parse_when(since) if since else None
        hi = parse_when(until) if until else None
        records = query(directory, since=lo, until=hi, caller=caller, request_id=request_id, action=action,
                        type_=type_)
        if output == "json":
            for record in records:
                typer.echo(json.dumps(record, ensure_ascii=False))
            return
        table = Table()
        for col in COLUMNS:
            table.add_column(col.replace("_", " "), justify="right" if col in ("seq", "code", "tokens") else "left",
                             no_wrap=col in ("time", "seq"))
        for record in records:
            table.add_row(*(_tokens(record) if col == "tokens" else _cell(record.get(col)) for col in COLUMNS))
    except (ValueError, AuditError) as exc:
        raise _bad_input("query", exc) from None
    Console(width=200).print(table)
