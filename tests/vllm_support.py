"""A real vLLM (CPU build, in its own virtualenv) behind real node agents.

scripts/test installs it (scripts/bootstrap-vllm) and sets STUDIOFLEET_REQUIRE_VLLM=1, so
CI fails rather than skips when it is missing; a bare `pytest` without it skips these.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[1]
# vLLM's CPU backend: a 1 GiB KV cache; eager mode starts in ~25 s instead of ~60 s
# (no torch.compile), float32 like the generated model.
VLLM_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1"}
VLLM_ARGS = "--dtype float32 --enforce-eager"
START_TIMEOUT_S = 300.0


def find_vllm_python() -> str:
    path = os.environ.get("STUDIOFLEET_TEST_VLLM_PYTHON") or str(ROOT / ".venv-vllm" / "bin" / "python")
    probe = "import importlib.util, sys; sys.exit(importlib.util.find_spec('vllm') is None)"
    ok = Path(path).exists() and subprocess.run([path, "-c", probe], capture_output=True).returncode == 0
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
