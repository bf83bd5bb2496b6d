"""OpenAI's chat completions and completions bodies <-> StudioFleet's GenerateRequest and
chunks (docs/openai-api.md). Pure functions: no I/O, no relay.

What a request may carry is listed field by field. A field StudioFleet honours maps onto
the request; one it accepts and does not use is ignored (never logged: `user` and
`metadata` may name a patient); a feature it does not have must keep its default value, or
the request is refused with 400 naming the field; a field OpenAI does not define is
refused as OpenAI refuses it ("Unrecognized request argument"). Error messages name the
field, never its value: values are the caller's text (the one exception is an unknown
`model`, an identifier, named back as OpenAI does).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any, Optional

import grpc

from cluster.api import inference_pb2
from cluster.quality.notes import NOTE_TEMPLATES

MAX_SEED = (1 << 63) - 1
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}

# Accepted and not used (OpenAI bookkeeping; may identify a person, so never logged).
IGNORED = frozenset(
    {"user", "metadata", "safety_identifier", "parallel_tool_calls", "stream_options"}
)
# Features StudioFleet does not have: accepted only at their default (no effect).
DEFAULTS: dict[str, tuple] = {
    "frequency_penalty": (None, 0, 0.0),
    "presence_penalty": (None, 0, 0.0),
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "logit_bias": (None, {}),
    "tools": (None, []),
    "tool_choice": (None, "none", "auto"),
    "functions": (None, []),
    "function_call": (None, "none"),
    "modalities": (None, ["text"]),
    "audio": (None,),
    "prediction": (None,),
    "store": (None, False),
    "web_search_options": (None,),
    "reasoning_effort": (None,),
    "verbosity": (None,),
}
COMPLETION_DEFAULTS: dict[str, tuple] = {
    "frequency_penalty": (None, 0, 0.0),
    "presence_penalty": (None, 0, 0.0),
    "logprobs": (None, 0),
    "logit_bias": (None, {}),
    "echo": (None, False),
    "best_of": (None, 1),
    "suffix": (None, ""),
}
COMMON = frozenset(
    {
        "model",
        "stream",
        "max_tokens",
        "temperature",
        "top_p",
        "n",
        "seed",
        "stop",
        "service_tier",
        "prompt_cache_key",
        "top_k",
        "min_p",
        "repetition_penalty",
        "ignore_eos",
    }
)
CHAT_FIELDS = (
    COMMON | {"messages", "max_completion_tokens", "response_format"} | IGNORED | set(DEFAULTS)
)
COMPLETION_FIELDS = COMMON | {"prompt"} | IGNORED | set(COMPLETION_DEFAULTS)


class ApiError(Exception):
    """An answer in OpenAI's error format: {"error": {message, type, param, code}}."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type_: str = "invalid_request_error",
        param: Optional[str] = None,
        code: Optional[str] = None,
        headers: Optional[dict] = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status,
            message,
            type_,
            param,
            code,
        )
        self.headers = headers or {}
        self.relayed = False  # set when the relay answered (and so recorded) it

    def body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


def bad(message: str, param: Optional[str] = None, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, param=param, code=code)


# gRPC status of a relayed request -> (HTTP status, OpenAI error type).
HTTP_OF = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.OUT_OF_RANGE: (400, "invalid_request_error"),
    grpc.StatusCode.FAILED_PRECONDITION: (400, "invalid_request_error"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error"),
    grpc.StatusCode.NOT_FOUND: (404, "not_found_error"),
    grpc.StatusCode.ALREADY_EXISTS: (409, "conflict_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.CANCELLED: (499, "cancelled"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable"),
    grpc.StatusCode.ABORTED: (503, "service_unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout"),
}


# HTTP status of a refusal made before the relay -> the gRPC code it is recorded under.
CODE_OF = {400: "INVALID_ARGUMENT", 404: "NOT_FOUND", 413: "INVALID_ARGUMENT", 503: "UNAVAILABLE"}


def from_status(
    code: Optional[grpc.StatusCode], details: str, retry_after_ms: Optional[int] = None
) -> ApiError:
    status, type_ = HTTP_OF.get(code, (500, "server_error"))
    headers = {}
    if status == 429 and retry_after_ms is not None:
        headers = {
            "Retry-After": str(max(1, math.ceil(retry_after_ms / 1000))),
            "retry-after-ms": str(retry_after_ms),
        }
    if (
        status == 409
    ):  # the SDKs retry 409 (a lock timeout for OpenAI); a duplicate request id is not one
        headers = {"x-should-retry": "false"}
    name = getattr(code, "name", "INTERNAL").lower()
    return ApiError(
        status, details or f"the request failed ({name})", type_=type_, code=name, headers=headers
    )


def parse_json(raw: bytes) -> dict:
    try:
        body = json.loads(raw.decode("utf-8"))  # not json's own guess (it would take UTF-16)
        # "\ud800" escapes decode to lone surrogates, which no protobuf string takes.
        json.dumps(body, ensure_ascii=False).encode("utf-8")
    except UnicodeDecodeError:
        raise bad("the request body is not UTF-8 JSON", code="invalid_json") from None
    except UnicodeEncodeError:
        raise bad(
            "the request body holds a lone UTF-16 surrogate escape (\\ud800-\\udfff): "
            "not valid Unicode text",
            code="invalid_json",
        ) from None
    except json.JSONDecodeError as exc:  # its message names a position, never the text
        raise bad(
            f"the request body is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}",
            code="invalid_json",
        ) from None
    except RecursionError:
        raise bad("the request body is nested too deeply", code="invalid_json") from None
    except ValueError:  # e.g. an integer of more than 4300 digits
        raise bad(
            "the request body holds a number too large to read", code="invalid_json"
        ) from None
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object", code="invalid_json")
    return body


@dataclass
class Parsed:
    """A front-door request: what to send the relay, and how to answer."""

    request: inference_pb2.GenerateRequest
    model: str
    stream: bool = False
    include_usage: bool = False
    extras: dict = field(default_factory=dict)


def _number(
    body: dict, name: str, lo: float, hi: float, *, integer: bool = False
) -> Optional[float]:
    value = body.get(name)
    if value is None:
        return None
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not lo <= value <= hi:
        kind = "an integer" if integer else "a number"
        raise bad(f"{name} must be {kind} between {lo:g} and {hi:g}", param=name)
    return value


def _check_fields(body: dict, known: frozenset, defaults: dict) -> None:
    for i, name in enumerate(body):
        if name in known:
            continue
        if name in CHAT_FIELDS | COMPLETION_FIELDS:  # a name from our own list: safe to name
            raise bad(
                f"Unrecognized request argument supplied: {name}",
                param=name,
                code="unknown_parameter",
            )
        # By position: any other name is the caller's text, never echoed.
        raise bad(
            f"Unrecognized request argument supplied (the body's key #{i + 1}); docs/openai-api.md "
            "lists the supported ones",
            code="unknown_parameter",
        )
    for name, allowed in defaults.items():
        if name in body and body[name] not in allowed:
            raise bad(
                f"{name} is not supported by StudioFleet; remove it (or leave it at its default)",
                param=name,
                code="unsupported_parameter",
            )


def _common(
    body: dict,
    req: inference_pb2.GenerateRequest,
    *,
    default_max_tokens: int,
    max_tokens_name: str = "max_tokens",
) -> None:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad("model is required: one of the ids GET /v1/models lists", param="model")
    req.model = model
    if body.get("stream") not in (None, True, False):
        raise bad("stream must be true or false", param="stream")
    if body.get("n") not in (None, 1):
        raise bad(
            "n must be 1: StudioFleet returns one choice per request; send separate requests for more",
            param="n",
            code="unsupported_value",
        )
    max_tokens = _number(body, max_tokens_name, 1, 1 << 31, integer=True)
    if max_tokens is None:  # as a hosted API: as much as the context leaves, within the default
        req.max_tokens, req.fit_context = default_max_tokens, True
    else:
        req.max_tokens = int(max_tokens)
    s = req.sampling
    for name, lo, hi in (
        ("temperature", 0, 2),
        ("top_p", 0, 1),
        ("min_p", 0, 1),
        ("repetition_penalty", 0, 10),
    ):
        value = _number(body, name, lo, hi)
        if value is not None:
            setattr(s, name, float(value))
    top_k = _number(body, "top_k", -1, 1 << 20, integer=True)
    if top_k is not None:
        s.top_k = max(0, int(top_k))  # vLLM's -1 (off) is our 0
    seed = _number(body, "seed", 0, MAX_SEED, integer=True)
    if seed is not None:
        s.seed = int(seed)
    ignore_eos = body.get(
        "ignore_eos"
    )  # vLLM's extension: `vllm bench serve` sends it; generate to max_tokens
    if ignore_eos not in (None, True, False):
        raise bad("ignore_eos must be true or false", param="ignore_eos")
    s.ignore_eos = bool(ignore_eos)
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and (
        not isinstance(stop, list) or not all(isinstance(x, str) for x in stop)
    ):
        raise bad("stop must be a string or a list of strings", param="stop")
    req.stop.extend(stop or [])
    tier = body.get("service_tier")
    if tier not in (None, "auto", "default", "flex"):
        raise bad(
            "service_tier must be auto, default or flex (flex: batch priority)",
            param="service_tier",
        )
    req.priority = (
        inference_pb2.PRIORITY_BATCH if tier == "flex" else inference_pb2.PRIORITY_INTERACTIVE
    )
    key = body.get("prompt_cache_key")
    if key is not None:
        if not isinstance(key, str) or len(key) > 256:
            raise bad(
                "prompt_cache_key must be a string of at most 256 characters",
                param="prompt_cache_key",
            )
        req.session_key = key  # routing affinity (opaque, never logged)


def _stream_options(body: dict) -> bool:
    options = body.get("stream_options")
    if options is None:
        return False
    if not body.get("stream"):
        raise bad("stream_options is only allowed with stream: true", param="stream_options")
    if not isinstance(options, dict) or options.get("include_usage") not in (None, True, False):
        raise bad(
            'stream_options must be an object like {"include_usage": true}', param="stream_options"
        )
    return bool(options.get("include_usage"))


def _text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for i, part in enumerate(content):
            if (
                not isinstance(part, dict)
                or part.get("type") != "text"
                or not isinstance(part.get("text"), str)
            ):
                raise bad(
                    f'{where}[{i}] must be a text part ({{"type": "text", "text": ...}}); '
                    "images, audio and files are not supported",
                    param=where,
                )
            parts.append(part["text"])
        return "".join(parts)
    raise bad(f"{where} must be a string or a list of text parts", param=where)


def _response_format(body: dict, req: inference_pb2.GenerateRequest) -> None:
    fmt = body.get("response_format")
    if fmt is None:
        return
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return
    if kind == "json_object":
        req.output_format.json_schema = '{"type":"object"}'
        return
    if kind != "json_schema":
        raise bad(
            "response_format.type must be text, json_object or json_schema", param="response_format"
        )
    spec = fmt.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("name", ""), str):
        raise bad(
            "response_format.json_schema must be an object with a name and a schema",
            param="response_format.json_schema",
        )
    schema = spec.get("schema")
    if schema is None:  # a note template shipped with StudioFleet, by name
        if spec.get("name") not in NOTE_TEMPLATES:
            raise bad(
                "response_format.json_schema.schema is required (or name one of the note templates: "
                f"{', '.join(NOTE_TEMPLATES)})",
                param="response_format.json_schema.schema",
            )
        req.output_format.note_template = spec["name"]
        return
    if not isinstance(schema, dict):
        raise bad(
            "response_format.json_schema.schema must be a JSON object",
            param="response_format.json_schema.schema",
        )
    req.output_format.json_schema = json.dumps(schema, separators=(",", ":"))


def chat_request(body: dict, *, default_max_tokens: int) -> Parsed:
    _check_fields(body, CHAT_FIELDS, DEFAULTS)
    req = inference_pb2.GenerateRequest()
    if (
        "max_tokens" in body
        and "max_completion_tokens" in body
        and body["max_tokens"] != body["max_completion_tokens"]
    ):
        raise bad("give max_completion_tokens or max_tokens, not both", param="max_tokens")
    name = (
        "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    )
    _common(body, req, default_max_tokens=default_max_tokens, max_tokens_name=name)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("messages must be a non-empty list of {role, content} objects", param="messages")
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad(f"{where} must be an object with role and content", param=where)
        role = ROLES.get(m.get("role"))
        if role is None:
            raise bad(
                f"{where}.role must be system, developer, user or assistant (tools are not supported)",
                param=f"{where}.role",
            )
        if m.get("tool_calls") or m.get("function_call"):
            raise bad(f"{where}: tool calls are not supported", param=where)
        req.chat.messages.add(role=role, content=_text(m.get("content"), f"{where}.content"))
    _response_format(body, req)
    return Parsed(
        req, req.model, stream=bool(body.get("stream")), include_usage=_stream_options(body)
    )


def completion_request(body: dict, *, default_max_tokens: int) -> Parsed:
    _check_fields(body, COMPLETION_FIELDS, COMPLETION_DEFAULTS)
    req = inference_pb2.GenerateRequest()
    _common(body, req, default_max_tokens=default_max_tokens)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise bad(
            "prompt must be one string (token-id prompts and batches of prompts are not supported; "
            "send one request per prompt)",
            param="prompt",
        )
    req.prompt = prompt
    return Parsed(
        req, req.model, stream=bool(body.get("stream")), include_usage=_stream_options(body)
    )


# -- answers ---------------------------------------------------------------------------------

FINISH = {inference_pb2.FINISH_REASON_STOP: "stop", inference_pb2.FINISH_REASON_LENGTH: "length"}


def usage(final: inference_pb2.FinalInfo) -> dict:
    u = final.usage
    out = {
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
    }
    if u.cached_prompt_tokens:
        out["prompt_tokens_details"] = {"cached_tokens": u.cached_prompt_tokens}
    return out


def fingerprint(final: inference_pb2.FinalInfo) -> Optional[str]:
    """The weights served (with `seed`: the same answer again on the same weights): the
    digest's first 16 hex digits; a hosted API's `remote:<host>/<model>` is hashed first."""
    digest = final.model.weights_digest
    if not digest:
        return None
    if not digest.startswith("sha256:"):
        digest = hashlib.sha256(digest.encode()).hexdigest()
    return f"fp_{digest.removeprefix('sha256:')[:16]}"


def extension(final: inference_pb2.FinalInfo) -> dict:
    """StudioFleet's own facts about the answer, beside OpenAI's fields (SDKs keep unknown
    keys: `response.model_extra["studiofleet"]` in the Python SDK). Never content."""
    out: dict = {
        "request_id": final.request_id,
        "nodes": list(final.nodes),
        "failovers": final.failovers,
        "seed": final.seed,
    }
    if final.template:
        out["template"] = final.template
    if final.HasField("structured"):
        st = final.structured
        out["structured"] = {
            "valid": st.valid,
            "format": st.format,
            **({} if st.valid else {"rule": st.rule, "path": st.path, "error": st.error}),
        }
    if final.HasField("quality"):
        out["quality"] = {
            "total": round(final.quality.total, 4),
            "rubric": final.quality.rubric,
            "parts": {p.name: round(p.score, 4) for p in final.quality.parts},
        }
    return out


def _finish(final: Optional[inference_pb2.FinalInfo]) -> Optional[str]:
    return FINISH.get(final.finish_reason, "stop") if final is not None else None


def _answer(
    obj: str, cid: str, created: int, model: str, choice: dict, final: inference_pb2.FinalInfo
) -> dict:
    return {
        "id": cid,
        "object": obj,
        "created": created,
        "model": model,
        "system_fingerprint": fingerprint(final),
        "choices": [{"index": 0, **choice, "logprobs": None, "finish_reason": _finish(final)}],
        "usage": usage(final),
        "studiofleet": extension(final),
    }


def chat_answer(
    cid: str, created: int, model: str, text: str, final: inference_pb2.FinalInfo
) -> dict:
    return _answer(
        "chat.completion",
        cid,
        created,
        model,
        {"message": {"role": "assistant", "content": text, "refusal": None}},
        final,
    )


def completion_answer(
    cid: str, created: int, model: str, text: str, final: inference_pb2.FinalInfo
) -> dict:
    return _answer("text_completion", cid, created, model, {"text": text}, final)


def _chunk(
    obj: str,
    cid: str,
    created: int,
    model: str,
    choice: dict,
    final: Optional[inference_pb2.FinalInfo],
    with_usage: bool,
) -> dict:
    out = {
        "id": cid,
        "object": obj,
        "created": created,
        "model": model,
        "choices": [{"index": 0, **choice, "logprobs": None, "finish_reason": _finish(final)}],
    }
    if final is not None:
        out["system_fingerprint"] = fingerprint(final)
        out["studiofleet"] = extension(final)
    if with_usage:  # null on every chunk but the last (usage_chunk), as OpenAI sends it
        out["usage"] = None
    return out


def chat_chunk(
    cid: str,
    created: int,
    model: str,
    *,
    text: Optional[str] = None,
    first: bool = False,
    final: Optional[inference_pb2.FinalInfo] = None,
    with_usage: bool = False,
) -> dict:
    delta: dict = {"role": "assistant"} if first else {}
    if text is not None:
        delta["content"] = text
    return _chunk("chat.completion.chunk", cid, created, model, {"delta": delta}, final, with_usage)


def completion_chunk(
    cid: str,
    created: int,
    model: str,
    *,
    text: str = "",
    final: Optional[inference_pb2.FinalInfo] = None,
    with_usage: bool = False,
) -> dict:
    return _chunk("text_completion", cid, created, model, {"text": text}, final, with_usage)


def usage_chunk(
    kind: str, cid: str, created: int, model: str, final: inference_pb2.FinalInfo
) -> dict:
    """The last streamed chunk with stream_options.include_usage: no choices, the usage."""
    return {
        "id": cid,
        "object": kind,
        "created": created,
        "model": model,
        "choices": [],
        "usage": usage(final),
    }
