"""Structured output: note templates shipped with StudioFleet and callers' JSON schemas.

`resolve(output_format)` turns a request's OutputFormat into an `OutputSpec` (the schema,
its grammar for constrained decoding, and the scorer's expectations) or raises
InvalidRequest naming what is wrong with it. `check_output(spec, text, finish)` validates
a completion and says which rule failed, never quoting the text (PHI). No message quotes
the caller's schema either (its keys, patterns and values may hold PHI): a rule is named by
its keyword and a place by a path of keywords, with the caller's names shown as `*`.
`resolve_async` checks a new schema in a child process (schema_worker), off the event loop
and its GIL, killed past COMPILE_TIMEOUT_S.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import hashlib
import json
import weakref
from dataclasses import dataclass, field
from typing import Optional

from cluster.invalid_request import InvalidRequest, guarded

MAX_SCHEMA_BYTES = 64 * 1024
MAX_SCHEMA_DEPTH = 64  # JSON nesting levels (a property is two: properties, its schema)
COMPILE_TIMEOUT_S = 5.0  # a 64 KiB schema checks in ~0.5 s
_CACHED = 256


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
    sections: tuple[str, ...]  # required and non-empty for a good note
    length: tuple[int, int]  # characters of section text a good note has (min, max)


NOTE_TEMPLATES: dict[str, NoteTemplate] = {
    t.name: t
    for t in (
        NoteTemplate(
            "soap",
            "SOAP note: subjective, objective, assessment, plan",
            _sections(1500, SOAP),
            SOAP,
            (200, 6000),
        ),
        NoteTemplate(
            "soap-brief",
            "Short SOAP note for follow-ups (each section at most 160 characters)",
            _sections(160, SOAP),
            SOAP,
            (40, 700),
        ),
        NoteTemplate(
            "care-coordination",
            "Care-coordination call summary: reason, actions, follow-up",
            _sections(600, ("reason", "actions", "follow_up")),
            ("reason", "actions", "follow_up"),
            (60, 1800),
        ),
    )
}


@dataclass(frozen=True)
class OutputSpec:
    """A checked output format: what the node constrains decoding to and the scorer expects."""

    format: str  # template name or "json_schema:<digest12>"
    schema: dict = field(repr=False)
    schema_text: str = field(repr=False)  # canonical JSON, what grammar engines compile
    sections: tuple[str, ...] = ()
    length: Optional[tuple[int, int]] = None


def note_template(name: str) -> NoteTemplate:
    try:
        return NOTE_TEMPLATES[name]
    except KeyError:
        raise InvalidRequest(
            "output_format.note_template is not a known note template; "
            f"use one of {', '.join(sorted(NOTE_TEMPLATES))} or send a json_schema"
        ) from None


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


_checkers: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # event loop -> SchemaChecker
_checked: "collections.OrderedDict[str, OutputSpec]" = (
    collections.OrderedDict()
)  # for resolve_async


async def resolve_async(output_format) -> Optional[OutputSpec]:
    """resolve() with a new JSON schema checked in a child process (the event loop only
    waits), refused if that takes longer than COMPILE_TIMEOUT_S (queueing included)."""
    if output_format is None or output_format.WhichOneof("kind") != "json_schema":
        return guarded(resolve)(output_format)
    from cluster.quality.schema_worker import CheckerBusy, CheckTimeout, SchemaChecker

    text = output_format.json_schema
    spec = _checked.get(text)  # only schemas that passed every check
    if spec is not None:
        _checked.move_to_end(text)
        return spec
    _check_bytes(text)  # the nesting is checked in the worker (check_text)
    loop = asyncio.get_running_loop()
    checker = _checkers.get(loop)
    if checker is None:
        checker = _checkers[loop] = SchemaChecker(timeout_s=COMPILE_TIMEOUT_S)
    try:
        error = await checker.check(text)
    except CheckTimeout:
        raise InvalidRequest(
            f"output_format.json_schema took longer than {COMPILE_TIMEOUT_S:g} s to check; "
            "simplify the schema"
        ) from None
    except CheckerBusy:
        raise InvalidRequest(
            f"{checker.max_waiting} new output_format.json_schema are already waiting to be "
            "checked here; retry shortly (a schema seen before is not checked again)"
        ) from None
    if error:
        raise InvalidRequest(error)
    spec = guarded(_build)(_parse(text))
    _checked[text] = spec
    if len(_checked) > _CACHED:
        _checked.popitem(last=False)
    return spec


def template_spec(name: str) -> OutputSpec:
    t = note_template(name)
    return OutputSpec(t.name, t.schema, _canonical(t.schema), t.sections, t.length)


def schema_spec(text: str) -> OutputSpec:
    """Blocking (up to ~0.5 s for a new 64 KiB schema); resolve_async runs it off the loop."""
    _check_size(text)
    return _schema_spec(text)


def _check_bytes(text: str) -> None:
    if len(text.encode()) > MAX_SCHEMA_BYTES:
        raise InvalidRequest(
            f"output_format.json_schema is larger than {MAX_SCHEMA_BYTES // 1024} KiB"
        )


def _check_size(text: str) -> None:
    """Size and nesting (~4 ms for 64 KiB), before json.loads and jsonschema, which recurse
    once per level."""
    _check_bytes(text)
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    if deepest > MAX_SCHEMA_DEPTH:
        raise InvalidRequest(
            f"output_format.json_schema is nested more than {MAX_SCHEMA_DEPTH} levels deep; "
            "flatten it (use $defs and $ref for repeated parts)"
        )


@functools.lru_cache(maxsize=_CACHED)
def _schema_spec(text: str) -> OutputSpec:
    schema = _parse(text)
    check_schema(schema)
    return _build(schema)


def check_text(text: str) -> None:
    """Every check of a schema's text (what the schema worker runs); raises InvalidRequest."""
    _check_size(text)
    check_schema(_parse(text))


def _parse(text: str) -> dict:
    try:
        schema = json.loads(text)
    except ValueError as exc:
        raise InvalidRequest(
            f"output_format.json_schema is not valid JSON ({exc.msg} at line {exc.lineno} "
            f"column {exc.colno})"
        ) from None
    if not isinstance(schema, dict):
        raise InvalidRequest(
            "output_format.json_schema must be a JSON object (a schema), not "
            f"{type(schema).__name__}"
        )
    return schema


def _build(schema: dict) -> OutputSpec:
    """The OutputSpec of a checked schema (cheap: no checking)."""
    canonical = _canonical(schema)
    digest = hashlib.sha256(
        json.dumps(schema, sort_keys=True, separators=(",", ":")).encode()
    ).hexdigest()[:12]
    required = tuple(schema.get("required", ())) if schema.get("type") == "object" else ()
    return OutputSpec(
        f"json_schema:{digest}", schema, canonical, tuple(r for r in required if isinstance(r, str))
    )


def check_schema(schema: dict) -> None:
    """Draft 2020-12 meta-schema check, then the grammar compiler's: a schema it cannot
    turn into a grammar (unsupported keywords, unsatisfiable) is refused before any work."""
    import jsonschema

    try:
        jsonschema.Draft202012Validator.check_schema(schema)
    except jsonschema.SchemaError as exc:
        where = schema_path(exc.path) if exc.path else "the top level"
        raise InvalidRequest(
            f"output_format.json_schema is not a valid JSON Schema: the meta-schema's "
            f"{_keyword(exc.validator)!r} rule fails at {where}"
        ) from None
    error = grammar_error(_canonical(schema))
    if error:
        raise InvalidRequest(
            f"output_format.json_schema cannot be enforced while decoding: {grammar_problem(error)}; "
            "simplify the schema (docs/clinical-notes.md lists what is supported)"
        )


def _keywords() -> frozenset:
    import jsonschema

    return frozenset(jsonschema.Draft202012Validator.VALIDATORS) | {
        "$defs",
        "definitions",
        "$schema",
        "$id",
        "title",
        "description",
        "default",
        "examples",
    }


def _keyword(part) -> str:
    """A schema path step as a message may show it: an index, a JSON Schema keyword, or `*`
    for a name the caller chose (a property name may itself be PHI)."""
    if isinstance(part, int):
        return str(part)
    return part if part in _keywords() else "*"


def schema_path(path) -> str:
    return "/" + "/".join(_keyword(p) for p in path)


_GRAMMAR_PROBLEMS = (  # llguidance's message -> what we say (its message may quote the schema)
    (
        "regex parse error",
        "a pattern is not a regular expression it supports (no look-around or back-references)",
    ),
    ("Unknown format", "a string format it does not know"),
    ("Unsatisfiable", "no value can satisfy it (contradictory bounds or types)"),
    ("does not exist", "a $ref points to nothing"),
    ("Expected", "a keyword has a value of the wrong type"),
    ("nimplemented", "it uses a keyword the grammar compiler does not support"),
    ("not supported", "it uses a feature the grammar compiler does not support"),
    ("limit", "it is too complex to compile within the grammar limits"),
    ("fuel", "it is too complex to compile within the grammar limits"),
)


def grammar_problem(error: str) -> str:
    """A fixed description of a grammar compiler error: never its text."""
    return next(
        (said for key, said in _GRAMMAR_PROBLEMS if key in error), "the grammar compiler refused it"
    )


def grammar(schema_text: str) -> str:
    """The llguidance grammar for a schema (compact JSON: no free whitespace to wander in)."""
    import llguidance

    return llguidance.LLMatcher.grammar_from_json_schema(
        schema_text, defaults={"whitespace_flexible": False}
    )


def limits():
    """llguidance's own fuel limits, with errors that do not dump the grammar."""
    import llguidance

    return llguidance.LLParserLimits(verbose_errors=False)


def grammar_error(schema_text: str) -> str:
    import llguidance

    try:
        g = grammar(schema_text)
    except (ValueError, RuntimeError) as exc:
        return str(exc)
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(g, limits=limits())
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
            return Checked(
                False,
                rule="truncated",
                error=f"the output hit max_tokens before the {spec.format} "
                "object was complete; raise max_tokens",
            )
        return Checked(
            False, rule="json", error=f"the output is not JSON ({exc.msg} at character {exc.pos})"
        )
    validator = jsonschema.Draft202012Validator(spec.schema)
    error = jsonschema.exceptions.best_match(validator.iter_errors(value))
    if error is None:
        return Checked(True, value=value)
    path = "/" + "/".join(str(p) for p in error.absolute_path)
    return Checked(
        False,
        rule=str(error.validator),
        path=path,
        error=f"the output breaks the schema's {error.validator!r} rule at {path}",
    )
