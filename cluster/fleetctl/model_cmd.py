"""`fleetctl model ...`: model files on this machine."""

from __future__ import annotations

import json
from pathlib import Path

import typer

app = typer.Typer(
    rich_markup_mode=None,
    add_completion=False,
    no_args_is_help=True,
    help="Model files on this machine.",
)

QWEN_VOCAB = "qwen2.5"


def _vocab(value: str) -> str:
    """--vocab: a size to train a small BPE to, or 'qwen2.5'."""
    if value == QWEN_VOCAB or (value.isdigit() and 0 < int(value) <= 1_000_000):
        return value
    raise typer.BadParameter(
        f"expected a vocabulary size (1 to 1000000) or '{QWEN_VOCAB}', got {value!r}"
    )


@app.command("make-tiny")
def make_tiny(
    out_dir: Path = typer.Argument(..., help="Directory to write the model into."),
    hidden: int | None = typer.Option(
        None, show_default=False, help="Hidden size. [default: 128; 64 with --vocab qwen2.5]"
    ),
    layers: int = typer.Option(2, help="Transformer layers."),
    heads: int | None = typer.Option(
        None,
        show_default=False,
        help="Attention heads (head_dim = hidden / heads). [default: hidden / 64]",
    ),
    kv_heads: int = typer.Option(1, help="Key/value heads."),
    intermediate: int = typer.Option(
        0,
        show_default=False,
        help="MLP (feed-forward) width; 0 means 2 x --hidden. [default: 0, i.e. 2 x hidden]",
    ),
    vocab: str = typer.Option(
        "512",
        callback=_vocab,
        metavar="SIZE|qwen2.5",
        help="Tokenizer: a vocabulary size trains a small BPE on synthetic text; 'qwen2.5' uses Qwen2.5's real tokenizer and chat template (151,936 embedding rows, built offline).",
    ),
    context: int = typer.Option(2048, help="max_position_embeddings."),
    seed: int = typer.Option(0, help="Weight seed: same seed, same weights digest."),
) -> None:
    """Write a small random Qwen2 model (weights, BPE tokenizer, ChatML template) that mlx_lm.load reads."""
    from cluster.offline import force_offline

    force_offline()
    from cluster.tinymodel import TinyModelSpec, make_tiny_model, qwen25_spec

    qwen = vocab == QWEN_VOCAB
    hidden = hidden or (64 if qwen else 128)
    heads = heads or max(1, hidden // 64)
    shape = dict(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        intermediate_size=intermediate or 2 * hidden,
        max_position_embeddings=context,
        seed=seed,
    )
    spec = qwen25_spec(**shape) if qwen else TinyModelSpec(vocab_size=int(vocab), **shape)
    if qwen:
        typer.echo(
            f"fleetctl: make-tiny: building Qwen2.5's tokenizer ({spec.vocab_size} embedding rows)...",
            err=True,
        )
    try:
        path = make_tiny_model(out_dir, spec)
    except ValueError as exc:
        typer.echo(f"fleetctl: make-tiny: {exc}", err=True)
        raise typer.Exit(2) from None
    size = sum(p.stat().st_size for p in path.iterdir() if p.is_file())
    typer.echo(json.dumps({"path": str(path), "bytes": size, "spec": spec.__dict__}))


@app.command("digest")
def digest(
    model_dir: Path = typer.Argument(
        ..., metavar="DIR", help="A model directory (config.json and *.safetensors)."
    ),
    output: str = typer.Option("text", "--output", "-o", help="text or json."),
) -> None:
    """Print the weights digest a node reports for DIR (sha256:...): what rollouts target
    (target.weights_digest), what an upstream node declares (--upstream-digest), and what a
    stream resumes on. Hashes every weights file (minutes for 40 GB), then caches the result."""
    from cluster.digest import digest_files, weights_digest

    if output not in ("text", "json"):
        typer.echo(
            f"fleetctl: model digest: --output must be text or json, not {output!r}", err=True
        )
        raise typer.Exit(2)
    if not model_dir.is_dir():
        typer.echo(f"fleetctl: model digest: {model_dir} is not a directory", err=True)
        raise typer.Exit(2)
    try:
        files = digest_files(model_dir)
        value = weights_digest(model_dir)
    except (FileNotFoundError, OSError) as exc:
        typer.echo(f"fleetctl: model digest: {exc}", err=True)
        raise typer.Exit(2) from None
    if output == "json":
        typer.echo(
            json.dumps({"path": str(model_dir), "weights_digest": value, "files": len(files)})
        )
    else:
        typer.echo(value)
