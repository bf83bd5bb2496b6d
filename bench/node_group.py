"""A node group (2 ranks, tensor parallel, ring backend on loopback) against a single node.

Served: a single `fleet-node` and a 2-rank group of `fleet-node` processes on the same
generated model; C streams of N greedy tokens at once (C = 1 and 8) to each, through gRPC:
per-stream tokens/s (mean), aggregate tokens/s, and time per step (median gap between a
stream's tokens).

Inside a step: two bare rank processes (this file with --worker) load the same model, shard
it as the agent does, and time mlx-lm's BatchGenerator step at batch C, then the collectives
that step makes, alone (tensor parallel: two all_sums of [C, 1, hidden] per layer, chained,
on the generation stream) plus the group's own one per loop turn (rank 0's command size and
the token-parity hashes). Their share of the group's step is where the time goes; one process
without a group gives the baseline step. On the Linux build machine two ranks use two CPU
cores where one MLX process computes on one thread, so the group can come out faster there;
that does not carry to Macs. The collectives' share of the step is the figure that does.

    .venv/bin/python bench/node_group.py            # ~2 min on the 2-core build machine
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROUNDS = 3
sys.path.insert(0, str(ROOT))

from cluster.localfleet import free_ports  # noqa: E402

# -- inside a step: bare ranks -----------------------------------------------------------


def worker(args) -> None:
    import mlx.core as mx
    from mlx_lm.generate import BatchGenerator, generation_stream

    group = None
    if args.group:
        from mlx_lm.utils import sharded_load

        from node_agent.group import GroupSpec, form
        from node_agent.group_heartbeat import Heartbeat

        spec = GroupSpec(tuple(args.group.split(",")), args.rank, "ring", "tensor", 60.0)
        hb = Heartbeat(spec, on_silent=lambda rank, cause: None)
        hb.start()
        hb.rendezvous()
        group = form(spec)
        model, _ = sharded_load(args.model, tensor_group=group)
    else:
        import mlx_lm

        model, _ = mlx_lm.load(args.model)
    config = json.loads((Path(args.model) / "config.json").read_text())
    hidden, layers = config["hidden_size"], config["num_hidden_layers"]
    out = {}
    for c in args.concurrency:
        gen = BatchGenerator(model, stop_tokens=[], completion_batch_size=c, prefill_batch_size=c)
        prompts = [[10 + (7 * i + j) % 200 for j in range(16)] for i in range(c)]
        gen.insert(prompts, max_tokens=[ROUNDS * args.steps + 16] * c)
        for _ in range(4):  # prefill, then a few decode steps
            gen.next()
        # The fastest of ROUNDS rounds: the ranks share two cores with everything else here,
        # and a rank descheduled mid-step shows as time the other waits in a collective.
        rounds = []
        for _ in range(ROUNDS):
            start = time.perf_counter()
            for _ in range(args.steps):
                gen.next()
            rounds.append((time.perf_counter() - start) / args.steps)
        gen.close()
        row = {"step_s": min(rounds)}
        if group is not None:
            x = mx.ones((c, 1, hidden))
            ours = mx.zeros((1 + 3 * 2,), dtype=mx.int32)
            mx.eval(x, ours)
            rounds = []
            for _ in range(ROUNDS + 1):  # the first round warms the links up, and is dropped
                start = time.perf_counter()
                for _ in range(args.steps):
                    y = x
                    for _ in range(2 * layers):
                        y = mx.distributed.all_sum(y, group=group, stream=generation_stream) * 0.5
                    mx.eval(y)
                    # The agent's own, one per turn: rank 0's command size and the parity hashes.
                    mx.eval(mx.distributed.all_sum(ours, group=group, stream=generation_stream))
                rounds.append((time.perf_counter() - start) / args.steps)
            row["collective_s"] = min(rounds[1:])
        out[str(c)] = row
    if args.rank == 0:
        print(json.dumps(out), flush=True)


def inside_steps(model: Path, concurrency: list[int], steps: int) -> tuple[dict, dict]:
    base = [sys.executable, __file__, "--worker", "--model", str(model), "--steps", str(steps)]
    base += ["--concurrency", *map(str, concurrency)]
    single = json.loads(subprocess.run(base, capture_output=True, text=True, check=True).stdout)
    group = ",".join(f"127.0.0.1:{p}" for p in free_ports(2))
    procs = [
        subprocess.Popen(
            [*base, "--group", group, "--rank", str(r)], stdout=subprocess.PIPE, text=True
        )
        for r in range(2)
    ]
    try:
        text = procs[0].communicate(timeout=600)[0]
        procs[1].wait(timeout=60)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return single, json.loads(text)


# -- served: fleet-node processes ----------------------------------------------------------


def run_streams(node, c: int, max_tokens: int, tag: str) -> dict:
    from cluster.client import build_request

    times: list[list[float]] = [[] for _ in range(c)]

    def one(i: int) -> None:
        request = build_request(
            prompt=f"Synthetic visit {i}: summarise.",
            max_tokens=max_tokens,
            request_id=f"{tag}-{i}",
            temperature=0.0,
        )
        for chunk in node.inference.Generate(request, timeout=300):
            times[i].extend([time.perf_counter()] * len(chunk.token_ids))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(c)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    per_stream = [(len(t) - 1) / (t[-1] - t[0]) for t in times if len(t) > 1]
    gaps = [b - a for t in times for a, b in zip(t, t[1:]) if b > a]
    total = sum(len(t) for t in times)
    return {
        "per_stream": statistics.mean(per_stream),
        "aggregate": total / (max(t[-1] for t in times) - start),
        "step_s": statistics.median(gaps),
    }


def served(model: Path, logs: Path, concurrency: list[int], max_tokens: int, repeats: int):
    from cluster.localfleet import NodeProcess

    results: dict[str, dict[int, list[dict]]] = {"single": {}, "group": {}}
    with ExitStack() as stack:
        single = stack.enter_context(NodeProcess(model, node_id="bench-single", plaintext=True))
        single.start(logs)
        group = ",".join(f"127.0.0.1:{p}" for p in free_ports(2))
        ranks = []
        for r in range(2):
            proc = NodeProcess(
                model,
                "--group",
                group,
                "--rank",
                str(r),
                "--group-timeout-s",
                "60",
                node_id=f"bench-rank-{r}",
                plaintext=True,
            )
            stack.enter_context(proc)
            proc.start(logs)
            ranks.append(proc)
        single.wait_serving(120)
        ranks[0].wait_serving(120)
        for name, node in (("single", single), ("group", ranks[0])):  # warm-up, not counted
            run_streams(node, max(concurrency), max_tokens, f"warm-{name}")
        for rep in range(repeats):
            for c in concurrency:
                for name, node in (("single", single), ("group", ranks[0])):
                    row = run_streams(node, c, max_tokens, f"{name}-{c}-{rep}")
                    results[name].setdefault(c, []).append(row)
    return {
        name: {
            c: {k: statistics.median(r[k] for r in rows) for k in rows[0]} for c, rows in by.items()
        }
        for name, by in results.items()
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--group", default="", help=argparse.SUPPRESS)
    ap.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--model", default="", help=argparse.SUPPRESS)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--steps", type=int, default=40, help="decode steps timed inside a step")
    ap.add_argument("--max-tokens", type=int, default=48, help="tokens per served stream")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--hidden", type=int, default=256, help="hidden size of the generated model")
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from cluster.tinymodel import TinyModelSpec, make_tiny_model

    with tempfile.TemporaryDirectory(prefix="bench-node-group-") as tmp:
        spec = TinyModelSpec(
            hidden_size=args.hidden,
            num_hidden_layers=4,
            num_attention_heads=args.hidden // 64,
            num_key_value_heads=2,
            intermediate_size=2 * args.hidden,
        )
        model = make_tiny_model(Path(tmp) / "model", spec)
        print(f"model: generated Qwen2, hidden {args.hidden}, 4 layers; ranks: 2 (tensor, ring)")
        single_in, group_in = inside_steps(model, args.concurrency, args.steps)
        serve = served(model, Path(tmp) / "logs", args.concurrency, args.max_tokens, args.repeats)
    print()
    print("| concurrency | measure | single node | group of 2 | group / single |")
    print("|---|---|---|---|---|")
    for c in args.concurrency:
        s, g = serve["single"][c], serve["group"][c]
        for key, label, unit in (
            ("per_stream", "per-stream tokens/s", "{:.0f}"),
            ("aggregate", "aggregate tokens/s", "{:.0f}"),
            ("step_s", "time per step, served (ms)", "{:.2f}"),
        ):
            a, b = s[key], g[key]
            if key == "step_s":
                a, b = a * 1e3, b * 1e3
            print(f"| {c} | {label} | {unit.format(a)} | {unit.format(b)} | {b / a:.2f}x |")
        si, gi = single_in[str(c)], group_in[str(c)]
        print(
            f"| {c} | time per step, engine only (ms) | {si['step_s'] * 1e3:.2f} | "
            f"{gi['step_s'] * 1e3:.2f} | {gi['step_s'] / si['step_s']:.2f}x |"
        )
        share = gi["collective_s"] / gi["step_s"]
        print(
            f"| {c} | collectives per step (ms, share of the group's step) | | "
            f"{gi['collective_s'] * 1e3:.2f} ({share:.0%}) | |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
