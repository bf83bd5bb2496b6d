"""What the node sends vLLM's OpenAI server and how its streamed answers become events."""

from __future__ import annotations

import json
import logging
from typing import Callable, Iterable, Optional

from node_agent.engine import EngineEvent, EngineRequest, EventKind

log = logging.getLogger(__name__)

_FINISH = {"stop": "stop", "length": "length"}
# aiohttp drops a connection idle 1-2 s, before the server's keep-alive ends it (uvicorn's,
# under vLLM's server: 5 s), so a request seldom meets a connection that is closing.
KEEPALIVE_S = 1.0


async def post_once_more(
    session, url: str, body: bytes, headers: dict, key: str, give_up: Callable[[], bool]
):
    """POST a completion and return its response (headers read). A pooled connection that
    the server closed as it was reused (its keep-alive ending at that moment) fails before
    any answer: the request is sent once more on a new connection, unless `give_up()` (the
    server is gone). The server aborts a request whose connection closes, so nothing runs
    twice; a second failure is the request's."""
    import aiohttp

    try:
        return await session.post(url, data=body, headers=headers)
    except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
        if give_up():
            raise
        log.info(
            "request %s: the server closed a pooled connection before answering (%s); "
            "sending it again on a new connection",
            key,
            type(exc).__name__,
        )
    return await session.post(url, data=body, headers=headers)


def completion_body(req: EngineRequest, served_name: str, eos_token_ids: Iterable[int]) -> bytes:
    """A streaming /v1/completions request: the prompt as token ids (so a resume with
    prefix tokens is exact), token ids back, our EOS ids, and only the sampling fields
    that change anything."""
    s = req.sampling
    body = {
        "model": served_name,
        "prompt": list(req.prompt_tokens),
        "max_tokens": req.max_tokens,
        "stream": True,
        "return_token_ids": True,
        "temperature": s.temperature,
        "stop_token_ids": [] if s.ignore_eos else list(eos_token_ids),
        "request_id": req.key,
    }
    if s.ignore_eos:
        body["ignore_eos"] = True
    if not s.greedy:  # vLLM seeds a generator per request: same seed, same tokens
        body.update(seed=s.seed, top_p=s.top_p, min_p=s.min_p)
        if s.top_k > 0:
            body["top_k"] = s.top_k
    if s.repetition_penalty != 1.0:
        body["repetition_penalty"] = s.repetition_penalty
    if req.schema:  # vLLM's structured outputs (compact JSON: the server's config, vllm_server.py)
        body["structured_outputs"] = {"json": req.schema}
    return json.dumps(body).encode()


def chunk_events(msg: dict) -> tuple[list[EngineEvent], bool, Optional[str]]:
    """One streamed chunk as (token events, finished, failure message or None)."""
    if "error" in msg:
        return [], True, f"the vLLM server failed the request{error_type(msg)}"
    choices = msg.get("choices")
    if not choices:
        return [], False, None
    choice = choices[0]
    ids = choice.get("token_ids") or ()
    finish = choice.get("finish_reason")
    if finish is not None and finish not in _FINISH:
        return [], True, f"the vLLM server ended the request ({finish})"
    last = len(ids) - 1
    events = [
        EngineEvent(EventKind.TOKEN, token, _FINISH[finish] if finish and i == last else None)
        for i, token in enumerate(ids)
    ]
    if finish is not None and not ids:
        events.append(
            EngineEvent(EventKind.TOKEN, -1, _FINISH[finish])
        )  # a finish with no new token
    return events, finish is not None, None


def error_type(raw) -> str:
    """vLLM's error type (e.g. BadRequestError), never its message: it may quote the input."""
    try:
        body = json.loads(raw) if isinstance(raw, (bytes, str)) else raw
        err = body.get("error", body)
        kind = err.get("type") if isinstance(err, dict) else None
    except (ValueError, AttributeError):
        return ""
    return f", {kind}" if isinstance(kind, str) and kind.isidentifier() else ""


async def stream_messages(resp):
    """The JSON messages of a streamed completion (server-sent events) up to [DONE].
    Callers read on to [DONE] after the last token: a stream left unread is a client
    disconnect to the server, which it handles as an abort."""
    import asyncio

    async for line in resp.content:
        if not line.startswith(b"data: "):
            continue
        data = line[6:].strip()
        if data == b"[DONE]":
            return
        yield json.loads(data)
        # A reader with lines buffered never waits, so it would hold the loop (and the
        # coalesced flush to the agent) while the server outpaces it.
        await asyncio.sleep(0)
