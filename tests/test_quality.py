"""The note scorer, note templates, prompt templates and the eval report, without a model:
hand-written good and bad notes (synthetic), bad schemas, bad suites."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cluster.api import inference_pb2
from cluster.quality import evaluation, notes, prompts, scoring
from cluster.validation import InvalidRequest

GOOD = {
    "subjective": "Dry cough for four days without fever; sleeping poorly because of the cough.",
    "objective": "Temperature 36.9 C, heart rate 78, lungs clear on auscultation, SpO2 98% on room air.",
    "assessment": "Acute viral bronchitis, no sign of pneumonia.",
    "plan": "Rest, fluids and honey for the cough; return if fever or shortness of breath develops.",
}


def score(note, *, template: str = "soap-brief", finish: str = "stop") -> scoring.Score:
    spec = notes.template_spec(template)
    text = note if isinstance(note, str) else json.dumps(note)
    return scoring.score_note(spec, notes.check_output(spec, text, finish), text, finish)


def test_a_good_note_scores_one_on_every_part():
    s = score(GOOD)
    assert s.total == 1.0
    assert {p.name for p in s.parts} == set(scoring.WEIGHTS)
    assert all(p.score == 1.0 and not p.detail for p in s.parts)


@pytest.mark.parametrize(
    "note, finish, part, detail",
    [
        ({**GOOD, "plan": ""}, "stop", "sections", "plan"),  # empty section (and minLength)
        ({k: v for k, v in GOOD.items() if k != "plan"}, "stop", "schema_valid", "required"),
        ('{"subjective": "Dry cough for four days', "length", "not_truncated", "max_tokens"),
        ({**GOOD, "plan": "take the tablets " * 9}, "stop", "repetition", "distinct"),
        (
            {**GOOD, "assessment": "I'm sorry, but I cannot help with that request."},
            "stop",
            "no_refusal",
            "refusal",
        ),
        ({k: "ok" for k in GOOD}, "stop", "length", "under 40"),
    ],
)
def test_each_flaw_lowers_its_own_sub_score(note, finish, part, detail):
    s = score(note, finish=finish)
    flawed = s.part(part)
    assert flawed.score < 1.0, s
    assert detail in flawed.detail
    assert s.total < 1.0
    assert (
        "cough" not in flawed.detail.lower() and "tablets" not in flawed.detail
    )  # never the note's text


def test_a_truncated_note_fails_schema_and_truncation_and_says_so():
    spec = notes.template_spec("soap-brief")
    checked = notes.check_output(spec, '{"subjective":"Dry co', "length")
    assert (checked.valid, checked.rule) == (False, "truncated")
    s = scoring.score_note(spec, checked, '{"subjective":"Dry co', "length")
    assert s.part("schema_valid").score == 0 and s.part("not_truncated").score == 0
    assert s.total <= 0.55


def test_schema_errors_name_the_rule_and_the_path_never_the_value():
    spec = notes.template_spec("soap-brief")
    checked = notes.check_output(spec, json.dumps({**GOOD, "plan": "x" * 200}), "stop")
    assert (checked.rule, checked.path) == ("maxLength", "/plan")
    assert "xxx" not in checked.error


@pytest.mark.parametrize(
    "schema, says",
    [
        ("{", "not valid JSON"),
        ("[1]", "must be a JSON object"),
        ('{"type": "strin"}', "not a valid JSON Schema"),
        ('{"type": "integer", "minimum": 5, "maximum": 1}', "cannot be enforced"),
        ('{"type": "string", "pattern": "(?<=a)b"}', "cannot be enforced"),
        ("{" + '"description": "' + "x" * (70 * 1024) + '"}', "larger than 64 KiB"),
    ],
)
def test_a_bad_schema_is_refused_with_what_is_wrong(schema, says):
    fmt = inference_pb2.OutputFormat(json_schema=schema)
    with pytest.raises(InvalidRequest, match=says):
        notes.resolve(fmt)


def test_note_templates_and_schemas_resolve():
    assert notes.resolve(inference_pb2.OutputFormat()) is None
    soap = notes.resolve(inference_pb2.OutputFormat(note_template="soap"))
    assert soap.sections == ("subjective", "objective", "assessment", "plan")
    # The grammar follows the schema's key order (S, O, A, P), not a sorted one.
    assert list(json.loads(soap.schema_text)["properties"]) == list(soap.sections)
    custom = notes.resolve(
        inference_pb2.OutputFormat(
            json_schema=json.dumps(
                {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]}
            )
        )
    )
    assert custom.format.startswith("json_schema:") and custom.sections == ("a",)
    with pytest.raises(InvalidRequest, match="not a known note template"):
        notes.resolve(inference_pb2.OutputFormat(note_template="haiku"))


def test_prompt_templates_are_versioned_per_model_family():
    assert (
        prompts.select("soap-note", "", "qwen2").id == "soap-note@qwen2/v2"
    )  # the newest for qwen2
    assert (
        prompts.select("soap-note", "", "mistral").id == "soap-note@default/v1"
    )  # no versions of its own
    assert (
        prompts.select("soap-note", "qwen2/v1", "llama").id == "soap-note@qwen2/v1"
    )  # pinned wins
    v = prompts.select("soap-brief", "", "qwen2")
    messages = v.render({"transcript": "Clinician: {not a field} hello"})
    assert messages[0][0] == "system" and "{not a field}" in messages[1][1]
    with pytest.raises(InvalidRequest, match="not in the registry"):
        prompts.check("discharge", "", {})
    with pytest.raises(InvalidRequest, match="needs the variable"):
        prompts.check("soap-note", "", {})
    with pytest.raises(InvalidRequest, match="has no such version"):
        prompts.check("soap-note", "qwen2/v9", {"transcript": "x"})
    with pytest.raises(InvalidRequest, match="is empty"):
        prompts.check("soap-note", "", {"transcript": "  "})


def test_the_starter_suite_has_twenty_plus_synthetic_cases():
    suite = evaluation.load_suite(evaluation.STARTER_SUITE)
    assert len(suite.cases) >= 20
    assert len({c.id for c in suite.cases}) == len(suite.cases)
    assert suite.prompt_template in prompts.REGISTRY
    for c in suite.cases:
        assert 40 <= len(c.transcript.split()) <= 400 and c.must_mention


@pytest.mark.parametrize(
    "text, says",
    [
        ('prompt_template = "haiku"\n[[case]]\nid = "a"\ntranscript = "x"\n', "not one of"),
        ('prompt_template = "soap-note"\n', "it has no"),
        ('prompt_template = "soap-note"\n[[case]]\nid = "A B"\ntranscript = "x"\n', "unique id"),
        ('prompt_template = "soap-note"\n[[case]]\nid = "a"\ntranscript = ""\n', "no transcript"),
        ("prompt_template = ", "cannot read"),
    ],
)
def test_a_bad_suite_is_refused_with_the_file_and_case(tmp_path: Path, text, says):
    path = tmp_path / "suite.toml"
    path.write_text(text)
    with pytest.raises(evaluation.SuiteError, match=says):
        evaluation.load_suite(path)


def _report(
    scores: list[float], *, truncated: int = 0, digest: str = "sha256:x"
) -> evaluation.Report:
    r = evaluation.Report("mini", 1, digest, "t", "v", wall_s=2.0)
    r.cases = [
        evaluation.CaseResult(
            f"c{i}",
            True,
            quality=q,
            schema_valid=q > 0.5,
            completion_tokens=100,
            finish_reason="length" if i < truncated else "stop",
            latency_ms=1000.0 + i,
        )
        for i, q in enumerate(scores)
    ]
    return r


def test_reports_round_trip_compare_and_gate():
    a, b = _report([1.0, 0.9, 0.8]), _report([0.5, 0.4, 0.45], truncated=3, digest="sha256:y")
    assert evaluation.Report.from_json(a.to_json()).summary == a.summary
    assert a.summary["score"] == 0.9 and a.summary["tokens_per_s"] == 150.0
    rows, warnings = evaluation.compare(a, b)
    assert ("score", "0.900", "0.450", "-0.450") in rows
    assert ("truncated", "0", "3", "+3") in rows
    assert any("different suite files" in w for w in warnings)
    assert evaluation.gate_verdict(a, a, margin=0.05, min_score=0.0) is None
    why = evaluation.gate_verdict(b, a, margin=0.05, min_score=0.0)
    assert "0.450 against 0.900" in why and "truncated 3 vs 0" in why
    assert (
        evaluation.gate_verdict(_report([0.88, 0.9, 0.82]), a, margin=0.05, min_score=0.0) is None
    )
    assert "under the floor" in evaluation.gate_verdict(a, None, margin=0.05, min_score=0.95)


def test_a_template_requests_audit_digest_covers_its_variables():
    """The audit record's prompt digest of a template request is over the caller's content
    (the variables), so two notes from different transcripts never share a digest."""
    from cluster.client import build_request
    from coordinator.audit_trail import canonical_input

    a = build_request(template="soap-note", variables={"transcript": "Patient: cough."})
    b = build_request(template="soap-note", variables={"transcript": "Patient: rash."})
    assert canonical_input(a) != canonical_input(b)
    assert json.loads(canonical_input(a)) == {
        "template": "soap-note",
        "version": "",
        "variables": {"transcript": "Patient: cough."},
    }
