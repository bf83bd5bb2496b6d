"""The MLX engine: mlx-lm's BatchGenerator on one thread that owns every MLX object.

Requests reach the thread through an inbox; a new request joins the running batch at
the next step (continuous batching). Events leave through `emit`, once per step.
"""

from __future__ import annotations

import collections
import json
import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import replace
from pathlib import Path
from typing import Callable, Optional

from cluster.digest import weights_digest
from cluster.logs import without_text
from node_agent.engine import (
    Emit,
    EngineClosed,
    EngineEvent,
    EngineRequest,
    EngineStats,
    EventKind,
    ModelFacts,
    quantization_of,
)
from node_agent.grammar import GrammarProcessor
from node_agent.sampling import make_processors, make_sampler

log = logging.getLogger(__name__)

_RATE_WINDOW_S = 10.0
_STATS_PERIOD_S = 0.05
_IDLE_WAKE_S = 1.0


class MlxEngine:
    """Engine over mlx-lm; construct, `start(emit)`, then `load()`."""

    name = "mlx"
    server_enforces_schema = False

    def __init__(
        self,
        *,
        model_path: Path,
        model_id: Optional[str] = None,
        max_running: int = 32,
        prefill_batch_size: int = 8,
        prefill_step_size: int = 512,
        max_context_tokens: Optional[int] = None,
        prompt_cache_entries: int = 16,
        prompt_cache_bytes: int = 4 << 30,
    ):
        self._path = Path(model_path)
        self._model_id = model_id or self._path.name
        self._max_running = max_running
        self._prefill_batch_size = min(prefill_batch_size, max_running)
        self._prefill_step_size = prefill_step_size
        self._max_context = max_context_tokens
        self._cache_entries = prompt_cache_entries
        self._cache_bytes = prompt_cache_bytes
        self._prompt_cache = None  # LRUPromptCache of finished sequences, keyed by digest
        self._digest = ""
        self._cached_total = 0
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: Optional[threading.Thread] = None
        self._emit: Optional[Emit] = None
        self._closed = threading.Event()
        self._gate = threading.Lock()
        self._on_exit: Optional[Callable[[str], None]] = None
        # Engine-thread state.
        self._model = None
        self._tokenizer = None
        self._gen = None
        self._waiting: collections.deque[EngineRequest] = collections.deque()
        self._uid_of: dict[str, int] = {}
        self._key_of: dict[int, str] = {}
        self._rate: collections.deque[tuple[float, int]] = collections.deque()
        self._rate_tokens = 0
        self._rate_seen: tuple[int, float, float] = (
            0,
            0.0,
            0.0,
        )  # (tokens, first, newest) at the last snapshot
        self._stats_at = 0.0
        self._stats_counts = (0, 0)
        self._stats = EngineStats()
        self._working_set = 0
        self._vocab = 0

    # -- called from other threads -------------------------------------------------

    @property
    def tokenizer(self):
        return self._tokenizer

    @property
    def alive(self) -> bool:
        return self._thread is not None and not self._closed.is_set()

    def start(
        self,
        emit: Emit,
        on_exit: Optional[Callable[[str], None]] = None,
        on_serving: Optional[Callable[[bool, str], None]] = None,
    ) -> None:
        """Start the engine thread; `on_exit(reason)` is called if it stops on its own.
        (MLX runs in-process: there is no server to restart, so `on_serving` is unused.)"""
        self._emit = emit
        self._on_exit = on_exit
        self._thread = threading.Thread(target=self._run, name="mlx-engine", daemon=True)
        self._thread.start()

    def load(self, model_path: Optional[Path] = None, model_id: Optional[str] = None) -> ModelFacts:
        """Load the model (another one than at construction when given) on the engine thread;
        blocks until loaded. Replacing a model drops its prompt caches; the agent calls it
        only with nothing in flight (drained)."""
        if model_path is not None:
            self._path = Path(model_path)
            self._model_id = model_id or self._path.name
        fut: Future = Future()
        self._send(("load", fut))
        return fut.result()

    def submit(self, request: EngineRequest) -> None:
        self._send(("submit", request))

    def cancel(self, key: str) -> None:
        with self._gate:
            if not self._closed.is_set():
                self._inbox.put(("cancel", key))

    def stats(self) -> EngineStats:
        """The latest snapshot, its decode rate brought to now: an idle engine publishes no
        new snapshot, so the rate is re-read as the window's tokens over the time since its
        first one, and 0 once the newest token is a whole window old."""
        s, (tokens, first, last) = self._stats, self._rate_seen
        now = time.monotonic()
        if not tokens or now - last > _RATE_WINDOW_S:
            return s  # the snapshot's rate is 0: only this reading computes it
        return replace(s, decode_tokens_per_s=tokens / max(now - first, 1e-3))

    def close(self) -> None:
        with self._gate:
            if self._thread is None or self._closed.is_set():
                return
            self._inbox.put(("close", None))
        self._thread.join(timeout=30)

    def _send(self, item) -> None:
        # The gate makes "not closed, then enqueue" atomic against the thread's final drain,
        # so nothing enqueued is ever left unanswered.
        with self._gate:
            if self._closed.is_set() or self._thread is None:
                raise EngineClosed("the MLX engine is not running")
            self._inbox.put(item)

    # -- engine thread ---------------------------------------------------------------

    def _run(self) -> None:
        reason = ""
        try:
            while True:
                busy = bool(self._waiting or self._key_of)
                if not self._handle(self._take(block=not busy)):
                    break
                self._admit()
                if self._key_of:
                    self._step()
                self._publish_stats()
        except BaseException as exc:  # noqa: BLE001 - the thread must report, not vanish
            reason = f"the MLX engine thread crashed ({type(exc).__name__})"
            log.error("mlx engine thread crashed: %s", without_text(exc))
        finally:
            with self._gate:
                self._closed.set()
            self._fail_all(reason or "the node is shutting down")
            self._fail_pending_commands()
            self._prompt_cache = None  # PHI-derived state goes with the engine
            if self._gen is not None:
                self._gen.close()
            if reason and self._on_exit is not None:
                self._on_exit(reason)

    def _take(self, block: bool) -> list:
        items = []
        if block:
            try:  # wake at least every second so idle stats (decode rate) stay current
                items.append(self._inbox.get(timeout=_IDLE_WAKE_S))
            except queue.Empty:
                return items
        while not self._inbox.empty():
            items.append(self._inbox.get_nowait())
        return items

    def _handle(self, items: list) -> bool:
        """Apply commands in order; a close is applied after everything that came with it."""
        closing = False
        for kind, arg in items:
            if kind == "submit":
                self._waiting.append(arg)
            elif kind == "cancel":
                self._drop(arg)
            elif kind == "load":
                self._load(arg)
            elif kind == "close":
                closing = True
        return not closing

    def _load(self, fut: Future) -> None:
        try:
            facts = self._do_load()
        except BaseException as exc:  # noqa: BLE001 - reported to the caller
            fut.set_exception(exc)
        else:
            fut.set_result(facts)

    def _do_load(self) -> ModelFacts:
        import mlx.core as mx
        import mlx_lm
        from mlx_lm.utils import get_total_parameters

        if not (self._path / "config.json").is_file():
            raise FileNotFoundError(
                f"{self._path} has no config.json; is it an MLX model directory?"
            )
        config = json.loads((self._path / "config.json").read_text())
        model, tokenizer = self._load_model()
        digest = self._model_digest()
        context = int(config.get("max_position_embeddings") or 32768)
        if self._max_context:
            context = min(context, self._max_context)
        vocab = int(config.get("vocab_size") or len(tokenizer.vocab))
        working_set = mx.device_info().get("max_recommended_working_set_size")
        self._working_set = int(working_set or 0)
        if self._gen is not None:
            self._gen.close()
        self._fail_all("the model was replaced")  # none in flight when drained; never left hanging
        self._model, self._tokenizer, self._digest = model, tokenizer, digest
        self._vocab = vocab
        self._gen = self._new_generator()
        self._prompt_cache = self._new_prompt_cache()  # never reuse state across models
        return ModelFacts(
            model_id=self._model_id,
            weights_digest=digest,
            context_length=context,
            vocab_size=vocab,
            decodable_vocab_size=min(vocab, len(tokenizer._tokenizer)),
            eos_token_ids=frozenset(tokenizer.eos_token_ids),
            engine=self.name,
            engine_version=f"mlx-lm {mlx_lm.__version__} / mlx {mx.__version__}",
            parameters=int(get_total_parameters(model)),
            quantization=quantization_of(config),
        )

    def _load_model(self):
        """(model, tokenizer) from self._path; a node group loads its shard instead."""
        import mlx_lm

        return mlx_lm.load(str(self._path))

    def _model_digest(self) -> str:
        return weights_digest(self._path)

    def _new_prompt_cache(self):
        from mlx_lm.models.cache import LRUPromptCache

        return (
            LRUPromptCache(max_size=self._cache_entries, max_bytes=self._cache_bytes)
            if self._cache_entries > 0
            else None
        )

    def _reuse(self, tokens: list[int]) -> tuple[Optional[list], list[int]]:
        """The longest cached prefix of `tokens` (a KV cache copy) and the tokens left to prefill."""
        if self._prompt_cache is None:
            return None, tokens
        from mlx_lm.models.cache import can_trim_prompt_cache, trim_prompt_cache

        cache, rest = self._prompt_cache.fetch_nearest_cache(self._digest, tokens)
        if cache is not None and not rest:  # exact hit: recompute the last token to get logits
            if not can_trim_prompt_cache(cache):
                return None, tokens
            trim_prompt_cache(cache, 1)
            rest = tokens[-1:]
        return cache, rest

    def _new_generator(self):
        from mlx_lm.generate import BatchGenerator, StopSequences

        eos = [[t] for t in self._tokenizer.eos_token_ids]
        self._eos_stop = StopSequences(
            eos
        )  # each insert names its stops: these, or none for ignore_eos
        self._no_stop = StopSequences(None)
        return BatchGenerator(
            self._model,
            stop_tokens=eos,
            completion_batch_size=self._max_running,
            prefill_batch_size=self._prefill_batch_size,
            prefill_step_size=self._prefill_step_size,
        )

    def _admit(self) -> None:
        room = self._max_running - len(self._key_of)
        if room <= 0 or not self._waiting:
            return
        if self._gen is None:
            while self._waiting:
                req = self._waiting.popleft()
                self._emit(
                    [(req.key, [EngineEvent(EventKind.FAILED, message="no model is loaded")])]
                )
            return
        batch = [self._waiting.popleft() for _ in range(min(room, len(self._waiting)))]
        try:
            uids = self._insert(batch)
        except Exception as exc:  # noqa: BLE001 - insert validates before it changes state
            log.error("mlx engine could not admit %d requests: %s", len(batch), without_text(exc))
            message = f"the engine could not start the request ({type(exc).__name__})"
            self._emit([(r.key, [EngineEvent(EventKind.FAILED, message=message)]) for r in batch])
            return
        admitted = []
        for req, (uid, cached) in zip(batch, uids):
            self._uid_of[req.key] = uid
            self._key_of[uid] = req.key
            self._cached_total += cached
            admitted.append((req.key, [EngineEvent(EventKind.ADMITTED, cached_tokens=cached)]))
        self._emit(admitted)

    def _insert(self, batch: list[EngineRequest]) -> list[tuple[int, int]]:
        """Insert into the BatchGenerator, reusing cached prefixes; [(uid, cached tokens)]."""
        reused = [self._reuse(list(r.prompt_tokens)) for r in batch]
        uids = self._gen.insert(
            [rest for _, rest in reused],
            max_tokens=[r.max_tokens for r in batch],
            caches=[cache for cache, _ in reused],
            all_tokens=[
                list(r.prompt_tokens[: len(r.prompt_tokens) - len(rest)])
                for r, (_, rest) in zip(batch, reused)
            ],
            samplers=[make_sampler(r.sampling, start_step=r.prefix_len) for r in batch],
            logits_processors=[self._processors(r) for r in batch],
            stop_sequences=[
                self._no_stop if r.sampling.ignore_eos else self._eos_stop for r in batch
            ],
        )
        return [
            (uid, len(r.prompt_tokens) - len(rest))
            for uid, r, (_, rest) in zip(uids, batch, reused)
        ]

    def _processors(self, r: EngineRequest) -> Optional[list]:
        """Sampling's processors, then the schema mask last (nothing may unmask a token)."""
        procs = list(make_processors(r.sampling) or ())
        if r.matcher is not None:
            procs.append(GrammarProcessor(r.matcher, self._vocab))
        return procs or None

    def _step(self) -> None:
        try:
            _, responses = self._gen.next()
        except Exception as exc:  # noqa: BLE001 - fail the batch, keep the node alive
            self._step_failed(exc)
            return
        if not responses:
            return
        out: dict[str, list[EngineEvent]] = {}
        for r in responses:
            key = self._key_of.get(r.uid)
            if key is None:
                continue
            out.setdefault(key, []).append(EngineEvent(EventKind.TOKEN, r.token, r.finish_reason))
            if r.finish_reason is not None:
                del self._key_of[r.uid]
                del self._uid_of[key]
                if self._prompt_cache is not None and r.prompt_cache is not None:
                    self._prompt_cache.insert_cache(
                        self._digest, list(r.all_tokens), r.prompt_cache
                    )
        self._rate.append((time.monotonic(), len(responses)))
        self._rate_tokens += len(responses)
        self._emit(list(out.items()))

    def _step_failed(self, exc: Exception) -> None:
        """A step raised: fail the running requests and go on with a fresh generator (a
        node group cannot go on: its ranks' states would differ)."""
        log.error(
            "mlx engine step failed; failing %d running requests: %s",
            len(self._key_of),
            without_text(exc),
        )
        self._fail_running(f"the engine failed during generation ({type(exc).__name__})")

    def _drop(self, key: str) -> None:
        uid = self._uid_of.pop(key, None)
        if uid is not None:
            del self._key_of[uid]
            self._gen.remove([uid])
            return
        for req in self._waiting:
            if req.key == key:
                self._waiting.remove(req)
                return

    def _fail_running(self, message: str, *, reset: bool = True) -> None:
        """Fail every admitted request and start from a fresh BatchGenerator: after an
        error inside a step its batch state cannot be trusted."""
        keys = list(self._uid_of)
        if reset and self._gen is not None and keys:
            self._gen.close()
            self._gen = self._new_generator()
        self._uid_of.clear()
        self._key_of.clear()
        if keys:
            self._emit([(k, [EngineEvent(EventKind.FAILED, message=message)]) for k in keys])

    def _fail_all(self, message: str) -> None:
        self._fail_running(message, reset=False)
        waiting = [r.key for r in self._waiting]
        self._waiting.clear()
        if waiting and self._emit is not None:
            self._emit([(k, [EngineEvent(EventKind.FAILED, message=message)]) for k in waiting])

    def _fail_pending_commands(self) -> None:
        for kind, arg in self._take(block=False):
            if kind == "load":
                arg.set_exception(EngineClosed("the MLX engine stopped before loading"))
            elif kind == "submit":
                self._emit(
                    [(arg.key, [EngineEvent(EventKind.FAILED, message="the engine stopped")])]
                )

    def _publish_stats(self) -> None:
        """Refresh the stats snapshot when counts change, else at most every _STATS_PERIOD_S."""
        import mlx.core as mx

        now = time.monotonic()
        counts = (len(self._key_of), len(self._waiting))
        if counts == self._stats_counts and now - self._stats_at < _STATS_PERIOD_S:
            return
        self._stats_counts = counts
        self._stats_at = now
        while self._rate and now - self._rate[0][0] > _RATE_WINDOW_S:
            self._rate_tokens -= self._rate.popleft()[1]
        self._rate_seen = (
            (self._rate_tokens, self._rate[0][0], self._rate[-1][0])
            if self._rate
            else (0, now, now)
        )
        self._stats = (
            EngineStats(  # decode_tokens_per_s stays 0 here: stats() computes it when read
                running=len(self._key_of),
                waiting=len(self._waiting),
                active_memory_bytes=mx.get_active_memory(),
                peak_memory_bytes=mx.get_peak_memory(),
                prompt_cache_entries=len(self._prompt_cache)
                if self._prompt_cache is not None
                else 0,
                prompt_cache_bytes=self._prompt_cache.nbytes
                if self._prompt_cache is not None
                else 0,
                cached_prompt_tokens_total=self._cached_total,
                recommended_working_set_bytes=self._working_set,
            )
        )
