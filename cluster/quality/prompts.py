"""Versioned prompt templates, per model family.

A prompt tuned for one model family does not transfer to another, so each template has
versions per family (`config.json` model_type: "qwen2", "llama", ...) plus a "default"
family for models with none of their own. A request names the template; the node picks
the newest version for its model's family unless the request pins one, and reports the
version it used (`soap-note@qwen2/v2`) on the final chunk, where the coordinator records
it in the request log. Versions are never edited once shipped: a change is a new version.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from typing import Optional

from cluster.invalid_request import InvalidRequest

MAX_VARIABLE_CHARS = 200_000


@dataclass(frozen=True)
class PromptVersion:
    template: str  # e.g. "soap-note"
    family: str  # e.g. "qwen2", or "default"
    version: str  # e.g. "v2"
    system: str
    user: str  # str.format fields are the variables, e.g. {transcript}
    note: str  # the note template (output format) it asks for
    # The completion budget when the request leaves max_tokens at 0: room for the longest
    # note the note template's schema allows (a brief note is at most ~700 characters).
    max_tokens: int
    temperature: float = 0.0

    @property
    def id(self) -> str:
        return f"{self.template}@{self.family}/{self.version}"

    @property
    def variables(self) -> tuple[str, ...]:
        return tuple(sorted({f for _, f, _, _ in string.Formatter().parse(self.user) if f}))

    def render(self, variables: dict[str, str]) -> tuple[tuple[str, str], ...]:
        """Chat messages (system, user) with the variables filled in."""
        return (("system", self.system), ("user", self.user.format_map(variables)))


_SOAP_SYSTEM_V1 = (
    "You are a clinical documentation assistant. Write a SOAP note from the encounter "
    "transcript. Use only facts stated in the transcript. Reply with JSON only."
)
_SOAP_SYSTEM_V2 = (
    "You are a clinical documentation assistant for a care-management team. From the "
    "encounter transcript, write a SOAP note as a JSON object with the keys subjective, "
    "objective, assessment and plan. Each value is plain prose. Subjective: the patient's "
    "own account. Objective: vital signs, examination and results. Assessment: the "
    "clinician's conclusions. Plan: treatment, orders, education and follow-up. Use only "
    "facts stated in the transcript; write 'not documented' for anything missing. "
    "Never add patient identifiers."
)
_SOAP_USER = "Encounter transcript:\n\n{transcript}\n\nWrite the SOAP note as JSON."
_BRIEF_USER = "Encounter transcript:\n\n{transcript}\n\nWrite a brief SOAP note as JSON, one or two sentences per section."
_COORD_SYSTEM = (
    "You summarise care-coordination calls for the care team as a JSON object with the keys "
    "reason, actions and follow_up. Use only facts stated in the call."
)
_COORD_USER = "Call transcript:\n\n{transcript}\n\nWrite the summary as JSON."

_VERSIONS = (
    PromptVersion("soap-note", "default", "v1", _SOAP_SYSTEM_V1, _SOAP_USER, "soap", 1200),
    PromptVersion("soap-note", "qwen2", "v1", _SOAP_SYSTEM_V1, _SOAP_USER, "soap", 1200),
    PromptVersion("soap-note", "qwen2", "v2", _SOAP_SYSTEM_V2, _SOAP_USER, "soap", 1200),
    PromptVersion("soap-note", "llama", "v1", _SOAP_SYSTEM_V2, _SOAP_USER, "soap", 1200),
    PromptVersion("soap-brief", "default", "v1", _SOAP_SYSTEM_V2, _BRIEF_USER, "soap-brief", 1000),
    PromptVersion(
        "care-coordination", "default", "v1", _COORD_SYSTEM, _COORD_USER, "care-coordination", 800
    ),
)

REGISTRY: dict[str, dict[str, list[PromptVersion]]] = {}
for _v in _VERSIONS:
    REGISTRY.setdefault(_v.template, {}).setdefault(_v.family, []).append(_v)


def names() -> list[str]:
    return sorted(REGISTRY)


def check(name: str, version: str, variables: dict[str, str]) -> None:
    """What every role can check without knowing the model: the template exists, a pinned
    version exists, and the variables every version needs are there; raises InvalidRequest.
    Messages name registry entries only, never what the caller sent (name, version, keys)."""
    families = _families(name)
    candidates = [v for vs in families.values() for v in vs]
    if version:
        candidates = [_pinned(name, version, families)]
    needed = set().union(*(v.variables for v in candidates))
    missing = sorted(needed - set(variables))
    if missing:
        raise InvalidRequest(f"template {name} needs the variable(s) {', '.join(missing)}")
    extra = len(set(variables) - needed)
    if extra:
        raise InvalidRequest(
            f"template {name} takes only the variable(s) {', '.join(sorted(needed))}; "
            f"the request has {extra} other(s)"
        )
    for key in sorted(needed):  # registry names: safe to name
        if len(variables[key]) > MAX_VARIABLE_CHARS:
            raise InvalidRequest(
                f"template variable {key} is longer than {MAX_VARIABLE_CHARS} characters"
            )
        if not variables[key].strip():
            raise InvalidRequest(f"template variable {key} is empty")


def recorded(name: str, version: str = "") -> str:
    """A requested template as logs and the request log may show it: `name[@version]` when
    both are registry entries, else "unknown" (never the caller's text)."""
    families = REGISTRY.get(name)
    if families is None:
        return "unknown"
    if not version:
        return name
    family, _, ver = version.partition("/")
    known = any(v.version == ver for v in families.get(family, ()))
    return f"{name}@{version}" if known else f"{name}@unknown"


def known_id(version_id: str) -> str:
    """A version id a node reported (`soap-note@qwen2/v2`) if the registry has it, else
    "unknown" ("" stays ""): only registry names reach the request log."""
    if not version_id:
        return ""
    return version_id if any(v.id == version_id for v in _VERSIONS) else "unknown"


def budget(name: str) -> int:
    return max(v.max_tokens for vs in _families(name).values() for v in vs)


def select(name: str, version: str, family: str) -> PromptVersion:
    """The version to use on a node whose model family is `family`."""
    families = _families(name)
    if version:
        return _pinned(name, version, families)
    versions = families.get(family) or families.get("default")
    if not versions:
        raise InvalidRequest(
            f"template {name} has no version for model family {family!r} and no default; "
            f"pin one of {', '.join(_ids(families))} with version"
        )
    return versions[-1]


def _families(name: str) -> dict[str, list[PromptVersion]]:
    families = REGISTRY.get(name)
    if families is None:
        raise InvalidRequest(
            f"template.name is not in the registry; use one of {', '.join(names())}"
        )
    return families


def _pinned(name: str, version: str, families: dict[str, list[PromptVersion]]) -> PromptVersion:
    family, _, ver = version.partition("/")
    found: Optional[PromptVersion] = next(
        (v for v in families.get(family, ()) if v.version == ver), None
    )
    if found is None:
        raise InvalidRequest(
            f"template {name} has no such version (template.version); use one of "
            f"{', '.join(_ids(families))}"
        )
    return found


def _ids(families: dict[str, list[PromptVersion]]) -> list[str]:
    return [f"{v.family}/{v.version}" for vs in families.values() for v in vs]
