"""Node group test helpers (docs/node-groups.md): a model two ranks can shard, free ports,
two real `fleet-node` ranks started together, and waiting for a group to fail."""

from __future__ import annotations

import time
from contextlib import ExitStack
from pathlib import Path

import grpc

from cluster.api import common_pb2
from cluster.localfleet import free_ports
from tests.procs import NodeProcess

TIMEOUT_S = 5.0  # --group-timeout-s in these tests: the documented detection deadline
FAILED = common_pb2.Lifecycle.Value("LIFECYCLE_FAILED")
READY = common_pb2.Lifecycle.Value("LIFECYCLE_READY")


def start_group(
    stack: ExitStack, model: Path, logs: Path, mode: str, *extra: str, wait: bool = True, models=()
):
    """Two ranks, started together; returns them once rank 0 serves and rank 1 is READY."""
    group = ",".join(f"127.0.0.1:{p}" for p in free_ports(2))
    ranks = []
    for rank in range(2):
        proc = NodeProcess(
            models[rank] if models else model,
            "--group",
            group,
            "--rank",
            str(rank),
            "--group-mode",
            mode,
            "--group-timeout-s",
            str(TIMEOUT_S),
            *extra,
            node_id=f"group-{mode}-{rank}",
        )
        stack.enter_context(proc)
        proc.start(logs)
        ranks.append(proc)
    if not wait:
        return ranks
    ranks[0].wait_serving(timeout_s=90)
    ranks[1].wait_until(lambda s: s.lifecycle == READY, timeout_s=30, what="rank 1 READY")
    return ranks


def make_group_model(directory: Path) -> Path:
    """The tiny model with two KV heads, so tensor mode splits them over two ranks."""
    from cluster.tinymodel import TinyModelSpec, make_tiny_model

    return make_tiny_model(directory, TinyModelSpec(num_key_value_heads=2))


def wait_failed(rank0: NodeProcess, timeout_s: float) -> tuple[str, float]:
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        try:
            st = rank0.status()
        except grpc.RpcError:
            break  # exited already: the reason is in its log
        if st.lifecycle == FAILED:
            return st.lifecycle_reason, time.monotonic() - start
        time.sleep(0.02)
    raise AssertionError(f"rank 0 not FAILED within {timeout_s}s: {rank0.stderr()[-2000:]}")
