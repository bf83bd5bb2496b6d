"""The evaluation harness: run a suite of synthetic encounters through a target and score
every note; compare two runs; and (coordinator/gates.py) gate a rollout on the score.

A suite is a TOML file (cluster/quality/suites/starter.toml): a prompt template and
cases, each a synthetic transcript plus phrases a correct note mentions. A run sends each
case as a template request (same seed for every run, so two model versions see the same
requests), takes the node's quality score from the final record, and reports per-case
and aggregate scores, latency and tokens/s. Reports hold scores and counts only, never
the generated notes.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import statistics
import time
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import AsyncIterator, Awaitable, Callable, Optional

from cluster.api import inference_pb2
from cluster.metrics import percentile
from cluster.quality import prompts
from cluster.quality.scoring import RUBRIC

STARTER_SUITE = Path(__file__).resolve().parent / "suites" / "starter.toml"
_ID = re.compile(r"^[a-z0-9][a-z0-9-]{0,39}$")


class SuiteError(ValueError):
    """The suite file cannot be used; the message names the file and the case."""


@dataclass(frozen=True)
class Case:
    id: str
    specialty: str
    transcript: str = field(repr=False)
    must_mention: tuple[str, ...] = ()


@dataclass(frozen=True)
class Suite:
    name: str
    version: int
    prompt_template: str
    cases: tuple[Case, ...]
    digest: str  # of the file: two runs on different suite files are not comparable


def load_suite(path: Path) -> Suite:
    path = Path(path)
    try:
        raw = path.read_bytes()
        data = tomllib.loads(raw.decode())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise SuiteError(f"suite {path}: cannot read it ({exc})") from None
    template = data.get("prompt_template", "")
    if template not in prompts.REGISTRY:
        raise SuiteError(
            f"suite {path}: prompt_template {template!r} is not one of {', '.join(prompts.names())}"
        )
    cases, seen = [], set()
    for i, c in enumerate(data.get("case", [])):
        cid = c.get("id", "")
        if not isinstance(cid, str) or not _ID.match(cid) or cid in seen:
            raise SuiteError(
                f"suite {path}: case {i + 1} needs a unique id of a-z 0-9 - (<= 40 characters)"
            )
        if not str(c.get("transcript", "")).strip():
            raise SuiteError(f"suite {path}: case {cid} has no transcript")
        seen.add(cid)
        cases.append(
            Case(
                cid,
                str(c.get("specialty", "")),
                str(c["transcript"]).strip(),
                tuple(str(m).lower() for m in c.get("must_mention", ())),
            )
        )
    if not cases:
        raise SuiteError(f"suite {path}: it has no [[case]] entries")
    return Suite(
        str(data.get("name", path.stem)),
        int(data.get("version", 1)),
        template,
        tuple(cases),
        "sha256:" + hashlib.sha256(raw).hexdigest(),
    )


@dataclass
class CaseResult:
    id: str
    ok: bool  # a completed note (valid or not); False: the request failed
    quality: float = 0.0  # 0 when the request failed
    parts: dict[str, float] = field(default_factory=dict)
    schema_valid: bool = False
    rule: str = ""  # the schema rule that failed, if any
    finish_reason: str = ""
    error: str = ""  # why the request failed (status and message; never note text)
    mentions: Optional[float] = None  # share of must_mention phrases found in the note
    latency_ms: float = 0.0
    ttft_ms: float = 0.0
    completion_tokens: int = 0
    node_id: str = ""


@dataclass
class Report:
    suite: str
    suite_version: int
    suite_digest: str
    target: str
    label: str
    template: str = ""  # prompt template version(s) used
    model: str = ""  # model id and weights digest that served the notes
    rubric: str = RUBRIC
    seed: int = 0
    started_at: float = 0.0
    wall_s: float = 0.0
    cases: list[CaseResult] = field(default_factory=list)

    @property
    def summary(self) -> dict:
        c = self.cases
        done = [r for r in c if r.ok]
        lat = [r.latency_ms for r in done]
        tokens = sum(r.completion_tokens for r in c)
        mentions = [r.mentions for r in done if r.mentions is not None]
        return {
            "cases": len(c),
            "completed": len(done),
            "score": round(statistics.fmean(r.quality for r in c), 4) if c else 0.0,
            "schema_valid": round(sum(r.schema_valid for r in c) / len(c), 4) if c else 0.0,
            "truncated": sum(r.finish_reason == "length" for r in c),
            "parts": {
                k: round(statistics.fmean(r.parts.get(k, 0.0) for r in done), 4)
                for k in sorted({k for r in done for k in r.parts})
            },
            "mentions": round(statistics.fmean(mentions), 4) if mentions else None,
            "latency_p50_ms": round(percentile(lat, 0.5), 1),
            "latency_p95_ms": round(percentile(lat, 0.95), 1),
            "tokens_per_s": round(tokens / self.wall_s, 1) if self.wall_s > 0 else 0.0,
        }

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "summary": self.summary}, indent=2)

    @classmethod
    def from_json(cls, text: str) -> "Report":
        data = json.loads(text)
        data.pop("summary", None)
        data["cases"] = [CaseResult(**c) for c in data.get("cases", [])]
        return cls(**data)


def case_request(
    suite: Suite,
    case: Case,
    *,
    template: str = "",
    version: str = "",
    seed: int = 0,
    run_id: str = "eval",
) -> inference_pb2.GenerateRequest:
    """The request for one case: the suite's template (or `template`), a fixed seed, the
    template's own budget (max_tokens 0) and greedy decoding, so runs are comparable."""
    req = inference_pb2.GenerateRequest(request_id=f"{run_id}/{case.id}", max_tokens=0)
    req.template.name = template or suite.prompt_template
    req.template.version = version
    req.template.variables["transcript"] = case.transcript
    req.sampling.seed = seed
    req.sampling.temperature = 0.0
    return req


# A target: sends one request, returns its final record (raises on a failed call).
Generate = Callable[[inference_pb2.GenerateRequest], Awaitable[inference_pb2.FinalInfo]]


async def final_of(chunks: AsyncIterator[inference_pb2.GenerateChunk]) -> inference_pb2.FinalInfo:
    """The final record of a stream (the note's text is not kept)."""
    final = None
    async for chunk in chunks:
        if chunk.HasField("final"):
            final = chunk.final
    if final is None:
        raise RuntimeError("the stream ended without a final chunk")
    return final


async def run_suite(
    suite: Suite,
    generate: Generate,
    *,
    target: str,
    label: str = "",
    template: str = "",
    version: str = "",
    seed: int = 0,
    concurrency: int = 4,
    run_id: str = "eval",
    progress: Optional[Callable[[int, int, CaseResult], None]] = None,
) -> Report:
    """Every case through `generate`, `concurrency` at a time; a failed request scores 0."""
    report = Report(
        suite.name, suite.version, suite.digest, target, label, seed=seed, started_at=time.time()
    )
    results: dict[str, CaseResult] = {}
    templates, models = set(), set()
    gate = asyncio.Semaphore(max(1, concurrency))
    done = 0

    async def one(case: Case) -> None:
        nonlocal done
        async with gate:
            t0 = time.perf_counter()
            try:
                final = await generate(
                    case_request(
                        suite, case, template=template, version=version, seed=seed, run_id=run_id
                    )
                )
            except Exception as exc:  # noqa: BLE001 - a failed case scores 0 and says why
                r = CaseResult(
                    case.id,
                    False,
                    error=_describe(exc),
                    latency_ms=(time.perf_counter() - t0) * 1000,
                )
            else:
                r = _case_result(case, final, (time.perf_counter() - t0) * 1000)
                templates.add(final.template)
                models.add(f"{final.model.model_id} {final.model.weights_digest[:19]}")
            results[case.id] = r
            done += 1
            if progress is not None:
                progress(done, len(suite.cases), r)

    t0 = time.perf_counter()
    await asyncio.gather(*(one(c) for c in suite.cases))
    report.wall_s = round(time.perf_counter() - t0, 3)
    report.cases = [results[c.id] for c in suite.cases]
    report.template = ", ".join(sorted(t for t in templates if t))
    report.model = ", ".join(sorted(models))
    return report


def _case_result(case: Case, f: inference_pb2.FinalInfo, latency_ms: float) -> CaseResult:
    finish = inference_pb2.FinishReason.Name(f.finish_reason).removeprefix("FINISH_REASON_").lower()
    r = CaseResult(
        case.id,
        finish in ("stop", "length"),
        finish_reason=finish,
        latency_ms=round(latency_ms, 1),
        ttft_ms=round(f.timings.time_to_first_token_ms, 1),
        completion_tokens=f.usage.completion_tokens,
        node_id=f.node_id,
    )
    if not r.ok:
        r.error = f"the node ended it: {f.message}"[:300]
        return r
    r.quality = round(f.quality.total, 4)
    r.parts = {p.name: round(p.score, 4) for p in f.quality.parts}
    r.schema_valid = f.structured.valid
    r.rule = f.structured.rule
    if case.must_mention and f.structured.valid:
        note = f.structured.json.lower()
        r.mentions = round(sum(m in note for m in case.must_mention) / len(case.must_mention), 4)
    return r


def _describe(exc: Exception) -> str:
    code = getattr(exc, "code", None)
    name = code() if callable(code) else code
    details = exc.details() if hasattr(exc, "details") and callable(exc.details) else str(exc)
    return f"{getattr(name, 'name', name) or type(exc).__name__}: {details}"[:300]


def compare(a: Report, b: Report) -> tuple[list[tuple[str, str, str, str]], list[str]]:
    """Rows (metric, A, B, B-A) for the aggregate and each case, and warnings about what
    makes the two runs not comparable."""
    warn = []
    if a.suite_digest != b.suite_digest:
        warn.append(
            f"the runs used different suite files ({a.suite} {a.suite_digest[:19]} vs "
            f"{b.suite} {b.suite_digest[:19]})"
        )
    if a.rubric != b.rubric:
        warn.append(f"the runs were scored by different rubrics ({a.rubric} vs {b.rubric})")
    if a.seed != b.seed:
        warn.append(f"the runs used different seeds ({a.seed} vs {b.seed})")
    sa, sb = a.summary, b.summary
    rows = [
        ("model", a.model or "-", b.model or "-", ""),
        ("template", a.template or "-", b.template or "-", ""),
    ]
    for key in (
        "score",
        "schema_valid",
        "truncated",
        "mentions",
        "latency_p50_ms",
        "latency_p95_ms",
        "tokens_per_s",
    ):
        rows.append((key, _fmt(sa[key]), _fmt(sb[key]), _delta(sa[key], sb[key])))
    for part in sorted(set(sa["parts"]) | set(sb["parts"])):
        va, vb = sa["parts"].get(part), sb["parts"].get(part)
        rows.append((f"  {part}", _fmt(va), _fmt(vb), _delta(va, vb)))
    by_b = {c.id: c for c in b.cases}
    for ca in a.cases:
        cb = by_b.get(ca.id)
        rows.append(
            (
                f"case {ca.id}",
                _fmt(ca.quality),
                _fmt(cb.quality) if cb else "-",
                _delta(ca.quality, cb.quality) if cb else "",
            )
        )
    return rows, warn


def _fmt(v) -> str:
    if v is None:
        return "-"
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def _delta(a, b) -> str:
    if a is None or b is None:
        return ""
    d = b - a
    return f"{d:+.3f}" if isinstance(d, float) else f"{d:+d}"


def gate_verdict(
    candidate: Report, baseline: Optional[Report], *, margin: float, min_score: float
) -> Optional[str]:
    """None if `candidate` may serve; else why not (scores only)."""
    s = candidate.summary
    if s["score"] < min_score:
        return f"suite {candidate.suite} scored {s['score']:.3f}, under the floor {min_score:.3f}"
    if baseline is not None:
        b = baseline.summary
        if s["score"] < b["score"] - margin:
            return (
                f"suite {candidate.suite} scored {s['score']:.3f} against {b['score']:.3f} for the current "
                f"version (margin {margin:.3f}); schema-valid {s['schema_valid']:.0%} vs {b['schema_valid']:.0%}, "
                f"truncated {s['truncated']} vs {b['truncated']}"
            )
    return None
