"""Replaying a synthetic day against a real fleet (issue 21 #4, `fleetctl replay`).

The plan's traffic (cluster.capacity.workload: arrival shape, token distributions) is cut
to a window of the day, compressed in time (`time_scale` day seconds per real second) and
sent through the client library (AsyncFleetClient) as synthetic clinical notes whose
prompt lengths match the distribution (calibrated against the fleet's own tokenizer, see
PromptBuilder) and whose outputs run to their sampled length (ignore_eos). Each note is
one request (no client retries), so the report's counts are the coordinator's request-log
counts for the run's request ids. Nothing here is PHI: every transcript is made up.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

from cluster.api import inference_pb2
from cluster.capacity.profile import Profile, ProfileError, resolve_profile
from cluster.capacity.simulate import fleet_of, simulate
from cluster.capacity.workload import DAY_S, NOTE_TEMPERATURE, Request, Workload
from cluster.client import AsyncFleetClient, build_request
from cluster.client.errors import FleetError
from cluster.metrics import percentile

__all__ = [
    "Measured",
    "NoteOutcome",
    "PlannedNote",
    "PromptBuilder",
    "ReplayReport",
    "plan_notes",
    "run_notes",
    "summarize",
]

SYSTEM = "You are a clinical documentation assistant. Write a concise SOAP note from the visit transcript."
# Made-up visit sentences: no patient, no PHI. Prompts are built from these.
SENTENCES = (
    "Patient seen for follow-up of hypertension and reports adherence to lisinopril.",
    "Blood pressure today is 136/84 with a heart rate of 74 and no chest pain.",
    "Reports mild headache for two days without fever or change in vision.",
    "Type 2 diabetes review with an HbA1c of 7.1 percent and occasional high fasting glucose.",
    "Walks about two hundred metres before needing to rest because of breathlessness.",
    "Medications reviewed and reconciled; no known drug allergies.",
    "Weight is up one and a half kilograms in a week with mild ankle swelling.",
    "Uses the inhaler twice daily and wakes at night with cough twice a week.",
    "Kidney function stable with an eGFR of 48 and potassium of 4.9.",
    "Plan to repeat labs in three months with dietary counselling.",
    "Care coordinator to confirm transport for the next appointment.",
    "Return sooner if symptoms worsen or new symptoms appear.",
)
PAD = " and"  # a one-word filler whose cost is measured, for the last few tokens
CALIBRATION_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class PlannedNote:
    """One note of the replayed traffic: when it is sent (real seconds after the start)
    and the token counts the workload drew for it."""

    index: int
    at_s: float
    prompt_tokens: int
    output_tokens: int
    cached_tokens: int = 0  # the shared prefix the node's prompt cache is expected to hold


@dataclass
class NoteOutcome:
    """How one note went, as the client saw it (times in seconds from its send)."""

    index: int
    request_id: str
    sent_s: float  # real seconds after the start that it was actually sent
    late_s: float  # how far behind its planned time the driver sent it
    outcome: str  # "completed", or the gRPC status name it failed with
    ttft_s: float | None = None
    total_s: float | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0
    node_id: str = ""


class PromptBuilder:
    """Synthetic transcripts of a wanted token length, for the fleet's own tokenizer.

    Calibrated through the fleet (max_tokens=1 requests; their usage says the prompt's
    token count): the chat template's and system prompt's cost, and each sentence's and
    the filler's cost. Byte-level BPE merges only within a pre-token (a word), so a text's
    count is the sum of its words' counts and these costs add up. Each note orders the
    sentences by its own seed, so notes share only the system prompt (the cached prefix
    `shared_prefix_tokens` asks for: the system prompt is padded to about that length)."""

    def __init__(self, *, shared_prefix_tokens: int = 0, request_prefix: str = "cal"):
        self.shared_prefix_tokens = shared_prefix_tokens
        self.system = SYSTEM
        self.base_tokens = 0  # template + system + the visit header
        self.sentence_tokens: list[int] = []
        self.pad_tokens = 1
        self._prefix = request_prefix
        self._calls = 0

    async def calibrate(self, client: AsyncFleetClient) -> int:
        """Measure the costs; returns the number of calibration requests sent."""

        async def count(system: str, user: str) -> int:
            self._calls += 1
            req = build_request(
                messages=[("system", system), ("user", user)],
                max_tokens=1,
                request_id=f"{self._prefix}-{self._calls}",
                temperature=0.0,
            )
            result = await client.generate(req, timeout_s=CALIBRATION_TIMEOUT_S)
            return result.prompt_tokens

        header = self._header(0)
        base = await count(self.system, header)
        costs = await asyncio.gather(
            *(count(self.system, header + " " + s) for s in [*SENTENCES, PAD.strip()])
        )
        self.sentence_tokens = [max(1, c - base) for c in costs[:-1]]
        self.pad_tokens = max(1, costs[-1] - base)
        self.base_tokens = base
        if self.shared_prefix_tokens:
            system_base = await count("", header)
            have = base - system_base
            words = self._fill(self.shared_prefix_tokens - have, random.Random(0))
            self.system = SYSTEM + words
            self.base_tokens = await count(self.system, header)
        return self._calls

    @staticmethod
    def _header(index: int) -> str:
        return f"Synthetic visit {index}:"

    def _fill(self, tokens: int, rng: random.Random) -> str:
        """Sentences (in an order from `rng`), then fillers, costing about `tokens`."""
        order = list(range(len(SENTENCES)))
        parts, left = [], tokens
        while left > 0:
            rng.shuffle(order)
            fitted = False
            for k in order:
                if self.sentence_tokens[k] <= left:
                    parts.append(SENTENCES[k])
                    left -= self.sentence_tokens[k]
                    fitted = True
            if not fitted:
                break
        parts.extend([PAD.strip()] * max(0, left // self.pad_tokens))
        return "".join(" " + p for p in parts)

    def messages(self, index: int, prompt_tokens: int) -> list[tuple[str, str]]:
        """A note's chat: the shared system prompt and a transcript costing about
        `prompt_tokens` in all (never less than the fixed part: base_tokens)."""
        if not self.sentence_tokens:
            raise RuntimeError("PromptBuilder.calibrate first")
        body = self._fill(prompt_tokens - self.base_tokens, random.Random(index))
        return [("system", self.system), ("user", self._header(index) + body)]


def note_request(
    builder: PromptBuilder, note: PlannedNote, request_id: str
) -> inference_pb2.GenerateRequest:
    req = build_request(
        messages=builder.messages(note.index, note.prompt_tokens),
        max_tokens=note.output_tokens,
        request_id=request_id,
        temperature=NOTE_TEMPERATURE,
        seed=note.index,
    )
    req.sampling.ignore_eos = True  # the sampled output length, whatever the model writes
    return req


async def _one(
    client: AsyncFleetClient,
    req: inference_pb2.GenerateRequest,
    note: PlannedNote,
    sent_s: float,
    late_s: float,
    timeout_s: float,
) -> NoteOutcome:
    out = NoteOutcome(note.index, req.request_id, sent_s, late_s, "completed")
    started = time.perf_counter()
    final = None
    try:
        async for chunk in client.stream(req, timeout_s=timeout_s):
            if out.ttft_s is None and chunk.token_ids:
                out.ttft_s = time.perf_counter() - started
            if chunk.HasField("final"):
                final = chunk.final
    except FleetError as err:
        out.outcome = err.code
    out.total_s = time.perf_counter() - started
    if final is not None:
        out.prompt_tokens = final.usage.prompt_tokens
        out.completion_tokens = final.usage.completion_tokens
        out.cached_prompt_tokens = final.usage.cached_prompt_tokens
        out.node_id = final.nodes[-1] if final.nodes else final.node_id
        if final.finish_reason in (
            inference_pb2.FINISH_REASON_CANCELLED,
            inference_pb2.FINISH_REASON_ERROR,
        ):
            out.outcome = "INTERRUPTED"
    elif out.outcome == "completed":
        out.outcome = "NO_FINAL"
    return out


@dataclass
class Progress:
    """What the driver has done so far (handed to the progress callback)."""

    planned: int
    sent: int = 0
    ended: int = 0
    failed: int = 0
    elapsed_s: float = 0.0


async def run_notes(
    client: AsyncFleetClient,
    builder: PromptBuilder,
    notes: Sequence[PlannedNote],
    *,
    run_id: str,
    timeout_s: float,
    on_progress: Callable[[Progress], None] | None = None,
    progress_every_s: float = 0.5,
) -> tuple[list[NoteOutcome], float]:
    """Send each note at its planned time (open loop: nothing waits for earlier notes),
    wait for all to end; returns the outcomes in note order and the wall time in seconds."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    progress = Progress(planned=len(notes))
    tasks: list[asyncio.Task] = []

    def done(task: asyncio.Task) -> None:
        progress.ended += 1
        if (
            not task.cancelled()
            and task.exception() is None
            and task.result().outcome != "completed"
        ):
            progress.failed += 1

    async def report() -> None:
        while True:
            progress.elapsed_s = loop.time() - start
            on_progress(progress)
            await asyncio.sleep(progress_every_s)

    reporter = asyncio.ensure_future(report()) if on_progress else None
    try:
        for note in sorted(notes, key=lambda n: n.at_s):
            wait = start + note.at_s - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            now = loop.time() - start
            req = note_request(builder, note, f"{run_id}-{note.index:05d}")
            task = asyncio.ensure_future(
                _one(client, req, note, now, max(0.0, now - note.at_s), timeout_s)
            )
            task.add_done_callback(done)
            tasks.append(task)
            progress.sent += 1
        outcomes = await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        if reporter is not None:
            reporter.cancel()
            progress.elapsed_s = loop.time() - start
            on_progress(progress)
    return sorted(outcomes, key=lambda o: o.index), loop.time() - start


@dataclass
class Measured:
    """Time per note, first token and throughput, from the client's side (or predicted)."""

    notes: int
    completed: int
    p50_s: float
    p95_s: float
    p99_s: float
    ttft_p50_s: float
    ttft_p95_s: float
    notes_per_s: float
    output_tokens_per_s: float


@dataclass
class ReplayReport:
    run_id: str
    coordinator: str
    time_scale: float
    window_start_s: float  # the day's window replayed: seconds after midnight
    window_s: float  # its length in day seconds (real: window_s / time_scale)
    wall_s: float
    measured: Measured
    outcomes: dict[str, int]  # completed / the gRPC status each failed with -> count
    prompt_tokens_planned_mean: float
    prompt_tokens_sent_mean: float
    calibration_requests: int
    send_late_p99_s: float  # how far the driver lagged its schedule (a busy client skews results)
    predicted: Measured | None = None
    error_pct: dict[str, float] = field(default_factory=dict)
    fleet: list[str] = field(default_factory=list)  # the --predict-with profiles, FILE=COUNT

    def as_dict(self) -> dict:
        return asdict(self)


def summarize(outcomes: Sequence[NoteOutcome], wall_s: float) -> Measured:
    """Percentiles over completed notes; throughput over the run's wall time."""
    ok = [o for o in outcomes if o.outcome == "completed"]
    totals = [o.total_s for o in ok if o.total_s is not None]
    ttfts = [o.ttft_s for o in ok if o.ttft_s is not None]
    wall = max(wall_s, 1e-9)
    return Measured(
        notes=len(outcomes),
        completed=len(ok),
        p50_s=percentile(totals, 0.50),
        p95_s=percentile(totals, 0.95),
        p99_s=percentile(totals, 0.99),
        ttft_p50_s=percentile(ttfts, 0.50),
        ttft_p95_s=percentile(ttfts, 0.95),
        notes_per_s=len(ok) / wall,
        output_tokens_per_s=sum(o.completion_tokens for o in ok) / wall,
    )


def error_pct(predicted: Measured, measured: Measured) -> dict[str, float]:
    """(predicted - measured) / measured in percent, for each figure both have."""
    out = {}
    for name in (
        "p50_s",
        "p95_s",
        "p99_s",
        "ttft_p50_s",
        "ttft_p95_s",
        "notes_per_s",
        "output_tokens_per_s",
    ):
        m, p = getattr(measured, name), getattr(predicted, name)
        if m > 0:
            out[name] = round(100.0 * (p - m) / m, 1)
    return out


def outcome_counts(outcomes: Sequence[NoteOutcome]) -> dict[str, int]:
    return dict(Counter(o.outcome for o in outcomes))


def new_run_id() -> str:
    """Request ids of a run start with this (the request log's ids then single the run out)."""
    return f"replay-{uuid.uuid4().hex[:8]}"


def plan_notes(
    workload: Workload,
    *,
    time_scale: float,
    duration_s: float,
    seed: int,
    start_s: float | None = None,
) -> tuple[list[PlannedNote], float, float]:
    """The notes of the day's window [start, start + duration * time_scale) (the busiest
    window when `start_s` is None), on the real clock: (notes, window start, window length)."""
    if not (time_scale > 0 and math.isfinite(time_scale)):
        raise ValueError(f"time scale must be a number > 0, not {time_scale:g}")
    if not (duration_s > 0 and math.isfinite(duration_s)):
        raise ValueError(f"duration must be a number of seconds > 0, not {duration_s:g}")
    length = duration_s * time_scale
    if start_s is None:
        start_s = workload.busiest_window(min(length, DAY_S))[0]
    drawn = workload.requests(random.Random(seed), start_s, start_s + length)
    notes = [
        PlannedNote(
            i, (r.at_s - start_s) / time_scale, r.prompt_tokens, r.output_tokens, r.cached_tokens
        )
        for i, r in enumerate(drawn)
    ]
    return notes, start_s, length


def build_report(
    run_id: str,
    coordinator: str,
    outcomes: Sequence[NoteOutcome],
    wall_s: float,
    notes: Sequence[PlannedNote],
    *,
    time_scale: float,
    window_start_s: float,
    window_s: float,
    calibration_requests: int,
) -> ReplayReport:
    sent = [o.prompt_tokens for o in outcomes if o.prompt_tokens]
    return ReplayReport(
        run_id=run_id,
        coordinator=coordinator,
        time_scale=time_scale,
        window_start_s=window_start_s,
        window_s=window_s,
        wall_s=wall_s,
        measured=summarize(outcomes, wall_s),
        outcomes=outcome_counts(outcomes),
        prompt_tokens_planned_mean=sum(n.prompt_tokens for n in notes) / max(1, len(notes)),
        prompt_tokens_sent_mean=sum(sent) / max(1, len(sent)),
        calibration_requests=calibration_requests,
        send_late_p99_s=percentile([o.late_s for o in outcomes], 0.99),
    )


def parse_fleet(
    specs: Sequence[str], bad: Callable[[str, str], Exception]
) -> list[tuple[Profile, int]]:
    """PROFILE[=COUNT] specs (a file or a shipped profile's name) -> [(profile, count)];
    raises bad("--predict-with", message) on nonsense."""
    fleet = []
    for spec in specs:
        name, _, count_text = spec.rpartition("=") if "=" in spec else (spec, "", "1")
        try:
            count = int(count_text)
            if count < 1:
                raise ValueError
        except ValueError:
            raise bad(
                "--predict-with",
                f"COUNT must be a whole number >= 1, not {count_text!r} in {spec!r}",
            ) from None
        try:
            fleet.append((resolve_profile(name), count))
        except ProfileError as exc:
            raise bad("--predict-with", str(exc)) from None
    return fleet


def predict(
    fleet: Sequence[tuple[Profile, int]],
    notes: Sequence[PlannedNote],
    nodes_per_host: int = 1,
    host_parallelism: float = 1.0,
) -> Measured:
    """The planner's prediction (cluster.capacity.simulate) for these very notes, at the
    times they were planned, on the fleet the profiles describe (`nodes_per_host` nodes
    sharing each host's compute, `host_parallelism` of them at full speed); figures as
    `summarize` computes them from a run (throughput over first send to last end)."""
    requests = [
        Request(n.at_s, n.prompt_tokens, n.output_tokens, n.cached_tokens)
        for n in sorted(notes, key=lambda n: n.at_s)
    ]
    end = max((n.at_s for n in notes), default=0.0) + 1e-6
    specs = fleet_of(fleet, nodes_per_host, host_parallelism)
    result = simulate(specs, requests, window=(0.0, end))
    by_arrival = sorted(notes, key=lambda n: n.at_s)
    done = [
        (n, total)
        for n, total in zip(by_arrival, result.totals, strict=True)
        if math.isfinite(total)
    ]
    wall = max((n.at_s + total for n, total in done), default=0.0)
    totals = [total for _, total in done]
    ttfts = [t for t in result.ttfts if math.isfinite(t)]
    return Measured(
        notes=len(notes),
        completed=len(done),
        p50_s=percentile(totals, 0.50),
        p95_s=percentile(totals, 0.95),
        p99_s=percentile(totals, 0.99),
        ttft_p50_s=percentile(ttfts, 0.50),
        ttft_p95_s=percentile(ttfts, 0.95),
        notes_per_s=len(done) / max(wall, 1e-9),
        output_tokens_per_s=sum(n.output_tokens for n, _ in done) / max(wall, 1e-9),
    )


def add_prediction(
    report: ReplayReport,
    fleet: Sequence[tuple[Profile, int]],
    notes: Sequence[PlannedNote],
    nodes_per_host: int = 1,
    host_parallelism: float = 1.0,
) -> None:
    """Put the planner's prediction and its error beside the measurement."""
    report.predicted = predict(fleet, notes, nodes_per_host, host_parallelism)
    report.error_pct = error_pct(report.predicted, report.measured)
    report.fleet = [f"{p.path or p.name}={count}" for p, count in fleet]
