"""Field checks on a GenerateRequest that every role shares (node and coordinator).

Messages never quote prompt or completion text (PHI): they name the field and the
allowed range only. Limits that depend on a model (context, vocabulary) stay on the node.
"""

from __future__ import annotations

import math
import re
import uuid
from dataclasses import dataclass
from typing import Optional

from cluster.api import inference_pb2

ROLES = ("system", "user", "assistant")
MAX_REQUEST_ID_LEN = 128
MAX_STOP_LEN = 64


class InvalidRequest(ValueError):
    """The request cannot be served as sent (gRPC INVALID_ARGUMENT)."""


@dataclass(frozen=True)
class Sampling:
    """Checked sampling settings; `seed` is None when the caller left it to the server
    (a node then draws one: its requests always carry a seed)."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: Optional[int] = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def new_request_id() -> str:
    return f"req-{uuid.uuid4().hex[:16]}"


_ID_RE = re.compile(r"^[A-Za-z0-9._:@/+-]+$")


def valid_id(raw: str) -> bool:
    """Letters, digits and . _ : @ / + - only: an id lands in key=value log lines, where a
    space or '=' could forge fields."""
    return len(raw) <= MAX_REQUEST_ID_LEN and bool(_ID_RE.match(raw))


def display_id(raw: str) -> str:
    """A caller-supplied id as it may appear in logs and messages (never free text)."""
    if not raw:
        return "(no id)"
    return raw if valid_id(raw) else "(invalid id)"


MAX_MODEL_ID_LEN = 256


def check_request_id(raw: str) -> str:
    """The caller's id, or a new one if empty."""
    if not raw:
        return new_request_id()
    if not valid_id(raw):
        raise InvalidRequest(f"request_id must be 1-{MAX_REQUEST_ID_LEN} characters from A-Z a-z 0-9 . _ : @ / + -")
    return raw


def check_model(model: str) -> None:
    """GenerateRequest.model: empty, or a model id as nodes report it."""
    if len(model) > MAX_MODEL_ID_LEN or not model.isprintable():
        raise InvalidRequest(f"model must be a model id of at most {MAX_MODEL_ID_LEN} printable characters "
                             "(`fleetctl nodes` shows the ids served)")


def _finite(name: str, value: float) -> float:
    if not math.isfinite(value):
        raise InvalidRequest(f"{name} must be a finite number")
    return value


def check_sampling(msg: inference_pb2.SamplingParams) -> Sampling:
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
    penalty = (_finite("repetition_penalty", msg.repetition_penalty)
               if msg.HasField("repetition_penalty") else 1.0)
    if penalty <= 0:
        raise InvalidRequest(f"repetition_penalty must be > 0 (1 disables it); got {penalty:g}")
    return Sampling(temperature, top_p, top_k, min_p, penalty, msg.seed if msg.HasField("seed") else None)


def _messages(chat: inference_pb2.ChatInput) -> tuple[tuple[str, str], ...]:
    if not chat.messages:
        raise InvalidRequest("chat.messages is empty; send at least one user message")
    out = []
    for i, m in enumerate(chat.messages):
        if m.role not in ROLES:
            # The role is not echoed: a caller may have put a name or other text there.
            raise InvalidRequest(f"chat.messages[{i}].role is not one of {', '.join(ROLES)}")
        out.append((m.role, m.content))
    if not any(content.strip() for _, content in out):
        raise InvalidRequest("every chat message is empty; the prompt has no content")
    return tuple(out)


def check_input(request: inference_pb2.GenerateRequest) -> tuple[Optional[tuple[tuple[str, str], ...]], Optional[str]]:
    """(messages, prompt): exactly one is set."""
    kind = request.WhichOneof("input")
    if kind == "chat":
        return _messages(request.chat), None
    if kind == "prompt":
        if not request.prompt.strip():
            raise InvalidRequest("prompt is empty; send text or chat messages")
        return None, request.prompt
    if kind == "template":
        from cluster.quality import prompts

        t = request.template
        prompts.check(t.name, t.version, dict(t.variables))
        return None, None
    raise InvalidRequest("no input: set chat (messages), prompt, or template")


def check_output_format(request: inference_pb2.GenerateRequest):
    """The request's output format as an OutputSpec (None if unset); raises InvalidRequest
    for an unknown note template or a schema that is invalid or cannot be enforced."""
    from cluster.quality import notes

    return notes.resolve(request.output_format) if request.HasField("output_format") else None


def template_budget(request: inference_pb2.GenerateRequest, limit: int) -> int:
    """max_tokens for a template request that left it at 0: the largest budget of the
    template's versions, within `limit` (the node then keeps it within its context)."""
    from cluster.quality import prompts

    return min(limit, prompts.budget(request.template.name))


def check_counts(request: inference_pb2.GenerateRequest, *, max_tokens: int, max_stop_sequences: int,
                 where: str) -> None:
    """max_tokens, stop sequences and the resume fields; `where` names the server's scope."""
    if request.max_tokens == 0 and request.WhichOneof("input") == "template":
        pass  # the template's budget (template_budget)
    elif not 1 <= request.max_tokens <= max_tokens:
        raise InvalidRequest(f"max_tokens must be between 1 and {max_tokens} on {where}; got {request.max_tokens}")
    if len(request.stop) > max_stop_sequences:
        raise InvalidRequest(f"at most {max_stop_sequences} stop sequences are allowed; got {len(request.stop)}")
    for i, s in enumerate(request.stop):
        if not s or len(s) > MAX_STOP_LEN:
            raise InvalidRequest(f"stop[{i}] must be 1 to {MAX_STOP_LEN} characters")
    if request.HasField("prefix_text_chars") and not request.prefix_token_ids:
        raise InvalidRequest("prefix_text_chars is set without prefix_token_ids; set both or neither")
