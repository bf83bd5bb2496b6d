"""Turn a validated request into prompt token ids with the model's own tokenizer."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from cluster.quality import notes, prompts
from node_agent.validation import ValidRequest


class PromptError(ValueError):
    """The prompt could not be built (bad chat shape for this model's template)."""


def _encoder(tokenizer):
    """The Rust `tokenizers` encoder when there is one: transformers' own encode() spends
    more Python time per call than the whole encoding, on the event loop."""
    backend = getattr(getattr(tokenizer, "_tokenizer", None), "backend_tokenizer", None)
    if backend is not None:
        return lambda text: backend.encode(text, add_special_tokens=False).ids
    return lambda text: tokenizer.encode(text, add_special_tokens=False)


def build_prompt_tokens(tokenizer, req: ValidRequest) -> list[int]:
    encode = _encoder(tokenizer)
    if req.messages is None:
        tokens = encode(req.prompt)
    else:
        messages = [{"role": r, "content": c} for r, c in req.messages]
        add_generation_prompt = messages[-1]["role"] != "assistant"
        try:
            text = tokenizer.apply_chat_template(
                messages, add_generation_prompt=add_generation_prompt, tokenize=False
            )
        except Exception as exc:  # noqa: BLE001 - template errors are caller errors
            # The exception text may quote the messages; name only its type.
            raise PromptError(
                f"this model's chat template rejected the messages ({type(exc).__name__}); "
                "check the roles and their order"
            ) from None
        tokens = encode(text)
    if not tokens:
        raise PromptError("the prompt encodes to no tokens")
    return list(tokens)


def model_family(model_path: Path) -> str:
    """config.json's model_type ("qwen2", "llama"): which prompt template versions apply."""
    try:
        return str(
            json.loads((Path(model_path) / "config.json").read_text()).get("model_type") or ""
        )
    except (OSError, ValueError):
        return ""


def apply_template(req: ValidRequest, family: str, max_tokens_limit: int) -> ValidRequest:
    """A template request as chat messages for this model family, with the template's note
    format (unless the request set one) and its budget (when max_tokens was 0)."""
    if req.template is None:
        return req
    name, version, variables = req.template
    v = prompts.select(name, version, family)
    return replace(
        req,
        messages=v.render(dict(variables)),
        template_id=v.id,
        output=req.output or notes.template_spec(v.note),
        max_tokens=req.max_tokens or min(v.max_tokens, max_tokens_limit),
    )
