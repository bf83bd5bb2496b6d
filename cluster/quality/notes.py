"""Structured output: note templates shipped with StudioFleet and callers' JSON schemas.

`resolve(output_format)` turns a request's OutputFormat into an `OutputSpec` (the schema,
its grammar for constrained decoding, and the scorer's expectations) or raises
InvalidRequest naming what is wrong with it. `check_output(spec, text, finish)` validates
a completion and says which rule failed, never quoting the text (PHI).
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass, field
from typing import Optional

from cluster.validation import InvalidRequest

MAX_SCHEMA_BYTES = 64 * 1024


def _sections(max_len: int, names: tuple[str, ...]) -> dict:
    return {
        "type": "object",
        "properties": {n: {"type": "string", "minLength": 1, "maxLength": max_len} for n in names},
        "required": list(names),
        "additionalProperties": False,
    }


SOAP = ("subjective", "objective", "assessment", "plan")


@dataclass(frozen=True)
class NoteTemplate:
    name: str
    description: str
    schema: dict
    sections: tuple[str, ...]          # required and non-empty for a good note
    length: tuple[int, int]            # characters of section text a good note has (min, max)


NOTE_TEMPLATES: dict[str, NoteTemplate] = {t.name: t for t in (
    NoteTemplate("soap", "SOAP note: subjective, objective, assessment, plan",
                 _sections(1500, SOAP), SOAP, (200, 6000)),
    NoteTemplate("soap-brief", "Short SOAP note for follow-ups (each section at most 160 characters)",
                 _sections(160, SOAP), SOAP, (40, 700)),
    NoteTemplate("care-coordination", "Care-coordination call summary: reason, actions, follow-up",
                 _sections(600, ("reason", "actions", "follow_up")), ("reason", "actions", "follow_up"),
                 (60, 1800)),
)}


@dataclass(frozen=True)
class OutputSpec:
    """A checked output format: what the node constrains decoding to and the scorer expects."""
    format: str                        # template name or "json_schema:<digest12>"
    schema: dict = field(repr=False)
    schema_text: str = field(repr=False)  # canonical JSON, what grammar engines compile
    sections: tuple[str, ...] = ()
    length: Optional[tuple[int, int]] = None


def note_template(name: str) -> NoteTemplate:
    try:
        return NOTE_TEMPLATES[name]
    except KeyError:
        raise InvalidRequest(f"output_format.note_template {name!r} is not a known note template; "
                             f"use one of {', '.join(sorted(NOTE_TEMPLATES))} or send a json_schema") from None


def resolve(output_format) -> Optional[OutputSpec]:
    """The request's OutputFormat (proto) as an OutputSpec; None when unset."""
    if output_format is None:
        return None
    kind = output_format.WhichOneof("kind")
    if kind is None:
        return None
    if kind == "note_template":
        return template_spec(output_format.note_template)
    return schema_spec(output_format.json_schema)


def template_spec(name: str) -> OutputSpec:
    t = note_template(name)
    return OutputSpec(t.name, t.schema, _canonical(t.schema), t.sections, t.length)


def schema_spec(text: str) -> OutputSpec:
    if len(text.encode()) > MAX_SCHEMA_BYTES:
        raise InvalidRequest(f"output_format.json_schema is larger than {MAX_SCHEMA_BYTES // 1024} KiB")
    return _schema_spec(text)


@functools.lru_cache(maxsize=256)
def _schema_spec(text: str) -> OutputSpec:
    try:
        schema = json.loads(text)
    except ValueError as exc:
        raise InvalidRequest(f"output_format.json_schema is not valid JSON ({exc.msg} at line {exc.lineno} "
                             f"column {exc.colno})") from None
    if not isinstance(schema, dict):
        raise InvalidRequest("output_format.json_schema must be a JSON object (a schema), not "
                             f"{type(schema).__name__}")
    check_schema(schema)
    canonical = _canonical(schema)
    digest = hashlib.sha256(json.dumps(schema, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:12]
    required = tuple(schema.get("required", ())) if schema.get("type") == "object" else ()
    return OutputSpec(f"json_schema:{digest}", schema, canonical, tuple(r for r in required if isinstance(r, str)))


def check_schema(schema: dict) -> None:
    """Draft 2020-12 meta-schema check, then the grammar compiler's: a schema it cannot
    turn into a grammar (unsupported keywords, unsatisfiable) is refused before any work."""
    import jsonschema

    try:
        jsonschema.Draft202012Validator.check_schema(schema)
    except jsonschema.SchemaError as exc:
        where = "/" + "/".join(str(p) for p in exc.path) if exc.path else "the top level"
        raise InvalidRequest(f"output_format.json_schema is not a valid JSON Schema: {exc.validator!r} "
                             f"at {where}: {exc.message[:200]}") from None
    error = grammar_error(_canonical(schema))
    if error:
        raise InvalidRequest(f"output_format.json_schema cannot be enforced while decoding: {' '.join(error.split())[:300]}; "
                             "simplify the schema (README 'Clinical notes' lists what is supported)")


def grammar(schema_text: str) -> str:
    """The llguidance grammar for a schema (compact JSON: no free whitespace to wander in)."""
    import llguidance

    return llguidance.LLMatcher.grammar_from_json_schema(
        schema_text, defaults={"whitespace_flexible": False})


def grammar_error(schema_text: str) -> str:
    import llguidance

    try:
        g = grammar(schema_text)
    except (ValueError, RuntimeError) as exc:
        return str(exc)
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(g)
    return messages[0] if is_error and messages else ("invalid grammar" if is_error else "")


def _canonical(schema: dict) -> str:
    """Compact JSON in the schema's own key order: the grammar emits properties in that
    order (subjective, objective, assessment, plan), so it must not be sorted."""
    return json.dumps(schema, separators=(",", ":"))


@dataclass(frozen=True)
class Checked:
    valid: bool
    value: object = field(default=None, repr=False)
    rule: str = ""
    path: str = ""
    error: str = ""


def check_output(spec: OutputSpec, text: str, finish: str) -> Checked:
    """Parse and validate a completion; the error names the rule and where, never a value."""
    import jsonschema

    try:
        value = json.loads(text)
    except ValueError as exc:
        if finish == "length":
            return Checked(False, rule="truncated", error=f"the output hit max_tokens before the {spec.format} "
                           "object was complete; raise max_tokens")
        return Checked(False, rule="json", error=f"the output is not JSON ({exc.msg} at character {exc.pos})")
    validator = jsonschema.Draft202012Validator(spec.schema)
    error = jsonschema.exceptions.best_match(validator.iter_errors(value))
    if error is None:
        return Checked(True, value=value)
    path = "/" + "/".join(str(p) for p in error.absolute_path)
    return Checked(False, rule=str(error.validator), path=path,
                   error=f"the output breaks the schema's {error.validator!r} rule at {path}")
