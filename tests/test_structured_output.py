"""Structured notes on a real MLX node (and through a real coordinator): schema-constrained
decoding keeps even the random tiny model's output valid for every seed, a resumed request
keeps its grammar, bad schemas and templates are INVALID_ARGUMENT, the template version
and quality score reach the final chunk, /metrics and the request log."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import grpc
import jsonschema
import pytest

from cluster import metrics as cm
from cluster.api import inference_pb2
from cluster.client import FleetClient, SchemaViolationError, build_request
from cluster.quality import notes
from cluster.security.identity import Role
from tests.fleet_helpers import collect
from tests.test_fleetctl import fleetctl

# Every kind of constraint a clinical form uses: bounded integers, enums, booleans,
# arrays with bounds, bounded strings, a nested object.
MIXED = {
    "type": "object",
    "properties": {
        "pain_score": {"type": "integer", "minimum": 0, "maximum": 10},
        "disposition": {"enum": ["home", "admit", "refer"]},
        "follow_up": {"type": "boolean"},
        "problems": {
            "type": "array",
            "items": {"type": "string", "maxLength": 20},
            "minItems": 1,
            "maxItems": 3,
        },
        "vitals": {
            "type": "object",
            "properties": {"heart_rate": {"type": "integer", "minimum": 20, "maximum": 250}},
            "required": ["heart_rate"],
            "additionalProperties": False,
        },
        "summary": {"type": "string", "minLength": 1, "maxLength": 60},
    },
    "required": ["pain_score", "disposition", "follow_up", "problems", "vitals", "summary"],
    "additionalProperties": False,
}
TRANSCRIPT = "Clinician: How is the cough? Patient: Better, no fever. Clinician: Lungs clear; rest and fluids."


def _req(seed: int, **kw) -> inference_pb2.GenerateRequest:
    kw.setdefault("messages", [("user", "Summarise the synthetic visit as JSON.")])
    kw.setdefault("max_tokens", 400)
    return build_request(
        seed=seed,
        temperature=1.0,
        request_id=f"structured-{seed}-{kw.get('note_template', 'x')}",
        **kw,
    )


def _many(node, requests):
    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(lambda r: collect(node.inference, r, timeout_s=120), requests))


@pytest.mark.usefixtures("as_node_caller")
def test_schema_constrained_output_is_valid_for_every_seed(node):
    """A random model samples freely at temperature 1; only the grammar keeps it valid."""
    runs = _many(node, [_req(seed, json_schema=MIXED) for seed in range(48)])
    runs += _many(node, [_req(seed, note_template="soap-brief") for seed in range(16)])
    soap = notes.template_spec("soap-brief").schema
    for s in runs:
        assert s.error is None, s.error
        f = s.final
        assert f.finish_reason == inference_pb2.FINISH_REASON_STOP, f
        assert f.structured.valid, (f.request_id, f.structured.rule, f.structured.path)
        value = json.loads(s.text)  # what the caller streamed is the object itself
        assert value == json.loads(f.structured.json)
        jsonschema.validate(value, MIXED if "soap" not in f.structured.format else soap)
        assert f.quality.parts and f.quality.rubric == "notes-v1"
        assert f.quality.parts[0].name == "schema_valid" and f.quality.parts[0].score == 1.0
    # The SOAP object comes in S, O, A, P order.
    assert list(json.loads(runs[-1].text)) == ["subjective", "objective", "assessment", "plan"]


@pytest.mark.usefixtures("as_node_caller")
def test_a_resumed_request_continues_its_grammar_exactly(node):
    whole = collect(node.inference, _req(7, json_schema=MIXED))
    assert whole.final.structured.valid
    cut = len(whole.ids) // 2
    resumed_req = _req(7, json_schema=MIXED, max_tokens=400 - cut)
    resumed_req.prefix_token_ids[:] = whole.ids[:cut]
    resumed_req.request_id = "structured-7-resumed"
    resumed = collect(node.inference, resumed_req)
    assert resumed.error is None, resumed.error
    assert whole.ids[:cut] + resumed.ids == whole.ids  # same tokens as without the cut
    assert (
        resumed.final.structured.valid
        and resumed.final.structured.json == whole.final.structured.json
    )
    # A prefix the schema cannot have produced is refused, not decoded into nonsense.
    bad = _req(8, json_schema=MIXED)
    bad.prefix_token_ids[:] = whole.ids[1:cut]
    with pytest.raises(grpc.RpcError) as err:
        list(node.inference.Generate(bad, timeout=30))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "prefix_token_ids do not follow" in err.value.details()


BAD = [
    (dict(json_schema='{"type": "strin"}'), "not a valid JSON Schema"),
    (dict(json_schema="{"), "not valid JSON"),
    (dict(json_schema='{"type": "integer", "minimum": 3, "maximum": 1}'), "cannot be enforced"),
    (dict(note_template="haiku"), "not a known note template"),
    (
        dict(messages=None, template="discharge", variables={"transcript": "x"}),
        "not in the registry",
    ),
    (dict(messages=None, template="soap-note", variables={}), "needs the variable"),
    (
        dict(
            messages=None,
            template="soap-note",
            template_version="qwen2/v9",
            variables={"transcript": "x"},
        ),
        "has no such version",
    ),
]


@pytest.mark.usefixtures("as_node_caller")
@pytest.mark.parametrize("kw, says", BAD)
def test_a_bad_schema_or_template_is_invalid_argument_on_the_node(node, kw, says):
    with pytest.raises(grpc.RpcError) as err:
        list(node.inference.Generate(_req(1, **kw), timeout=30))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert says in err.value.details() and node.node_id in err.value.details()


@pytest.mark.usefixtures("as_node_caller")
def test_template_requests_record_their_version_and_a_truncated_note_is_a_typed_error(node):
    with FleetClient(node.address, server_name="node.studiofleet") as client:
        r = client.generate(
            template="soap-brief",
            variables={"transcript": TRANSCRIPT},
            seed=3,
            temperature=1.0,
            request_id="tpl-1",
            timeout_s=120,
        )
        assert r.template == "soap-brief@default/v1" and r.output_format == "soap-brief"
        assert set(r.output) == {"subjective", "objective", "assessment", "plan"}
        assert set(r.quality.parts) == {
            "schema_valid",
            "sections",
            "not_truncated",
            "repetition",
            "length",
            "no_refusal",
        }
        pinned = client.generate(
            template="soap-note",
            template_version="qwen2/v1",
            note_template="soap-brief",
            variables={"transcript": TRANSCRIPT},
            max_tokens=400,
            seed=3,
            temperature=1.0,
            request_id="tpl-2",
            timeout_s=120,
        )
        assert pinned.template == "soap-note@qwen2/v1" and pinned.output_format == "soap-brief"
        with pytest.raises(SchemaViolationError) as err:
            client.generate(
                template="soap-brief",
                variables={"transcript": TRANSCRIPT},
                max_tokens=6,
                seed=3,
                request_id="tpl-3",
                timeout_s=60,
            )
    e = err.value
    assert e.rule == "truncated" and "raise max_tokens" in e.message
    assert e.result.finish_reason == "length" and e.result.quality.parts["not_truncated"] == 0.0
    assert e.result.output is None
    # The node's /metrics counts notes by format and validity, and the score's parts.
    scrape = cm.parse(node.http_get("/metrics", "monitor", Role.MONITOR)[1].decode())
    assert _sample(scrape, "studiofleet_node_notes_total", format="soap-brief", valid="false") >= 1
    assert _sample(scrape, "studiofleet_node_notes_total", format="soap-brief", valid="true") >= 2
    assert (
        _sample(
            scrape,
            "studiofleet_node_note_subscore_sum_total",
            format="soap-brief",
            part="schema_valid",
        )
        >= 2
    )
    assert _sample(scrape, "studiofleet_node_note_quality_count", format="soap-brief") >= 3


def _sample(scrape: dict, name: str, **labels) -> float:
    return scrape.get((name, frozenset(labels.items())), 0.0)


def test_through_the_coordinator_notes_reach_the_request_log_and_metrics(node, start_coordinator):
    co = start_coordinator(nodes=[node.address])
    co.wait_routable(1)
    req = build_request(
        template="soap-brief",
        variables={"transcript": TRANSCRIPT},
        seed=5,
        temperature=1.0,
        request_id="co-note-1",
    )
    ok_run = collect(co.inference, req)
    assert ok_run.error is None, ok_run.error
    f = ok_run.final
    assert f.template == "soap-brief@default/v1" and f.structured.valid and f.quality.total > 0
    bad_run = collect(
        co.inference,
        build_request(
            messages=[("user", "x")],
            max_tokens=8,
            json_schema='{"type": "strin"}',
            request_id="co-note-2",
        ),
    )
    assert bad_run.error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid JSON Schema" in bad_run.error.details()
    out = fleetctl(
        "requests", "-c", co.address, "--tls-name", "operator", "--since", "10m", "-o", "json"
    )
    assert out.returncode == 0, out.stderr
    rows = {row["request_id"]: row for row in json.loads(out.stdout)["requests"]}
    ok, bad = rows["co-note-1"], rows["co-note-2"]
    assert ok["template"] == "soap-brief@default/v1" and ok["output_format"] == "soap-brief"
    assert ok["schema_valid"] is True and ok["quality_score"] == pytest.approx(f.quality.total)
    assert set(ok["quality_parts"]) == {p.name for p in f.quality.parts}
    assert bad["outcome"] == "rejected" and "quality_score" not in bad
    table = fleetctl("requests", "-c", co.address, "--tls-name", "operator", "--since", "10m")
    assert "soap-brief@default/v1" in table.stdout
    scrape = cm.parse(co.http_get("/metrics")[1].decode())
    assert _sample(scrape, "studiofleet_notes_total", format="soap-brief", valid="true") == 1


def test_fleetctl_generate_writes_a_structured_note_and_says_how_it_scored(node):
    from tests.test_fleetctl import AT_NODE

    out = fleetctl(
        "generate",
        *AT_NODE,
        "--target",
        node.address,
        "--template",
        "soap-brief",
        "--prompt",
        TRANSCRIPT,
        "--seed",
        "4",
        "--temperature",
        "1",
    )
    assert out.returncode == 0, out.stderr
    assert set(json.loads(out.stdout)) == {"subjective", "objective", "assessment", "plan"}
    assert (
        "-- template soap-brief@default/v1" in out.stderr
        and "-- soap-brief: valid; quality" in out.stderr
    )
    out = fleetctl(
        "generate",
        *AT_NODE,
        "--target",
        node.address,
        "--prompt",
        "Summarise as JSON.",
        "--note-template",
        "soap-brief",
        "--max-tokens",
        "5",
        "-o",
        "json",
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["output"] is None and result["finish_reason"] == "length"
    assert (
        result["quality"]["parts"]["not_truncated"] == 0.0
        and result["output_format"] == "soap-brief"
    )
