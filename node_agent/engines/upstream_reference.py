"""The vllm kind's weights check (docs/upstream.md, "Digest and the token check").

Where `--model` holds the weights that the node's digest names, and they fit in this
host's memory, the agent runs them itself (mlx_lm, in a child process so that the
weights leave with it) for the token check's greedy continuation; the endpoint must give
the same ids, or it serves other weights than the digest says. Elsewhere (a control host
with the tokenizer and config only, or weights too large for it) the check says why it
was not made.

    python -m node_agent.engines.upstream_reference MODEL_DIR MAX_TOKENS ID,ID,...
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from pathlib import Path
from typing import Optional

from node_agent.engines.upstream_check import CHECK_TOKENS

log = logging.getLogger(__name__)

# The weights are run only if they take at most this share of the memory available now.
MEMORY_SHARE = 0.25
TIMEOUT_S = 300.0


def weights_bytes(model_dir: Path) -> int:
    return sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))


def plan(model_dir: Path, node_digest: str) -> Optional[str]:
    """None if the reference can run here, else why not (for the log and the docs). The
    size comes first: 40 GB of weights are not hashed to learn that they do not fit."""
    import psutil

    from cluster.digest import weights_digest

    size = weights_bytes(model_dir)
    if not size:
        return f"{model_dir} holds no weights (*.safetensors) to run"
    available = psutil.virtual_memory().available
    if size > MEMORY_SHARE * available:
        return (
            f"the weights in {model_dir} ({size / 2**30:.1f} GiB) exceed "
            f"{MEMORY_SHARE:.0%} of this host's available memory ({available / 2**30:.1f} GiB)"
        )
    local = weights_digest(model_dir)
    if local != node_digest:
        return f"the weights in {model_dir} are {local[:19]}..., not the declared {node_digest[:19]}..."
    return None


async def reference_tokens(model_dir: Path, prompt: list[int], max_tokens: int) -> list[int]:
    """The weights' greedy continuation of `prompt` (EOS ignored), from a child process.
    Raises RuntimeError naming what failed (never model text)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        __name__,
        str(model_dir),
        str(max_tokens),
        ",".join(map(str, prompt)),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), TIMEOUT_S)
    except (TimeoutError, asyncio.CancelledError):
        proc.kill()
        await proc.wait()
        raise
    if proc.returncode != 0:
        last = err.decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"the reference run exited {proc.returncode}: {last[0][:200]}")
    return [int(t) for t in json.loads(out)]


async def weights_reference(
    model_dir: Path, digest: str, prompt: list[int], *, enabled: bool = True
) -> tuple[Optional[list[int]], str]:
    """The weights' own greedy tokens for the token check's `prompt` where they can run here
    (None elsewhere, logged with why), and what the status's engine line says of it."""
    if not enabled:
        log.info("upstream weights check: off (--upstream-weights-check off)")
        return None, ", weights not checked (off)"
    why = await asyncio.to_thread(plan, model_dir, digest)
    if why is None:
        try:
            tokens = await reference_tokens(model_dir, prompt, CHECK_TOKENS)
        except (RuntimeError, OSError, ValueError, TimeoutError) as exc:
            why = f"the reference run failed ({exc})"
    if why is not None:
        log.warning(
            "upstream weights check not made: %s; the endpoint's weights are taken on trust as %s",
            why,
            digest,
        )
        return None, ", weights not checked"
    log.info(
        "upstream weights check: reference of %d greedy tokens from %s", len(tokens), model_dir
    )
    return tokens, ", weights checked"


def _run(model_dir: str, max_tokens: int, prompt: list[int]) -> list[int]:
    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.generate import generate_step

    model, _ = load(model_dir)
    ids: list[int] = []
    for token, _ in generate_step(
        mx.array(prompt), model, max_tokens=max_tokens, sampler=lambda x: mx.argmax(x, axis=-1)
    ):
        ids.append(int(token))
    return ids


if __name__ == "__main__":
    directory, count, tokens = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    print(json.dumps(_run(directory, count, [int(t) for t in tokens.split(",")])))
