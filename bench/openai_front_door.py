"""The OpenAI-compatible front door vs gRPC: the same load through the same coordinator
and node, one run (docs/openai-api.md; goal: >= 0.9x gRPC's throughput).

Per concurrency level, `streams` callers each send requests back to back (a synthetic
note prompt, 64 tokens, greedy) over three paths, interleaved per repeat with the order
rotated so machine noise hits them alike:

- grpc: the coordinator's Inference.Generate (grpc.aio, one channel; bench/coordinator.py's
        load, whose chats the HTTP paths send too);
- http: POST /v1/chat/completions, streamed (SSE), read with aiohttp (one session);
- sdk:  the same through the official openai SDK's AsyncOpenAI (its pydantic parsing
        of every chunk included: what an application migrating from a hosted API runs).

Tokens counted are the completion tokens the caller received (gRPC: token ids; HTTP:
`usage` of the last chunk, stream_options.include_usage). Node, coordinator and callers
share this machine's cores: every CPU-second the HTTP path adds is taken from decode.
The fleet runs in plaintext (TLS costs both paths alike, once per connection).

    .venv/bin/python bench/openai_front_door.py            # ~3 min on 2 cores
    .venv/bin/python bench/openai_front_door.py --quick    # ~1 min
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")

import aiohttp  # noqa: E402
import openai  # noqa: E402

from bench.coordinator import load as grpc_load  # noqa: E402
from bench.coordinator import request  # noqa: E402
from cluster.localfleet import CoordinatorProcess, NodeProcess  # noqa: E402
from cluster.metrics import percentile as pct  # noqa: E402
from cluster.tinymodel import make_tiny_model  # noqa: E402

MAX_TOKENS = 64


def messages(tag: str, i: int) -> list[dict]:
    """The chat bench/coordinator.py's gRPC load sends as request `tag`-`i`, as OpenAI messages."""
    return [
        {"role": m.role, "content": m.content} for m in request(i, MAX_TOKENS, tag).chat.messages
    ]


async def http_load(
    base_url: str, model: str, streams: int, per_stream: int, tag: str
) -> tuple[int, list[float]]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=streams)) as session:

        async def one(i: int) -> tuple[int, float]:
            body = {
                "model": model,
                "messages": messages(tag, i),
                "max_tokens": MAX_TOKENS,
                "temperature": 0,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            start, first, tokens = time.perf_counter(), None, 0
            async with session.post(
                f"{base_url}/chat/completions", json=body, headers={"X-Request-Id": f"{tag}-{i}"}
            ) as r:
                assert r.status == 200, await r.text()
                async for line in r.content:
                    if not line.startswith(b"data: {"):
                        continue
                    event = json.loads(line[6:])
                    if (
                        first is None
                        and event["choices"]
                        and event["choices"][0]["delta"].get("content")
                    ):
                        first = time.perf_counter()
                    if event.get("usage"):
                        tokens = event["usage"]["completion_tokens"]
            return tokens, (first - start) * 1000.0

        return await _callers(one, streams, per_stream)


async def sdk_load(
    base_url: str, model: str, streams: int, per_stream: int, tag: str
) -> tuple[int, list[float]]:
    client = openai.AsyncOpenAI(base_url=base_url, api_key="plaintext-fleet", max_retries=0)

    async def one(i: int) -> tuple[int, float]:
        start, first, tokens = time.perf_counter(), None, 0
        stream = await client.chat.completions.create(
            model=model,
            messages=messages(tag, i),
            max_tokens=MAX_TOKENS,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_headers={"X-Request-Id": f"{tag}-{i}"},
        )
        async for chunk in stream:
            if first is None and chunk.choices and chunk.choices[0].delta.content:
                first = time.perf_counter()
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
        return tokens, (first - start) * 1000.0

    try:
        return await _callers(one, streams, per_stream)
    finally:
        await client.close()


async def _callers(one, streams: int, per_stream: int) -> tuple[float, list[float]]:
    """(tokens/s over the whole run, TTFTs in ms)."""
    ttfts: list[float] = []
    total = 0

    async def caller(c: int) -> None:
        nonlocal total
        for k in range(per_stream):
            tokens, ttft = await one(c * per_stream + k)
            total += tokens
            ttfts.append(ttft)

    start = time.perf_counter()
    await asyncio.gather(*(caller(c) for c in range(streams)))
    return total / (time.perf_counter() - start), ttfts


def run(levels: list[int], repeats: int) -> list[tuple[int, dict]]:
    tmp = Path(tempfile.mkdtemp(prefix="bench-openai-"))
    model = make_tiny_model(tmp / "tiny-qwen2")
    rows = []
    with NodeProcess(
        model, "--max-running", "64", "--max-queued", "64", node_id="bench-node"
    ) as node:
        node.start(tmp / "logs")
        node.wait_serving()
        with CoordinatorProcess(
            "--no-audit",
            "--no-request-log",
            nodes=[node.address],
            name="bench-coordinator",
            plaintext=True,
        ) as co:
            co.start(tmp / "logs")
            co.wait_routable(1)
            paths = {
                "grpc": lambda _model, streams, per_stream, tag: grpc_load(
                    co.address, streams, per_stream, MAX_TOKENS, tag
                ),
                "http": lambda *a: http_load(co.openai_base_url, *a),
                "sdk": lambda *a: sdk_load(co.openai_base_url, *a),
            }
            for streams in levels:
                per_stream = max(2, 32 // streams)
                for name, path in paths.items():  # warm-up: connections, prompt cache, JIT
                    asyncio.run(path("tiny-qwen2", streams, 1, f"warm-{name}{streams}"))
                tps = {k: [] for k in paths}
                ttft = {k: [] for k in paths}
                names = list(paths)
                for r in range(repeats):
                    for name in names[r % 3 :] + names[: r % 3]:
                        t, lat = asyncio.run(
                            paths[name]("tiny-qwen2", streams, per_stream, f"{name}{streams}r{r}")
                        )
                        tps[name].append(t)
                        ttft[name].extend(lat)
                    print(
                        f"  {streams:>2} streams, repeat {r + 1}/{repeats}: "
                        + ", ".join(f"{k} {v[-1]:.0f} tok/s" for k, v in tps.items()),
                        flush=True,
                    )
                rows.append((streams, {k: (statistics.median(tps[k]), ttft[k]) for k in paths}))
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats")
    ap.add_argument("--levels", default="1,8,32", help="concurrent streams, comma separated")
    args = ap.parse_args()
    repeats = 3 if args.quick else 7
    levels = [int(x) for x in args.levels.split(",")]
    print(
        f"# OpenAI front door vs gRPC, {datetime.now():%Y-%m-%d %H:%M}, {os.cpu_count()} CPUs, "
        f"{repeats} repeats, {MAX_TOKENS} tokens per request",
        flush=True,
    )
    rows = run(levels, repeats)
    print()
    print(
        "| streams | grpc tok/s | http tok/s | sdk tok/s | http/grpc | sdk/grpc | TTFT p50 grpc / http / sdk ms |"
    )
    print("|---|---|---|---|---|---|---|")
    worst = 9.9
    for streams, r in rows:
        g, h, s = r["grpc"][0], r["http"][0], r["sdk"][0]
        worst = min(worst, h / g)
        print(
            f"| {streams} | {g:.0f} | {h:.0f} | {s:.0f} | {h / g:.2f}x | {s / g:.2f}x | "
            f"{pct(r['grpc'][1], 0.5):.1f} / {pct(r['http'][1], 0.5):.1f} / {pct(r['sdk'][1], 0.5):.1f} |"
        )
    print(f"\nfront door (http) throughput vs gRPC, worst level: {worst:.2f}x (goal >= 0.9x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
