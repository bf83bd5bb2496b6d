"""Measure one node's performance through its public interface (Generate streams and
NodeStatus) and fit the profile's step-time model (docs/capacity.md "Measuring a node").

Every prompt is synthetic: words drawn from a fixed list, behind a per-request nonce so
that no two measurements share a cached prefix unless the measurement means them to.
Times are taken at the caller: a prefill is the time to the first token of a lone request
with max_tokens=1; a decode step is the gap between tokens of one stream while a fixed
number of streams (ignore_eos, fixed max_tokens) are all decoding, between the last
stream's first token and the first stream's last."""

from __future__ import annotations

import asyncio
import math
import random
import re
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from cluster.api import inference_pb2, node_pb2
from cluster.capacity.profile import (
    ENGINES,
    GROUP_LINKS,
    MEASURED,
    Curves,
    DecodePoint,
    GroupFacts,
    Info,
    Limits,
    Memory,
    ModelFacts,
    NodeFacts,
    PrefillPoint,
    Profile,
    StepModel,
    TtftPoint,
)
from cluster.client import build_request

# Synthetic vocabulary: clinical-sounding words, no person, no record.
WORDS = (
    "patient",
    "follow",
    "up",
    "blood",
    "pressure",
    "stable",
    "reports",
    "mild",
    "headache",
    "denies",
    "fever",
    "plan",
    "continue",
    "current",
    "dose",
    "review",
    "labs",
    "three",
    "months",
    "assessment",
    "subjective",
    "objective",
    "heart",
    "rate",
    "normal",
    "exam",
    "today",
    "clinic",
    "visit",
    "note",
    "medication",
    "reconciled",
    "allergies",
    "none",
    "known",
    "return",
    "if",
    "symptoms",
    "worsen",
    "counselling",
    "diet",
    "exercise",
    "sleep",
    "weight",
    "glucose",
    "controlled",
    "referral",
    "letter",
)


class MeasureError(Exception):
    """A measurement could not be taken; the message says why and what to do."""


@dataclass(frozen=True)
class NodeLimits:
    """What the node accepts (NodeStatus capacity and context): a run's sizes fit inside."""

    max_running: int
    context_tokens: int
    max_prompt_tokens: int = 0  # 0: bounded by the context only
    max_tokens_per_request: int = 0  # 0: bounded by the context only


@dataclass(frozen=True)
class Sizes:
    """How much a profile run measures; `plan_sizes` derives it from the node's limits."""

    prefill_tokens: tuple[int, ...]  # prompt lengths timed, uncached and with a cached prefix
    cached_share: float  # fraction of the prompt that is a cached prefix
    running: tuple[int, ...]  # decode batch sizes at a short context
    long_running: tuple[int, ...]  # decode batch sizes at a long context
    long_context_tokens: int  # prompt tokens per sequence of the long-context points
    short_context_tokens: int
    decode_steps: int  # steady-state steps wanted per decode point
    decode_window_s: float  # and at least this long (arrival jitter averages out)
    repeats: int  # rounds over the grid
    ttft_concurrency: tuple[int, ...]
    ttft_prompt_tokens: int
    ttft_output_tokens: int
    ttft_requests: int  # requests per concurrent caller

    @property
    def planned(self) -> int:
        """Units of work, for the progress bar: one per request or decode batch."""
        return (
            1
            + 2 * len(self.prefill_tokens) * self.repeats
            + (len(self.running) + len(self.long_running)) * self.repeats
            + 1
            + sum(c * self.ttft_requests for c in self.ttft_concurrency)
        )


def plan_sizes(limits: NodeLimits, *, quick: bool = False, repeats: int | None = None) -> Sizes:
    """A run of a few minutes on a large model and well under a minute on the tiny one."""
    cap = limits.context_tokens
    if limits.max_prompt_tokens:
        cap = min(cap, limits.max_prompt_tokens)
    top = 1024 if quick else 2048
    lengths = tuple(n for n in (64, 256, 1024, 2048) if n <= min(top, cap * 3 // 4)) or (
        max(8, cap // 4),
    )
    limit_running = max(1, limits.max_running)
    most = min(limit_running, 16 if quick else 64)
    running = tuple(n for n in (1, 2, 4, 8, 16, 32, 64) if n < most) + (most,)
    long_ctx = max(32, min(512, cap // 4))
    budget = 4096 if quick else 8192  # prompt tokens prefilled per long-context point
    fits = [n for n in running if n * long_ctx <= budget]
    long_running = tuple(
        sorted({1, fits[-1], *[n for n in fits if n * long_ctx <= budget // 4][-1:]})
    )
    top_conc = min(most, 16)
    conc = tuple(sorted({1, max(1, top_conc // 2), top_conc}))
    return Sizes(
        prefill_tokens=lengths,
        cached_share=0.75,
        running=running,
        long_running=long_running,
        long_context_tokens=long_ctx,
        short_context_tokens=16,
        decode_steps=24 if quick else 32,
        decode_window_s=0.3 if quick else 0.5,
        repeats=repeats or (2 if quick else 3),
        ttft_concurrency=conc,
        ttft_prompt_tokens=min(256, cap // 4),
        ttft_output_tokens=16 if quick else 32,
        ttft_requests=2 if quick else 3,
    )


@dataclass
class Measured:
    prefill: list[PrefillPoint] = field(default_factory=list)
    decode: list[DecodePoint] = field(default_factory=list)
    ttft: list[TtftPoint] = field(default_factory=list)
    repeats: int = 1


@dataclass
class _Stream:
    sent: float
    arrivals: list[tuple[float, int]]  # (time, tokens in the chunk)
    final: inference_pb2.FinalInfo


class Prober:
    """Times Generate streams on one node through `client` (an AsyncFleetClient of a node,
    or of a coordinator routing to exactly one node, whose id `node_id` then checks)."""

    def __init__(
        self,
        client,
        limits: NodeLimits,
        *,
        node_id: str = "",
        timeout_s: float = 300.0,
        seed: int = 0,
        temperature: float = 0.0,
    ):
        self._client = client
        self.temperature = temperature  # > 0: seeded sampling, as the workload's requests
        self._limits = limits
        self._node_id = node_id
        self._timeout_s = timeout_s
        self._rng = random.Random(seed)
        self.tokens_per_word = 0.0
        self.step_hint_s = 0.0  # the fastest decode step seen so far: sizes the next windows

    def text(self, tokens: int) -> str:
        """About `tokens` tokens of synthetic words (calibrate() first)."""
        words = max(1, round(tokens / (self.tokens_per_word or 1.0)))
        return " ".join(self._rng.choice(WORDS) for _ in range(words))

    def nonce(self) -> str:
        return f"{self._rng.getrandbits(40):010x}:"

    async def calibrate(self) -> None:
        """Learn the tokenizer's tokens per synthetic word (and warm the node up)."""
        words = 200
        s = await self.stream(
            f"{self.nonce()} " + " ".join(self._rng.choice(WORDS) for _ in range(words)), 1
        )
        self.tokens_per_word = max(0.25, (s.final.usage.prompt_tokens - 4) / words)

    async def stream(self, prompt: str, max_tokens: int) -> _Stream:
        req = build_request(
            prompt=prompt,
            max_tokens=max_tokens,
            temperature=self.temperature,
            seed=self._rng.getrandbits(31) if self.temperature > 0 else None,
        )
        req.sampling.ignore_eos = True
        arrivals: list[tuple[float, int]] = []
        final = None
        sent = time.perf_counter()
        async for chunk in self._client.stream(req, timeout_s=self._timeout_s):
            if chunk.token_ids:
                arrivals.append((time.perf_counter(), len(chunk.token_ids)))
            if chunk.HasField("final"):
                final = chunk.final
        if final is None or not arrivals:
            raise MeasureError(
                f"request {req.request_id} ended without a token; check the node's log"
            )
        if final.finish_reason not in (
            inference_pb2.FINISH_REASON_LENGTH,
            inference_pb2.FINISH_REASON_STOP,
        ):
            raise MeasureError(
                f"request {req.request_id} on {final.node_id} ended early ({final.message or 'no reason'}); "
                "profile a node that is serving and idle"
            )
        if self._node_id and final.node_id != self._node_id:
            raise MeasureError(
                f"request {req.request_id} was served by node {final.node_id}, not {self._node_id}: "
                "the fleet changed while profiling; profile the node directly with --node"
            )
        return _Stream(sent, arrivals, final)

    async def prefill_pair(
        self, tokens: int, cached_share: float
    ) -> tuple[PrefillPoint, PrefillPoint]:
        """Two lone requests of about `tokens` tokens: the first uncached, the second sharing
        its first `cached_share` with the first (the node's prompt cache holds it by then)."""
        head = f"{self.nonce()} {self.text(tokens * cached_share)}"
        first = await self.stream(f"{head} {self.text(tokens * (1 - cached_share))}", 1)
        second = await self.stream(f"{head} {self.text(tokens * (1 - cached_share))}", 1)
        return _prefill_point(first), _prefill_point(second)

    def _max_tokens(self, prompt_tokens: int) -> int:
        room = self._limits.context_tokens - int(prompt_tokens * 1.25) - 8
        if self._limits.max_tokens_per_request:
            room = min(room, self._limits.max_tokens_per_request)
        return max(1, room)

    async def decode_point(
        self, running: int, context_tokens: int, steps: int, window_s: float = 0.0
    ) -> DecodePoint:
        """The step time with `running` sequences of about `context_tokens` prompt tokens
        each, decoding together for at least `steps` steps and, once a step time is known,
        at least `window_s` seconds (longer streams if the ramp left too short a window)."""
        if window_s and self.step_hint_s:
            steps = max(steps, math.ceil(window_s / self.step_hint_s))
        max_tokens_cap = self._max_tokens(context_tokens)
        max_tokens = min(2 * steps + 16, max_tokens_cap)
        for _ in range(3):
            streams = await asyncio.gather(
                *(
                    self.stream(f"{self.nonce()} {self.text(context_tokens)}", max_tokens)
                    for _ in range(running)
                )
            )
            point = _steady(streams, steps)
            if point is not None:
                self.step_hint_s = min(self.step_hint_s or math.inf, point.step_s)
                return point
            if max_tokens >= max_tokens_cap:
                break
            max_tokens = min(max_tokens * 2, max_tokens_cap)
        raise MeasureError(
            f"{running} streams never decoded together for {steps} steps (admission took too "
            "long); measure with fewer running sequences or a longer max_tokens limit"
        )

    async def ttft_under_load(
        self, concurrency: int, prompt_tokens: int, output_tokens: int, requests: int
    ) -> TtftPoint:
        """`concurrency` callers each sending `requests` requests back to back."""
        ttfts: list[float] = []

        async def caller() -> None:
            for _ in range(requests):
                s = await self.stream(f"{self.nonce()} {self.text(prompt_tokens)}", output_tokens)
                ttfts.append(s.arrivals[0][0] - s.sent)

        await asyncio.gather(*(caller() for _ in range(concurrency)))
        return TtftPoint(concurrency, statistics.median(ttfts), percentile(ttfts, 95))


async def decode_curve(
    prober: Prober,
    points: Sequence[tuple[int, int]],
    steps: int,
    repeats: int,
    window_s: float = 0.0,
    advance: Callable[[str, int], None] = lambda what, n: None,
) -> list[DecodePoint]:
    """Step times at (running, prompt tokens per sequence) points: `repeats` rounds of the
    whole list (a busy spell on the host falls on different points each time), each point
    the median of its rounds."""
    decoded: dict[tuple[int, int], list[DecodePoint]] = {}
    for rep in range(repeats):
        for n, ctx in points:
            what = f"decode {n} running, {ctx}-token prompts ({rep + 1}/{repeats})"
            advance(what, 0)
            decoded.setdefault((n, ctx), []).append(
                await prober.decode_point(n, ctx, steps, window_s)
            )
            advance(what, 1)
    return [_median_point(decoded[key]) for key in dict.fromkeys(points)]


def _median_point(samples: Sequence[DecodePoint]) -> DecodePoint:
    return sorted(samples, key=lambda p: p.step_s)[(len(samples) - 1) // 2]


def _prefill_point(s: _Stream) -> PrefillPoint:
    u = s.final.usage
    return PrefillPoint(
        u.prompt_tokens + u.prefix_tokens, u.cached_prompt_tokens, s.arrivals[0][0] - s.sent
    )


def _steady(streams: Sequence[_Stream], steps: int) -> DecodePoint | None:
    """The step time while every stream was decoding (between the last stream's first token
    and the first stream's last): per stream, the time between its first and last token in
    that window over the tokens between them, the median over the streams; None when that
    window held fewer than `steps` steps. (Not a statistic of single gaps: when the host
    holds the caller back, tokens arrive late in a burst; only a long window averages that
    out, hence Sizes.decode_window_s.)"""
    start = max(s.arrivals[0][0] for s in streams)
    end = min(s.arrivals[-1][0] for s in streams)
    mid = (start + end) / 2
    per_stream: list[float] = []
    context = 0
    for s in streams:
        window = [(t, n) for t, n in s.arrivals if start <= t <= end]
        tokens = sum(n for _, n in window[1:])
        if tokens < steps:
            return None
        per_stream.append((window[-1][0] - window[0][0]) / tokens)
        context += (
            s.final.usage.prompt_tokens
            + s.final.usage.prefix_tokens
            + sum(n for t, n in s.arrivals if t <= mid)
        )
    return DecodePoint(len(streams), context, statistics.median(per_stream))


def percentile(values: Sequence[float], pct: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=float), pct))


async def measure(
    prober: Prober, sizes: Sizes, advance: Callable[[str, int], None] = lambda what, n: None
) -> Measured:
    """Run every measurement of `sizes`; `advance(what, units)` reports progress. Repeats go
    round the whole grid (a busy spell on the host falls on different points each time) and
    a prefill point keeps its fastest round (a delay at the caller only adds), a decode point
    its median round."""
    out = Measured(repeats=sizes.repeats)
    advance("calibrating", 0)
    await prober.calibrate()
    advance("calibrating", 1)
    fresh: dict[int, list[PrefillPoint]] = {}
    cached: dict[int, list[PrefillPoint]] = {}
    for rep in range(sizes.repeats):
        for tokens in sizes.prefill_tokens:
            advance(f"prefill {tokens} tokens ({rep + 1}/{sizes.repeats})", 0)
            first, second = await prober.prefill_pair(tokens, sizes.cached_share)
            fresh.setdefault(tokens, []).append(first)
            cached.setdefault(tokens, []).append(second)
            advance(f"prefill {tokens} tokens ({rep + 1}/{sizes.repeats})", 2)
    for tokens in sizes.prefill_tokens:
        out.prefill += [
            min(fresh[tokens], key=lambda p: p.seconds),
            min(cached[tokens], key=lambda p: p.seconds),
        ]
    advance("decode warm-up", 0)
    await prober.decode_point(sizes.running[-1], sizes.short_context_tokens, 4)
    advance("decode warm-up", 1)
    points = [(n, sizes.short_context_tokens) for n in sizes.running] + [
        (n, sizes.long_context_tokens) for n in sizes.long_running
    ]
    out.decode = await decode_curve(
        prober, points, sizes.decode_steps, sizes.repeats, sizes.decode_window_s, advance
    )
    for c in sizes.ttft_concurrency:
        advance(f"time to first token, {c} at once", 0)
        out.ttft.append(
            await prober.ttft_under_load(
                c, sizes.ttft_prompt_tokens, sizes.ttft_output_tokens, sizes.ttft_requests
            )
        )
        advance(f"time to first token, {c} at once", c * sizes.ttft_requests)
    return out


# -- the fit --------------------------------------------------------------------------


@dataclass(frozen=True)
class Fitted:
    model: StepModel
    prefill: tuple[
        PrefillPoint, ...
    ]  # the prefill part of each time to first token (raw: extra ttft_s)
    decode_max_error: float  # the largest relative residual over the decode points
    prefill_max_error: float
    notes: tuple[str, ...] = ()


def nonneg_lstsq(a: np.ndarray, y: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """Weighted least squares with every coefficient >= 0: a negative coefficient is pinned
    to 0 and the rest refitted (an active set); a column of zeros gets 0."""
    w = np.ones(len(y)) if weights is None else weights
    a_w, y_w = a * w[:, None], y * w
    free = [j for j in range(a.shape[1]) if np.any(a[:, j])]
    coef = np.zeros(a.shape[1])
    while free:
        sol, *_ = np.linalg.lstsq(a_w[:, free], y_w, rcond=None)
        worst = int(np.argmin(sol))
        if sol[worst] >= 0:
            coef[free] = sol
            break
        free.pop(worst)
    return coef


def robust_fit(a: np.ndarray, y: np.ndarray, rounds: int = 20, k: float = 1.345) -> np.ndarray:
    """Non-negative least squares of relative error, made robust by Huber weights (iteratively
    reweighted): a point the host slowed down pulls on the fit like a near one, not as its
    square. Residuals are scaled by their median absolute deviation."""
    rel = 1.0 / y
    coef = nonneg_lstsq(a, y, rel)
    for _ in range(rounds):
        r = (a @ coef - y) / y
        scale = 1.4826 * float(np.median(np.abs(r - np.median(r))))
        if scale <= 1e-9:
            break
        u = np.abs(r) / (k * scale)
        huber = np.where(u <= 1.0, 1.0, 1.0 / np.maximum(u, 1e-12))
        new = nonneg_lstsq(a, y, rel * np.sqrt(huber))
        if np.allclose(new, coef, rtol=1e-6, atol=1e-12):
            break
        coef = new
    return coef


def _max_rel(a: np.ndarray, y: np.ndarray, coef: np.ndarray) -> float:
    return float(np.max(np.abs(a @ coef - y) / y)) if len(y) else 0.0


def fit(measured: Measured) -> Fitted:
    """The [fit] table from the measured curves."""
    if len(measured.decode) < 2 or len(measured.prefill) < 2:
        raise MeasureError(
            "too few measured points to fit (need 2 decode points and 2 prefill points); "
            "profile a node whose limits allow several batch sizes and prompt lengths"
        )
    notes = []
    ad = np.array([[1.0, p.running - 1, p.context_tokens] for p in measured.decode])
    yd = np.array([p.step_s for p in measured.decode])
    d = robust_fit(ad, yd)
    # A lone prompt's first token comes from the step that prefills it, which also decodes it
    # (the simulator's step: prefill part + decode part): the prefill part is the rest.
    decode_one = StepModel(*(float(x) for x in d))
    prefill = tuple(
        PrefillPoint(
            pt.prompt_tokens,
            pt.cached_tokens,
            max(1e-6, pt.seconds - decode_one.decode_step_s(1, pt.prompt_tokens)),
            extra={"ttft_s": pt.seconds},
        )
        for pt in measured.prefill
    )
    ap = np.array([[1.0, pt.prompt_tokens - pt.cached_tokens, pt.cached_tokens] for pt in prefill])
    yp = np.array([pt.seconds for pt in prefill])
    p = robust_fit(ap, yp)
    if not any(pt.cached_tokens for pt in prefill):
        p[2] = p[1]
        notes.append(
            "the node reused no cached prefix (no prompt cache): cached tokens cost as uncached ones"
        )
    return Fitted(
        StepModel(*(float(x) for x in (*d, *p))),
        prefill,
        decode_max_error=_max_rel(ad, yd, d),
        prefill_max_error=_max_rel(ap, yp, p),
        notes=tuple(notes),
    )


# -- the profile ----------------------------------------------------------------------

GIB = float(1 << 30)


def limits_of(st: node_pb2.NodeStatus) -> NodeLimits:
    return NodeLimits(
        max_running=st.capacity.max_running,
        context_tokens=st.model.context_length,
        max_prompt_tokens=st.capacity.max_prompt_tokens,
        max_tokens_per_request=st.capacity.max_tokens_per_request,
    )


def group_of(st: node_pb2.NodeStatus) -> GroupFacts | None:
    """The node group a status describes (NodeStatus.group, docs/node-groups.md), or None for a
    single node. The profile is measured at rank 0, which serves the group's requests."""
    if not st.HasField("group") or st.group.size < 2:
        return None
    g = st.group
    hosts = tuple(r.hostname or r.address for r in sorted(g.ranks, key=lambda r: r.rank))
    return GroupFacts(
        size=g.size,
        mode=g.mode,
        backend=g.backend,
        link=GROUP_LINKS.get(g.backend, ""),
        hosts=hosts if len(hosts) == g.size else (),
    )


def profile_name(st: node_pb2.NodeStatus) -> str:
    """model-node-engine (with -groupN-MODE-BACKEND for a node group), in file-name-safe characters."""
    group = group_of(st)
    layout = f"-group{group.size}-{group.mode}-{group.backend}" if group else ""
    raw = f"{st.model.model_id}-{st.node_id}-{st.model.engine}{layout}".lower()
    return re.sub(r"[^a-z0-9._-]+", "-", raw).strip("-.") or "profile"


def build_profile(
    before: node_pb2.NodeStatus,
    after: node_pb2.NodeStatus,
    measured: Measured,
    fitted: Fitted,
    *,
    command: str,
    created: str,
    through: str,
    temperature: float = 0.0,
) -> Profile:
    """The measured profile: facts from NodeStatus (`before` the run, memory peaks from
    `after`), the curves, the fit, and how it was made."""
    gpus = [
        g.name for g in after.memory.gpus
    ]  # a GPU host is described by its GPUs, a Mac by its chip
    chip = (
        ", ".join(dict.fromkeys(gpus)) if gpus else before.chip
    ) or f"not reported by the node (host {before.hostname})"
    weights = max(0, before.memory.engine_active_bytes - before.load.prompt_cache_bytes)
    peak = after.memory.engine_peak_bytes or max(
        (g.memory_used_bytes for g in after.memory.gpus), default=0
    )
    m = fitted.model
    group = group_of(before)
    notes = [
        f"Measured by fleetctl profile {through}: {len(measured.prefill)} prefill, {len(measured.decode)} decode and "
        f"{len(measured.ttft)} time-to-first-token points; synthetic prompts; times at the caller; "
        f"{measured.repeats} rounds over the grid, a prefill point the fastest round, a decode point the median.",
        "prefill: the time to the first token of a lone request with max_tokens=1 (ttft_s) less the fitted "
        "decode step that yields that token; the fixed part (tokenizing, the RPC) is in prefill_base_s.",
        "decode: the gap between tokens of one stream while `running` ignore_eos streams all decode; "
        "context_tokens is their prompt plus generated tokens, summed, at the middle of that window.",
        (
            f"sampling: temperature {temperature:g}, seeded per request (as fleetctl replay's notes; "
            "sampling costs more per sequence than greedy decoding)"
            if temperature > 0
            else "sampling: greedy (temperature 0); a workload that samples decodes slower per sequence"
        ),
        f"fit: least squares of relative error with Huber weights, coefficients >= 0; largest residual {fitted.decode_max_error:.1%} "
        f"(decode), {fitted.prefill_max_error:.1%} (prefill).",
        f"per-stream decode bound {1 / m.decode_base_s:.1f} tok/s; memory in GiB (2^30 bytes): weights = the "
        "engine's active memory at idle less its prompt cache, peak = the engine's peak after the run.",
        *fitted.notes,
        *(
            [
                f"node group: {group.describe()}, ranks on {', '.join(group.hosts) or 'hosts not reported'}; "
                "measured at rank 0 like any node: the fit is the group's, memory_gb is rank 0's host, "
                "and costs count every machine."
            ]
            if group
            else []
        ),
    ]
    return Profile(
        info=Info(
            name=profile_name(before),
            provenance=MEASURED,
            created=created,
            sources=(command,),
            notes="\n".join(notes),
        ),
        node=NodeFacts(
            engine=before.model.engine if before.model.engine in ENGINES else "upstream",
            chip=chip,
            memory_gb=round(before.memory.total_bytes / GIB, 2),
            node_id=before.node_id,
            group_size=group.size if group else 1,
        ),
        model=ModelFacts(
            id=before.model.model_id,
            digest=before.model.weights_digest,
            params_b=round(before.model.parameters / 1e9, 6),
            quantization=before.model.quantization,
        ),
        limits=Limits(
            max_running=max(1, before.capacity.max_running),
            max_context_tokens=before.model.context_length,
        ),
        fit=m,
        curves=Curves(
            prefill=fitted.prefill, decode=tuple(measured.decode), ttft=tuple(measured.ttft)
        ),
        memory=Memory(weights_gb=round(weights / GIB, 4), peak_gb=round(peak / GIB, 4)),
        group=group,
    )
