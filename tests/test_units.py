"""Pure pieces of the node agent, tested without sockets."""

from __future__ import annotations

import json
import math

import mlx.core as mx
import pytest

from cluster.api import inference_pb2
from cluster.config import NodeSettings, split_host_port
from cluster.digest import CACHE_NAME, weights_digest
from node_agent.lifecycle import IllegalTransition, Lifecycle, State
from node_agent.sampling import SamplingSpec, make_sampler
from node_agent.stops import StopMatcher
from node_agent.validation import InvalidRequest, Limits, check_length, validate

LIMITS = Limits(max_tokens=100, context_length=64, vocab_size=50, max_stop_sequences=2)


def feed_all(matcher, parts):
    out, stopped = [], False
    for p in parts:
        text, stopped = matcher.feed(p)
        out.append(text)
        if stopped:
            break
    if not stopped:
        out.append(matcher.flush())
    return "".join(out), stopped


@pytest.mark.parametrize(
    "parts,stops,expected",
    [
        (["Plan: rest", "\n\nNext"], ("\n\n",), ("Plan: rest", True)),
        (["Plan: re", "st\n", "\nNext"], ("\n\n",), ("Plan: rest", True)),
        (["a<", "|e", "nd|>b"], ("<|end|>",), ("a", True)),
        (["a<", "b"], ("<|end|>",), ("a<b", False)),
        (["abc"], (), ("abc", False)),
        (["xSTOPy", "z"], ("STOP", "xS"), ("", True)),
    ],
)
def test_stop_matcher(parts, stops, expected):
    assert feed_all(StopMatcher(stops), parts) == expected


def test_stop_matcher_holds_back_only_a_possible_prefix():
    m = StopMatcher(("END",))
    assert m.feed("the E") == ("the ", False)
    assert m.feed("x") == ("Ex", False)


def _req(**kw):
    kw.setdefault("max_tokens", 10)
    kw.setdefault("prompt", "hello")
    return inference_pb2.GenerateRequest(**kw)


def test_validate_fills_defaults_and_draws_a_seed():
    v = validate(_req(), LIMITS)
    assert v.request_id.startswith("req-")
    assert v.sampling.temperature == 0 and v.sampling.top_p == 1.0
    assert not v.seed_given and v.sampling.seed > 0


def test_validate_keeps_explicit_zero_seed():
    v = validate(_req(sampling=inference_pb2.SamplingParams(seed=0)), LIMITS)
    assert v.seed_given and v.sampling.seed == 0


@pytest.mark.parametrize(
    "kw,needle",
    [
        ({"max_tokens": 101}, "between 1 and 100"),
        ({"stop": ["a", "b", "c"]}, "at most 2 stop"),
        ({"prefix_token_ids": [50]}, "outside this model's vocabulary"),
        ({"sampling": inference_pb2.SamplingParams(top_p=-0.1)}, "top_p"),
        ({"sampling": inference_pb2.SamplingParams(temperature=math.inf)}, "finite"),
        ({"request_id": "x" * 129}, "request_id"),
    ],
)
def test_validate_rejects(kw, needle):
    with pytest.raises(InvalidRequest, match=needle):
        validate(_req(**kw), LIMITS)


def test_check_length_bounds():
    check_length(30, 4, 30, LIMITS)
    with pytest.raises(InvalidRequest, match="set max_tokens <= 30"):
        check_length(30, 4, 31, LIMITS)
    with pytest.raises(InvalidRequest, match="longer than"):
        check_length(64, 0, 1, LIMITS)


def test_lifecycle_allows_only_the_documented_transitions():
    seen = []
    lc = Lifecycle(node_id="n")
    lc.subscribe(lambda snap: seen.append(snap.state))
    lc.transition(State.LOADING, "load")
    with pytest.raises(IllegalTransition):
        lc.transition(State.READY, "skipping warm-up")
    lc.transition(State.WARMING, "warm")
    lc.transition(State.READY, "ok")
    assert seen == [State.STARTING, State.LOADING, State.WARMING, State.READY]
    assert lc.snapshot.reason == "ok"


def test_sampler_depends_only_on_seed_and_step():
    logits = mx.log(mx.softmax(mx.random.normal((1, 50), key=mx.random.key(1)), axis=-1))
    spec = SamplingSpec(temperature=1.0, seed=11)
    a = [make_sampler(spec)(logits).item() for _ in range(1)]
    s1 = make_sampler(spec)
    run = [s1(logits).item() for _ in range(20)]
    mx.random.seed(999)  # global random state must not matter
    s2 = make_sampler(spec, start_step=5)
    assert [s2(logits).item() for _ in range(15)] == run[5:]
    assert a == run[:1]
    assert len(set(run)) > 1


def test_greedy_sampler_is_argmax():
    logits = mx.array([[0.1, 3.0, 0.2]])
    assert make_sampler(SamplingSpec()).__name__ == "greedy_sampler"
    assert make_sampler(SamplingSpec())(logits).item() == 1


def test_weights_digest_is_cached_and_tracks_changes(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"a": 1}))
    (tmp_path / "model.safetensors").write_bytes(b"weights-v1")
    d1 = weights_digest(tmp_path)
    assert d1.startswith("sha256:") and (tmp_path / CACHE_NAME).exists()
    assert weights_digest(tmp_path) == d1
    (tmp_path / "model.safetensors").write_bytes(b"weights-v2")
    assert weights_digest(tmp_path) != d1


def test_settings_flags_beat_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("STUDIOFLEET_NODE_MAX_RUNNING", "7")
    monkeypatch.setenv("STUDIOFLEET_NODE_MAX_QUEUED", "3")
    s = NodeSettings(model_path=tmp_path, max_queued=5)
    assert (s.max_running, s.max_queued) == (7, 5)
    with pytest.raises(ValueError, match="HOST:PORT"):
        NodeSettings(model_path=tmp_path, listen="nope")
    assert split_host_port("[::1]:80") == ("::1", 80)


def test_default_node_ids_are_unique_for_port_zero_and_stable_otherwise():
    from node_agent.agent import default_node_id

    assert default_node_id("127.0.0.1:0") != default_node_id("127.0.0.1:0")
    assert default_node_id("127.0.0.1:7700") == default_node_id("127.0.0.1:7700")
    assert default_node_id("127.0.0.1:7700") != default_node_id("127.0.0.1:7701")


def test_fast_prompt_encoding_matches_transformers(tiny_model):
    import mlx_lm

    from node_agent.prompts import _encoder, build_prompt_tokens
    from node_agent.sampling import SamplingSpec
    from node_agent.validation import ValidRequest

    _, tok = mlx_lm.load(str(tiny_model))
    fast = _encoder(tok)
    for text in (
        "Synthetic visit: BP 132/84, é ü 中文",
        "<|im_start|>user\nhi<|im_end|>\n",
        "  a\n\n b  ",
    ):
        assert fast(text) == list(tok.encode(text, add_special_tokens=False))
    req = ValidRequest(
        "r",
        (("system", "Be brief."), ("user", "Cough for 3 days.")),
        None,
        SamplingSpec(),
        True,
        5,
        (),
        (),
        "",
    )
    rendered = tok.apply_chat_template(
        [{"role": r, "content": c} for r, c in req.messages],
        add_generation_prompt=True,
        tokenize=False,
    )
    assert build_prompt_tokens(tok, req) == list(tok.encode(rendered, add_special_tokens=False))
