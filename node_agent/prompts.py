"""Turn a validated request into prompt token ids with the model's own tokenizer."""

from __future__ import annotations

from node_agent.validation import ValidRequest


class PromptError(ValueError):
    """The prompt could not be built (bad chat shape for this model's template)."""


def build_prompt_tokens(tokenizer, req: ValidRequest) -> list[int]:
    if req.messages is None:
        tokens = tokenizer.encode(req.prompt, add_special_tokens=False)
    else:
        messages = [{"role": r, "content": c} for r, c in req.messages]
        add_generation_prompt = messages[-1]["role"] != "assistant"
        try:
            text = tokenizer.apply_chat_template(
                messages, add_generation_prompt=add_generation_prompt, tokenize=False)
        except Exception as exc:  # noqa: BLE001 - template errors are caller errors
            # The exception text may quote the messages; name only its type.
            raise PromptError(
                f"this model's chat template rejected the messages ({type(exc).__name__}); "
                "check the roles and their order") from None
        tokens = tokenizer.encode(text, add_special_tokens=False)
    if not tokens:
        raise PromptError("the prompt encodes to no tokens")
    return list(tokens)
