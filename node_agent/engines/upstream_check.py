"""The vllm kind's token check (docs/upstream.md, "Digest and the token check").

Before an upstream node of the vllm kind serves, the endpoint must (1) spell a synthetic
text with the same token ids as the tokenizer in --model (when it answers /tokenize), and
(2) give the same greedy continuation of those ids twice. Exact resume needs both. Where
the weights are on this host, (3) that continuation must also be theirs
(upstream_reference).
"""

from __future__ import annotations

import logging
from typing import Callable, Optional

from node_agent.engine import EngineRequest
from node_agent.engines.vllm_protocol import (
    chunk_events,
    completion_body,
    error_type,
    stream_messages,
)
from node_agent.sampling import SamplingSpec

log = logging.getLogger(__name__)

CHECK_TEXT = "Synthetic check 7: BP 120/80, metformin 500 mg twice daily; follow-up in 2 weeks."
CHECK_TOKENS = 16


class _CheckFailed(Exception):
    """A call of the check failed; the message is ours (no endpoint text)."""


async def token_check(
    session,
    url: str,
    served_model: str,
    headers: dict[str, str],
    encode: Callable[[str], list[int]],
    eos: tuple[int, ...],
    reference: Optional[list[int]] = None,
) -> Optional[str]:
    """None if the endpoint passes, else why not (one line naming what to do). With
    `reference` (the declared weights' own greedy tokens, upstream_reference), the
    endpoint's greedy run must also be those ids."""
    import aiohttp

    local = encode(CHECK_TEXT)
    where = f"the upstream endpoint {url}"
    try:
        async with session.post(
            f"{url}/tokenize",
            json={"model": served_model, "prompt": CHECK_TEXT, "add_special_tokens": False},
            headers=headers,
        ) as r:
            if r.status == 200:
                if (await r.json()).get("tokens") != local:
                    return (
                        f"{where} tokenizes text differently from the tokenizer in --model: "
                        "point --model at the served model's files (a stream cannot resume "
                        "exactly across tokenizers)"
                    )
            elif r.status not in (404, 405):  # no /tokenize: that part is not checked
                return (
                    f"{where} answered /tokenize with HTTP {r.status}{error_type(await r.read())}"
                )
        runs = [await _greedy(session, url, served_model, headers, local, eos, i) for i in (0, 1)]
    except _CheckFailed as exc:
        return f"{where} failed the token check ({exc})"
    except (TimeoutError, aiohttp.ClientError, OSError, ValueError) as exc:
        return f"{where} failed the token check ({type(exc).__name__})"
    if not runs[0] or not runs[1]:
        return (
            f"{where} streamed no token ids back; is it a vLLM server? (else use "
            "--upstream-kind openai)"
        )
    if runs[0] != runs[1]:
        return (
            f"{where} gave two different greedy continuations of the same tokens, so a stream "
            "cannot resume exactly on it; turn prefix caching off there, or use "
            "--upstream-kind openai"
        )
    if reference is not None and runs[0][: len(reference)] != reference:
        same = next(
            (i for i, (a, b) in enumerate(zip(runs[0], reference)) if a != b),
            min(len(runs[0]), len(reference)),
        )
        return (
            f"{where} continues the check text differently from the weights in --model "
            f"(greedy tokens agree for {same} of {len(reference)}): it serves other weights "
            "than the node's digest names; point --model (or --upstream-digest) at the "
            "weights it serves, or turn the check off with --upstream-weights-check off"
        )
    log.info(
        "upstream %s passed the token check (%d greedy tokens twice%s)",
        url,
        len(runs[0]),
        ", equal to the weights' own" if reference is not None else "",
    )
    return None


async def _greedy(session, url, served_model, headers, prompt, eos, i: int) -> list[int]:
    """A greedy continuation of `prompt` to CHECK_TOKENS, as token ids."""
    req = EngineRequest(
        key=f"studiofleet-token-check-{i}",
        prompt_tokens=prompt,
        prefix_len=0,
        max_tokens=CHECK_TOKENS,
        sampling=SamplingSpec(seed=0, ignore_eos=True),
    )
    body = completion_body(req, served_model, eos)
    async with session.post(f"{url}/v1/completions", data=body, headers=headers) as r:
        if r.status != 200:
            raise _CheckFailed(f"HTTP {r.status}{error_type(await r.read())} to /v1/completions")
        ids: list[int] = []
        async for msg in stream_messages(r):
            events, _, failure = chunk_events(msg)
            if failure is not None:
                raise _CheckFailed("an error event in its stream")
            ids += [e.token for e in events if e.token >= 0]
    return ids
