"""Field checks on a GenerateRequest that every role shares (node and coordinator).

Messages never quote anything the caller sent (PHI may be anywhere, names and keys
included): they name the field and the allowed range only. Every string field has a length
cap (FIELD_CAPS), and any exception while checking is an InvalidRequest, never a crash.
Limits that depend on a model (context, vocabulary) stay on the node. InvalidRequest and
`guarded` live in cluster.invalid_request (imported from here too), so the quality checks
this module calls (cluster.quality.notes, prompts) need not import it back.
"""

from __future__ import annotations

import math
import re
import uuid
from dataclasses import dataclass
from typing import Optional

from cluster.api import inference_pb2
from cluster.invalid_request import InvalidRequest, guarded
from cluster.quality import notes, prompts

ROLES = ("system", "user", "assistant")
MAX_REQUEST_ID_LEN = 128
MAX_STOP_LEN = 64


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
    ignore_eos: bool = (
        False  # generate to max_tokens past end-of-sequence (stop strings still apply)
    )

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
MAX_TEXT_CHARS = 1 << 20  # a prompt, or all chat message contents together
MAX_MESSAGES = 1024
MAX_NAME_LEN = 64  # template name and version, variable keys, note template
MAX_VARIABLES = 16
MAX_DIGEST_LEN = 200  # sha256:<64 hex>, or remote:<host[:port]>/<model> (upstream nodes)
MAX_SESSION_KEY_LEN = 256
# A weights digest, or an openai-kind upstream node's remote:<host[:port]>/<model>
# (docs/upstream.md): a request may be pinned to either.
_DIGEST_RE = re.compile(r"^(sha256:[0-9a-f]{64}|remote:[A-Za-z0-9.:\[\]-]+/[\x21-\x7e]+)$")


def _cap(name: str, value: str, cap: int) -> None:
    if len(value) > cap:  # the field and the cap, never the value
        raise InvalidRequest(f"{name} is longer than its limit of {cap} characters")


def check_sizes(request: inference_pb2.GenerateRequest) -> None:
    """A length cap on every string field (and on counts of repeated ones), before any
    other check reads them: no caller string of unbounded size is kept, logged or stored."""
    _cap("request_id", request.request_id, MAX_REQUEST_ID_LEN)
    _cap("model", request.model, MAX_MODEL_ID_LEN)
    _cap("require_weights_digest", request.require_weights_digest, MAX_DIGEST_LEN)
    if request.require_weights_digest and not _DIGEST_RE.match(request.require_weights_digest):
        raise InvalidRequest(
            "require_weights_digest must be sha256: and 64 lowercase hex digits (or an "
            "upstream node's remote:HOST/MODEL), as `fleetctl nodes` shows the digests served"
        )
    _cap("session_key", request.session_key, MAX_SESSION_KEY_LEN)
    kind = request.WhichOneof("input")
    if kind == "prompt":
        _cap("prompt", request.prompt, MAX_TEXT_CHARS)
    elif kind == "chat":
        messages = request.chat.messages
        if len(messages) > MAX_MESSAGES:
            raise InvalidRequest(f"chat.messages has more than {MAX_MESSAGES} messages")
        for i, m in enumerate(messages):
            _cap(f"chat.messages[{i}].role", m.role, MAX_NAME_LEN)
        if sum(len(m.content) for m in messages) > MAX_TEXT_CHARS:
            raise InvalidRequest(
                f"chat.messages' contents are longer than their limit of {MAX_TEXT_CHARS} "
                "characters together"
            )
    elif kind == "template":
        t = request.template
        _cap("template.name", t.name, MAX_NAME_LEN)
        _cap("template.version", t.version, MAX_NAME_LEN)
        if len(t.variables) > MAX_VARIABLES:
            raise InvalidRequest(f"template.variables has more than {MAX_VARIABLES} entries")
        for i, (key, value) in enumerate(sorted(t.variables.items())):
            _cap(f"template.variables key #{i + 1}", key, MAX_NAME_LEN)
            _cap(f"template.variables value #{i + 1}", value, prompts.MAX_VARIABLE_CHARS)
    if request.HasField("output_format"):
        fmt = request.output_format
        _cap("output_format.note_template", fmt.note_template, MAX_NAME_LEN)
        if len(fmt.json_schema.encode()) > notes.MAX_SCHEMA_BYTES:
            raise InvalidRequest(
                f"output_format.json_schema is larger than {notes.MAX_SCHEMA_BYTES // 1024} KiB"
            )
    for i, s in enumerate(request.stop[:1024]):
        _cap(f"stop[{i}]", s, MAX_STOP_LEN)


def check_request_id(raw: str) -> str:
    """The caller's id, or a new one if empty."""
    if not raw:
        return new_request_id()
    if not valid_id(raw):
        raise InvalidRequest(
            f"request_id must be 1-{MAX_REQUEST_ID_LEN} characters from A-Z a-z 0-9 . _ : @ / + -"
        )
    return raw


def serves(model_id: str, version: str, wanted: str) -> bool:
    """Whether a node serving `model_id` at `version` answers for `wanted`: "" (any), a model
    id (any version: what a rollout keeps), or ID@VERSION (an app pinned to one version)."""
    if not wanted:
        return True
    want_id, pinned, want_version = wanted.partition("@")
    return model_id == want_id and (not pinned or version == want_version)


def check_model(model: str) -> None:
    """GenerateRequest.model: empty, a model id as nodes report it, or ID@VERSION (pinned)."""
    if len(model) > MAX_MODEL_ID_LEN or not model.isprintable():
        raise InvalidRequest(
            f"model must be a model id of at most {MAX_MODEL_ID_LEN} printable characters "
            "(`fleetctl nodes` shows the ids served)"
        )


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
    penalty = (
        _finite("repetition_penalty", msg.repetition_penalty)
        if msg.HasField("repetition_penalty")
        else 1.0
    )
    if penalty <= 0:
        raise InvalidRequest(f"repetition_penalty must be > 0 (1 disables it); got {penalty:g}")
    return Sampling(
        temperature,
        top_p,
        top_k,
        min_p,
        penalty,
        msg.seed if msg.HasField("seed") else None,
        msg.ignore_eos,
    )


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


@guarded
def check_input(
    request: inference_pb2.GenerateRequest,
) -> tuple[Optional[tuple[tuple[str, str], ...]], Optional[str]]:
    """(messages, prompt): exactly one is set."""
    kind = request.WhichOneof("input")
    if kind == "chat":
        return _messages(request.chat), None
    if kind == "prompt":
        if not request.prompt.strip():
            raise InvalidRequest("prompt is empty; send text or chat messages")
        return None, request.prompt
    if kind == "template":
        t = request.template
        prompts.check(t.name, t.version, dict(t.variables))
        return None, None
    raise InvalidRequest("no input: set chat (messages), prompt, or template")


@guarded
def check_output_format(request: inference_pb2.GenerateRequest):
    """The request's output format as an OutputSpec (None if unset); raises InvalidRequest
    for an unknown note template or a schema that is invalid or cannot be enforced.
    Blocking (a new schema compiles for up to ~0.5 s): on an event loop, use
    check_output_format_async."""
    return notes.resolve(request.output_format) if request.HasField("output_format") else None


async def check_output_format_async(request: inference_pb2.GenerateRequest):
    """check_output_format with a schema compiled off the event loop, within a time limit."""
    if not request.HasField("output_format"):
        return None
    try:
        return await notes.resolve_async(request.output_format)
    except InvalidRequest:
        raise
    except Exception as exc:  # noqa: BLE001 - as guarded: e.g. the schema worker died on this schema
        raise InvalidRequest(
            f"output_format could not be checked ({type(exc).__name__}); simplify the schema"
        ) from None


@guarded
def check_request(
    request: inference_pb2.GenerateRequest, *, max_tokens: int, max_stop_sequences: int, where: str
) -> None:
    """Every check both roles share except the output format's (check_output_format_async)."""
    check_sizes(request)
    check_request_id(request.request_id)
    check_model(request.model)
    check_input(request)
    check_counts(request, max_tokens=max_tokens, max_stop_sequences=max_stop_sequences, where=where)
    check_sampling(request.sampling)
    if request.sampling.ignore_eos and request.HasField("output_format"):
        raise InvalidRequest(
            "sampling.ignore_eos cannot be combined with output_format: a note must end where its "
            "schema ends"
        )


def template_budget(request: inference_pb2.GenerateRequest, limit: int) -> int:
    """max_tokens for a template request that left it at 0: the largest budget of the
    template's versions, within `limit` (the node then keeps it within its context)."""
    return min(limit, prompts.budget(request.template.name))


def check_counts(
    request: inference_pb2.GenerateRequest, *, max_tokens: int, max_stop_sequences: int, where: str
) -> None:
    """max_tokens, stop sequences and the resume fields; `where` names the server's scope."""
    if request.max_tokens == 0 and request.WhichOneof("input") == "template":
        pass  # the template's budget (template_budget)
    elif not 1 <= request.max_tokens <= max_tokens:
        raise InvalidRequest(
            f"max_tokens must be between 1 and {max_tokens} on {where}; got {request.max_tokens}"
        )
    if len(request.stop) > max_stop_sequences:
        raise InvalidRequest(
            f"at most {max_stop_sequences} stop sequences are allowed; got {len(request.stop)}"
        )
    for i, s in enumerate(request.stop):
        if not s or len(s) > MAX_STOP_LEN:
            raise InvalidRequest(f"stop[{i}] must be 1 to {MAX_STOP_LEN} characters")
    if request.HasField("prefix_text_chars") and not request.prefix_token_ids:
        raise InvalidRequest(
            "prefix_text_chars is set without prefix_token_ids; set both or neither"
        )
