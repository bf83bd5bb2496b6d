"""Aggregate output tokens/s through a vLLM node agent vs straight to the same vLLM server.

One invocation starts one `fleet-node --engine vllm` (which starts vLLM's OpenAI server)
and measures, interleaved per repeat so machine noise hits both alike:
  - node:   gRPC Generate to the node agent (chat template and tokens by the agent, a
            token-id streaming completion to vLLM, text and stops in the agent);
  - direct: a streaming /v1/completions call straight to that same vLLM server, with the
            same prompt token ids and greedy settings, as an app without StudioFleet would.
at 1 and 16 concurrent streams. Needs vLLM
(scripts/bootstrap-vllm makes .venv-vllm).

    .venv/bin/python bench/vllm_node.py                 # ~2 min on 2 cores
    .venv/bin/python bench/vllm_node.py --repeats 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")

from bench.node_throughput import NodeClient, prompts  # noqa: E402
from cluster.localfleet import NodeProcess  # noqa: E402
from cluster.tinymodel import TinyModelSpec, make_tiny_model  # noqa: E402

CONCURRENCY = (1, 16)


class DirectClient:
    """Streaming completions straight to the vLLM server, token ids in, text out."""

    def __init__(self, url: str, model_dir: Path, served_name: str):
        import aiohttp
        from transformers import AutoTokenizer

        self.url, self.name = url, served_name
        self.tok = AutoTokenizer.from_pretrained(model_dir)
        self.loop = asyncio.new_event_loop()
        self.session = self.loop.run_until_complete(self._open(aiohttp))

    @staticmethod
    async def _open(aiohttp):
        # A connection per request: this loop runs only during a round, so aiohttp could not
        # drop idle connections before uvicorn's 5 s keep-alive ends them.
        return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, force_close=True))

    async def _one(self, chat, max_tokens: int) -> tuple[int, float, float]:
        """(completion tokens, arrival of the first and of the last token) as this client saw them."""
        ids = self.tok.apply_chat_template(
            [{"role": r, "content": c} for r, c in chat],
            add_generation_prompt=True,
            tokenize=True,
            return_dict=False,
        )
        assert ids and isinstance(ids[0], int), (
            "the prompt must be token ids (one completion per request)"
        )
        body = {
            "model": self.name,
            "prompt": list(ids),
            "max_tokens": max_tokens,
            "temperature": 0.0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        tokens, first, last, text = 0, 0.0, 0.0, []
        async with self.session.post(f"{self.url}/v1/completions", json=body) as resp:
            resp.raise_for_status()
            async for line in resp.content:
                if not line.startswith(b"data: {"):
                    continue
                msg = json.loads(line[6:])
                if msg.get("choices") and msg["choices"][0]["text"]:
                    last = time.perf_counter()
                    first = first or last
                    text.append(msg["choices"][0]["text"])
                if msg.get("usage"):
                    tokens = msg["usage"]["completion_tokens"]
        return tokens, first, last

    def close(self) -> None:
        self.loop.run_until_complete(self.session.close())
        self.loop.close()


async def node_one(client: NodeClient, i: int, chat, max_tokens: int) -> tuple[int, float, float]:
    """The same measure through the node agent: (tokens, first and last token arrival)."""
    from cluster.api import inference_pb2

    req = inference_pb2.GenerateRequest(
        request_id=f"bench-{i}-{time.monotonic_ns()}",
        max_tokens=max_tokens,
        sampling=inference_pb2.SamplingParams(temperature=0.0),
    )
    req.chat.messages.extend(inference_pb2.ChatMessage(role=r, content=c) for r, c in chat)
    tokens, first, last = 0, 0.0, 0.0
    async for chunk in client.stub.Generate(req, timeout=600):
        if chunk.token_ids:
            last = time.perf_counter()
            first = first or last
        if chunk.HasField("final"):
            tokens = chunk.final.usage.completion_tokens
    return tokens, first, last


async def one_round(one, chats) -> tuple[int, float]:
    """All `chats` at once: (completion tokens, seconds until the last stream ended)."""
    start = time.perf_counter()
    results = await asyncio.gather(*(one(i, chat) for i, chat in enumerate(chats)))
    return sum(n for n, _, _ in results), time.perf_counter() - start


async def one_round_each(direct: "DirectClient", chats, max_tokens: int) -> list:
    return await asyncio.gather(*(direct._one(c, max_tokens) for c in chats))


def full_length_prompts(direct: "DirectClient", want: int, max_tokens: int) -> list:
    """Prompts whose greedy completion runs the whole max_tokens: a round's wall time is
    its longest stream, so streams that stop early (end-of-sequence at a point that can
    move with the batch) would make rounds of unequal work."""
    keep: list = []
    tried = 0
    while len(keep) < want:
        batch = prompts(16, f"screen{tried}-")
        tried += 1
        results = direct.loop.run_until_complete(one_round_each(direct, batch, max_tokens))
        keep += [c for c, (n, _, _) in zip(batch, results) if n == max_tokens]
        if tried > 20:
            raise RuntimeError(
                f"only {len(keep)} of {16 * tried} prompts ran {max_tokens} tokens; lower --max-tokens"
            )
    return keep[:want]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--vllm-python", default=str(ROOT / ".venv-vllm" / "bin" / "python"))
    parser.add_argument("--vllm-args", default="--dtype float32 --enforce-eager")
    parser.add_argument("--workdir", type=Path, default=ROOT / ".bench")
    args = parser.parse_args()
    model_dir = args.workdir / "tiny"
    if not (model_dir / "config.json").exists():
        make_tiny_model(model_dir, TinyModelSpec())
    env = {"VLLM_CPU_KVCACHE_SPACE": "1"}
    node = NodeProcess(
        model_dir,
        "--engine",
        "vllm",
        "--vllm-python",
        args.vllm_python,
        "--vllm-args",
        args.vllm_args,
        "--max-running",
        "16",
        "--max-queued",
        "64",
        node_id="bench-vllm",
        env=env,
        plaintext=True,
    )
    rows = []
    try:
        print("starting the vLLM node agent (its server takes ~30 s)", flush=True)
        node.start(args.workdir / "logs")
        node.wait_serving(600)
        st = node.status()
        print(f"  {st.model.engine_version}, server {st.engine_server.url}", flush=True)
        agent = NodeClient(node.address)
        direct = DirectClient(st.engine_server.url, model_dir, st.model.model_id)
        systems = {
            "node": (agent.loop, lambda i, chat: node_one(agent, i, chat, args.max_tokens)),
            "direct": (direct.loop, lambda i, chat: direct._one(chat, args.max_tokens)),
        }
        pool = full_length_prompts(direct, 16 * 2, args.max_tokens)
        for loop, one in systems.values():
            loop.run_until_complete(one_round(one, pool[:2]))
        for conc in CONCURRENCY:
            work: dict[str, list[tuple[int, float]]] = {k: [] for k in systems}
            for rep in range(args.repeats):
                chats = [pool[(rep * conc + k) % len(pool)] for k in range(conc)]
                order = list(systems.items()) if rep % 2 == 0 else list(reversed(systems.items()))
                for name, (loop, one) in order:  # the same prompts for both, in turn
                    work[name].append(loop.run_until_complete(one_round(one, chats)))
            rate = {k: sum(n for n, _ in v) / sum(t for _, t in v) for k, v in work.items()}
            ratios = [n[0] / n[1] / (d[0] / d[1]) for n, d in zip(work["node"], work["direct"])]
            rows.append((conc, rate["direct"], rate["node"], min(ratios), max(ratios)))
            print(
                f"  c={conc}: direct {rate['direct']:.0f} tok/s, node {rate['node']:.0f} tok/s; per-round ratios "
                + " ".join(f"{r:.2f}" for r in ratios),
                flush=True,
            )
        agent.close()
        direct.close()
    finally:
        node.stop()
    print()
    print(
        "| streams | straight to vLLM (tok/s) | through the node agent (tok/s) | node / direct | per-round range |"
    )
    print("|---:|---:|---:|---:|---:|")
    for conc, d, n, lo, hi in rows:
        print(f"| {conc} | {d:.0f} | {n:.0f} | {n / d:.2f}x | {lo:.2f}-{hi:.2f} |")
    print(
        f"(aggregate output tokens/s over {args.repeats} rounds per concurrency, interleaved, the same prompts for "
        f"both; greedy, {args.max_tokens} tokens per request, prompts screened to run them all; the same vLLM "
        "server serves both)"
    )
    print("\ngoal: node >= 0.95x direct at 1 and 16 streams")
    return 0


if __name__ == "__main__":
    sys.exit(main())
