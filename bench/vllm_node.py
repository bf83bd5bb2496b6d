"""Aggregate output tokens/s through a vLLM node agent vs straight to the same vLLM server.

One invocation starts one `fleet-node --engine vllm` (which starts vLLM's OpenAI server)
and measures, interleaved per repeat so machine noise hits both alike:
  - node:   gRPC Generate to the node agent (chat template and tokens by the agent, a
            token-id streaming completion to vLLM, text and stops in the agent);
  - direct: a streaming /v1/completions call straight to that same vLLM server, with the
            same prompt token ids and greedy settings, as an app without StudioFleet would.
at 1 and 16 concurrent streams. Needs vLLM (scripts/bootstrap-vllm makes .venv-vllm).

    .venv/bin/python bench/vllm_node.py                 # ~3 min on 2 cores
    .venv/bin/python bench/vllm_node.py --repeats 3 --max-tokens 128
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")

from bench.node_throughput import NodeClient, prompts, timed  # noqa: E402
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
        return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))

    async def _one(self, chat, max_tokens: int) -> int:
        ids = self.tok.apply_chat_template([{"role": r, "content": c} for r, c in chat], add_generation_prompt=True)
        body = {"model": self.name, "prompt": list(ids), "max_tokens": max_tokens, "temperature": 0.0,
                "stream": True, "stream_options": {"include_usage": True}}
        tokens, text = 0, []
        async with self.session.post(f"{self.url}/v1/completions", json=body) as resp:
            resp.raise_for_status()
            async for line in resp.content:
                if not line.startswith(b"data: {"):
                    continue
                msg = json.loads(line[6:])
                if msg.get("choices"):
                    text.append(msg["choices"][0]["text"])
                if msg.get("usage"):
                    tokens = msg["usage"]["completion_tokens"]
        return tokens

    async def _round(self, chats, max_tokens: int) -> int:
        return sum(await asyncio.gather(*(self._one(c, max_tokens) for c in chats)))

    def run(self, chats, max_tokens: int) -> int:
        return self.loop.run_until_complete(self._round(chats, max_tokens))

    def close(self) -> None:
        self.loop.run_until_complete(self.session.close())
        self.loop.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--vllm-python", default=str(ROOT / ".venv-vllm" / "bin" / "python"))
    parser.add_argument("--vllm-args", default="--dtype float32 --enforce-eager")
    parser.add_argument("--workdir", type=Path, default=ROOT / ".bench")
    args = parser.parse_args()
    model_dir = args.workdir / "tiny"
    if not (model_dir / "config.json").exists():
        make_tiny_model(model_dir, TinyModelSpec())
    env = {"VLLM_CPU_KVCACHE_SPACE": "1"}
    node = NodeProcess(model_dir, "--engine", "vllm", "--vllm-python", args.vllm_python, "--vllm-args",
                       args.vllm_args, "--max-running", "16", "--max-queued", "64", node_id="bench-vllm",
                       env=env, plaintext=True)
    rows = []
    try:
        print("starting the vLLM node agent (its server takes ~30 s)", flush=True)
        node.start(args.workdir / "logs")
        node.wait_serving(600)
        st = node.status()
        print(f"  {st.model.engine_version}, server {st.engine_server.url}", flush=True)
        agent = NodeClient(node.address)
        direct = DirectClient(st.engine_server.url, model_dir, st.model.model_id)
        systems = {"node": lambda chats: agent.run(chats, args.max_tokens),
                   "direct": lambda chats: direct.run(chats, args.max_tokens)}
        for fn in systems.values():
            fn(prompts(2, "warm-"))
        for conc in CONCURRENCY:
            rounds = max(1, 4 // conc)
            rates: dict[str, list[float]] = {k: [] for k in systems}
            for rep in range(args.repeats):
                order = list(systems.items()) if rep % 2 == 0 else list(reversed(systems.items()))
                for name, fn in order:
                    batches = [prompts(conc, f"c{conc}r{rep}b{b}{name}-") for b in range(rounds)]
                    secs, toks = timed(lambda: sum(fn(chats) for chats in batches))
                    rates[name].append(toks / secs)
            med = {k: statistics.median(v) for k, v in rates.items()}
            ratios = [n / d for n, d in zip(rates["node"], rates["direct"])]
            rows.append((conc, med["direct"], med["node"], statistics.median(ratios), min(ratios), max(ratios)))
            print(f"  c={conc}: direct {med['direct']:.0f} tok/s, node {med['node']:.0f} tok/s, "
                  f"per-repeat ratios {' '.join(f'{r:.2f}' for r in ratios)}", flush=True)
        agent.close()
        direct.close()
    finally:
        node.stop()
    print()
    print("| streams | straight to vLLM (tok/s) | through the node agent (tok/s) | node / direct (median of repeats) "
          "| range |")
    print("|---:|---:|---:|---:|---:|")
    for conc, d, n, ratio, lo, hi in rows:
        print(f"| {conc} | {d:.0f} | {n:.0f} | {ratio:.2f}x | {lo:.2f}-{hi:.2f} |")
    print(f"(aggregate output tokens/s, greedy, {args.max_tokens} tokens per request, {args.repeats} repeats "
          "interleaved; the same vLLM server serves both)")
    print("\ngoal: node >= 0.95x direct at 1 and 16 streams")
    return 0


if __name__ == "__main__":
    sys.exit(main())
