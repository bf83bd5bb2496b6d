"""`fleetctl demo`: run the main job on this machine with a generated model."""

from __future__ import annotations

from pathlib import Path

import typer

VOCABS = ("trained", "qwen2.5")


def _vocab(value: str) -> str:
    if value not in VOCABS:
        raise typer.BadParameter(f"expected one of {', '.join(VOCABS)}, got {value!r}")
    return value


def demo(
    workdir: Path = typer.Option(Path(".demo"), help="Where the model and logs go."),
    notes: int = typer.Option(12, help="Clinical-note requests to send."),
    concurrency: int = typer.Option(8, help="Requests in flight at once."),
    max_tokens: int = typer.Option(
        0,
        help="Tokens per note; 0: the soap-brief template's budget (a too small "
        "budget truncates notes, which then fail their schema).",
    ),
    nodes: int = typer.Option(2, help="Node agents to start."),
    vllm_python: str = typer.Option(
        "",
        help="Also start a vLLM node agent with this Python (scripts/demo --vllm "
        "sets up .venv-vllm and passes it).",
    ),
    vocab: str = typer.Option(
        "qwen2.5",
        callback=_vocab,
        metavar="trained|qwen2.5",
        help="The generated model's "
        "tokenizer: 'qwen2.5' (Qwen2.5's real tokenizer: the real token counts of clinical text "
        "and grammar mask sizes) or 'trained' (a 512-token BPE, about 3x faster on a 2-core "
        "CPU, where sampling over Qwen's 151,936 tokens dominates).",
    ),
    keep_running: bool = typer.Option(
        False,
        "--keep-running",
        help="Keep the fleet up after the notes: print its "
        "addresses, the dashboard and the fleetctl commands to try; Ctrl-C stops it.",
    ),
) -> None:
    """Make a tiny model, start a coordinator and node agents (mDNS on loopback), stream
    concurrent clinical notes through the client library, show the fleet, stop cleanly."""
    from cluster.offline import force_offline

    force_offline()
    from cluster.demo import run_demo

    raise typer.Exit(
        run_demo(
            workdir,
            notes=notes,
            concurrency=concurrency,
            max_tokens=max_tokens,
            nodes=nodes,
            vllm_python=vllm_python,
            keep_running=keep_running,
            vocab=vocab,
        )
    )
