"""Check a GenerateRequest against this node's limits before it is accepted.

The field checks every role shares live in cluster.validation; this adds the model's
limits (context, vocabulary) and builds the node's ValidRequest.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional

from cluster.api import inference_pb2
from cluster.quality.notes import OutputSpec
from cluster.validation import (
    InvalidRequest,
    check_input,
    check_output_format,
    check_request,
    check_request_id,
    check_sampling,
    display_id,
    guarded,
    new_request_id,
)
from node_agent.sampling import SamplingSpec, draw_seed

__all__ = [
    "InvalidRequest",
    "Limits",
    "ValidRequest",
    "check_length",
    "display_id",
    "new_request_id",
    "validate",
]

MAX_CHARS_PER_TOKEN = 16  # generous: English averages ~4 characters per token


@dataclass(frozen=True)
class Limits:
    max_tokens: int
    context_length: int
    vocab_size: int
    max_stop_sequences: int


@dataclass(frozen=True)
class ValidRequest:
    request_id: str
    # Content fields stay out of repr(): a logged request must not carry PHI.
    messages: Optional[tuple[tuple[str, str], ...]] = field(repr=False)
    prompt: Optional[str] = field(repr=False)
    sampling: SamplingSpec
    seed_given: bool
    max_tokens: int
    stop: tuple[str, ...] = field(repr=False)
    prefix_token_ids: tuple[int, ...] = field(repr=False)
    require_weights_digest: str
    prefix_text_chars: Optional[int] = None
    # A prompt template (name, pinned version or "", variables), rendered into `messages`
    # for this node's model family by prompts.apply_template, which sets `template_id`.
    template: Optional[tuple[str, str, tuple[tuple[str, str], ...]]] = field(
        default=None, repr=False
    )
    template_id: str = ""
    output: Optional[OutputSpec] = None  # the schema the completion must follow
    fit: bool = False  # the request's fit_context

    @property
    def fit_context(self) -> bool:
        """A template request, or one that asked (fit_context): its max_tokens is kept within
        the context, not refused."""
        return self.template is not None or self.fit


@guarded
def validate(
    request: inference_pb2.GenerateRequest, limits: Limits, *, with_output: bool = True
) -> ValidRequest:
    """Field checks that need no tokenizer; raises InvalidRequest (for any failure to check).
    `with_output=False` leaves `output` unset, for the caller to resolve it off the event
    loop (cluster.validation.check_output_format_async)."""
    check_request(
        request,
        max_tokens=limits.max_tokens,
        max_stop_sequences=limits.max_stop_sequences,
        where="this node",
    )
    request_id = check_request_id(request.request_id)
    messages, prompt = check_input(request)
    template = None
    if request.WhichOneof("input") == "template":
        t = request.template
        template = (t.name, t.version, tuple(sorted(t.variables.items())))
    # Refuse text that cannot fit before spending event-loop time tokenizing it.
    if template is not None:
        chars = sum(len(v) for _, v in template[2])
    else:
        chars = len(prompt) if prompt is not None else sum(len(c) for _, c in messages)
    if chars > limits.context_length * MAX_CHARS_PER_TOKEN:
        raise InvalidRequest(
            f"prompt is {chars} characters, far beyond this node's context of "
            f"{limits.context_length} tokens; shorten the prompt"
        )
    bad = next((i for i, t in enumerate(request.prefix_token_ids) if t >= limits.vocab_size), None)
    if bad is not None:  # the position, never the id: token ids encode text
        raise InvalidRequest(
            f"prefix_token_ids[{bad}] is outside this model's vocabulary "
            f"(0..{limits.vocab_size - 1}); resume only on a node serving the same weights"
        )
    output = check_output_format(request) if with_output else None
    checked = check_sampling(request.sampling)
    seed_given = checked.seed is not None
    seed = checked.seed if seed_given else draw_seed()
    sampling = replace(checked, seed=seed & ((1 << 63) - 1))
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
        prefix_text_chars=request.prefix_text_chars
        if request.HasField("prefix_text_chars")
        else None,
        template=template,
        output=output,
        fit=request.fit_context,
    )


def check_length(
    prompt_tokens: int, prefix_tokens: int, max_tokens: int, limits: Limits, *, fit: bool = False
) -> int:
    """Prompt + prefix + max_tokens must fit the context; raises InvalidRequest. With `fit`
    (template requests) max_tokens is cut to what fits instead; returns the max_tokens to use."""
    used = prompt_tokens + prefix_tokens
    if used >= limits.context_length:
        raise InvalidRequest(
            f"prompt is {prompt_tokens} tokens (+{prefix_tokens} prefix), longer than this "
            f"node's context of {limits.context_length} tokens; shorten the prompt"
        )
    if fit:
        return min(max_tokens, limits.context_length - used)
    if used + max_tokens > limits.context_length:
        raise InvalidRequest(
            f"prompt ({used} tokens) + max_tokens ({max_tokens}) exceeds the context of "
            f"{limits.context_length} tokens; set max_tokens <= {limits.context_length - used}"
        )
    return max_tokens
