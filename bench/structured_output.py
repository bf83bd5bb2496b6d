"""Decode tokens/s with a JSON-schema constraint vs without, on the same MLX node, one run.

The same node agent serves both kinds of request, interleaved per repeat so machine noise
hits them alike: the same chats, seeds (temperature 1) and max_tokens; the constrained
ones carry the SOAP note template (llguidance masks every step), the others nothing.
The SOAP schema allows far longer notes than max_tokens, so constrained requests run to
max_tokens; the random model rarely samples EOS unconstrained, and the rate counts the
tokens each request really produced. Goal (issue 8): constrained >= 0.8x unconstrained.
The models carry Qwen2.5's real tokenizer (issue 21), so the schema mask covers the real
151,936-token vocabulary; "tiny-512" is the small trained BPE the numbers before issue 21 used.

    .venv/bin/python bench/structured_output.py           # Qwen-vocab tiny + larger model, tiny-512
    .venv/bin/python bench/structured_output.py --quick   # the Qwen-vocab tiny model only
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")

from cluster.api import inference_pb2  # noqa: E402
from cluster.client import build_request  # noqa: E402
from cluster.localfleet import NodeProcess  # noqa: E402
from cluster.tinymodel import TinyModelSpec, make_tiny_model, qwen25_spec  # noqa: E402

CONCURRENCY = (1, 8, 32)


def requests(
    conc: int, tag: str, max_tokens: int, constrained: bool
) -> list[inference_pb2.GenerateRequest]:
    fmt = {"note_template": "soap"} if constrained else {}
    return [
        build_request(
            messages=[
                ("system", "You are a clinical documentation assistant."),
                ("user", f"Write a SOAP note for synthetic visit {tag}-{i}."),
            ],
            max_tokens=max_tokens,
            temperature=1.0,
            seed=i,
            request_id=f"bench-{tag}-{i}",
            **fmt,
        )
        for i in range(conc)
    ]


def run(node: NodeProcess, batch: list) -> tuple[float, int]:
    """Wall seconds and tokens for the batch sent at once (one thread per stream)."""

    def one(req):
        tokens = 0
        for chunk in node.inference.Generate(req, timeout=600):
            tokens += len(chunk.token_ids)
        return tokens

    start = time.perf_counter()
    with ThreadPoolExecutor(len(batch)) as pool:
        tokens = sum(pool.map(one, batch))
    return time.perf_counter() - start, tokens


def bench_model(
    name: str,
    spec: TinyModelSpec,
    max_tokens: int,
    workdir: Path,
    repeats: int,
    concurrency: tuple[int, ...] = CONCURRENCY,
) -> list[tuple]:
    model_dir = workdir / name
    if not (model_dir / "config.json").exists():
        print(
            f"  generating {name} ({spec.hidden_size} hidden, {spec.num_hidden_layers} layers, "
            f"{spec.vocab_size} vocabulary)",
            flush=True,
        )
        make_tiny_model(model_dir, spec)
    node = NodeProcess(
        model_dir,
        "--max-running",
        "32",
        "--max-queued",
        "64",
        node_id=f"bench-{name}",
        plaintext=True,
    )
    rows = []
    try:
        node.start(workdir / "logs")
        node.wait_serving()
        for constrained in (False, True):  # warm both paths
            run(node, requests(2, "warm", 16, constrained))
        for conc in concurrency:
            rates: dict[bool, list[float]] = {False: [], True: []}
            for rep in range(repeats):
                for constrained in (False, True) if rep % 2 == 0 else (True, False):
                    secs, toks = run(
                        node, requests(conc, f"c{conc}r{rep}", max_tokens, constrained)
                    )
                    rates[constrained].append(toks / secs)
            free, fixed = statistics.median(rates[False]), statistics.median(rates[True])
            rows.append((name, conc, free, fixed, fixed / free))
            print(
                f"  {name} c={conc}: unconstrained {free:.0f} tok/s, constrained {fixed:.0f} tok/s, "
                f"ratio {fixed / free:.2f}x",
                flush=True,
            )
    finally:
        node.stop()
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="the Qwen-vocab tiny model only")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument(
        "--concurrency",
        type=int,
        nargs="+",
        default=list(CONCURRENCY),
        help="streams per batch, one row each",
    )
    parser.add_argument("--workdir", type=Path, default=ROOT / ".bench")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    cases = [("qwen-vocab", qwen25_spec())]
    if not args.quick:  # compute-bound, as a real model is: the mask's share shrinks
        cases.append(
            (
                "qwen-vocab-h512-l4",
                qwen25_spec(
                    hidden_size=512,
                    num_hidden_layers=4,
                    num_attention_heads=8,
                    num_key_value_heads=2,
                    intermediate_size=1408,
                ),
            )
        )
        cases.append(("tiny-512", TinyModelSpec()))
    rows = []
    for name, spec in cases:
        rows += bench_model(
            name, spec, args.max_tokens, args.workdir, args.repeats, tuple(args.concurrency)
        )
    print(
        f"\nSchema-constrained (SOAP note, llguidance) vs unconstrained decode on one MLX node, "
        f"{args.max_tokens} tokens per request, temperature 1, median of {args.repeats}"
    )
    print(f"{'model':<18} {'streams':>7} {'free tok/s':>11} {'schema tok/s':>13} {'ratio':>6}")
    for name, conc, free, fixed, ratio in rows:
        print(f"{name:<18} {conc:>7} {free:>11.0f} {fixed:>13.0f} {ratio:>5.2f}x")
    worst = min(r[4] for r in rows)
    print(f"worst ratio {worst:.2f}x (goal >= 0.80x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
