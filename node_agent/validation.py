"""Check a GenerateRequest before it is accepted; every message says what to change.

Messages never quote prompt or completion text (PHI): they name the field and the
allowed range only.
"""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass
from typing import Optional

from cluster.api import inference_pb2
from node_agent.sampling import SamplingSpec, draw_seed

ROLES = ("system", "user", "assistant")
MAX_REQUEST_ID_LEN = 128
MAX_STOP_LEN = 64
MAX_CHARS_PER_TOKEN = 16  # generous: English averages ~4 characters per token


class InvalidRequest(ValueError):
    """The request cannot be served as sent (gRPC INVALID_ARGUMENT)."""


@dataclass(frozen=True)
class Limits:
    max_tokens: int
    context_length: int
    vocab_size: int
    max_stop_sequences: int


@dataclass(frozen=True)
class ValidRequest:
    request_id: str
    messages: Optional[tuple[tuple[str, str], ...]]
    prompt: Optional[str]
    sampling: SamplingSpec
    seed_given: bool
    max_tokens: int
    stop: tuple[str, ...]
    prefix_token_ids: tuple[int, ...]
    require_weights_digest: str


def new_request_id() -> str:
    return f"req-{uuid.uuid4().hex[:16]}"


def _valid_id(raw: str) -> bool:
    return len(raw) <= MAX_REQUEST_ID_LEN and raw.isascii() and raw.isprintable()


def display_id(raw: str) -> str:
    """A caller-supplied id as it may appear in logs and messages (never free text)."""
    if not raw:
        return "(no id)"
    return raw if _valid_id(raw) else "(invalid id)"


def _request_id(raw: str) -> str:
    if not raw:
        return new_request_id()
    if not _valid_id(raw):
        raise InvalidRequest(
            f"request_id must be at most {MAX_REQUEST_ID_LEN} printable ASCII characters"
        )
    return raw


def _finite(name: str, value: float) -> float:
    if not math.isfinite(value):
        raise InvalidRequest(f"{name} must be a finite number")
    return value


def _sampling(msg: inference_pb2.SamplingParams) -> tuple[SamplingSpec, bool]:
    temperature = _finite("temperature", msg.temperature) if msg.HasField("temperature") else 0.0
    if temperature < 0:
        raise InvalidRequest(f"temperature must be >= 0 (0 is greedy); got {temperature:g}")
    top_p = _finite("top_p", msg.top_p) if msg.HasField("top_p") else 1.0
    if not 0.0 < top_p <= 1.0:
        raise InvalidRequest(f"top_p must be in (0, 1]; got {top_p:g}")
    top_k = msg.top_k if msg.HasField("top_k") else 0
    if top_k < 0:
        raise InvalidRequest(f"top_k must be >= 0 (0 disables it); got {top_k}")
    min_p = _finite("min_p", msg.min_p) if msg.HasField("min_p") else 0.0
    if not 0.0 <= min_p <= 1.0:
        raise InvalidRequest(f"min_p must be in [0, 1]; got {min_p:g}")
    penalty = (
        _finite("repetition_penalty", msg.repetition_penalty)
        if msg.HasField("repetition_penalty")
        else 1.0
    )
    if penalty <= 0:
        raise InvalidRequest(f"repetition_penalty must be > 0 (1 disables it); got {penalty:g}")
    seed_given = msg.HasField("seed")
    seed = msg.seed if seed_given else draw_seed()
    spec = SamplingSpec(temperature, top_p, top_k, min_p, penalty, seed & ((1 << 63) - 1))
    return spec, seed_given


def _messages(chat: inference_pb2.ChatInput) -> tuple[tuple[str, str], ...]:
    if not chat.messages:
        raise InvalidRequest("chat.messages is empty; send at least one user message")
    out = []
    for i, m in enumerate(chat.messages):
        if m.role not in ROLES:
            # The role is not echoed: a caller may have put a name or other text there.
            raise InvalidRequest(
                f"chat.messages[{i}].role is not one of {', '.join(ROLES)}"
            )
        out.append((m.role, m.content))
    if not any(content.strip() for _, content in out):
        raise InvalidRequest("every chat message is empty; the prompt has no content")
    return tuple(out)


def validate(request: inference_pb2.GenerateRequest, limits: Limits) -> ValidRequest:
    """Field checks that need no tokenizer; raises InvalidRequest."""
    request_id = _request_id(request.request_id)
    kind = request.WhichOneof("input")
    messages = prompt = None
    if kind == "chat":
        messages = _messages(request.chat)
    elif kind == "prompt":
        if not request.prompt.strip():
            raise InvalidRequest("prompt is empty; send text or chat messages")
        prompt = request.prompt
    else:
        raise InvalidRequest("no input: set either chat (messages) or prompt")
    # Refuse text that cannot fit before spending event-loop time tokenizing it.
    chars = len(prompt) if prompt is not None else sum(len(c) for _, c in messages)
    if chars > limits.context_length * MAX_CHARS_PER_TOKEN:
        raise InvalidRequest(
            f"prompt is {chars} characters, far beyond this node's context of "
            f"{limits.context_length} tokens; shorten the prompt")

    if not 1 <= request.max_tokens <= limits.max_tokens:
        raise InvalidRequest(
            f"max_tokens must be between 1 and {limits.max_tokens} on this node; "
            f"got {request.max_tokens}"
        )
    if len(request.stop) > limits.max_stop_sequences:
        raise InvalidRequest(
            f"at most {limits.max_stop_sequences} stop sequences are allowed; got {len(request.stop)}"
        )
    for i, s in enumerate(request.stop):
        if not s or len(s) > MAX_STOP_LEN:
            raise InvalidRequest(f"stop[{i}] must be 1 to {MAX_STOP_LEN} characters")
    bad = next((t for t in request.prefix_token_ids if t >= limits.vocab_size), None)
    if bad is not None:
        raise InvalidRequest(
            f"prefix_token_ids contains id {bad}, outside this model's vocabulary "
            f"(0..{limits.vocab_size - 1}); resume only on a node serving the same weights"
        )
    sampling, seed_given = _sampling(request.sampling)
    return ValidRequest(
        request_id=request_id,
        messages=messages,
        prompt=prompt,
        sampling=sampling,
        seed_given=seed_given,
        max_tokens=request.max_tokens,
        stop=tuple(request.stop),
        prefix_token_ids=tuple(request.prefix_token_ids),
        require_weights_digest=request.require_weights_digest,
    )


def check_length(prompt_tokens: int, prefix_tokens: int, max_tokens: int, limits: Limits) -> None:
    """Prompt + prefix + max_tokens must fit the context; raises InvalidRequest."""
    used = prompt_tokens + prefix_tokens
    if used >= limits.context_length:
        raise InvalidRequest(
            f"prompt is {prompt_tokens} tokens (+{prefix_tokens} prefix), longer than this "
            f"node's context of {limits.context_length} tokens; shorten the prompt"
        )
    if used + max_tokens > limits.context_length:
        raise InvalidRequest(
            f"prompt ({used} tokens) + max_tokens ({max_tokens}) exceeds the context of "
            f"{limits.context_length} tokens; set max_tokens <= {limits.context_length - used}"
        )
