"""A real fleet-node process: concurrent streams, batching, determinism, resume."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from cluster.api import inference_pb2
from cluster.client import FleetClient, build_request

# These tests call node agents directly, as the coordinator does.
pytestmark = pytest.mark.usefixtures("as_node_caller")

NOTE = [
    ("system", "You are a clinical documentation assistant."),
    ("user", "Write a SOAP note for a synthetic follow-up visit."),
]


def _run(node, req, timeout=60):
    """Collect a whole stream: (token ids, text, final, chunk arrival times)."""
    ids, text, final, times = [], [], None, []
    for chunk in node.inference.Generate(req, timeout=timeout):
        times.append(time.monotonic())
        ids.extend(chunk.token_ids)
        text.append(chunk.text)
        if chunk.HasField("final"):
            assert final is None, "only the last chunk carries final"
            final = chunk.final
    assert final is not None, "every completed stream ends with a final chunk"
    return ids, "".join(text), final, times


def test_sixteen_concurrent_streams_complete_with_right_counts(node):
    barrier = threading.Barrier(16)
    max_tokens = [24 + 4 * i for i in range(16)]

    def one(i):
        barrier.wait()
        req = build_request(
            messages=NOTE, max_tokens=max_tokens[i], request_id=f"conc-{i}", temperature=0.7, seed=i
        )
        return _run(node, req)

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(16)))

    finishes = []
    for i, (ids, _text, final, _) in enumerate(results):
        assert final.request_id == f"conc-{i}"
        assert final.node_id == "shared-node"
        assert final.model.weights_digest.startswith("sha256:")
        assert final.usage.completion_tokens == len(ids)
        assert final.usage.prompt_tokens > 0
        if final.finish_reason == inference_pb2.FINISH_REASON_LENGTH:
            assert len(ids) == max_tokens[i]
        else:
            assert final.finish_reason == inference_pb2.FINISH_REASON_STOP
            assert len(ids) < max_tokens[i]
        assert final.timings.time_to_first_token_ms > 0
        assert final.timings.total_ms >= final.timings.time_to_first_token_ms
        finishes.append(final.finish_reason)
    assert finishes.count(inference_pb2.FINISH_REASON_LENGTH) >= 8
    # They ran together: every stream had its first chunk before the first stream ended.
    first_end = min(r[3][-1] for r in results)
    assert all(r[3][0] <= first_end for r in results)


def test_new_request_joins_the_running_batch(node):
    """A short request finishes while a long one keeps streaming (no head-of-line wait)."""
    long_req = build_request(prompt="Progress note:", max_tokens=1500, request_id="long-one")
    call = node.inference.Generate(long_req, timeout=60)
    next(call)  # the long request is decoding
    ids, _, final, _ = _run(
        node, build_request(prompt="Plan:", max_tokens=8, request_id="short-one")
    )
    assert len(ids) == final.usage.completion_tokens <= 8
    # The long one is still running when the short one is done.
    st = node.status()
    assert st.load.running >= 1
    call.cancel()


def test_same_seed_gives_same_tokens(node):
    def sample(seed, rid):
        req = build_request(
            messages=NOTE, max_tokens=48, temperature=1.0, top_p=0.95, seed=seed, request_id=rid
        )
        return _run(node, req)

    a, _, fa, _ = sample(1234, "seed-a")
    b, _, fb, _ = sample(1234, "seed-b")
    c, _, _, _ = sample(99, "seed-c")
    assert a == b
    assert fa.seed == fb.seed == 1234
    assert a != c


def test_same_seed_same_tokens_inside_a_busy_batch(node):
    """Sampling depends on (seed, step) only, not on what else is in the batch."""

    def req(rid):
        return build_request(
            messages=NOTE,
            max_tokens=32,
            temperature=0.8,
            seed=7,  # noqa: E731
            request_id=rid,
        )

    alone, _, _, _ = _run(node, req("alone"))
    noise = [
        node.inference.Generate(
            build_request(
                prompt=f"Other patient {i}",
                max_tokens=200,
                temperature=1.0,
                request_id=f"noise-{i}",
            ),
            timeout=60,
        )
        for i in range(6)
    ]
    for call in noise:
        next(call)
    busy, _, _, _ = _run(node, req("busy"))
    for call in noise:
        call.cancel()
    assert busy == alone


def test_unset_seed_is_reported_and_replays(node):
    ids, _, final, _ = _run(
        node, build_request(prompt="Assessment:", max_tokens=24, temperature=1.0)
    )
    assert final.seed != 0
    again, _, _, _ = _run(
        node, build_request(prompt="Assessment:", max_tokens=24, temperature=1.0, seed=final.seed)
    )
    assert again == ids


def test_prefix_token_ids_resume_the_same_sequence(node):
    """Continuing after k generated tokens yields the uninterrupted run's remaining tokens."""
    full, full_text, _, _ = _run(
        node,
        build_request(messages=NOTE, max_tokens=40, temperature=0.9, seed=5, request_id="whole"),
    )
    assert len(full) == 40
    k = 15
    req = build_request(
        messages=NOTE, max_tokens=40 - k, temperature=0.9, seed=5, request_id="resumed"
    )
    req.prefix_token_ids.extend(full[:k])
    rest, _, final, _ = _run(node, req)
    assert final.usage.prefix_tokens == k
    assert full[:k] + rest == full


def test_prefix_text_chars_splices_the_text_exactly(node):
    """A resumed stream sends the prefix's text the caller has not seen yet, then the rest:
    old text[:c] + new text equals the uninterrupted text, wherever the cut falls."""
    chunks = list(
        node.inference.Generate(
            build_request(
                messages=NOTE, max_tokens=40, temperature=0.9, seed=9, request_id="whole-text"
            ),
            timeout=60,
        )
    )
    full = [t for c in chunks for t in c.token_ids]
    full_text = "".join(c.text for c in chunks)
    # What a caller holds when the node dies after k tokens: the chunks sent so far.
    seen, seen_text = [], ""
    for chunk in chunks:
        if len(seen) >= 17:
            break
        seen.extend(chunk.token_ids)
        seen_text += chunk.text
    k = len(seen)
    for chars in sorted({0, len(seen_text) // 2, len(seen_text)}):
        req = build_request(
            messages=NOTE, max_tokens=40 - k, temperature=0.9, seed=9, request_id=f"splice-{chars}"
        )
        req.prefix_token_ids.extend(seen)
        req.prefix_text_chars = chars
        rest, rest_text, _, _ = _run(node, req)
        assert full[:k] + rest == full
        assert seen_text[:chars] + rest_text == full_text


def test_prefix_text_chars_without_prefix_is_invalid(node):
    req = build_request(prompt="Plan:", max_tokens=4)
    req.prefix_text_chars = 3
    with pytest.raises(grpc.RpcError) as err:
        _run(node, req)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "prefix_text_chars" in err.value.details()


def test_stop_sequence_cuts_text_and_ends_stream(node):
    ids, text, final, _ = _run(
        node, build_request(messages=NOTE, max_tokens=64, request_id="nostop")
    )
    assert len(text) > 6
    stop = text[3:6]
    _, cut, final, _ = _run(
        node, build_request(messages=NOTE, max_tokens=1500, stop=[stop], request_id="withstop")
    )
    assert final.finish_reason == inference_pb2.FINISH_REASON_STOP
    assert cut == text[: text.index(stop)]
    # The engine stops too: its slot is free long before 1500 tokens could be generated.
    _, waited = node.wait_until(
        lambda s: s.load.engine_sequences == 0,
        timeout_s=2.0,
        what="engine slot freed after a stop sequence",
    )
    assert waited < 0.5


def test_client_generate_returns_metadata(node):
    with FleetClient(node.address) as client:
        result = client.generate(prompt="Discharge summary:", max_tokens=16, request_id="client-1")
    assert result.request_id == "client-1"
    assert result.node_id == "shared-node"
    assert result.completion_tokens == len(result.token_ids)
    assert result.finish_reason in ("length", "stop")


def test_duplicate_request_id_in_flight_is_refused(node):
    call = node.inference.Generate(
        build_request(prompt="Note:", max_tokens=1500, request_id="dup"), timeout=60
    )
    next(call)
    with pytest.raises(grpc.RpcError) as err:
        _run(node, build_request(prompt="Note:", max_tokens=4, request_id="dup"))
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    call.cancel()


def test_prompt_cache_reuses_a_shared_prefix_without_changing_tokens(node, start_node):
    system = (
        "system",
        "Synthetic clinic 4471 house style: SOAP sections, short sentences, metric units.",
    )
    first = build_request(
        messages=[system, ("user", "Visit A: cough for three days.")],
        max_tokens=16,
        request_id="cache-a",
    )
    _, _, fa, _ = _run(node, first)

    def second(rid):
        return build_request(
            messages=[system, ("user", "Visit B: knee pain after a fall.")],  # noqa: E731
            max_tokens=24,
            request_id=rid,
            temperature=0.8,
            seed=3,
        )

    ids_b, _, fb, _ = _run(node, second("cache-b"))
    assert fb.usage.cached_prompt_tokens >= fa.usage.cached_prompt_tokens + 10, (
        "the system prompt is reused"
    )
    assert fb.usage.cached_prompt_tokens < fb.usage.prompt_tokens
    st = node.status().load
    assert st.prompt_cache_entries >= 1 and st.prompt_cache_bytes > 0
    assert st.cached_prompt_tokens_total >= fb.usage.cached_prompt_tokens

    uncached = start_node("--prompt-cache-entries", "0", node_id="no-cache")
    ids_plain, _, fp, _ = _run(uncached, second("plain-b"))
    assert fp.usage.cached_prompt_tokens == 0
    assert ids_plain == ids_b, "a cached prefix must not change what is generated"
    assert uncached.status().load.prompt_cache_entries == 0
