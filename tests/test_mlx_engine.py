"""The MLX engine in-process on the real generated model: admission, cancel, failure."""

from __future__ import annotations

import queue

import pytest

from node_agent.engine import EngineRequest, EventKind
from node_agent.engines.mlx_engine import MlxEngine
from node_agent.sampling import SamplingSpec


@pytest.fixture
def engine(tiny_model):
    events: "queue.Queue[tuple[str, object]]" = queue.Queue()

    def emit(batch):
        for key, evs in batch:
            for ev in evs:
                events.put((key, ev))

    eng = MlxEngine(model_path=tiny_model, max_running=2)
    eng.start(emit)
    facts = eng.load()
    assert facts.context_length == 2048 and facts.weights_digest.startswith("sha256:")
    eng.events = events
    yield eng
    eng.close()
    assert not eng.alive


def _req(key, max_tokens=8):
    return EngineRequest(
        key=key,
        prompt_tokens=[5, 6, 7, 8],
        prefix_len=0,
        max_tokens=max_tokens,
        sampling=SamplingSpec(),
    )


def _until_finished(eng, keys):
    done, seen = set(), {}
    while done != set(keys):
        key, ev = eng.events.get(timeout=30)
        seen.setdefault(key, []).append(ev)
        if ev.kind is EventKind.FAILED or ev.finish is not None:
            done.add(key)
    return seen


def test_at_most_max_running_are_admitted_the_rest_wait(engine):
    for k in ("a", "b", "c"):
        engine.submit(_req(k, max_tokens=6))
    seen = _until_finished(engine, ["a", "b", "c"])
    order = [k for k in ("a", "b", "c") if seen[k][0].kind is EventKind.ADMITTED]
    assert order == ["a", "b", "c"]
    for k in "abc":
        tokens = [e for e in seen[k] if e.kind is EventKind.TOKEN]
        assert len(tokens) <= 6 and tokens[-1].finish in ("length", "stop")


def test_cancel_while_waiting_never_admits(engine):
    engine.submit(_req("long-1", max_tokens=500))
    engine.submit(_req("long-2", max_tokens=500))
    engine.submit(_req("waiting", max_tokens=5))
    engine.cancel("waiting")
    engine.cancel("long-1")
    engine.cancel("long-2")
    engine.submit(_req("after", max_tokens=3))
    seen = _until_finished(engine, ["after"])
    assert "waiting" not in seen or all(e.kind is not EventKind.ADMITTED for e in seen["waiting"])
    assert engine.stats().running == 0


def test_a_failed_step_fails_only_the_running_batch(engine, monkeypatch):
    # MLX cannot be made to fail on demand, so one step is made to raise: a stand-in
    # for an out-of-memory error inside BatchGenerator.next().
    real_next = engine._gen.next
    calls = {"n": 0}

    def flaky():
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("[metal::malloc] simulated out of memory")
        return real_next()

    monkeypatch.setattr(engine._gen, "next", flaky)
    engine.submit(_req("victim", max_tokens=50))
    seen = _until_finished(engine, ["victim"])
    failed = [e for e in seen["victim"] if e.kind is EventKind.FAILED]
    assert failed and "RuntimeError" in failed[0].message
    engine.submit(_req("survivor", max_tokens=4))
    seen = _until_finished(engine, ["survivor"])
    assert seen["survivor"][-1].finish in ("length", "stop")
    assert engine.alive


def test_a_failed_admission_fails_that_batch_only(engine, monkeypatch):
    # As above: a stand-in error where BatchGenerator.insert or a cache copy could raise.
    real_insert = engine._insert

    def broken(batch):
        monkeypatch.setattr(engine, "_insert", real_insert)
        raise ValueError("simulated insert failure")

    monkeypatch.setattr(engine, "_insert", broken)
    engine.submit(_req("rejected", max_tokens=4))
    seen = _until_finished(engine, ["rejected"])
    assert seen["rejected"][0].kind is EventKind.FAILED
    assert "could not start" in seen["rejected"][0].message
    engine.submit(_req("next", max_tokens=4))
    assert _until_finished(engine, ["next"])["next"][-1].kind is EventKind.TOKEN


def test_engine_thread_death_is_reported(tiny_model):
    events: "queue.Queue" = queue.Queue()
    exits: "queue.Queue[str]" = queue.Queue()
    eng = MlxEngine(model_path=tiny_model, max_running=2)
    eng.start(
        lambda batch: [events.put((k, ev)) for k, evs in batch for ev in evs], on_exit=exits.put
    )
    eng.load()

    def crash():
        if eng._key_of:  # once the request is running
            raise SystemError("simulated crash of the engine loop")

    eng._publish_stats = crash  # the next loop iteration dies outside any per-request guard
    eng.submit(_req("in-flight", max_tokens=50))
    reason = exits.get(timeout=30)
    assert "crashed (SystemError)" in reason
    assert not eng.alive
    failed = []
    while not events.empty():
        key, ev = events.get_nowait()
        if key == "in-flight" and ev.kind is EventKind.FAILED:
            failed.append(ev)
    assert failed, "the request in flight is told, not left hanging"
    with pytest.raises(Exception, match="not running"):
        eng.submit(_req("too-late"))
