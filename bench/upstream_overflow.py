"""The overflow controller's reaction to a load step (issue 25, docs/traffic.md): a real
coordinator, two tiny-model nodes in classes `macs` and `burst`, the policy `* macs=100
burst=0 overflow=burst`, and a capacity profile that holds macs to about 2 short notes/s
under a 3 s SLA. The load runs low, steps up past that rate, and falls back.

The predicted breach and recovery are computed here, independently of the controller, from
this script's own send times (the same window and closed form the coordinator uses, the
profile's fit, the warm-up notes' token mix): overflow "starts" when the first request is
actually served by the burst node, and "stops" when the coordinator reports it off (polled
every 50 ms). Goals: start within 2 s of the predicted breach, stop within 10 s of recovery.
The baseline is the hold time the controller is configured with (the least the stop can take).

    .venv/bin/python bench/upstream_overflow.py            # ~1.5 min on 2 cores
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")

from cluster.api import fleet_pb2, fleet_pb2_grpc  # noqa: E402
from cluster.capacity.headroom import ArrivalMeter, NodeModel, headroom  # noqa: E402
from cluster.capacity.profile import (  # noqa: E402
    Info,
    Limits,
    ModelFacts,
    NodeFacts,
    Profile,
    StepModel,
)
from cluster.client import build_request  # noqa: E402
from cluster.localfleet import CoordinatorProcess, NodeProcess  # noqa: E402
from cluster.security.ca import init_ca  # noqa: E402
from cluster.tinymodel import make_tiny_model  # noqa: E402

FIT = StepModel(decode_base_s=0.03, decode_per_seq_s=0.015, prefill_base_s=0.003)
SLOTS, SLA_S, MAX_TOKENS = 2, 3.0, 8
GOAL_START_S, GOAL_STOP_S = 2.0, 10.0


def note(i: int, tag: str):
    return build_request(
        messages=[("system", "You write clinical notes."), ("user", f"Synthetic visit {i}.")],
        max_tokens=MAX_TOKENS,
        request_id=f"{tag}-{i}",
        temperature=0.0,
    )


def call(co: CoordinatorProcess, req) -> tuple[str, int, int]:
    """(node that finished it, prompt tokens, completion tokens)."""
    final = None
    for chunk in co.inference.Generate(req, timeout=60):
        if chunk.HasField("final"):
            final = chunk.final
    return final.nodes[-1], final.usage.prompt_tokens, final.usage.completion_tokens


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--low-rate", type=float, default=0.5, help="notes/s before and after")
    ap.add_argument("--high-rate", type=float, default=8.0, help="notes/s during the step")
    ap.add_argument("--before-s", type=float, default=6.0)
    ap.add_argument("--step-s", type=float, default=6.0)
    ap.add_argument("--after-s", type=float, default=20.0)
    ap.add_argument("--window-s", type=float, default=5.0, help="--traffic-overflow-window-s")
    ap.add_argument("--hold-s", type=float, default=5.0, help="--traffic-overflow-hold-s")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="sf-overflow-") as tmp:
        work = Path(tmp)
        model = make_tiny_model(work / "model")
        certs = work / "ca"
        init_ca(certs, fleet="bench")
        logs = work / "logs"
        profile = Profile(
            Info(
                "slow-macs", "derived, for the benchmark", sources=("bench/upstream_overflow.py",)
            ),
            NodeFacts("mlx", "bench", 1.0, node_id="mac-1"),
            ModelFacts(model.name),
            Limits(SLOTS),
            FIT,
        ).save(work / "slow.toml")
        nodes = [
            NodeProcess(
                model,
                "--node-class",
                "macs",
                "--max-running",
                str(SLOTS),
                node_id="mac-1",
                tls_dir=certs,
            ),
            NodeProcess(model, "--node-class", "burst", node_id="burst-1", tls_dir=certs),
        ]
        co = None
        try:
            for n in nodes:
                n.start(logs)
            for n in nodes:
                n.wait_serving()
            co = CoordinatorProcess(
                "--capacity-profile",
                str(profile),
                "--sla-p95-s",
                str(SLA_S),
                "--traffic-overflow-window-s",
                str(args.window_s),
                "--traffic-overflow-hold-s",
                str(args.hold_s),
                nodes=[n.address for n in nodes],
                name="overflow-coordinator",
                tls_dir=certs,
            )
            co.start(logs)
            co.wait_serving()
            co.wait_routable(2)
            print(
                f"fleet: mac-1 (class macs, {SLOTS} slots, profiled) and burst-1 (class burst) "
                f"behind a coordinator, mTLS; SLA p95 {SLA_S:g} s, overflow window "
                f"{args.window_s:g} s, hold {args.hold_s:g} s; {os.cpu_count()} CPUs",
                flush=True,
            )
            return run(co, args)
        finally:
            if co is not None:
                co.stop()
            for n in nodes:
                n.stop()


def run(co: CoordinatorProcess, args) -> int:
    admin = fleet_pb2_grpc.FleetStub(co.channel)
    warm = [call(co, note(i, "warm")) for i in range(22)]  # the live headroom's token mix
    mix_meter = ArrivalMeter(300.0)
    for _, p, c in warm:
        mix_meter.observe(0.0, time.time(), completed=True, prompt_tokens=p, completion_tokens=c)
    mix = mix_meter.mix()
    admin.SetTrafficPolicy(
        fleet_pb2.SetTrafficPolicyRequest(
            policy=fleet_pb2.TrafficPolicy(
                model="*", weights={"macs": 100, "burst": 0}, overflow="burst"
            )
        ),
        timeout=10,
    )
    t0 = time.time()  # the policy's arrival meter starts here
    print(f"policy set; warm-up mix {mix.prompt_mean:g}/{mix.output_mean:g} tokens", flush=True)

    polls: list[tuple[float, bool]] = []
    done = threading.Event()

    def poll() -> None:
        while not done.is_set():
            st = admin.GetTrafficPolicies(fleet_pb2.GetTrafficPoliciesRequest(), timeout=5)
            polls.append((time.time(), st.policies[0].overflow_active))
            done.wait(0.05)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    sends: list[float] = []
    served: list[tuple[float, str]] = []
    phases = [
        (args.low_rate, args.before_s),
        (args.high_rate, args.step_s),
        (args.low_rate, args.after_s),
    ]
    i = 0
    with ThreadPoolExecutor(64) as pool:

        def one(k: int, at: float) -> None:
            node, _, _ = call(co, note(k, "load"))
            served.append((at, node))

        start = time.time()
        for rate, length in phases:
            end = start + length
            t = start
            while t < end:
                delay = t - time.time()
                if delay > 0:
                    time.sleep(delay)  # load pacing
                at = time.time()
                sends.append(at)
                pool.submit(one, i, at)
                i += 1
                t += 1.0 / rate
            start = end
        step_at = sends[0] + args.before_s
        step_end = step_at + args.step_s
    done.set()
    poller.join()

    # The prediction, recomputed here every 10 ms from our own send times.
    nodes = [NodeModel("mac-1", FIT, SLOTS)]
    breach_at = recover_at = None
    t = t0
    while t < sends[-1] + 0.5:
        count = sum(1 for s in sends if t - args.window_s <= s <= t)
        rate = count / max(1.0, min(args.window_s, t - t0))
        over = headroom(nodes, rate, mix, SLA_S).predicted_p95_s > SLA_S
        if over and breach_at is None:
            breach_at = t
        if breach_at is not None and not over and recover_at is None and t > step_at:
            recover_at = t
        t += 0.01
    to_burst = sorted(at for at, node in served if node == "burst-1")
    started = to_burst[0] if to_burst else None
    on_polls = [pt for pt, on in polls if on]
    stopped = next((pt for pt, on in polls if not on and on_polls and pt > on_polls[-1]), None)
    outside = [at for at in to_burst if breach_at is None or at < breach_at - 0.05]
    print(
        f"\nCommand: .venv/bin/python bench/upstream_overflow.py · date: {datetime.now(UTC):%Y-%m-%d}"
    )
    print(
        f"load: {args.low_rate:g}/s for {args.before_s:g} s, {args.high_rate:g}/s for "
        f"{args.step_s:g} s, {args.low_rate:g}/s for {args.after_s:g} s ({len(sends)} notes); "
        f"{len(to_burst)} served by burst-1, {len(served) - len(to_burst)} by mac-1"
    )
    if breach_at is None or started is None or recover_at is None or stopped is None:
        print(
            f"no full episode: breach {breach_at}, first overflow {started}, recovery "
            f"{recover_at}, off {stopped}; raise --high-rate"
        )
        return 1
    start_s, stop_s = started - breach_at, stopped - recover_at
    print("| measure | figure | baseline | goal |")
    print("|---|---|---|---|")
    print(f"| predicted breach after the step | {breach_at - step_at:+.2f} s | | |")
    print(
        f"| overflow start after the predicted breach (first note served by burst-1) | "
        f"{start_s:.2f} s | | <= {GOAL_START_S:g} s |"
    )
    print(f"| predicted recovery after the step ended | {recover_at - step_end:+.2f} s | | |")
    print(
        f"| overflow stop after the predicted recovery (coordinator reports off) | {stop_s:.2f} s "
        f"| hold {args.hold_s:g} s ({stop_s / args.hold_s:.2f}x) | <= {GOAL_STOP_S:g} s |"
    )
    print(f"| notes served by burst-1 before the predicted breach | {len(outside)} | | 0 |")
    ok = start_s <= GOAL_START_S and stop_s <= GOAL_STOP_S and not outside
    print("goals met" if ok else "GOAL MISSED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
