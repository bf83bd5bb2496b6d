"""The front door's parts without processes: OpenAI bodies -> GenerateRequest, statuses ->
HTTP answers, and the token store on a real SQLite file."""

from __future__ import annotations

import grpc
import pytest

from cluster.api import inference_pb2
from cluster.security.identity import Role
from coordinator import openai_protocol as oa
from coordinator.api_tokens import TokenRefused, TokenRequestError, TokenStore


def test_a_chat_body_maps_onto_a_generate_request():
    p = oa.chat_request(
        {
            "model": "qwen",
            "messages": [
                {"role": "developer", "content": "Be brief."},
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
                },
            ],
            "max_completion_tokens": 40,
            "temperature": 0.2,
            "top_p": 0.9,
            "seed": 7,
            "stop": "END",
            "service_tier": "flex",
            "prompt_cache_key": "episode-1",
            "top_k": -1,
            "stream": True,
            "stream_options": {"include_usage": True},
            "user": "someone",
            "logprobs": False,
            "response_format": {"type": "json_object"},
        },
        default_max_tokens=2048,
    )
    r = p.request
    assert p.stream and p.include_usage and p.model == r.model == "qwen"
    assert [(m.role, m.content) for m in r.chat.messages] == [
        ("system", "Be brief."),
        ("user", "ab"),
    ]
    assert r.max_tokens == 40 and not r.fit_context
    assert (
        r.sampling.seed == 7 and r.sampling.top_k == 0 and abs(r.sampling.temperature - 0.2) < 1e-6
    )
    assert (
        list(r.stop) == ["END"]
        and r.priority == inference_pb2.PRIORITY_BATCH
        and r.session_key == "episode-1"
    )
    assert r.output_format.json_schema == '{"type":"object"}'
    assert not r.sampling.HasField("repetition_penalty")


def test_no_max_tokens_means_up_to_the_default_within_the_context():
    r = oa.completion_request(
        {"model": "m", "prompt": ["one prompt"]}, default_max_tokens=512
    ).request
    assert r.prompt == "one prompt" and r.max_tokens == 512 and r.fit_context
    assert r.priority == inference_pb2.PRIORITY_INTERACTIVE and not r.sampling.HasField(
        "temperature"
    )


@pytest.mark.parametrize(
    "body, words",
    [
        ({"prompt": "x"}, "model is required"),
        ({"model": "m", "prompt": ["a", "b"]}, "one string"),
        ({"model": "m", "prompt": [1, 2, 3]}, "one string"),
        ({"model": "m", "prompt": "x", "echo": True}, "echo is not supported"),
        ({"model": "m", "prompt": "x", "best_of": 3}, "best_of is not supported"),
        ({"model": "m", "prompt": "x", "max_tokens": True}, "max_tokens must be an integer"),
        ({"model": "m", "prompt": "x", "service_tier": "priority"}, "service_tier"),
        (
            {"model": "m", "prompt": "x", "messages": []},
            "Unrecognized request argument supplied: messages",
        ),
    ],
)
def test_unsupported_or_malformed_completion_fields_are_named(body, words):
    with pytest.raises(oa.ApiError) as err:
        oa.completion_request(body, default_max_tokens=16)
    assert err.value.status == 400 and words in err.value.message


def test_errors_never_quote_the_callers_values():
    with pytest.raises(oa.ApiError) as err:
        oa.chat_request(
            {
                "model": "m",
                "messages": [{"role": "user", "content": "Jane Roe"}],
                "tools": [{"name": "Jane Roe"}],
            },
            default_max_tokens=16,
        )
    assert "Jane" not in err.value.message and err.value.param == "tools"


@pytest.mark.parametrize(
    "raw, words",
    [
        (b'{"model": "m", "prompt": "\\ud800"}', "surrogate"),
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
        (b'{"seed": ' + b"9" * 5000 + b"}", "number too large"),
    ],
)
def test_json_python_cannot_hold_is_a_400(raw, words):
    with pytest.raises(oa.ApiError) as err:
        oa.parse_json(raw)
    assert err.value.status == 400 and words in err.value.message


def test_relay_statuses_become_http_answers():
    busy = oa.from_status(
        grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full; retry after 1200 ms", 1200
    )
    assert busy.status == 429 and busy.headers == {"Retry-After": "2", "retry-after-ms": "1200"}
    assert busy.body()["error"]["type"] == "rate_limit_error"
    assert oa.from_status(grpc.StatusCode.UNAVAILABLE, "no node").status == 503
    assert oa.from_status(grpc.StatusCode.ABORTED, "interrupted").status == 503
    assert oa.from_status(grpc.StatusCode.INVALID_ARGUMENT, "bad").status == 400
    assert oa.from_status(grpc.StatusCode.DEADLINE_EXCEEDED, "late").status == 504
    assert oa.from_status(grpc.StatusCode.INTERNAL, "").status == 500
    assert oa.from_status(grpc.StatusCode.ALREADY_EXISTS, "running").headers == {
        "x-should-retry": "false"
    }


def test_tokens_are_stored_hashed_expire_and_revoke(tmp_path):
    now = [1_000_000.0]
    db = tmp_path / "state.db"
    store = TokenStore(db, clock=lambda: now[0])
    row, secret = store.issue("notes-app", ttl_s=3600, created_by="operator/alice")
    assert secret.startswith("sft_") and row.id == secret.split(".")[0] and row.role == "app"
    holder = store.verify(secret)
    assert (
        holder.identity.role is Role.APP
        and holder.identity.name == "notes-app"
        and holder.id == row.id
    )
    store.close()
    raw = b"".join(p.read_bytes() for p in tmp_path.glob("state.db*"))
    assert secret.split(".")[1].encode() not in raw, "only the hash is stored"

    store = TokenStore(db, clock=lambda: now[0])  # survives a restart
    assert store.verify(secret).id == row.id
    with pytest.raises(TokenRefused, match="not known"):
        store.verify(secret[:-1] + ("A" if secret[-1] != "A" else "B"))
    with pytest.raises(TokenRefused, match="not a StudioFleet API token"):
        store.verify("sk-proj-abc")
    now[0] += 3601
    with pytest.raises(TokenRefused, match="expired"):
        store.verify(secret)
    assert store.list() == [] and len(store.list(include_inactive=True)) == 1

    _, other = store.issue("scraper", role="monitor")
    assert store.verify(other).identity.role is Role.MONITOR
    revoked = store.revoke(other.split(".")[0], "left the team")
    assert revoked.revoked_unix_s == now[0] and revoked.revoked_reason == "left the team"
    with pytest.raises(TokenRefused, match="revoked"):
        store.verify(other)
    with pytest.raises(TokenRequestError, match="role"):
        store.issue("x", role="operator")
    with pytest.raises(TokenRequestError, match="ttl"):
        store.issue("x", ttl_s=float("nan"))
    with pytest.raises(TokenRequestError, match="token name"):
        store.issue("bad name!")
    with pytest.raises(TokenRequestError) as missing:
        store.revoke("sft_000000000000")
    assert missing.value.code == "NOT_FOUND"
    _, leaked = store.issue("leaky")
    assert store.revoke(leaked).revoked_unix_s  # a whole key pasted: revoked by its id part
    with pytest.raises(TokenRequestError) as odd:
        store.revoke("sft_" + leaked.split(".")[1])
    assert leaked.split(".")[1][:8] not in str(odd.value)
    store.close()


def test_fingerprint_is_the_digests_hex_and_a_remote_digest_is_hashed():
    from cluster.api import common_pb2, inference_pb2
    from coordinator.openai_protocol import fingerprint

    def final(digest: str):
        return inference_pb2.FinalInfo(model=common_pb2.ModelInfo(weights_digest=digest))

    assert fingerprint(final("sha256:" + "ab" * 32)) == "fp_" + "ab" * 8
    remote = fingerprint(final("remote:api.example:443/some-model"))
    assert remote.startswith("fp_") and len(remote) == 19 and "example" not in remote
    assert fingerprint(final("")) is None
