"""A day of clinical-note traffic, shared by `fleetctl plan` (simulated) and `fleetctl replay`
(sent to a real fleet): notes per day, the day's arrival shape, prompt and output token
distributions, and the shared (cached) prompt prefix.

Arrivals are a non-homogeneous Poisson process whose rate follows the shape; `arrivals`
draws them by thinning (Lewis and Shedler). Times are seconds since midnight.
"""

from __future__ import annotations

import csv
import json
import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

# A replayed note samples (seeded, so a rerun writes the same note); `fleetctl profile`
# measures with the same sampling by default, since seeded sampling costs more per sequence
# than greedy decoding (docs/capacity.md).
NOTE_TEMPERATURE = 0.7

DAY_S = 86_400.0
MINUTES = 1440
DEFAULT_NOTES_PER_DAY = 6000.0  # the field report's clinic


class WorkloadError(ValueError):
    """A workload description that cannot be used; the message names what is wrong, and
    `flag` the command-line flag it came from (set by `build_workload`)."""

    def __init__(self, message: str, flag: str = ""):
        super().__init__(message)
        self.flag = flag


def _from(flag: str, fn, *args):
    """fn(*args), its WorkloadError tagged with the flag whose value it read."""
    try:
        return fn(*args)
    except WorkloadError as exc:
        raise WorkloadError(str(exc), flag) from None


@dataclass(frozen=True)
class TokenDist:
    """Token counts: a constant, a uniform integer range lo:hi (inclusive), or an empirical sample."""

    lo: int
    hi: int
    values: tuple[int, ...] = ()  # empirical: drawn from these with equal weight

    @classmethod
    def parse(cls, text: str, what: str = "tokens") -> TokenDist:
        """'500' or '400:600'."""
        parts = text.strip().split(":")
        try:
            nums = [int(p) for p in parts]
        except ValueError:
            raise WorkloadError(f"{what}: expected N or LO:HI (integers), not {text!r}") from None
        if len(nums) not in (1, 2):
            raise WorkloadError(f"{what}: expected N or LO:HI, not {text!r}")
        lo, hi = nums[0], nums[-1]
        if lo < 0 or hi < lo:
            raise WorkloadError(f"{what}: need 0 <= LO <= HI, not {text!r}")
        return cls(lo, hi)

    @classmethod
    def empirical(cls, values: Sequence[int]) -> TokenDist:
        vals = tuple(int(v) for v in values)
        if not vals:
            raise WorkloadError("an empirical token distribution needs at least one value")
        return cls(min(vals), max(vals), vals)

    def sample(self, rng: random.Random) -> int:
        if self.values:
            return self.values[rng.randrange(len(self.values))]
        return self.lo if self.lo == self.hi else rng.randint(self.lo, self.hi)

    @property
    def mean(self) -> float:
        return sum(self.values) / len(self.values) if self.values else (self.lo + self.hi) / 2.0

    def describe(self) -> str:
        if self.values:
            return f"{len(self.values)} logged values, {self.lo}-{self.hi}, mean {self.mean:.0f}"
        return str(self.lo) if self.lo == self.hi else f"{self.lo}:{self.hi}"


@dataclass(frozen=True)
class ArrivalShape:
    """The fraction of the day's notes arriving in each minute of the day (1,440 weights summing to 1)."""

    weights: tuple[float, ...]
    label: str

    @classmethod
    def hours(cls, start_h: float, end_h: float, peak_factor: float) -> ArrivalShape:
        """Rate inside [start_h, end_h) is `peak_factor` x the rate outside (wrapping past
        midnight if start > end); the weights sum to 1."""
        if not (0 <= start_h <= 24 and 0 <= end_h <= 24) or start_h == end_h:
            raise WorkloadError(
                f"hours: need two different hours in 0-24, not {start_h:g}-{end_h:g}"
            )
        if not (peak_factor > 0 and math.isfinite(peak_factor)):
            raise WorkloadError(f"peak factor: must be a number > 0, not {peak_factor:g}")
        raw = []
        for m in range(MINUTES):
            h = (m + 0.5) / 60.0
            inside = start_h <= h < end_h if start_h < end_h else (h >= start_h or h < end_h)
            raw.append(peak_factor if inside else 1.0)
        total = sum(raw)
        return cls(
            tuple(r / total for r in raw),
            f"{start_h:g}-{end_h:g}h at {peak_factor:g}x the rest of the day",
        )

    @classmethod
    def per_minute(cls, counts: Sequence[float], label: str) -> ArrivalShape:
        if len(counts) != MINUTES:
            raise WorkloadError(f"{label}: need {MINUTES} minutes, got {len(counts)}")
        total = float(sum(counts))
        if total <= 0 or any(c < 0 or not math.isfinite(c) for c in counts):
            raise WorkloadError(f"{label}: counts must be >= 0 with a positive total")
        return cls(tuple(c / total for c in counts), label)

    def fraction(self, minute: int) -> float:
        return self.weights[int(minute) % MINUTES]


def read_arrivals_csv(path: Path | str) -> tuple[list[float], float]:
    """Arrivals per minute from a CSV: one row per minute of the day, either `count` or
    `minute,count` / `HH:MM,count` (a header row is skipped; missing minutes are 0).
    Returns (1,440 counts, their total)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise WorkloadError(f"{path}: cannot read: {exc.strerror or exc}") from None
    counts = [0.0] * MINUTES
    rows = [r for r in csv.reader(text.splitlines()) if r and any(c.strip() for c in r)]
    if rows and not _numberish(rows[0][-1]):
        rows = rows[1:]  # header
    if not rows:
        raise WorkloadError(f"{path}: no rows of arrivals")
    single = all(len(r) == 1 for r in rows)
    if single and len(rows) != MINUTES:
        raise WorkloadError(
            f"{path}: a one-column CSV needs {MINUTES} rows (one per minute), got {len(rows)}"
        )
    for i, row in enumerate(rows):
        line = i + 1
        try:
            if single:
                minute, count = i, float(row[0])
            else:
                if len(row) != 2:
                    raise ValueError("expected 2 columns: minute (or HH:MM) and count")
                minute = _minute(row[0].strip())
                count = float(row[1])
            if not (0 <= minute < MINUTES):
                raise ValueError(f"minute {minute} outside 0-1439")
            if count < 0 or not math.isfinite(count):
                raise ValueError(f"count must be >= 0, not {row[-1]!r}")
        except ValueError as exc:
            raise WorkloadError(f"{path}: data row {line}: {exc}") from None
        counts[minute] += count
    total = sum(counts)
    if total <= 0:
        raise WorkloadError(f"{path}: no arrivals (all counts are 0)")
    return counts, total


def _numberish(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def _minute(text: str) -> int:
    if ":" in text:
        h, m = text.split(":", 1)
        return int(h) * 60 + int(m)
    return int(text)


def read_request_log(path: Path | str) -> list[tuple[int, int]]:
    """(prompt_tokens, completion_tokens) of the completed requests in a request-log export:
    `fleetctl requests -o json` output ({"requests": [...]}), or a JSON list of such records,
    or JSON lines of them."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise WorkloadError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        doc = json.loads(text)
        records = doc.get("requests", []) if isinstance(doc, dict) else doc
    except json.JSONDecodeError:
        try:
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as exc:
            raise WorkloadError(
                f"{path}: not a request-log export (JSON or JSON lines): {exc}"
            ) from None
    if not isinstance(records, list):
        raise WorkloadError(f"{path}: expected a list of request records")
    pairs = []
    for i, r in enumerate(records):
        if not isinstance(r, dict):
            raise WorkloadError(f"{path}: record {i + 1} is not an object")
        if r.get("outcome", "completed") != "completed":
            continue
        try:
            p, c = int(r.get("prompt_tokens", 0)), int(r.get("completion_tokens", 0))
        except (TypeError, ValueError):
            raise WorkloadError(
                f"{path}: record {i + 1}: prompt_tokens / completion_tokens must be integers"
            ) from None
        if p < 0 or c < 0:
            raise WorkloadError(f"{path}: record {i + 1}: negative token count")
        if c > 0:
            pairs.append((p, c))
    if not pairs:
        raise WorkloadError(f"{path}: no completed requests with output tokens in the export")
    return pairs


@dataclass(frozen=True)
class Request:
    """One note: when it arrives (seconds since midnight) and its token counts."""

    at_s: float
    prompt_tokens: int
    output_tokens: int
    cached_tokens: int = 0  # of the prompt, found in the node's prompt cache


@dataclass(frozen=True)
class Workload:
    notes_per_day: float
    shape: ArrivalShape
    prompt: TokenDist
    output: TokenDist
    shared_prefix_tokens: int = 0
    pairs: tuple[tuple[int, int], ...] = ()  # joint (prompt, output) draws from a request log
    tokens_label: str = ""

    def __post_init__(self):
        if not (self.notes_per_day > 0 and math.isfinite(self.notes_per_day)):
            raise WorkloadError(f"notes per day: must be a number > 0, not {self.notes_per_day:g}")
        if self.shared_prefix_tokens < 0:
            raise WorkloadError(
                f"shared prefix tokens: must be >= 0, not {self.shared_prefix_tokens}"
            )

    def rate_at(self, t_s: float) -> float:
        """Notes per second arriving at `t_s` seconds since midnight (wraps by day)."""
        return self.notes_per_day * self.shape.fraction(int((t_s % DAY_S) // 60)) / 60.0

    @property
    def peak_rate(self) -> float:
        return self.notes_per_day * max(self.shape.weights) / 60.0

    @property
    def mean_rate(self) -> float:
        return self.notes_per_day / DAY_S

    def expected_notes(self, start_s: float, end_s: float) -> float:
        """The mean number of arrivals in [start_s, end_s)."""
        total, t = 0.0, start_s
        while t < end_s:
            nxt = min(end_s, (math.floor(t / 60.0) + 1) * 60.0)
            total += self.rate_at(t) * (nxt - t)
            t = nxt
        return total

    def busiest_window(self, length_s: float) -> tuple[float, float]:
        """The [start, end) of `length_s` seconds (whole minutes, within one day) with the most arrivals."""
        n = max(1, min(MINUTES, int(math.ceil(length_s / 60.0))))
        w = self.shape.weights
        window = sum(w[:n])
        best, best_at = window, 0
        for start in range(1, MINUTES - n + 1):
            window += w[start + n - 1] - w[start - 1]
            if window > best + 1e-15:
                best, best_at = window, start
        return best_at * 60.0, (best_at + n) * 60.0

    @property
    def mean_prompt_tokens(self) -> float:
        return sum(p for p, _ in self.pairs) / len(self.pairs) if self.pairs else self.prompt.mean

    @property
    def mean_output_tokens(self) -> float:
        return sum(o for _, o in self.pairs) / len(self.pairs) if self.pairs else self.output.mean

    def sample_tokens(self, rng: random.Random) -> tuple[int, int]:
        """(prompt_tokens, output_tokens) of one note; output is at least 1 token."""
        if self.pairs:
            p, o = self.pairs[rng.randrange(len(self.pairs))]
        else:
            p, o = self.prompt.sample(rng), self.output.sample(rng)
        return p, max(1, o)

    def arrivals(self, rng: random.Random, start_s: float, end_s: float) -> Iterator[float]:
        """Arrival times in [start_s, end_s): a Poisson process of rate `rate_at`, by thinning."""
        top = self.peak_rate
        if top <= 0:
            return
        t = start_s
        while True:
            t += rng.expovariate(top)
            if t >= end_s:
                return
            if rng.random() * top <= self.rate_at(t):
                yield t

    def requests(self, rng: random.Random, start_s: float, end_s: float) -> list[Request]:
        """The notes arriving in [start_s, end_s), with their token draws."""
        out = []
        for t in self.arrivals(rng, start_s, end_s):
            p, o = self.sample_tokens(rng)
            out.append(Request(t, p, o, min(p, self.shared_prefix_tokens)))
        return out

    def describe(self) -> str:
        tokens = (
            self.tokens_label
            or f"prompt {self.prompt.describe()}, output {self.output.describe()} tokens"
        )
        prefix = f", shared prefix {self.shared_prefix_tokens}" if self.shared_prefix_tokens else ""
        return f"{self.notes_per_day:g} notes/day, {self.shape.label}; {tokens}{prefix}"


def parse_hours(text: str) -> tuple[float, float]:
    """'8-18' -> (8, 18); hours 0-24, may wrap ('22-6')."""
    parts = text.strip().split("-")
    try:
        if len(parts) != 2:
            raise ValueError
        start, end = float(parts[0]), float(parts[1])
    except ValueError:
        raise WorkloadError(
            f"hours: expected START-END in hours (e.g. 8-18), not {text!r}"
        ) from None
    if not (0 <= start <= 24 and 0 <= end <= 24):
        raise WorkloadError(f"hours: START and END must be within 0-24, not {text!r}")
    if start == end:
        raise WorkloadError(f"hours: START and END must differ, not {text!r}")
    return start, end


def build_workload(
    *,
    notes_per_day: float | None = None,
    hours: str = "8-18",
    peak_factor: float = 2.0,
    arrivals_csv: Path | None = None,
    prompt_tokens: str = "500",
    output_tokens: str = "400:600",
    tokens_from: Path | None = None,
    shared_prefix_tokens: int = 0,
) -> Workload:
    """A Workload from the planner's and replay's options; WorkloadError (with the flag) on
    nonsense. With a CSV and no notes-per-day, the CSV's total is the day's volume."""
    if notes_per_day is not None and not (notes_per_day > 0 and math.isfinite(notes_per_day)):
        raise WorkloadError(f"must be a number > 0, not {notes_per_day:g}", "--notes-per-day")
    if shared_prefix_tokens < 0:
        raise WorkloadError(f"must be >= 0, not {shared_prefix_tokens}", "--shared-prefix-tokens")
    if arrivals_csv is not None:
        counts, total = _from("--arrivals-csv", read_arrivals_csv, arrivals_csv)
        shape = ArrivalShape.per_minute(
            counts, f"arrivals per minute from {Path(arrivals_csv).name}"
        )
        notes = total if notes_per_day is None else notes_per_day
    else:
        start, end = _from("--hours", parse_hours, hours)
        if not (peak_factor > 0 and math.isfinite(peak_factor)):
            raise WorkloadError(f"must be a number > 0, not {peak_factor:g}", "--peak-factor")
        shape = ArrivalShape.hours(start, end, peak_factor)
        notes = DEFAULT_NOTES_PER_DAY if notes_per_day is None else notes_per_day
    prompt = _from("--prompt-tokens", TokenDist.parse, prompt_tokens, "prompt tokens")
    output = _from("--output-tokens", TokenDist.parse, output_tokens, "output tokens")
    if output.hi < 1:
        raise WorkloadError("a note has at least 1 output token", "--output-tokens")
    pairs: tuple[tuple[int, int], ...] = ()
    label = ""
    if tokens_from is not None:
        pairs = tuple(_from("--tokens-from", read_request_log, tokens_from))
        prompt = TokenDist.empirical([p for p, _ in pairs])
        output = TokenDist.empirical([o for _, o in pairs])
        label = (
            f"tokens from {len(pairs)} logged requests in {Path(tokens_from).name} (prompt mean "
            f"{prompt.mean:.0f}, output mean {output.mean:.0f})"
        )
    return Workload(notes, shape, prompt, output, shared_prefix_tokens, pairs, label)
