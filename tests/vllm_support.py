"""A real vLLM (CPU build, in its own virtualenv) behind real node agents.

scripts/test installs it (scripts/bootstrap-vllm) and sets STUDIOFLEET_REQUIRE_VLLM=1, so
CI fails rather than skips when it is missing; a bare `pytest` without it skips these.
"""

from __future__ import annotations

import os
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[1]
# vLLM's CPU backend: a 1 GiB KV cache; eager mode starts in ~25 s instead of ~60 s
# (no torch.compile), float32 like the generated model. Without prefix caching a repeated
# greedy request takes the same numeric path, so it repeats its tokens exactly (a cached
# prefix is computed another way and may tip a near-tie: another continuation).
VLLM_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1"}
VLLM_ARGS = "--dtype float32 --enforce-eager --no-enable-prefix-caching"
LONG_PROMPTS = (
    "Long note:",
    "Plan:",
    "Assessment and plan:",
    "History:",
    "Summary of care:",
    "Note:",
)


_LONG: dict = {}


def long_prompt(node, tokens: int = 400) -> str:
    """A prompt whose greedy completion on `node` runs `tokens` without end-of-sequence, for
    tests that need a stream still running when they act (cancel, kill, sample status)."""
    from cluster.api import inference_pb2
    from cluster.client import build_request

    if (node.address, tokens) in _LONG:
        return _LONG[node.address, tokens]
    for i, prompt in enumerate(LONG_PROMPTS):
        final = None
        for chunk in node.inference.Generate(
            build_request(
                prompt=prompt, max_tokens=tokens, temperature=0.0, request_id=f"probe-long-{i}"
            ),
            timeout=120,
        ):
            final = chunk.final if chunk.HasField("final") else final
        if final is not None and final.finish_reason == inference_pb2.FINISH_REASON_LENGTH:
            _LONG[node.address, tokens] = prompt
            return prompt
    raise AssertionError(f"none of {LONG_PROMPTS} runs {tokens} greedy tokens on {node.node_id}")


START_TIMEOUT_S = 300.0


def find_vllm_python() -> str:
    path = os.environ.get("STUDIOFLEET_TEST_VLLM_PYTHON") or str(
        ROOT / ".venv-vllm" / "bin" / "python"
    )
    from node_agent.engines.vllm_server import has_vllm

    ok = Path(path).exists() and has_vllm(path)
    if not ok:
        why = f"no vLLM at {path}: run scripts/bootstrap-vllm (scripts/test does)"
        if os.environ.get("STUDIOFLEET_REQUIRE_VLLM") == "1":
            pytest.fail(why)
        pytest.skip(why)
    return path


def vllm_node_args(python: str, *extra: str) -> tuple[str, ...]:
    return ("--engine", "vllm", "--vllm-python", python, "--vllm-args", VLLM_ARGS, *extra)


def group_alive(pgid: int) -> list[int]:
    """Pids still in process group `pgid` (a vLLM server's api server, engine core, workers)."""
    alive = []
    for p in psutil.process_iter():
        try:
            if os.getpgid(p.pid) == pgid and p.status() != psutil.STATUS_ZOMBIE:
                alive.append(p.pid)
        except (OSError, psutil.Error):
            continue
    return alive
