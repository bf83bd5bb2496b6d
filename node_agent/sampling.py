"""Per-request samplers whose randomness depends only on (seed, step).

mlx-lm's default samplers draw from MLX's global random state, so a request's tokens
would depend on what else is in the batch. Here step i of a request always uses the key
derived from (seed, i): the same request with the same seed gives the same tokens in
any batch, and a resumed request (prefix of k tokens) continues at step k.
"""

from __future__ import annotations

import hashlib
import secrets
from typing import Callable, Optional

import mlx.core as mx
from mlx_lm.sample_utils import (
    apply_min_p,
    apply_top_k,
    apply_top_p,
    greedy_sampler,
    make_logits_processors,
)

from cluster.validation import Sampling

SamplingSpec = Sampling  # the node's requests always carry a seed (drawn if the caller sent none)


def draw_seed() -> int:
    return secrets.randbits(63)


def step_key(seed: int, step: int) -> mx.array:
    digest = hashlib.blake2b(f"{seed}:{step}".encode(), digest_size=8).digest()
    return mx.random.key(int.from_bytes(digest, "little") >> 1)


def make_sampler(spec: SamplingSpec, *, start_step: int = 0) -> Callable[[mx.array], mx.array]:
    """A sampler for one request; greedy requests share mlx-lm's batched argmax."""
    if spec.greedy:
        return greedy_sampler
    step = start_step
    inv_temp = 1.0 / spec.temperature

    def sample(logprobs: mx.array) -> mx.array:
        nonlocal step
        if 0.0 < spec.top_p < 1.0:
            logprobs = apply_top_p(logprobs, spec.top_p)
        if spec.min_p > 0.0:
            logprobs = apply_min_p(logprobs, spec.min_p)
        if 0 < spec.top_k < logprobs.shape[-1]:
            logprobs = apply_top_k(logprobs, spec.top_k)
        token = mx.random.categorical(logprobs * inv_temp, key=step_key(spec.seed, step))
        step += 1
        return token

    return sample


def make_processors(spec: SamplingSpec) -> Optional[list]:
    if spec.repetition_penalty == 1.0:
        return None
    return make_logits_processors(repetition_penalty=spec.repetition_penalty)
