"""The upstream engine's openai kind: a hosted OpenAI-compatible API, chat messages in and
text out (docs/upstream.md).

No token ids cross the wire, so the text streamed back is turned into ids with the local
tokenizer (`TextTokens`): the agent's stops, detokenizer and usage work as on every node,
but the ids are this node's own spelling of the text, not what the remote model drew. So
the node never takes part in an exact resume: its digest is `remote:` + provider + model,
and a request continuing `prefix_token_ids` is refused.
"""

from __future__ import annotations

import json
from typing import Callable, Optional
from urllib.parse import urlsplit

from cluster.digest import REMOTE_PREFIX
from node_agent.engine import EngineEvent, EngineRequest, EventKind
from node_agent.engines.vllm_protocol import error_type

_FINISH = {"stop": "stop", "length": "length"}
_HOLD = 2  # trailing tokens held back: more text may merge them into others
_MAX_PENDING_CHARS = 4096  # text that never re-encodes as a prefix of itself is sent anyway


def remote_digest(url: str, served_model: str) -> str:
    """`remote:` + provider + model; the provider is the URL's host, with its port if any."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    provider = f"{host}:{parts.port}" if parts.port else host
    return f"{REMOTE_PREFIX}{provider}/{served_model}"


def codec(tokenizer):
    """(encode, decode, spans) of the local tokenizer without special tokens; `spans(text)`
    gives the ids and each one's (start, end) in `text` (None without a Rust backend)."""
    backend = getattr(getattr(tokenizer, "_tokenizer", None), "backend_tokenizer", None)
    if backend is None:
        return (
            lambda text: tokenizer.encode(text, add_special_tokens=False),
            lambda ids: tokenizer.decode(ids, skip_special_tokens=False),
            None,
        )

    def spans(text: str) -> tuple[list[int], list[tuple[int, int]]]:
        e = backend.encode(text, add_special_tokens=False)
        return e.ids, e.offsets

    return (
        lambda text: backend.encode(text, add_special_tokens=False).ids,
        lambda ids: backend.decode(ids, skip_special_tokens=False),
        spans,
    )


def refusal(req: EngineRequest) -> Optional[str]:
    """Why this kind cannot take the request (None if it can)."""
    if req.prefix_len:
        return (
            "this node fronts a hosted API (upstream kind openai) that returns text, not token "
            "ids, so it cannot continue prefix_token_ids exactly; resume on a node serving the "
            "stream's weights, or start the request over"
        )
    return None


def request_body(req: EngineRequest, served_model: str, decode: Callable) -> tuple[str, bytes]:
    """(path, body) of the streaming call: /v1/chat/completions with the messages, or
    /v1/completions with the text of a raw prompt. Only fields OpenAI defines, except
    vLLM's top_k, min_p, repetition_penalty and ignore_eos when a request sets them."""
    s = req.sampling
    body: dict = {
        "model": served_model,
        "max_tokens": req.max_tokens,
        "stream": True,
        "temperature": s.temperature,
        "seed": s.seed,
    }
    if req.messages is None:
        path, body["prompt"] = "/v1/completions", decode(list(req.prompt_tokens))
    else:
        path = "/v1/chat/completions"
        body["messages"] = [{"role": r, "content": c} for r, c in req.messages]
    if not s.greedy:
        body["top_p"] = s.top_p
        if s.top_k > 0:
            body["top_k"] = s.top_k
        if s.min_p > 0:
            body["min_p"] = s.min_p
    if s.repetition_penalty != 1.0:
        body["repetition_penalty"] = s.repetition_penalty
    if s.ignore_eos:
        body["ignore_eos"] = True
    if req.schema:
        body["response_format"] = {
            "type": "json_schema",
            "json_schema": {
                "name": "studiofleet_output",
                "schema": json.loads(req.schema),
                "strict": True,
            },
        }
    return path, json.dumps(body).encode()


class TextTokens:
    """Streamed text as local token ids: each delta is encoded with the text not yet sent,
    and all but its last tokens are sent (more text may merge those with what follows).
    The ids decode to the text, up to the tokenizer's normalization (e.g. NFC)."""

    def __init__(self, encode: Callable, decode: Callable, spans: Optional[Callable] = None):
        self._encode, self._decode, self._spans = encode, decode, spans
        self._pending = ""

    def feed(self, text: str) -> list[int]:
        self._pending += text
        if len(self._pending) > _MAX_PENDING_CHARS:
            return self.flush()
        if self._spans is None:
            return self._by_prefix()
        ids, offsets = self._spans(self._pending)
        n = len(ids) - _HOLD
        # A character split over tokens (byte-level BPE) shares its span: cut before it.
        while n > 0 and offsets[n][0] < offsets[n - 1][1]:
            n -= 1
        if n <= 0:
            return []
        self._pending = self._pending[offsets[n - 1][1] :]
        return list(ids[:n])

    def _by_prefix(self) -> list[int]:
        ids = self._encode(self._pending)
        if len(ids) <= _HOLD:
            return []
        ready = ids[:-_HOLD]
        spelled = self._decode(ready)
        if not self._pending.startswith(spelled):  # it ends inside a character: wait
            return []
        self._pending = self._pending[len(spelled) :]
        return list(ready)

    def flush(self) -> list[int]:
        ids = self._encode(self._pending) if self._pending else []
        self._pending = ""
        return list(ids)


class TextReader:
    """One streamed answer (chat or text completion) as token events, cut at max_tokens."""

    def __init__(self, tokens: TextTokens, max_tokens: int):
        self._tokens, self._left = tokens, max_tokens
        self.cut = False  # ended here at max_tokens: stop reading, the call is closed

    def read(self, msg: dict) -> tuple[list[EngineEvent], bool, Optional[str]]:
        """(token events, finished, failure message or None) for one streamed message."""
        if "error" in msg:
            return [], True, f"the upstream endpoint failed the request{error_type(msg)}"
        choices = msg.get("choices")
        if not choices:  # e.g. the usage chunk
            return [], False, None
        choice = choices[0]
        delta = choice.get("delta")
        text = (delta or {}).get("content") if delta is not None else choice.get("text")
        finish = choice.get("finish_reason")
        if finish is not None and finish not in _FINISH:
            what = finish if isinstance(finish, str) and finish.isidentifier() else "unknown"
            return [], True, f"the upstream endpoint ended the request ({what})"
        ids = self._tokens.feed(text) if isinstance(text, str) and text else []
        if finish is not None:
            ids += self._tokens.flush()
        if len(ids) >= self._left and (finish is None or len(ids) > self._left):
            ids, finish, self.cut = ids[: self._left], "length", True
        self._left -= len(ids)
        last = len(ids) - 1
        events = [
            EngineEvent(EventKind.TOKEN, t, _FINISH[finish] if finish and i == last else None)
            for i, t in enumerate(ids)
        ]
        if finish is not None and not ids:
            events.append(EngineEvent(EventKind.TOKEN, -1, _FINISH[finish]))
        return events, finish is not None, None
