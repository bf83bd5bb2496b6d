"""Node groups: one model sharded over several agents with mlx.distributed.

Each rank is its own `fleet-node` process (under launchd/systemd as any node) given the same
`--group` list; the group forms here, without `mlx.launch` (SIGTERM to it leaves the ranks
behind). A group that fails is not mended in place: every rank exits with
GROUP_FAILED_EXIT_CODE, its service manager restarts it, and the ranks form the group again
once all are back (docs/node-groups.md).
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import sys
import tempfile
from dataclasses import dataclass
from typing import Optional

from cluster import digest
from cluster.config import split_host_port

GROUP_FAILED_EXIT_CODE = 70  # EX_SOFTWARE: the service manager restarts the agent


@dataclass(frozen=True)
class GroupSpec:
    addresses: tuple[str, ...]  # every rank's collective address, in rank order
    rank: int
    backend: str  # ring, jaccl, mpi
    mode: str  # tensor, pipeline
    timeout_s: float

    @property
    def size(self) -> int:
        return len(self.addresses)

    @classmethod
    def from_settings(cls, settings) -> Optional["GroupSpec"]:
        if not settings.group:
            return None
        return cls(
            tuple(settings.group),
            settings.rank,
            settings.group_backend,
            settings.group_mode,
            settings.group_timeout_s,
        )

    def describe(self, rank: int) -> str:
        return f"rank {rank} ({self.addresses[rank]})"


def backend_problem(backend: str) -> Optional[str]:
    """A backend this MLX build cannot run, as one line naming the fix; None if fine."""
    import mlx.core as mx

    if mx.distributed.is_available(backend):
        return None
    return (
        f"--group-backend {backend} is not available in this MLX build ({sys.platform}); "
        "use --group-backend ring (TCP, works everywhere), or for jaccl run macOS 26.2+ with "
        "Thunderbolt 5 RDMA enabled (docs/node-groups.md)"
    )


def _ring_hostfile(addresses: tuple[str, ...]) -> list[list[str]]:
    """The ring backend wants IP addresses: resolve names once, at formation."""
    out = []
    for address in addresses:
        host, port = split_host_port(address)
        ip = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][4][0]
        out.append([f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"])
    return out


def form(spec: GroupSpec):
    """Join the group (blocks until every rank has joined); the mlx.distributed Group."""
    import mlx.core as mx

    os.environ["MLX_RANK"] = str(spec.rank)
    hostfile = None
    if spec.backend == "ring":
        fd, hostfile = tempfile.mkstemp(prefix="studiofleet-group-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump(_ring_hostfile(spec.addresses), f)
        os.environ["MLX_HOSTFILE"] = hostfile
    try:
        group = mx.distributed.init(strict=True, backend=spec.backend)
    finally:
        if hostfile is not None:
            os.unlink(hostfile)  # read by init; nothing else needs it
    if group.size() != spec.size or group.rank() != spec.rank:
        raise RuntimeError(
            f"the {spec.backend} backend formed rank {group.rank()} of {group.size()}, "
            f"not rank {spec.rank} of {spec.size} as --group/--rank say"
        )
    return group


def layout_digest(model_digest: str, spec: GroupSpec) -> str:
    """The group's weights digest: the model's plus how it is sharded, since a sharded model's
    tokens may differ from one process's (a stream resumes only where tokens are the same)."""
    return digest.layout_digest(model_digest, spec.mode, spec.size)


def die_with_parent() -> None:
    """Linux: end this rank with SIGKILL if the process that started it dies, so no rank
    outlives its supervisor (launchd has no such signal; there KeepAlive owns the agent)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
