"""`fleetctl model ...`: model files on this machine."""

from __future__ import annotations

import json
from pathlib import Path

import typer

app = typer.Typer(rich_markup_mode=None, add_completion=False, no_args_is_help=True, help="Model files on this machine.")


@app.command("make-tiny")
def make_tiny(
    out_dir: Path = typer.Argument(..., help="Directory to write the model into."),
    hidden: int = typer.Option(128, help="Hidden size."),
    layers: int = typer.Option(2, help="Transformer layers."),
    heads: int = typer.Option(2, help="Attention heads (head_dim = hidden / heads)."),
    kv_heads: int = typer.Option(1, help="Key/value heads."),
    intermediate: int = typer.Option(0, show_default=False, help="MLP (feed-forward) width; 0 means 2 x --hidden. [default: 0, i.e. 2 x hidden]"),
    vocab: int = typer.Option(512, help="Tokenizer vocabulary size to train."),
    context: int = typer.Option(2048, help="max_position_embeddings."),
    seed: int = typer.Option(0, help="Weight seed: same seed, same weights digest."),
) -> None:
    """Write a small random Qwen2 model (weights, BPE tokenizer, ChatML template) that mlx_lm.load reads."""
    from cluster.offline import force_offline

    force_offline()
    from cluster.tinymodel import TinyModelSpec, make_tiny_model

    spec = TinyModelSpec(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv_heads, intermediate_size=intermediate or 2 * hidden,
                         vocab_size=vocab, max_position_embeddings=context, seed=seed)
    try:
        path = make_tiny_model(out_dir, spec)
    except ValueError as exc:
        typer.echo(f"fleetctl: make-tiny: {exc}", err=True)
        raise typer.Exit(2)
    size = sum(p.stat().st_size for p in path.iterdir() if p.is_file())
    typer.echo(json.dumps({"path": str(path), "bytes": size, "spec": spec.__dict__}))
