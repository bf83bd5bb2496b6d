"""Schema-constrained decoding on MLX nodes, with llguidance (README "Clinical notes" says
why llguidance rather than xgrammar or outlines-core; bench/grammar_engines.py measures it).

`Grammars` wraps one loaded model's tokenizer for llguidance (built once, ~1 s for a
150k vocabulary) and makes a matcher per request, already advanced past a resumed
request's prefix. `GrammarProcessor` is an mlx-lm logits processor: each step it feeds
the token sampled last into the matcher and masks every token the schema forbids next.
"""

from __future__ import annotations

import logging
import threading
from typing import Optional, Sequence

import numpy as np

from cluster.quality import notes
from cluster.validation import InvalidRequest

log = logging.getLogger(__name__)


class Grammars:
    def __init__(self, tokenizer, *, vocab_size: int, eos_token_ids: frozenset[int]):
        self._hf = getattr(tokenizer, "_tokenizer", tokenizer)
        self._vocab = vocab_size
        self._eos = sorted(eos_token_ids)
        self._lock = threading.Lock()
        self._ll = None

    @property
    def vocab_size(self) -> int:
        return self._vocab

    def _tokenizer(self):
        with self._lock:
            if self._ll is None:
                import llguidance.hf

                self._ll = llguidance.hf.from_tokenizer(self._hf, n_vocab=self._vocab, eos_token=self._eos)
            return self._ll

    def matcher(self, spec: notes.OutputSpec, prefix: Sequence[int] = ()):
        """A fresh matcher for `spec`, past `prefix`; raises InvalidRequest (blocking: call
        it off the event loop)."""
        import llguidance

        m = llguidance.LLMatcher(self._tokenizer(), notes.grammar(spec.schema_text), log_level=0)
        if m.is_error():
            raise InvalidRequest(f"output_format cannot be enforced on this model: {' '.join(m.get_error().split())[:300]}")
        if prefix and not m.consume_tokens(list(prefix)):
            raise InvalidRequest("prefix_token_ids do not follow the output_format's schema; resume only the "
                                 "tokens this request generated")
        return m


class GrammarProcessor:
    """An mlx-lm logits processor for one request (called on the engine thread)."""

    def __init__(self, matcher, vocab_size: int):
        self._m = matcher
        self._width = vocab_size
        self._bits = np.full((1, (vocab_size + 31) // 32), -1, dtype=np.int32)
        self._started = False
        self._broken = False

    def __call__(self, tokens, logits):
        import mlx.core as mx

        # Start the forward pass now, so the device computes logits while the CPU works
        # out the mask (the mask needs only the previous token).
        mx.async_eval(logits)
        if self._started:
            self._m.consume_token(int(tokens[-1].item()))
        self._started = True
        if self._broken or self._m.is_error():
            if not self._broken:  # never the tokens: they encode text
                log.error("grammar matcher stopped enforcing the schema: %s", self._m.get_error()[:200])
                self._broken = True
            return logits  # the output check will fail it with a typed error
        self._m.unsafe_compute_mask_ptr(self._bits.ctypes.data, self._bits.nbytes)
        allowed = np.unpackbits(self._bits.view(np.uint8), bitorder="little")[: logits.shape[-1]]
        return mx.where(mx.array(allowed.astype(np.bool_)), logits, mx.array(-np.inf, dtype=logits.dtype))


def processor_for(matcher, vocab_size: int) -> Optional[GrammarProcessor]:
    return GrammarProcessor(matcher, vocab_size) if matcher is not None else None
