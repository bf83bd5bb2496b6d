"""`fleetctl generate`: an operator's smoke test against a node or coordinator."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer

from cluster.api import inference_pb2
from cluster.client import FleetClient, build_request
from cluster.client.errors import FleetError, SchemaViolationError
from cluster.fleetctl.connect import COORDINATOR, PLAINTEXT, TLS_DIR, TLS_NAME, credentials
from cluster.fleetctl.exits import EXIT_BAD_INPUT, EXIT_UNAVAILABLE, fail
from cluster.security.identity import ANY_NODE

ENDED_EARLY = (inference_pb2.FINISH_REASON_CANCELLED, inference_pb2.FINISH_REASON_ERROR)


def generate(
    coordinator: str = COORDINATOR,
    target: Optional[str] = typer.Option(
        None,
        "--target",
        metavar="HOST:PORT",
        help="HOST:PORT of one node agent to call directly "
        "(with --node). [default: the coordinator, as -c gives it]",
    ),
    prompt: Optional[str] = typer.Option(
        None,
        help="Prompt text (sent as one user chat message unless --raw); "
        "real patient text belongs in --prompt-file, not argv.",
    ),
    prompt_file: Optional[Path] = typer.Option(
        None,
        "--prompt-file",
        help="Read the prompt from this file, or "
        "'-' for stdin: it stays out of `ps` and shell history.",
    ),
    max_tokens: Optional[int] = typer.Option(
        None, help="Tokens to generate. [default: 64; with --template, the template's budget]"
    ),
    raw: bool = typer.Option(False, help="Send the prompt as raw text, without the chat template."),
    system: Optional[str] = typer.Option(None, help="System message to put before the prompt."),
    temperature: Optional[float] = typer.Option(None, help="Sampling temperature (0 = greedy)."),
    top_p: Optional[float] = typer.Option(None),
    top_k: Optional[int] = typer.Option(None),
    seed: Optional[int] = typer.Option(None, help="Seed for reproducible sampling."),
    stop: List[str] = typer.Option([], help="Stop sequence (repeatable)."),
    request_id: str = typer.Option("", help="Request id to trace in node logs."),
    allow_restart: bool = typer.Option(
        False,
        "--allow-restart",
        help="If the weights a started stream runs on "
        "are gone from the fleet, let the coordinator start it over on other "
        "weights (the text before the restart is void) instead of failing.",
    ),
    template: Optional[str] = typer.Option(
        None,
        "--template",
        help="A prompt template (e.g. soap-note); the prompt "
        "text becomes its `transcript` variable (docs/clinical-notes.md).",
    ),
    template_version: str = typer.Option(
        "", "--template-version", help="Pin a template version, e.g. qwen2/v1."
    ),
    note_template: Optional[str] = typer.Option(
        None,
        "--note-template",
        help="Constrain the output to a note template: soap, soap-brief, care-coordination.",
    ),
    json_schema: Optional[Path] = typer.Option(
        None, "--json-schema", help="Constrain the output to the JSON Schema in this file."
    ),
    timeout_s: float = typer.Option(120.0, help="Deadline for the whole request."),
    output: str = typer.Option(
        "text", "--output", "-o", help="text (stream) or json (one object)."
    ),
    node: bool = typer.Option(
        False,
        "--node",
        help="TARGET is a node agent, not a coordinator (nodes serve "
        "coordinators only: use a coordinator-role certificate).",
    ),
    tls_dir: Optional[Path] = TLS_DIR,
    tls_name: Optional[str] = TLS_NAME,
    plaintext: bool = PLAINTEXT,
) -> None:
    """Stream a completion to the terminal, or print one JSON object with text, counts and timings."""
    if node and not target:
        typer.echo(
            "fleetctl: --node calls one node agent directly: give its address with --target HOST:PORT",
            err=True,
        )
        raise typer.Exit(EXIT_BAD_INPUT)
    target = target or coordinator
    if (prompt is None) == (prompt_file is None):
        typer.echo("fleetctl: give exactly one of --prompt or --prompt-file", err=True)
        raise typer.Exit(EXIT_BAD_INPUT)
    if prompt_file is not None:
        prompt = sys.stdin.read() if str(prompt_file) == "-" else prompt_file.read_text()
    messages = None
    if not raw and template is None:
        messages = ([("system", system)] if system else []) + [("user", prompt)]
    try:
        schema = json_schema.read_text() if json_schema is not None else None
    except OSError as exc:
        typer.echo(f"fleetctl: --json-schema: {exc}", err=True)
        raise typer.Exit(EXIT_BAD_INPUT) from None
    req = build_request(
        prompt=prompt if raw and template is None else None,
        messages=messages,
        max_tokens=max_tokens if max_tokens is not None else (0 if template is not None else 64),
        request_id=request_id,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        seed=seed,
        stop=stop,
        allow_restart=allow_restart,
        template=template,
        template_version=template_version,
        variables={"transcript": prompt} if template is not None else None,
        json_schema=schema,
        note_template=note_template,
    )
    tls = credentials(tls_dir, tls_name, plaintext)
    with FleetClient(
        target, tls=tls, plaintext=tls is None, server_name=ANY_NODE if node and tls else None
    ) as client:
        try:
            if output == "json":
                try:
                    result = client.generate(req, timeout_s=timeout_s)
                except SchemaViolationError as err:
                    result = err.result
                out = result.as_dict()
                if result.quality is not None:
                    out["quality"] = {
                        "total": result.quality.total,
                        "parts": result.quality.parts,
                        "rubric": result.quality.rubric,
                    }
                out["output"] = result.output
                typer.echo(json.dumps(out))
                return
            final = None
            for chunk in client.stream(req, timeout_s=timeout_s):
                if chunk.restarted:
                    sys.stdout.write("\n")
                    sys.stdout.flush()
                    typer.echo(
                        "fleetctl: -- RESTARTED on other weights: the text above is void; "
                        "the completion starts over below --",
                        err=True,
                    )
                sys.stdout.write(chunk.text)
                sys.stdout.flush()
                if chunk.HasField("final"):
                    final = chunk.final
        except FleetError as err:
            if output != "json":
                sys.stdout.write("\n")
            raise fail(err, target) from None
    if final is not None and final.finish_reason in ENDED_EARLY:
        typer.echo(f"\nfleetctl: {target}: {final.message or 'generation ended early'}", err=True)
        raise typer.Exit(EXIT_UNAVAILABLE)
    if final is not None:
        if final.message:  # e.g. a restart on other weights
            typer.echo(f"\nfleetctl: {target}: {final.message}", err=True)
        t, u = final.timings, final.usage
        typer.echo(
            f"\n-- {final.request_id} on {final.node_id}: {u.completion_tokens} tokens, "
            f"finish={inference_finish(final.finish_reason)}, ttft {t.time_to_first_token_ms:.0f} ms, "
            f"{t.decode_tokens_per_s:.1f} tok/s, total {t.total_ms:.0f} ms, "
            f"model {final.model.model_id} {final.model.weights_digest[:19]}",
            err=True,
        )
        if final.template:
            typer.echo(f"-- template {final.template}", err=True)
        if final.HasField("structured"):
            st = final.structured
            verdict = "valid" if st.valid else f"INVALID: {st.error}"
            parts = ", ".join(f"{p.name} {p.score:.2f}" for p in final.quality.parts)
            typer.echo(
                f"-- {st.format}: {verdict}; quality {final.quality.total:.3f} ({parts})", err=True
            )


def inference_finish(value: int) -> str:
    return inference_pb2.FinishReason.Name(value).removeprefix("FINISH_REASON_").lower()
