"""Aggregate output tokens/s through the node agent vs mlx-lm in-process and mlx_lm.server.

All three run in this one invocation, on the same generated models, prompts (chat
template applied) and greedy settings, interleaved per cell so machine noise hits them
alike. Ratios are against in-process `batch_generate` measured in the same run.

    .venv/bin/python bench/node_throughput.py            # tiny + larger model (~10 min)
    .venv/bin/python bench/node_throughput.py --quick    # tiny model only, fewer tokens
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")

import grpc  # noqa: E402

from cluster.api import inference_pb2, inference_pb2_grpc  # noqa: E402
from cluster.localfleet import NodeProcess  # noqa: E402
from cluster.tinymodel import TinyModelSpec, make_tiny_model  # noqa: E402

SYSTEM = "You are a clinical documentation assistant."
CONCURRENCY = (1, 8, 32)


@dataclass(frozen=True)
class ModelCase:
    name: str
    spec: TinyModelSpec
    max_tokens: int


def prompts(n: int, salt: str = "") -> list[list[tuple[str, str]]]:
    """n chats that share the system prompt (as a clinic's do) and differ after it; a new
    salt gives prompts no system has seen, so nothing is a whole-prompt cache hit."""
    return [
        [
            ("system", SYSTEM),
            ("user", f"Synthetic visit {salt}{i}: follow-up, vitals stable, plan review."),
        ]
        for i in range(n)
    ]


def timed(fn) -> tuple[float, int]:
    start = time.perf_counter()
    tokens = fn()
    return time.perf_counter() - start, tokens


# -- in-process baseline ---------------------------------------------------------------


class InProcess:
    def __init__(self, model_dir: Path, max_running: int, prefill_step: int):
        import mlx_lm

        self.model, self.tok = mlx_lm.load(str(model_dir))
        self.max_running, self.prefill_step = max_running, prefill_step

    def run(self, chats, max_tokens: int) -> int:
        from mlx_lm import batch_generate

        ids = [
            self.tok.apply_chat_template(
                [{"role": r, "content": c} for r, c in chat], add_generation_prompt=True
            )
            for chat in chats
        ]
        out = batch_generate(
            self.model,
            self.tok,
            ids,
            max_tokens=max_tokens,
            return_token_ids=True,
            completion_batch_size=self.max_running,
            prefill_batch_size=8,
            prefill_step_size=self.prefill_step,
        )
        return sum(len(t) for t in out.token_ids)


# -- the node agent over gRPC (asyncio client, one stream per request) ----------------------


class NodeClient:
    """One persistent channel and event loop, as a long-lived clinical app would hold."""

    def __init__(self, address: str):
        self.loop = asyncio.new_event_loop()
        self.channel = self.loop.run_until_complete(self._open(address))
        self.stub = inference_pb2_grpc.InferenceStub(self.channel)

    @staticmethod
    async def _open(address: str):
        channel = grpc.aio.insecure_channel(address)
        await channel.channel_ready()
        return channel

    async def _one(self, i: int, chat, max_tokens: int) -> int:
        req = inference_pb2.GenerateRequest(
            request_id=f"bench-{i}-{time.monotonic_ns()}", max_tokens=max_tokens
        )
        req.chat.messages.extend(inference_pb2.ChatMessage(role=r, content=c) for r, c in chat)
        n = 0
        async for chunk in self.stub.Generate(req, timeout=600):
            if chunk.HasField("final"):
                n = chunk.final.usage.completion_tokens
        return n

    async def _round(self, chats, max_tokens: int) -> int:
        return sum(
            await asyncio.gather(*(self._one(i, c, max_tokens) for i, c in enumerate(chats)))
        )

    def run(self, chats, max_tokens: int) -> int:
        return self.loop.run_until_complete(self._round(chats, max_tokens))

    def close(self) -> None:
        self.loop.run_until_complete(self.channel.close())
        self.loop.close()


# -- mlx_lm.server over HTTP ------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlxServer:
    def __init__(self, model_dir: Path, log: Path, max_running: int, prefill_step: int):
        self.port = free_port()
        self.resets = 0
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mlx_lm.server",
                "--model",
                str(model_dir),
                "--port",
                str(self.port),
                "--decode-concurrency",
                str(max_running),
                "--prompt-concurrency",
                "8",
                "--prefill-step-size",
                str(prefill_step),
            ],
            stdout=subprocess.DEVNULL,
            stderr=open(log, "wb"),
            env={**os.environ},
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # mlx_lm.server has no readiness signal but its port
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                conn.request("GET", "/v1/models")
                if conn.getresponse().status == 200:
                    return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError(f"mlx_lm.server did not start; see {log}")

    def one(self, chat, max_tokens: int, stream: bool) -> int:
        body = {
            "messages": [{"role": r, "content": c} for r, c in chat],
            "max_tokens": max_tokens,
            "temperature": 0.0,
        }
        if stream:
            body.update(stream=True, stream_options={"include_usage": True})
        for _attempt in range(50):
            # Its ThreadingHTTPServer keeps the default listen backlog of 5: under 32 concurrent
            # connects some are reset, and a real client retries them.
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)
                conn.request(
                    "POST",
                    "/v1/chat/completions",
                    json.dumps(body),
                    {"Content-Type": "application/json"},
                )
                resp = conn.getresponse()
                if not stream:
                    return json.loads(resp.read())["usage"]["completion_tokens"]
                tokens = 0
                for line in resp:
                    if line.startswith(b"data: {"):
                        usage = json.loads(line[6:]).get("usage")
                        if usage:
                            tokens = usage["completion_tokens"]
                return tokens
            except (ConnectionResetError, ConnectionRefusedError, http.client.RemoteDisconnected):
                self.resets += 1
                time.sleep(0.05)
        raise RuntimeError("mlx_lm.server kept resetting connections")

    def run(self, chats, max_tokens: int, stream: bool) -> int:
        with ThreadPoolExecutor(len(chats)) as pool:
            return sum(pool.map(lambda c: self.one(c, max_tokens, stream), chats))

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


# -- the table --------------------------------------------------------------------------------


def bench_model(case: ModelCase, workdir: Path, repeats: int, rows: list) -> None:
    model_dir = workdir / case.name
    if not (model_dir / "config.json").exists():
        print(
            f"  generating {case.name} model ({case.spec.hidden_size} hidden, "
            f"{case.spec.num_hidden_layers} layers)",
            flush=True,
        )
        make_tiny_model(model_dir, case.spec)
    max_running, prefill_step = 32, 512
    inproc = InProcess(model_dir, max_running, prefill_step)
    server = MlxServer(
        model_dir, workdir / f"{case.name}-mlx_lm.server.log", max_running, prefill_step
    )
    flags = (
        "--max-running",
        str(max_running),
        "--max-queued",
        "64",
        "--prefill-step-size",
        str(prefill_step),
    )
    node = NodeProcess(model_dir, *flags, node_id=f"bench-{case.name}")
    bare = NodeProcess(
        model_dir, *flags, "--prompt-cache-entries", "0", node_id=f"bench-{case.name}-nocache"
    )
    try:
        for proc in (node, bare):
            proc.start(workdir / "logs")
            proc.wait_serving()
        client, bare_client = NodeClient(node.address), NodeClient(bare.address)
        systems = {
            "inproc": lambda chats: inproc.run(chats, case.max_tokens),
            "node": lambda chats: client.run(chats, case.max_tokens),
            "node_nocache": lambda chats: bare_client.run(chats, case.max_tokens),
            "server": lambda chats: server.run(chats, case.max_tokens, stream=False),
            "server_stream": lambda chats: server.run(chats, case.max_tokens, stream=True),
        }
        for fn in systems.values():  # warm every path once
            fn(prompts(2, "warm-"))
        for conc in CONCURRENCY:
            rounds = max(1, 8 // conc)  # concurrency 1 runs several requests back to back
            rates: dict[str, list[float]] = {k: [] for k in systems}
            for rep in range(repeats):
                for tag, (name, fn) in enumerate(systems.items()):
                    # Each system gets prompts it has never seen (same shape and length), so
                    # a prompt cache can reuse the shared system prompt but no whole prompt.
                    batches = [prompts(conc, f"c{conc}r{rep}b{b}s{tag}-") for b in range(rounds)]
                    secs, toks = timed(
                        lambda fn=fn, batches=batches: sum(fn(chats) for chats in batches)
                    )
                    rates[name].append(toks / secs)
            med = {k: statistics.median(v) for k, v in rates.items()}
            rows.append(
                (
                    case.name,
                    conc,
                    med["inproc"],
                    med["node"],
                    med["node_nocache"],
                    med["server"],
                    med["server_stream"],
                )
            )
            print(
                f"  {case.name} c={conc}: inproc {med['inproc']:.0f}, node {med['node']:.0f} "
                f"(cache off {med['node_nocache']:.0f}), "
                f"mlx_lm.server {med['server']:.0f} (streaming {med['server_stream']:.0f}) tok/s, "
                f"{server.resets} connection resets retried so far",
                flush=True,
            )
        client.close()
        bare_client.close()
    finally:
        node.stop()
        bare.stop()
        server.stop()


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="tiny model only")
    parser.add_argument("--repeats", type=int, default=3)
    # MLX on these CPUs does ~4.5 GFLOP/s: hidden 1024 x 8 layers decodes ~10 tokens/s, so
    # the default larger model is hidden 512 x 4 layers (~80 tokens/s), where compute dominates.
    parser.add_argument("--large-hidden", type=int, default=512)
    parser.add_argument("--large-layers", type=int, default=4)
    parser.add_argument("--large-tokens", type=int, default=32)
    parser.add_argument("--workdir", type=Path, default=ROOT / ".bench")
    args = parser.parse_args()
    cases = [ModelCase("tiny", TinyModelSpec(), 64)]
    if not args.quick:
        h, layers = args.large_hidden, args.large_layers
        cases.append(
            ModelCase(
                f"larger-h{h}-l{layers}",
                TinyModelSpec(
                    hidden_size=h,
                    num_hidden_layers=layers,
                    num_attention_heads=h // 64,
                    num_key_value_heads=max(1, h // 256),
                    intermediate_size=int(h * 2.75),
                ),
                args.large_tokens,
            )
        )
    repeats = args.repeats
    args.workdir.mkdir(parents=True, exist_ok=True)
    rows: list = []
    for case in cases:
        print(
            f"benchmarking {case.name} ({case.max_tokens} tokens per request, {repeats} repeats)",
            flush=True,
        )
        bench_model(case, args.workdir, repeats, rows)

    print()
    print(
        "| model | conc | in-process batch_generate | node agent | node / in-process | node, prompt cache off "
        "| cache off / in-process | mlx_lm.server | node / server | mlx_lm.server streaming "
        "| node / server streaming |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, conc, inproc, node, bare, server, server_stream in rows:
        print(
            f"| {name} | {conc} | {inproc:.0f} | {node:.0f} | {node / inproc:.2f}x | {bare:.0f} "
            f"| {bare / inproc:.2f}x | {server:.0f} | {node / server:.2f}x | {server_stream:.0f} "
            f"| {node / server_stream:.2f}x |"
        )
    print(
        "(aggregate output tokens/s, median of the repeats; the node streams over gRPC, in-process has no "
        "prompt cache, mlx_lm.server and the node reuse the shared system prompt)"
    )
    print("\ngoal: node >= 0.85x in-process at concurrency 8 and 32, and ahead of mlx_lm.server")
    return 0


if __name__ == "__main__":
    sys.exit(main())
