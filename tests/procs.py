"""Test helpers over cluster.localfleet's real node processes."""

from __future__ import annotations

import time
from pathlib import Path

from cluster.localfleet import CoordinatorProcess
from cluster.localfleet import NodeProcess as _NodeProcess

__all__ = ["CoordinatorProcess", "NodeProcess"]

ROOT = Path(__file__).resolve().parents[1]


class NodeProcess(_NodeProcess):
    def wait_until(self, predicate, timeout_s: float = 5.0, what: str = "condition"):
        """Re-read status until predicate(status) holds; returns (status, seconds waited)."""
        start = time.monotonic()
        while True:
            st = self.status()
            if predicate(st):
                return st, time.monotonic() - start
            if time.monotonic() - start > timeout_s:
                raise AssertionError(
                    f"{self.node_id}: {what} not reached in {timeout_s}s; last status {st}"
                )
            time.sleep(0.005)
