"""Write a small random Qwen2 model that the real `mlx_lm.load` path loads.

The weights are random, so the text is gibberish; the shapes, tokenizer, chat
template and file layout are those of a real Qwen2 checkpoint. Same arguments and
seed give byte-identical weights, so the same weights digest.
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


def make_tiny_model(out_dir: str | Path, spec: TinyModelSpec = TinyModelSpec()) -> Path:
    """Write config.json, model.safetensors and a ChatML tokenizer into `out_dir`."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.models import qwen2
    from transformers import PreTrainedTokenizerFast

    if spec.hidden_size % spec.num_attention_heads:
        raise ValueError("hidden_size must be a multiple of num_attention_heads")
    if spec.num_attention_heads % spec.num_key_value_heads:
        raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    tok = _train_tokenizer(spec.vocab_size)
    vocab_size = tok.get_vocab_size()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.model_max_length = spec.max_position_embeddings
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
        "eos_token_id": tok.token_to_id("<|im_end|>"),
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
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out
