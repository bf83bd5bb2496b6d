"""Throughput and time to first token through an upstream node vs straight to the same
vLLM server (issue 25; goal: >= 0.95x at 1 and 16 streams).

One invocation starts a vLLM OpenAI server (CPU build, with --api-key, as a remote
endpoint would run) and one `fleet-node --engine upstream --upstream-kind vllm` in front
of it, then measures, interleaved per repeat so machine noise hits both alike:
  - upstream: gRPC Generate to the upstream node (chat template and tokens by the agent,
              a token-id streaming completion to the endpoint with the bearer key);
  - direct:   a streaming /v1/completions call straight to that server, with the same
              prompt token ids, greedy settings and key, as an app without StudioFleet would.
at 1 and 16 concurrent streams: aggregate output tokens/s, TTFT p50 (from sending the
request to its first token, as each client saw it), and the upstream node agent's own CPU
time per token it relayed (psutil, over its rounds only), which machine noise does not
move. The endpoint runs on CPUs of its own (the upper half; `--endpoint-cpus shared` puts
everything on every CPU), as a remote endpoint has its own hardware. Needs vLLM
(scripts/bootstrap-vllm).
The overflow controller's reaction time is measured by bench/upstream_overflow.py.

    .venv/bin/python bench/upstream.py                  # ~3 min on 2 cores
    .venv/bin/python bench/upstream.py --repeats 3 --max-tokens 128
    .venv/bin/python bench/upstream.py --endpoint-cpus shared
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")

import psutil  # noqa: E402

from bench.node_throughput import NodeClient  # noqa: E402
from bench.vllm_node import DirectClient, full_length_prompts, node_one  # noqa: E402
from cluster.localfleet import NodeProcess  # noqa: E402
from cluster.tinymodel import TinyModelSpec, make_tiny_model  # noqa: E402
from node_agent.engines.vllm_server import CHILD_ENV, VllmServer, free_port  # noqa: E402

CONCURRENCY = (1, 16)
SERVED = "bench-remote"
KEY = "sk-synthetic-bench-key"  # synthetic: the endpoint is on loopback


class KeyedDirect(DirectClient):
    """DirectClient with the endpoint's bearer key on every call."""

    def _open(self, aiohttp):  # called by DirectClient.__init__ on its loop
        return self._session(aiohttp)

    async def _session(self, aiohttp):
        return aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, force_close=True),
            headers={"Authorization": f"Bearer {KEY}"},
        )


def split_cpus(spec: str) -> tuple[set[int], set[int]]:
    """(the endpoint's CPUs, the agent's and the callers'): `shared` puts everything on every
    CPU; `auto` gives the endpoint the upper half (a remote endpoint has cores of its own);
    a list such as `1` or `2,3` names the endpoint's."""
    allowed = sorted(os.sched_getaffinity(0))
    if spec == "shared" or len(allowed) < 2:
        return set(allowed), set(allowed)
    if spec == "auto":
        endpoint = set(allowed[len(allowed) // 2 :])
    else:
        endpoint = {int(c) for c in spec.split(",")}
        if not endpoint < set(allowed):
            raise SystemExit(f"--endpoint-cpus {spec}: not a proper subset of CPUs {allowed}")
    return endpoint, set(allowed) - endpoint


def start_endpoint(
    args, model_dir: Path, workdir: Path, cpus: set[int]
) -> tuple[subprocess.Popen, str]:
    """The vLLM server as a remote endpoint would run it (a key; plain http on loopback), on
    `cpus` (its OpenMP threads bound to them)."""
    server = VllmServer(
        python=args.vllm_python,
        state_dir=workdir,
        extra_args=[*args.vllm_args.split(), "--api-key", KEY],
    )
    server.port = free_port()
    cmd = server.command(model_dir, SERVED, max_model_len=2048, max_num_seqs=16)
    log = open(workdir / "endpoint.log", "wb")
    proc = subprocess.Popen(
        cmd,
        stdout=log,
        stderr=log,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
        env={
            **os.environ,
            **CHILD_ENV,
            "VLLM_CPU_KVCACHE_SPACE": "1",
            "VLLM_CPU_OMP_THREADS_BIND": ",".join(map(str, sorted(cpus))),
        },
        preexec_fn=lambda: os.sched_setaffinity(0, cpus),
    )
    url = f"http://127.0.0.1:{server.port}"
    deadline = time.monotonic() + 600
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"the vLLM server exited; see {workdir / 'endpoint.log'}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return proc, url
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError("the vLLM server did not answer /health in 600 s")
        time.sleep(0.5)


async def timed_round(one, chats) -> tuple[int, float, list[float]]:
    """All `chats` at once: (completion tokens, seconds until the last stream ended, each
    stream's time to first token in seconds)."""
    start = time.perf_counter()
    results = await asyncio.gather(*(one(i, chat) for i, chat in enumerate(chats)))
    ttft = [first - start for _, first, _ in results]
    return sum(n for n, _, _ in results), time.perf_counter() - start, ttft


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--vllm-python", default=str(ROOT / ".venv-vllm" / "bin" / "python"))
    parser.add_argument(
        "--vllm-args", default="--dtype float32 --enforce-eager --no-enable-prefix-caching"
    )
    parser.add_argument("--workdir", type=Path, default=ROOT / ".bench" / "upstream")
    parser.add_argument(
        "--endpoint-cpus",
        default="auto",
        help="the endpoint's CPUs: auto (the upper half; the agent and the callers get the rest, "
        "as a remote endpoint has cores of its own), shared (everything on every CPU), or a "
        "list such as 1 or 2,3",
    )
    args = parser.parse_args()
    endpoint_cpus, caller_cpus = split_cpus(args.endpoint_cpus)
    args.workdir.mkdir(parents=True, exist_ok=True)
    model_dir = args.workdir / "tiny"
    if not (model_dir / "config.json").exists():
        make_tiny_model(model_dir, TinyModelSpec())
    key_file = args.workdir / "key"
    key_file.write_text(KEY + "\n")
    print("starting the vLLM endpoint (~30 s)", flush=True)
    endpoint, url = start_endpoint(args, model_dir, args.workdir, endpoint_cpus)
    os.sched_setaffinity(0, caller_cpus)  # this process and the node agent it starts
    print(
        f"CPUs: endpoint {sorted(endpoint_cpus)}, node agent and callers {sorted(caller_cpus)}",
        flush=True,
    )
    node = NodeProcess(
        model_dir,
        *("--engine", "upstream", "--upstream-kind", "vllm", "--phi-allowed"),
        *("--upstream-url", url, "--upstream-model", SERVED, "--upstream-key-file", str(key_file)),
        *("--max-running", "16", "--max-queued", "64"),
        node_id="bench-upstream",
        plaintext=True,
    )
    rows = []
    try:
        node.start(args.workdir / "logs")
        node.wait_serving(120)
        print(f"  {node.status().model.engine_version}", flush=True)
        agent = NodeClient(node.address)
        direct = KeyedDirect(url, model_dir, SERVED)
        systems = {
            "upstream": (agent.loop, lambda i, chat: node_one(agent, i, chat, args.max_tokens)),
            "direct": (direct.loop, lambda i, chat: direct._one(chat, args.max_tokens)),
        }
        pool = full_length_prompts(direct, 16 * 2, args.max_tokens)
        for loop, one in systems.values():  # warm both paths
            loop.run_until_complete(timed_round(one, pool[:2]))
        agent_proc = psutil.Process(node.proc.pid)
        for conc in CONCURRENCY:
            work: dict[str, list] = {k: [] for k in systems}
            cpu_s = 0.0  # the upstream node agent's CPU time over its own rounds
            for rep in range(args.repeats):
                chats = [pool[(rep * conc + k) % len(pool)] for k in range(conc)]
                order = list(systems.items()) if rep % 2 == 0 else list(reversed(systems.items()))
                for name, (loop, one) in order:  # the same prompts for both, in turn
                    before = sum(agent_proc.cpu_times()[:2])
                    work[name].append(loop.run_until_complete(timed_round(one, chats)))
                    if name == "upstream":
                        cpu_s += sum(agent_proc.cpu_times()[:2]) - before
            rate = {k: sum(r[0] for r in v) / sum(r[1] for r in v) for k, v in work.items()}
            ttft = {
                k: statistics.median(t for r in v for t in r[2]) * 1000 for k, v in work.items()
            }
            per_round = [
                u[0] / u[1] / (d[0] / d[1]) for u, d in zip(work["upstream"], work["direct"])
            ]
            us_per_token = cpu_s / sum(r[0] for r in work["upstream"]) * 1e6
            rows.append((conc, rate, ttft, min(per_round), max(per_round), us_per_token))
            print(
                f"  c={conc}: direct {rate['direct']:.0f} tok/s, upstream node "
                f"{rate['upstream']:.0f} tok/s; TTFT p50 {ttft['direct']:.1f} vs "
                f"{ttft['upstream']:.1f} ms; agent CPU {us_per_token:.0f} us/token",
                flush=True,
            )
        agent.close()
        direct.close()
    finally:
        node.stop()
        os.killpg(endpoint.pid, signal.SIGTERM)
        try:
            endpoint.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(endpoint.pid, signal.SIGKILL)
            endpoint.wait()
    print()
    print(
        "| streams | direct tok/s | upstream node tok/s | throughput ratio | per-round range "
        "| direct TTFT p50 | upstream TTFT p50 | TTFT ratio (direct / upstream) "
        "| agent CPU per token |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for conc, rate, ttft, lo, hi, us in rows:
        print(
            f"| {conc} | {rate['direct']:.0f} | {rate['upstream']:.0f} | "
            f"{rate['upstream'] / rate['direct']:.2f}x | {lo:.2f}-{hi:.2f} | "
            f"{ttft['direct']:.1f} ms | {ttft['upstream']:.1f} ms | "
            f"{ttft['direct'] / ttft['upstream']:.2f}x | {us:.0f} us |"
        )
    print(
        f"({args.repeats} rounds per concurrency, interleaved, the same prompts for both; greedy, "
        f"{args.max_tokens} tokens per request, prompts screened to run them all; one vLLM server "
        "serves both)"
    )
    print("\ngoal: upstream node >= 0.95x direct (throughput, and TTFT as direct / upstream)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
