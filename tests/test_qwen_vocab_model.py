"""The tiny test model with Qwen2.5's real vocabulary (`fleetctl model make-tiny --vocab qwen2.5`):
real mlx_lm.load reads it, its tokenizer and chat template are Qwen2.5's, a real node serves
it, and a schema-constrained clinical note completes over its 151,936-token vocabulary."""

from __future__ import annotations

import json

import jsonschema
import pytest

from cluster.api import inference_pb2
from cluster.client import build_request
from cluster.quality import notes
from tests.fleet_helpers import collect
from tests.test_fleetctl import fleetctl

SYSTEM = "You are a clinical documentation assistant."
USER = "Write a SOAP note for a synthetic follow-up visit: BP 132/84, HbA1c 6.8%."


@pytest.fixture(scope="module")
def loaded(qwen_tiny_model):
    import mlx_lm

    return mlx_lm.load(str(qwen_tiny_model))


def test_loads_with_qwen25_ids_and_embedding(qwen_tiny_model, loaded):
    model, tok = loaded
    assert tok.encode("<|im_start|>user\nHello<|im_end|>", add_special_tokens=False) == [
        151644,
        872,
        198,
        9707,
        151645,
    ]
    assert tok.convert_tokens_to_ids(
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<tool_call>", "<|file_sep|>"]
    ) == [151643, 151644, 151645, 151657, 151664]
    assert tok.eos_token_id == 151645 and len(tok._tokenizer) == 151665
    config = json.loads((qwen_tiny_model / "config.json").read_text())
    assert config["vocab_size"] == 151936 and config["tie_word_embeddings"]
    assert model.model.embed_tokens.weight.shape == (151936, 64)
    assert tok.decode(tok.encode(USER, add_special_tokens=False)) == USER


def test_chat_template_renders_as_qwen25(loaded):
    _, tok = loaded
    both = tok.apply_chat_template(
        [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hello"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert both == (
        f"<|im_start|>system\n{SYSTEM}<|im_end|>\n"
        "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"
    )
    # Without a system message Qwen2.5 supplies its own.
    alone = tok.apply_chat_template(
        [{"role": "user", "content": "Hello"}], tokenize=False, add_generation_prompt=False
    )
    assert alone == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
        "<|im_end|>\n<|im_start|>user\nHello<|im_end|>\n"
    )


def test_grammar_masks_over_the_real_vocabulary(loaded):
    """llguidance builds its token trie from Qwen2.5's tokenizer: the first SOAP step allows
    only the start of the compact object; inside a section string most of the vocabulary is open."""
    import numpy as np

    from node_agent.grammar import Grammars

    _, tok = loaded
    grammars = Grammars(tok, vocab_size=151936, eos_token_ids=frozenset({151645}))
    m = grammars.matcher(notes.template_spec("soap-brief"))

    def allowed():
        bits = np.zeros((151936 + 31) // 32, dtype=np.int32)
        m.unsafe_compute_mask_ptr(bits.ctypes.data, bits.nbytes)
        return np.unpackbits(bits.view(np.uint8), bitorder="little")[:151936]

    opening = '{"subjective":"'
    first = allowed()
    starts = [tok.decode([int(i)]) for i in np.nonzero(first)[0]]
    assert starts and all(opening.startswith(t) for t in starts), starts
    hello = tok.convert_tokens_to_ids("Hello")
    assert first[hello] == 0
    assert m.consume_tokens(tok.encode(opening, add_special_tokens=False))
    inside = allowed()
    assert inside[hello] == 1 and inside.sum() > 100_000, inside.sum()


@pytest.mark.usefixtures("as_node_caller")
def test_a_node_serves_it_and_a_soap_note_completes(start_node, qwen_tiny_model, loaded):
    _, tok = loaded
    node = start_node("--max-running", "4", node_id="qwen-vocab-node", model=qwen_tiny_model)
    messages = [("system", SYSTEM), ("user", USER)]
    rendered = tok.apply_chat_template(
        [{"role": r, "content": c} for r, c in messages], add_generation_prompt=True
    )

    free = collect(
        node.inference,
        build_request(
            messages=messages, max_tokens=8, temperature=0.0, request_id="qwen-vocab-free"
        ),
        timeout_s=60,
    )
    assert free.error is None, free.error
    assert free.final.usage.prompt_tokens == len(
        rendered
    )  # Qwen2.5's count of the templated prompt
    assert 0 < free.final.usage.completion_tokens <= 8
    assert all(0 <= t < 151936 for t in free.ids)

    note = collect(
        node.inference,
        build_request(
            messages=messages,
            max_tokens=1500,
            temperature=1.0,
            seed=3,
            note_template="soap-brief",
            request_id="qwen-vocab-note",
        ),
        timeout_s=120,
    )
    assert note.error is None, note.error
    f = note.final
    assert f.finish_reason == inference_pb2.FINISH_REASON_STOP, f
    assert f.structured.valid, (f.structured.rule, f.structured.path)
    value = json.loads(note.text)
    jsonschema.validate(value, notes.template_spec("soap-brief").schema)
    assert list(value) == ["subjective", "objective", "assessment", "plan"]


def test_fleetctl_make_tiny_refuses_an_unknown_vocabulary(tmp_path):
    out = fleetctl("model", "make-tiny", str(tmp_path / "m"), "--vocab", "qwen3")
    assert out.returncode == 2 and "--vocab" in out.stderr and "qwen2.5" in out.stderr
    assert not (tmp_path / "m").exists()
