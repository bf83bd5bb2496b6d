"""Write a small random Qwen2 model that the real `mlx_lm.load` path loads.

The weights are random, so the text is gibberish; the shapes, tokenizer, chat
template and file layout are those of a real Qwen2 checkpoint. Same arguments and
seed give byte-identical weights, so the same weights digest. The tokenizer is either
a small BPE trained on synthetic text (`vocab="trained"`) or Qwen2.5's real one
(`vocab="qwen2.5"`: real token counts and grammar mask sizes, 151,936 embedding rows).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

# ChatML, as Qwen2.5 uses it (without the tool-calling branches).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Synthetic, PHI-free text to train the byte-level BPE on.
_CORPUS = [
    "Patient seen for follow-up of hypertension. Blood pressure 132/84. Continue lisinopril.",
    "Subjective: reports mild headache for two days, no fever, no vision change.",
    "Objective: heart rate 72, respiratory rate 16, temperature 36.8 C, SpO2 98% on room air.",
    "Assessment: type 2 diabetes mellitus, well controlled. HbA1c 6.8%.",
    "Plan: repeat labs in three months, dietary counselling, return if symptoms worsen.",
    "Medications reviewed and reconciled. Allergies: none known.",
    "Care coordinator called to confirm the appointment and transport arrangements.",
    "The quick brown fox jumps over the lazy dog 0123456789 times.",
    "SOAP note: Subjective, Objective, Assessment, Plan. Discharge summary and referral letter.",
]


@dataclass(frozen=True)
class TinyModelSpec:
    """Shape of a generated Qwen2 model; defaults keep head_dim at 64 (vLLM needs it)."""

    hidden_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 2
    num_key_value_heads: int = 1
    intermediate_size: int = 256
    vocab_size: int = 512
    max_position_embeddings: int = 2048
    seed: int = 0
    vocab: str = (
        "trained"  # or "qwen2.5": Qwen2.5's tokenizer; vocab_size is then the embedding rows
    )


VOCABS = ("trained", "qwen2.5")


def qwen25_spec(**shape) -> TinyModelSpec:
    """A tiny model with Qwen2.5's tokenizer and embedding size (151,936 rows, tied).

    Hidden 64 (one head of 64): the embedding, 151,936 x 64 float32 = 39 MB, is nearly all
    of the weights, and its logits matmul most of a decode step on a CPU.
    """
    from cluster.qwen25_tokenizer import EMBEDDING_ROWS

    defaults = dict(
        hidden_size=64, num_attention_heads=1, num_key_value_heads=1, intermediate_size=128
    )
    return TinyModelSpec(**{**defaults, "vocab": "qwen2.5", "vocab_size": EMBEDDING_ROWS, **shape})


def _train_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    return tok


def _trained_tokenizer(spec: TinyModelSpec):
    """The small BPE trained on synthetic text, as a fast tokenizer; the vocabulary it reached."""
    from transformers import PreTrainedTokenizerFast

    tok = _train_tokenizer(spec.vocab_size)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.model_max_length = spec.max_position_embeddings
    return fast, tok.get_vocab_size()


def _qwen25_tokenizer(spec: TinyModelSpec):
    """Qwen2.5's real tokenizer; the embedding keeps spec.vocab_size rows (151,936 in Qwen2.5)."""
    from cluster.qwen25_tokenizer import fast_tokenizer

    fast = fast_tokenizer(spec.max_position_embeddings)
    if spec.vocab_size < len(fast):
        raise ValueError(
            f"vocab_size {spec.vocab_size} is below the {len(fast)} tokens of Qwen2.5's "
            f"tokenizer (Qwen2.5 uses 151936)"
        )
    return fast, spec.vocab_size


def make_tiny_model(out_dir: str | Path, spec: TinyModelSpec = TinyModelSpec()) -> Path:
    """Write config.json, model.safetensors and a ChatML tokenizer into `out_dir`."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.models import qwen2

    if spec.hidden_size % spec.num_attention_heads:
        raise ValueError("hidden_size must be a multiple of num_attention_heads")
    if spec.num_attention_heads % spec.num_key_value_heads:
        raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
    if spec.vocab not in VOCABS:
        raise ValueError(f"vocab must be one of {', '.join(VOCABS)}, not {spec.vocab!r}")

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    fast, vocab_size = (_qwen25_tokenizer if spec.vocab == "qwen2.5" else _trained_tokenizer)(spec)
    fast.save_pretrained(str(out))

    config = {
        "model_type": "qwen2",
        "architectures": ["Qwen2ForCausalLM"],
        "hidden_size": spec.hidden_size,
        "num_hidden_layers": spec.num_hidden_layers,
        "num_attention_heads": spec.num_attention_heads,
        "num_key_value_heads": spec.num_key_value_heads,
        "intermediate_size": spec.intermediate_size,
        "vocab_size": vocab_size,
        "max_position_embeddings": spec.max_position_embeddings,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": True,
        "torch_dtype": "float32",
        "bos_token_id": None,
        "eos_token_id": fast.convert_tokens_to_ids("<|im_end|>"),
        "studiofleet_tiny": asdict(spec),
    }
    args = qwen2.ModelArgs(
        model_type="qwen2",
        hidden_size=spec.hidden_size,
        num_hidden_layers=spec.num_hidden_layers,
        intermediate_size=spec.intermediate_size,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        rms_norm_eps=1e-6,
        vocab_size=vocab_size,
        max_position_embeddings=spec.max_position_embeddings,
        rope_theta=1000000.0,
        tie_word_embeddings=True,
    )
    mx.random.seed(spec.seed)
    model = qwen2.Model(args)
    weights = dict(tree_flatten(model.parameters()))
    mx.eval(weights)
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "mlx"})
    # The shard index real checkpoints carry: pipeline-parallel loading (node groups) reads it.
    index = {"metadata": {}, "weight_map": dict.fromkeys(sorted(weights), "model.safetensors")}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=1) + "\n")
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out
