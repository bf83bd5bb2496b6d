"""A shadow run's tallies (docs/shadow.md): per prompt template, the live side and the
candidate side of the sampled requests, each as the quality scores and timings of its
outcomes (never text), and the verdict against a margin. Pure: no I/O, no clock."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from statistics import fmean
from typing import Iterable, Optional

from cluster.api import shadow_pb2
from cluster.metrics import percentile

PASS, FAIL, INSUFFICIENT = "pass", "fail", "insufficient"
KEEP = 10_000  # outcomes kept per side and template (the newest)


@dataclass(frozen=True)
class Outcome:
    """One side's result for one sampled request: no text, only what the rubric and the
    clock said of it."""

    completed: bool
    latency_ms: float
    ttft_ms: Optional[float] = None
    score: Optional[float] = None  # the node's quality score (template / output-format requests)
    schema_valid: Optional[bool] = None
    parts: tuple[tuple[str, float], ...] = ()
    model: str = ""  # model@version
    digest: str = ""


@dataclass
class Side:
    outcomes: deque = field(default_factory=lambda: deque(maxlen=KEEP))

    def add(self, o: Outcome) -> None:
        self.outcomes.append(o)

    @property
    def scored(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.completed and o.score is not None]

    @property
    def failed(self) -> int:
        return sum(1 for o in self.outcomes if not o.completed)

    @property
    def failure_rate(self) -> float:
        return self.failed / len(self.outcomes) if self.outcomes else 0.0

    def score(self) -> float:
        s = self.scored
        return fmean(o.score for o in s) if s else 0.0

    def schema_valid(self) -> float:
        s = [o for o in self.scored if o.schema_valid is not None]
        return fmean(1.0 if o.schema_valid else 0.0 for o in s) if s else 0.0

    def to_proto(self) -> shadow_pb2.ShadowSide:
        done = [o for o in self.outcomes if o.completed]
        scored = self.scored
        parts: dict[str, list[float]] = {}
        for o in scored:
            for name, value in o.parts:
                parts.setdefault(name, []).append(value)
        latency = sorted(o.latency_ms for o in done)
        ttft = sorted(o.ttft_ms for o in done if o.ttft_ms is not None)
        return shadow_pb2.ShadowSide(
            scored=len(scored),
            completed=len(done),
            failed=self.failed,
            score=round(self.score(), 4),
            schema_valid=round(self.schema_valid(), 4),
            parts={k: round(fmean(v), 4) for k, v in sorted(parts.items())},
            latency_p50_ms=round(percentile(latency, 0.5), 1) if latency else 0.0,
            latency_p95_ms=round(percentile(latency, 0.95), 1) if latency else 0.0,
            ttft_p50_ms=round(percentile(ttft, 0.5), 1) if ttft else 0.0,
            models=sorted({o.model for o in self.outcomes if o.model}),
            digests=sorted({o.digest for o in self.outcomes if o.digest}),
        )


@dataclass
class Pair:
    """One template's two sides."""

    live: Side = field(default_factory=Side)
    candidate: Side = field(default_factory=Side)


def verdict(pair: Pair, *, margin: float, min_samples: int) -> tuple[str, str]:
    """(pass|fail|insufficient, why) for one template: the candidate passes when it has at
    least `min_samples` scored outcomes on both sides and neither its mean score, its
    schema-valid share nor its completion rate is more than `margin` under the live side's.
    Latency is reported, not judged."""
    live, cand = pair.live, pair.candidate
    n_live, n_cand = len(live.scored), len(cand.scored)
    if cand.failed and not n_cand and cand.failure_rate > live.failure_rate + margin:
        return FAIL, f"every candidate copy failed ({cand.failed})"
    if n_live < min_samples or n_cand < min_samples:
        return (
            INSUFFICIENT,
            f"{n_cand} candidate and {n_live} live scored samples; the verdict needs "
            f"{min_samples} of each",
        )
    why = []
    if cand.score() < live.score() - margin:
        why.append(f"score {cand.score():.3f} vs {live.score():.3f}")
    if cand.schema_valid() < live.schema_valid() - margin:
        why.append(f"schema-valid {cand.schema_valid():.0%} vs {live.schema_valid():.0%}")
    if cand.failure_rate > live.failure_rate + margin:
        why.append(f"failed {cand.failure_rate:.0%} vs {live.failure_rate:.0%}")
    if why:
        return FAIL, f"candidate under live by more than the margin {margin:.3f}: " + "; ".join(why)
    return PASS, (
        f"candidate score {cand.score():.3f} vs live {live.score():.3f} over "
        f"{n_cand}/{n_live} samples, within the margin {margin:.3f}"
    )


def overall(verdicts: Iterable[tuple[str, str, str]]) -> tuple[str, str]:
    """The run's verdict from its templates' (template, verdict, why): any fail fails, then
    any insufficient (or none scored at all) is insufficient."""
    rows = list(verdicts)
    failed = [f"{t or '-'}: {why}" for t, v, why in rows if v == FAIL]
    if failed:
        return FAIL, "; ".join(failed)
    short = [f"{t or '-'}: {why}" for t, v, why in rows if v == INSUFFICIENT]
    if short or not rows:
        return INSUFFICIENT, "; ".join(short) or "no sampled request has ended yet"
    return PASS, f"{len(rows)} template(s) within the margin"


def templates_proto(
    pairs: dict[str, Pair], *, margin: float, min_samples: int
) -> tuple[list[shadow_pb2.ShadowTemplate], str, str]:
    """Every template's row and the run's verdict."""
    rows, verdicts = [], []
    for name in sorted(pairs):
        pair = pairs[name]
        v, why = verdict(pair, margin=margin, min_samples=min_samples)
        if not pair.live.scored and not pair.candidate.scored and v == INSUFFICIENT:
            # No scores on either side (requests without an output format): timings only.
            why = "no quality scores (requests without a template or output format)"
        rows.append(
            shadow_pb2.ShadowTemplate(
                template=name,
                live=pair.live.to_proto(),
                candidate=pair.candidate.to_proto(),
                verdict=v,
                reason=why,
            )
        )
        if pair.live.scored or pair.candidate.scored or pair.candidate.failed:
            verdicts.append((name, v, why))
    v, why = overall(verdicts)
    return rows, v, why
