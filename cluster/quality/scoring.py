"""The note scorer: named sub-scores in 0..1 and their weighted total.

Every completed note (a request with an output format) is scored on the node that
finished it, from the whole completion (a resumed request's prefix included). Details
name sections and counts, never generated text (PHI). Change the rubric, change RUBRIC:
scores from different rubrics are not comparable, and `fleetctl eval compare` says so.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

from cluster.quality.notes import Checked, OutputSpec

RUBRIC = "notes-v1"

WEIGHTS = {
    "schema_valid": 0.30,
    "sections": 0.20,
    "not_truncated": 0.15,
    "repetition": 0.15,
    "length": 0.10,
    "no_refusal": 0.10,
}

# Phrases a model uses to decline; matched case-insensitively on word boundaries.
REFUSAL_MARKERS = (
    "i cannot",
    "i can't",
    "i can not",
    "i am unable",
    "i'm unable",
    "i won't",
    "i will not",
    "as an ai",
    "as a language model",
    "i'm sorry, but",
    "i am sorry, but",
    "cannot assist",
    "can't assist",
    "cannot help with",
    "not able to provide",
    "unable to provide",
)
_REFUSAL = re.compile(
    r"\b(?:" + "|".join(re.escape(m) for m in REFUSAL_MARKERS) + r")\b", re.IGNORECASE
)
_WORD = re.compile(r"\w+", re.UNICODE)
_NGRAM = 3
# Distinct word trigrams / all trigrams: prose is ~0.95+, a model stuck in a loop far less.
_REPEAT_FLOOR, _REPEAT_OK = 0.2, 0.8


@dataclass(frozen=True)
class Part:
    name: str
    score: float
    weight: float
    detail: str = ""


@dataclass(frozen=True)
class Score:
    total: float
    parts: tuple[Part, ...]
    rubric: str = RUBRIC

    def part(self, name: str) -> Optional[Part]:
        return next((p for p in self.parts if p.name == name), None)


def score_note(spec: OutputSpec, checked: Checked, text: str, finish: str) -> Score:
    """Score one completion against its output spec (`checked` from notes.check_output)."""
    sections = _section_texts(spec, checked)
    body = " ".join(sections.values()) if sections else text
    parts = [
        Part(
            "schema_valid",
            1.0 if checked.valid else 0.0,
            WEIGHTS["schema_valid"],
            "" if checked.valid else f"{checked.rule} {checked.path}".strip(),
        ),
        _sections_part(spec, sections),
        Part(
            "not_truncated",
            0.0 if finish == "length" else 1.0,
            WEIGHTS["not_truncated"],
            "hit max_tokens" if finish == "length" else "",
        ),
        _repetition_part(body),
        _length_part(spec, body),
        _refusal_part(text),
    ]
    return _total(parts)


def _total(parts: list[Part]) -> Score:
    weight = sum(p.weight for p in parts)
    total = sum(p.score * p.weight for p in parts) / weight if weight else 0.0
    return Score(
        round(total, 4), tuple(Part(p.name, round(p.score, 4), p.weight, p.detail) for p in parts)
    )


def _section_texts(spec: OutputSpec, checked: Checked) -> dict[str, str]:
    """The required sections' text, from the parsed object (valid or not, if it parsed)."""
    value = checked.value
    if not isinstance(value, dict):
        return {}
    names = spec.sections or tuple(k for k, v in value.items() if isinstance(v, str))
    return {n: value[n] for n in names if isinstance(value.get(n), str)}


def _sections_part(spec: OutputSpec, sections: dict[str, str]) -> Part:
    expected = spec.sections
    if not expected:
        return Part(
            "sections",
            1.0 if sections else 0.0,
            WEIGHTS["sections"],
            "" if sections else "no sections",
        )
    missing = [n for n in expected if not sections.get(n, "").strip()]
    detail = f"missing or empty: {', '.join(missing)}" if missing else ""
    return Part(
        "sections", (len(expected) - len(missing)) / len(expected), WEIGHTS["sections"], detail
    )


def _length_part(spec: OutputSpec, body: str) -> Part:
    n = len(body.strip())
    if spec.length is None:
        return Part("length", 1.0 if n else 0.0, WEIGHTS["length"], "" if n else "empty")
    low, high = spec.length
    if n < low:
        return Part("length", n / low, WEIGHTS["length"], f"{n} characters, under {low}")
    if n > high:
        return Part("length", high / n, WEIGHTS["length"], f"{n} characters, over {high}")
    return Part("length", 1.0, WEIGHTS["length"], "")


def _repetition_part(body: str) -> Part:
    words = [w.lower() for w in _WORD.findall(body)]
    grams = [tuple(words[i : i + _NGRAM]) for i in range(len(words) - _NGRAM + 1)]
    if len(grams) < 4:
        return Part("repetition", 1.0, WEIGHTS["repetition"], "")
    distinct = len(set(grams)) / len(grams)
    score = min(1.0, max(0.0, (distinct - _REPEAT_FLOOR) / (_REPEAT_OK - _REPEAT_FLOOR)))
    detail = f"{distinct:.0%} of word trigrams distinct" if score < 1.0 else ""
    return Part("repetition", score, WEIGHTS["repetition"], detail)


def _refusal_part(text: str) -> Part:
    hits = len(_REFUSAL.findall(text))
    return Part(
        "no_refusal",
        0.0 if hits else 1.0,
        WEIGHTS["no_refusal"],
        f"{hits} refusal marker(s)" if hits else "",
    )
