"""The capacity planner's parts without a CLI: the profile file, the workload, and the fleet
simulator against closed forms (M/M/1, M/M/c with Erlang C, a batching node's throughput
bound) and against step-by-step arithmetic. Fixed seeds throughout."""

from __future__ import annotations

import dataclasses
import heapq
import math
import random

import pytest

from cluster.capacity.profile import (
    PUBLISHED,
    Info,
    Limits,
    ModelFacts,
    NodeFacts,
    Profile,
    ProfileError,
    StepModel,
    load_profile,
    parse_profile,
    resolve_profile,
)
from cluster.capacity.simulate import (
    CoordinatorLimits,
    NodeSpec,
    _span,
    _steps_within,
    fleet_of,
    simulate,
)
from cluster.capacity.workload import (
    ArrivalShape,
    Request,
    TokenDist,
    Workload,
    WorkloadError,
    build_workload,
)

UNBOUNDED = CoordinatorLimits(queue_max_depth=math.inf, queue_max_wait_s=math.inf)


def profile(max_running: int = 1, *, name: str = "test", **fit) -> Profile:
    fit.setdefault("decode_base_s", 0.01)
    return Profile(
        Info(name, "measured", "2026-12-06T00:00:00Z", ("fleetctl profile --target x",)),
        NodeFacts("mlx", "test chip", 64.0),
        ModelFacts("test-model", params_b=0.5),
        Limits(max_running, 4096),
        StepModel(**fit),
    )


def geometric(rng: random.Random, mean: float) -> int:
    """Output tokens on 1, 2, ... with the given mean: with a tiny step time, an exponential service time."""
    return 1 + int(math.log(1.0 - rng.random()) / math.log(1.0 - 1.0 / mean))


def poisson_requests(rng: random.Random, rate: float, n: int, mean_tokens: float) -> list[Request]:
    t, out = 0.0, []
    for _ in range(n):
        t += rng.expovariate(rate)
        out.append(Request(t, 0, geometric(rng, mean_tokens)))
    return out


def queue_waits(servers: int, rate: float, n: int, seed: int) -> tuple[list[Request], list[float]]:
    """Queue waits with `servers` one-slot nodes that queue nothing themselves (so the
    coordinator's FIFO queue is the only queue), serving exponential times of mean 1 s
    (geometric outputs of mean 1,000 tokens at 1 ms a step). The first 5% warm up."""
    reqs = poisson_requests(random.Random(seed), rate, n, 1000.0)
    fleet = [
        NodeSpec(profile(1, decode_base_s=0.001), f"n{i}", max_queued=0) for i in range(servers)
    ]
    res = simulate(fleet, reqs, window=(reqs[n // 20].at_s, reqs[-1].at_s + 1e-9), limits=UNBOUNDED)
    assert not res.refused and res.notes == n - n // 20
    return reqs[n // 20 :], res.waits


def fifo_waits(servers: int, reqs: list[Request], step_s: float) -> list[float]:
    """The Kiefer-Wolfowitz recursion for a FIFO multi-server queue: each customer starts when
    it arrives or when the earliest server frees, whichever is later."""
    free = [0.0] * servers
    waits = []
    for r in reqs:
        earliest = heapq.heappop(free)
        start = max(r.at_s, earliest)
        waits.append(start - r.at_s)
        heapq.heappush(free, start + r.output_tokens * step_s)
    return waits


def erlang_c(c: int, a: float) -> float:
    """The probability an arrival waits in M/M/c with offered load a = lambda/mu."""
    below = sum(a**k / math.factorial(k) for k in range(c))
    top = a**c / math.factorial(c) * c / (c - a)
    return top / (below + top)


@pytest.mark.parametrize("servers, rate", [(1, 0.6), (3, 2.1)])
def test_waits_follow_the_fifo_recursion_note_for_note(servers, rate):
    reqs, waits = queue_waits(servers, rate, 20_000, seed=2)
    expected = fifo_waits(
        servers, [r for r in poisson_requests(random.Random(2), rate, 20_000, 1000.0)], 0.001
    )
    assert waits == pytest.approx(expected[len(expected) - len(waits) :], abs=1e-6)


# Over 200,000 notes the mean wait's own spread across seeds is about 1% (M/M/1, rho 0.5) and
# 2% (M/M/3, rho 0.7) (measured with the recursion above over 30 seeds), so these two checks
# are coarse; the recursion test above pins the simulator to the queue note for note.
def test_mm1_mean_wait_matches_closed_form():
    rho = 0.5  # mu = 1/s
    _, waits = queue_waits(1, rho, 200_000, seed=1)
    assert sum(waits) / len(waits) == pytest.approx(
        rho / (1.0 - rho), rel=0.02
    )  # Wq = rho / (mu - lambda)


def test_mmc_mean_wait_matches_erlang_c():
    c, rate = 3, 2.1  # rho = 0.7
    _, waits = queue_waits(c, rate, 200_000, seed=1)
    expected = erlang_c(c, rate) / (c - rate)  # Wq = C(c, a) / (c mu - lambda)
    assert sum(waits) / len(waits) == pytest.approx(expected, rel=0.02)


def test_batching_node_saturates_at_its_throughput_bound():
    # 8 slots, 100-token notes, steps of 10 ms + 2 ms per extra sequence: a full batch
    # finishes 8 notes per 100 steps of 24 ms: 3.33 notes/s, whatever the offered load above it.
    node = profile(8, decode_base_s=0.010, decode_per_seq_s=0.002)
    bound = 8 / (100 * node.fit.decode_step_s(8))
    rng = random.Random(5)
    t, reqs = 0.0, []
    while t < 400.0:
        t += rng.expovariate(2 * bound)
        reqs.append(Request(t, 0, 100))
    res = simulate(
        [NodeSpec(node, "n1", max_queued=100_000)], reqs, window=(100.0, 300.0), limits=UNBOUNDED
    )
    assert res.throughput_per_s == pytest.approx(bound, rel=0.01)
    assert res.nodes[0].busy == pytest.approx(1.0, abs=1e-6)
    assert res.nodes[0].mean_running == pytest.approx(8.0, rel=0.01)


def test_batching_node_below_saturation_serves_the_offered_load():
    node = profile(8, decode_base_s=0.010, decode_per_seq_s=0.002)
    rng = random.Random(6)
    t, reqs = 0.0, []
    while t < 2000.0:
        t += rng.expovariate(1.5)
        reqs.append(Request(t, 0, 100))
    res = simulate([NodeSpec(node, "n1")], reqs, window=(200.0, 1800.0))
    assert res.throughput_per_s == pytest.approx(1.5, rel=0.05)
    assert 0.0 < res.nodes[0].busy < 1.0


def test_a_note_alone_takes_its_prefill_and_one_step_per_token():
    fit = dict(
        decode_base_s=0.05,
        decode_per_ctx_token_s=1e-5,
        prefill_base_s=0.2,
        prefill_per_token_s=0.004,
        cached_prefix_per_token_s=0.0005,
    )
    node = profile(4, **fit)
    req = Request(10.0, 300, 40, cached_tokens=100)
    res = simulate([NodeSpec(node, "n1")], [req], window=(0.0, 100.0))
    prefill = 0.2 + 0.004 * 200 + 0.0005 * 100
    decode = sum(0.05 + 1e-5 * (300 + j) for j in range(40))  # the context grows a token a step
    assert res.ttfts[0] == pytest.approx(prefill + 0.05 + 1e-5 * 300)
    assert res.totals[0] == pytest.approx(prefill + decode)
    assert res.waits[0] == 0.0
    # The planner's bound ignores context growth: it is below this note's time, by that much.
    assert node.fit.single_note_s(300, 40, 100) == pytest.approx(prefill + 40 * 0.05)


def test_an_arrival_joins_the_batch_at_the_next_step_boundary():
    node = profile(2, decode_base_s=0.010, decode_per_seq_s=0.002)
    a, b = Request(0.0, 0, 100), Request(0.505, 0, 100)
    res = simulate([NodeSpec(node, "n1")], [a, b], window=(0.0, 1.0))
    # A runs alone for 51 steps of 10 ms (to 0.51 s); B is admitted then; 49 steps of 12 ms finish A
    # at 1.098 s, by when B has 49 tokens; its last 51 take 10 ms each.
    assert res.waits == pytest.approx([0.0, 0.005])
    assert res.ttfts == pytest.approx([0.010, 0.522 - 0.505])
    assert res.totals == pytest.approx([1.098, 1.608 - 0.505])


def test_a_long_prompt_is_prefilled_in_chunks_beside_the_running_decodes():
    node = profile(4, decode_base_s=0.01, prefill_base_s=0.1, prefill_per_token_s=0.001)
    a, b = Request(0.0, 0, 1000), Request(0.505, 1200, 10)
    res = simulate([NodeSpec(node, "n1", prefill_chunk=512)], [a, b], window=(0.0, 1.0))
    # B joins at A's step boundary 0.51 s; its 1,200 tokens take three steps of 512, 512 and 176
    # tokens (the first with the 0.1 s base), each with A's decode step; the third also decodes B.
    steps = [0.1 + 0.512 + 0.01, 0.512 + 0.01, 0.176 + 0.01]
    first = 0.51 + sum(steps)
    assert res.ttfts[1] == pytest.approx(first - 0.505)
    assert res.totals[1] == pytest.approx(first + 9 * 0.01 - 0.505)
    # A gained a token in every one of those steps: 1 + 40 + 3 + 9 by B's end, 947 more after.
    assert res.totals[0] == pytest.approx(first + 9 * 0.01 + 947 * 0.01)


@pytest.mark.parametrize("engine", ["mlx", "vllm"])
def test_a_step_attends_over_the_padded_batch_on_mlx_and_the_sum_on_vllm(engine):
    """mlx-lm left-pads its batch KV cache, so a short note decoding beside a long one costs
    as much context as the long one (measured: the sum-of-context model missed a replayed
    day's p95 by 34-43 % at 60-90 % load, bench/README.md); vLLM's paged cache costs the sum."""
    node = profile(2, decode_base_s=0.01, decode_per_ctx_token_s=1e-5)
    node = dataclasses.replace(node, node=dataclasses.replace(node.node, engine=engine))
    a, b = Request(0.0, 1000, 20), Request(0.0, 10, 20)  # prefilled in one step, together
    res = simulate([NodeSpec(node, "n1", prefill_chunk=1024)], [a, b], window=(0.0, 10.0))
    if engine == "mlx":
        context = [2 * (1000 + j) for j in range(20)]
    else:
        context = [(1000 + j) + (10 + j) for j in range(20)]
    want = sum(0.01 + 1e-5 * c for c in context)
    assert res.totals == pytest.approx([want, want])


def test_nodes_sharing_a_host_share_its_compute():
    # Two 8-slot nodes on one host, saturated: each step takes twice its profiled time while both
    # are busy, so the pair finishes what one node alone would (the bound above), not twice it.
    node = profile(8, decode_base_s=0.010, decode_per_seq_s=0.002)
    bound = 8 / (100 * node.fit.decode_step_s(8))
    rng = random.Random(5)
    t, reqs = 0.0, []
    while t < 400.0:
        t += rng.expovariate(4 * bound)
        reqs.append(Request(t, 0, 100))
    shared = fleet_of([(node, 2)], nodes_per_host=2, max_queued=100_000)
    assert [s.host for s in shared] == ["host-1", "host-1"]
    res = simulate(shared, reqs, window=(100.0, 300.0), limits=UNBOUNDED)
    assert res.throughput_per_s == pytest.approx(bound, rel=0.02)
    apart = simulate(fleet_of([(node, 2)], max_queued=100_000), reqs, window=(100.0, 300.0))
    assert apart.throughput_per_s == pytest.approx(2 * bound, rel=0.02)
    # A host that runs 1.5 nodes at full speed: both busy, each step takes 2 / 1.5 times longer.
    partly = fleet_of([(node, 2)], nodes_per_host=2, host_parallelism=1.5, max_queued=100_000)
    res = simulate(partly, reqs, window=(100.0, 300.0), limits=UNBOUNDED)
    assert res.throughput_per_s == pytest.approx(1.5 * bound, rel=0.02)
    with pytest.raises(ValueError, match="host parallelism"):
        fleet_of([(node, 2)], nodes_per_host=2, host_parallelism=0)
    with pytest.raises(ValueError, match="nodes per host"):
        fleet_of([(node, 2)], nodes_per_host=0)


def test_a_note_slows_while_its_hosts_other_node_is_busy_and_speeds_up_after():
    # A: 100 tokens from 0 s on n1; B: 20 tokens from 0.2 s on n2, the same host. Alone, a step is
    # 10 ms. A runs 20 steps alone (to 0.2 s), then both run at 20 ms a step: B's 20 tokens end at
    # 0.6 s, by when A has 40 tokens; A's last 60 run alone again: 0.6 + 0.6 = 1.2 s.
    node = profile(1, decode_base_s=0.010)
    fleet = [NodeSpec(node, "n1", host="h"), NodeSpec(node, "n2", host="h")]
    a, b = Request(0.0, 0, 100), Request(0.2, 0, 20)
    res = simulate(fleet, [a, b], window=(0.0, 1.0))
    assert res.totals == pytest.approx([1.2, 0.4])
    # On hosts of their own, neither slows the other.
    apart = simulate([NodeSpec(node, "n1"), NodeSpec(node, "n2")], [a, b], window=(0.0, 1.0))
    assert apart.totals == pytest.approx([1.0, 0.2])


def test_steps_within_inverts_span():
    rng = random.Random(3)
    for _ in range(2000):
        a, b = rng.uniform(1e-3, 0.1), rng.choice([0.0, rng.uniform(0, 1e-4)])
        m = rng.randrange(0, 5000)
        assert _steps_within(_span(m, a, b), a, b) == m
        if m:
            assert _steps_within(_span(m, a, b) - a / 10, a, b) == m - 1


def test_coordinator_queue_bounds_depth_and_wait():
    node = profile(1, decode_base_s=1.0)
    fleet = [NodeSpec(node, "n1", max_queued=0)]
    burst = [
        Request(0.0, 0, 3) for _ in range(5)
    ]  # one runs 3 s, two wait, two find the queue full
    res = simulate(
        fleet,
        burst,
        window=(0.0, 1.0),
        limits=CoordinatorLimits(queue_max_depth=2, queue_max_wait_s=5),
    )
    assert res.refused == {"queue_full": 2, "waited_too_long": 1}
    assert sorted(res.totals)[:2] == pytest.approx([3.0, 6.0])
    assert math.isinf(max(res.totals))


def test_router_spreads_work_across_nodes():
    node = profile(4, decode_base_s=0.01)
    rng = random.Random(9)
    reqs = sorted((Request(rng.uniform(0, 600), 0, 200) for _ in range(2000)), key=lambda r: r.at_s)
    res = simulate([NodeSpec(node, f"n{i}") for i in range(3)], reqs, window=(0.0, 600.0))
    served = [u.served for u in res.nodes]
    assert sum(served) == 2000 and max(served) - min(served) < 0.1 * max(served)


# ---- profile files ----------------------------------------------------------------------


def test_profile_round_trips_through_toml(tmp_path):
    p = Profile(
        Info(
            "x-72b",
            PUBLISHED,
            "2026-12-06T08:00:00Z",
            ("https://example.org/bench",),
            'arithmetic: 800 GB/s / 41 GB = 19.5 tok/s\nsecond "line"\\',
        ),
        NodeFacts("vllm", "NVIDIA H100", 80.0, group_size=2),
        ModelFacts("org/x", "", 72.7, "fp8"),
        Limits(64, 32768),
        StepModel(0.02, 0.0005, 1e-7, 0.03, 0.0002, 0.0),
    )
    path = p.save(tmp_path / "x.toml")
    back = load_profile(path)
    assert back == p and back.path == str(path)


@pytest.mark.parametrize(
    "edit, problem",
    [
        (("decode_base_s = 0.06", "decode_base_s = -1"), "fit.decode_base_s: must be > 0"),
        (("max_running = 8", 'max_running = "8"'), "limits.max_running: must be an integer"),
        (('engine = "mlx"', 'engine = "cuda"'), "node.engine: must be one of"),
        (("decode_per_seq_s", "decode_per_sequence_s"), "fit.decode_per_sequence_s: unknown key"),
        (("schema = 1", "schema = 2"), "schema: this planner reads schema 1"),
        (('provenance = "measured"', 'provenance = "guessed"'), "profile.provenance: must be"),
        (("[limits]", "[limit]"), "[limits]: table missing"),
        (("peak_gb = 45.0", "peak_gb = "), "not valid TOML"),
    ],
)
def test_profile_errors_name_the_file_and_key(tmp_path, edit, problem):
    good = profile(8, decode_base_s=0.06, decode_per_seq_s=0.004)
    text = good.to_toml().replace(
        "[memory]\nweights_gb = 0.0\npeak_gb = 0.0", "[memory]\npeak_gb = 45.0"
    )
    path = tmp_path / "bad.toml"
    path.write_text(text.replace(*edit, 1))
    with pytest.raises(ProfileError) as err:
        load_profile(path)
    assert str(err.value).startswith(f"{path}: ") and problem in str(err.value)


def test_published_profile_must_cite_sources():
    doc = {
        "schema": 1,
        "profile": {"name": "p", "provenance": PUBLISHED, "sources": []},
        "node": {"engine": "mlx", "chip": "c", "memory_gb": 1},
        "model": {"id": "m"},
        "limits": {"max_running": 1},
        "fit": {"decode_base_s": 0.1, "prefill_per_token_s": 0.001},
    }
    with pytest.raises(
        ProfileError, match="profile.sources: a profile not measured here must cite"
    ):
        parse_profile(doc, "p.toml")


def test_resolve_profile_by_path_or_reference_name(tmp_path):
    p = profile(2)
    p.save(tmp_path / "mine.toml")
    assert resolve_profile(str(tmp_path / "mine.toml")).name == "test"
    with pytest.raises(ProfileError, match="no reference profile by that name"):
        resolve_profile("no-such-profile")


def test_step_model_bounds():
    fit = StepModel(decode_base_s=0.0667, decode_per_seq_s=0.004, prefill_per_token_s=1 / 170)
    assert fit.stream_decode_tok_s() == pytest.approx(15.0, rel=0.01)
    assert fit.single_note_s(500, 500) == pytest.approx(500 / 170 + 500 * 0.0667)
    assert fit.decode_tok_s(8) == pytest.approx(8 / (0.0667 + 7 * 0.004))
    assert fit.step_s(1.5, 2) == pytest.approx(1.5 + 0.0707)


# ---- the workload ----------------------------------------------------------------------


def test_busy_hours_shape_totals_the_day():
    w = build_workload(notes_per_day=6000, hours="8-18", peak_factor=2.0)
    assert w.rate_at(9 * 3600) == pytest.approx(2 * w.rate_at(20 * 3600))
    assert w.expected_notes(0, 86_400) == pytest.approx(6000)
    assert w.expected_notes(8 * 3600, 18 * 3600) == pytest.approx(6000 * 1200 / 2040)
    drawn = w.requests(random.Random(4), 0, 86_400)
    assert len(drawn) == pytest.approx(6000, rel=0.05)
    inside = sum(1 for r in drawn if 8 * 3600 <= r.at_s < 18 * 3600)
    assert inside / len(drawn) == pytest.approx(1200 / 2040, rel=0.05)
    assert all(400 <= r.output_tokens <= 600 and r.prompt_tokens == 500 for r in drawn)


def test_arrivals_csv_and_request_log_export(tmp_path):
    csv = tmp_path / "day.csv"
    csv.write_text("time,arrivals\n09:00,30\n09:01,10\n")
    log = tmp_path / "log.json"
    log.write_text(
        '{"requests": [{"prompt_tokens": 480, "completion_tokens": 510, "outcome": "completed"},'
        ' {"prompt_tokens": 9, "completion_tokens": 0, "outcome": "failed"}], "matched": 2}'
    )
    w = build_workload(arrivals_csv=csv, tokens_from=log)
    assert w.notes_per_day == 40 and w.busiest_window(60) == (540 * 60.0, 541 * 60.0)
    assert w.sample_tokens(random.Random(1)) == (480, 510)
    with pytest.raises(WorkloadError, match="data row 2: minute 1500 outside"):
        csv.write_text("minute,count\n1,2\n1500,3\n")
        build_workload(arrivals_csv=csv)


def test_token_spec_parsing():
    assert TokenDist.parse("400:600") == TokenDist(400, 600)
    assert TokenDist.parse("500").mean == 500
    for bad in ("600:400", "-1", "a:b", "1:2:3"):
        with pytest.raises(WorkloadError):
            TokenDist.parse(bad)
    with pytest.raises(WorkloadError):
        ArrivalShape.hours(8, 8, 2.0)
    with pytest.raises(WorkloadError):
        Workload(-5, ArrivalShape.hours(8, 18, 2.0), TokenDist(1, 1), TokenDist(1, 1))


def test_a_traffic_policy_splits_notes_by_weight_and_each_class_queues_on_its_own():
    """Weights macs=3 upstream=1 over Poisson arrivals (mean service 1 s on one-slot nodes):
    each class gets exactly its weight's share (the coordinator's own Chooser), its notes wait
    as in a FIFO queue of its own nodes note for note (the recursion over the notes its class
    was given), and each class's utilisation is its share of the load, lambda w_c / (n_c mu)."""
    from cluster.traffic import Chooser, Policy

    rate, n = 2.0, 40_000
    reqs = poisson_requests(random.Random(3), rate, n, 1000.0)
    policy = Policy.parse("*", {"macs": 3, "upstream": 1})
    node = profile(1, decode_base_s=0.001)
    fleet = [NodeSpec(node, f"mac-{i}", max_queued=0, node_class="macs") for i in range(3)]
    fleet.append(NodeSpec(node, "api-1", max_queued=0, node_class="upstream"))
    warm = n // 20
    window = (reqs[warm].at_s, reqs[-1].at_s + 1e-9)
    res = simulate(fleet, reqs, window=window, limits=UNBOUNDED, traffic=policy)
    assert not res.refused and res.notes == n - warm and res.fallbacks == 0

    chooser = Chooser(policy)
    chosen = [chooser.next() for _ in reqs]
    servers = {"macs": 3, "upstream": 1}
    expected: dict[int, float] = {}
    for cls, count in servers.items():
        mine = [i for i, c in enumerate(chosen) if c == cls]
        for i, wait in zip(mine, fifo_waits(count, [reqs[i] for i in mine], 0.001)):
            expected[i] = wait
    assert res.waits == pytest.approx([expected[i] for i in range(warm, n)], abs=1e-6)
    served = [chosen[i] for i in range(warm, n)]
    assert all(
        fleet[node_index].node_class == cls for node_index, cls in zip(res.served_by, served)
    )

    span = window[1] - window[0]
    by_class = {c.node_class: c for c in res.by_class()}
    assert set(by_class) == {"macs", "upstream"}
    for cls, weight in (("macs", 0.75), ("upstream", 0.25)):
        use = by_class[cls]
        assert use.nodes == servers[cls] and use.served == served.count(cls)
        assert use.share == pytest.approx(weight, abs=1e-3)
        work = sum(reqs[i].output_tokens * 0.001 for i in range(warm, n) if chosen[i] == cls)
        assert use.busy == pytest.approx(work / (servers[cls] * span), rel=0.02)
        assert use.busy == pytest.approx(rate * weight / servers[cls], rel=0.05)  # rho = 0.5
        assert use.p95_s >= use.p50_s > 0


def test_a_class_without_nodes_falls_back_and_no_policy_routes_as_before():
    from cluster.traffic import Policy

    reqs = poisson_requests(random.Random(4), 0.5, 2_000, 200.0)
    fleet = [NodeSpec(profile(2), f"mac-{i}", node_class="macs") for i in range(2)]
    window = (reqs[100].at_s, reqs[-1].at_s + 1e-9)
    plain = simulate(fleet, reqs, window=window)
    policy = Policy.parse("*", {"macs": 1, "gpu": 1})  # no gpu node: half fall back to macs
    split = simulate(fleet, reqs, window=window, traffic=policy)
    assert split.fallbacks == 950  # the gpu picks among the 1,900 measured notes
    assert split.totals == pytest.approx(plain.totals)
    assert [c.node_class for c in split.by_class()] == ["macs"]
    assert split.by_class()[0].share == 1.0
    # Without --node-class a profile's class follows its engine (cluster.traffic.class_of).
    assert NodeSpec(profile(1), "n").traffic_class == "local"


def _constant_day(rate: float, hours: float, seed: int, tokens: int = 100) -> list[Request]:
    rng, t, out = random.Random(seed), 0.0, []
    while t < hours * 3600:
        t += rng.expovariate(rate)
        out.append(Request(t, 0, tokens))
    return out


@pytest.mark.parametrize("load", [0.5, 2.0])
def test_overflow_on_the_headroom_signal_sends_the_excess_over_the_sla_rate(load):
    """macs=100 upstream=0 overflow=upstream with the live headroom's signal: the share of
    notes that overflow is 1 - (the rate the SLA holds to) / (the arrival rate), the closed
    form the coordinator's controller aims at (docs/traffic.md "Overflow"); none below it."""
    from cluster.capacity.headroom import NodeModel, TokenMix, headroom
    from cluster.capacity.simulate import OverflowSettings
    from cluster.traffic import Policy

    mac, api = profile(4, decode_base_s=0.02, decode_per_seq_s=0.005), profile(16)
    fleet = [NodeSpec(mac, "mac-1", node_class="macs")]
    fleet += [NodeSpec(api, f"api-{i}", node_class="upstream") for i in (1, 2)]
    sla = 6.0
    mix = TokenMix(0, 0, 100, 100, source="measured")  # every note: no prompt, 100 tokens
    sla_rate = headroom([NodeModel("mac-1", mac.fit, 4)], 1.0, mix, sla).sla_rate_per_s
    reqs = _constant_day(load * sla_rate, 1.5, seed=7)
    res = simulate(
        fleet,
        reqs,
        window=(900.0, 1.5 * 3600 - 300),
        limits=UNBOUNDED,
        traffic=Policy.parse("*", {"macs": 100, "upstream": 0}, "upstream"),
        overflow=OverflowSettings(sla_p95_s=sla),
    )
    by_class = {c.node_class: c for c in res.by_class()}
    spilled = by_class["upstream"].share
    assert spilled == pytest.approx(max(0.0, 1.0 - 1.0 / load), abs=0.03)
    if load > 1:
        assert res.overflow_routed == by_class["upstream"].served and by_class["macs"].p95_s <= sla
    else:
        assert spilled < 0.01


def test_overflow_on_the_queue_signal_bounds_each_local_notes_wait():
    """Without profiles (the QUEUE signal) a local note waits in the coordinator's queue at
    most --traffic-overflow-queue-wait-s plus one tick of the switch: past it overflow is on
    and the waiting notes go to the overflow class."""
    from cluster.capacity.simulate import OverflowSettings
    from cluster.traffic import TICK_S, Policy

    node = profile(1, decode_base_s=0.01)  # 1 s per 100-token note, one at a time
    fleet = [NodeSpec(node, f"mac-{i}", max_queued=0, node_class="macs") for i in (1, 2)]
    fleet += [NodeSpec(profile(16), "api-1", node_class="upstream")]
    reqs = _constant_day(2.4, 0.5, seed=9)  # 1.2 erlangs a mac: they cannot keep up
    settings = OverflowSettings(queue_wait_s=0.5, hold_s=2.0, signal="queue")
    res = simulate(
        fleet,
        reqs,
        window=(300.0, 1500.0),
        limits=UNBOUNDED,
        traffic=Policy.parse("*", {"macs": 1, "upstream": 0}, "upstream"),
        overflow=settings,
    )
    local = [w for w, i in zip(res.waits, res.served_by) if i in (0, 1)]
    assert res.overflow_routed > 0 and res.overflow_episodes >= 1
    assert max(local) <= settings.queue_wait_s + TICK_S + 1e-6
    by_class = {c.node_class: c for c in res.by_class()}
    # The macs carry at most 2 notes/s: at least the excess goes upstream (bursts add more).
    assert by_class["upstream"].share >= 1.0 - 2.0 / 2.4 - 0.02
