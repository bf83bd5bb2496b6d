"""The narrow interface between the agent and an inference engine (MLX, vLLM).

The agent owns admission, validation, text, stops and outcomes; an engine owns the
model and turns token prompts into token events. Engines call `emit` from their own
thread, once per step, with every request's new events.
"""

from __future__ import annotations

import enum
import json
import math
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Protocol, Sequence

from node_agent.sampling import SamplingSpec


class EventKind(enum.Enum):
    ADMITTED = "admitted"  # joined the running batch (queue wait ends)
    TOKEN = "token"  # one generated token; `finish` set on the last (token -1: finish only)
    FAILED = "failed"  # the engine could not continue this request


@dataclass(frozen=True, slots=True)
class EngineEvent:
    kind: EventKind
    token: int = -1
    finish: Optional[str] = None  # "stop" (EOS) or "length", on the last TOKEN
    message: str = ""  # FAILED only; never request content
    # FAILED only, before any token: a gRPC status name (RESOURCE_EXHAUSTED, UNAVAILABLE)
    # the call ends with instead of an error final, and a retry hint for it.
    status: str = ""
    retry_after_ms: int = 0
    cached_tokens: int = 0  # ADMITTED only: prompt tokens reused from the prompt cache


@dataclass(frozen=True)
class EngineRequest:
    key: str  # unique while in flight
    prompt_tokens: Sequence[int] = field(repr=False)  # template + prompt + prefix tokens, in order
    prefix_len: int  # how many of prompt_tokens were generated before
    max_tokens: int
    sampling: SamplingSpec
    # Schema-constrained requests: the llguidance matcher (past the prefix) for engines
    # that mask logits themselves (MLX), the schema's canonical JSON for those whose
    # server enforces it (vLLM structured outputs).
    matcher: object = field(default=None, repr=False)
    schema: str = field(default="", repr=False)
    # The request's chat messages ((role, content), template rendered) or None for a raw
    # prompt: for engines that send text, not token ids (the upstream engine's openai kind).
    messages: Optional[tuple[tuple[str, str], ...]] = field(default=None, repr=False)


class EngineClosed(RuntimeError):
    """The engine is not running (never started, closed, or its thread crashed)."""


Emit = Callable[[list[tuple[str, list[EngineEvent]]]], None]


@dataclass(frozen=True)
class ModelFacts:
    model_id: str
    weights_digest: str
    context_length: int
    vocab_size: int  # rows of the embedding (may exceed the tokenizer's)
    decodable_vocab_size: int  # ids the tokenizer can turn back into text
    eos_token_ids: frozenset[int]
    engine: str
    engine_version: str
    parameters: int = 0  # as stored, quantized weights counted unpacked; 0 if unknown
    quantization: str = ""  # quantization_of(config.json)


def quantization_of(config: dict) -> str:
    """config.json's quantization in a word or two: "4bit" (MLX's `quantization`), "awq 4bit"
    (Hugging Face's `quantization_config`); "" when the weights are not quantized."""
    q = config.get("quantization") or config.get("quantization_config") or {}
    if not isinstance(q, dict):
        return ""
    bits = q.get("bits") or q.get("w_bit")
    words = (
        str(q.get("quant_method") or ""),
        f"{int(bits)}bit" if isinstance(bits, (int, float)) and bits else "",
    )
    return " ".join(w for w in words if w)


def stored_parameters(path: Path) -> int:
    """Parameters in a model directory's safetensors files, read from their headers (no
    weights loaded); packed quantized tensors count as stored. Blocking: run it in a thread."""
    total = 0
    for file in sorted(Path(path).glob("*.safetensors")):
        with open(file, "rb") as f:
            size = struct.unpack("<Q", f.read(8))[0]
            header = json.loads(f.read(size))
        total += sum(math.prod(t["shape"]) for name, t in header.items() if name != "__metadata__")
    return total


@dataclass
class EngineStats:
    running: int = 0
    waiting: int = 0
    decode_tokens_per_s: float = 0.0
    active_memory_bytes: int = 0
    peak_memory_bytes: int = 0
    prompt_cache_entries: int = 0
    prompt_cache_bytes: int = 0
    cached_prompt_tokens_total: int = 0
    recommended_working_set_bytes: int = 0  # Metal's limit on macOS; 0 elsewhere
    kv_cache_usage: float = 0.0  # fraction of the KV cache in use (vLLM's /metrics)
    gpus: tuple = ()  # telemetry.GpuReading per NVIDIA GPU
    server: Optional["ServerInfo"] = None  # a supervised server process (vLLM), if any


@dataclass(frozen=True)
class ServerInfo:
    """The engine's own server process, for engines that supervise one."""

    pid: int
    url: str
    restarts: int  # unplanned restarts since the agent started
    last_exit: str  # why it last stopped unplanned ("" if never)
    up_s: float  # seconds since it last became healthy (0 while down)


class Engine(Protocol):
    name: str
    server_enforces_schema: bool  # True: send `schema` (vLLM); False: apply `matcher` (MLX)

    @property
    def alive(self) -> bool:
        """False once the engine's thread has stopped, for whatever reason."""

    def load(self, model_path=None, model_id: Optional[str] = None) -> ModelFacts:
        """Load weights (blocking, off the event loop); another model than the configured
        one when `model_path` is given (activation), replacing the current one."""

    @property
    def tokenizer(self):
        """The model's mlx-lm TokenizerWrapper (encode, chat template, detokenizer)."""

    def start(
        self,
        emit: Emit,
        on_exit: Optional[Callable[[str], None]] = None,
        on_serving: Optional[Callable[[bool, str], None]] = None,
    ) -> None:
        """Start generating; `emit` receives events from the engine's thread, `on_exit(reason)`
        is called from that thread if the engine stops by itself for good (a crash).
        Engines that restart their own server call `on_serving(False, why)` when it goes
        down (in-flight requests have failed) and `on_serving(True, what)` when it serves again."""

    def submit(self, request: EngineRequest) -> None:
        """Queue a request; thread-safe; never blocks; raises EngineClosed."""

    def cancel(self, key: str) -> None:
        """Stop a request and free its slot; thread-safe; unknown keys are ignored."""

    def stats(self) -> EngineStats: ...

    def close(self) -> None:
        """Stop the engine thread and release the model; idempotent."""
