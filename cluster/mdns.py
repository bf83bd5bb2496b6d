"""The StudioFleet mDNS record: service type and TXT schema, shared by advertiser and browser.

mDNS only says where a node claims to be (DESIGN invariant 7): a coordinator connects and
reads the node's status before routing to it. TXT stays under 200 bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import psutil
from zeroconf import InterfaceChoice, IPVersion

from cluster.api import API_VERSION

SERVICE_TYPE = "_studiofleet._tcp.local."
DEFAULT_FLEET = "default"
_MAX_FIELD = 48


@dataclass(frozen=True)
class Advert:
    """What a node announces about itself (a claim, verified over gRPC before use)."""

    node_id: str
    engine: str = ""
    model_id: str = ""
    digest: str = ""  # short weights digest, e.g. "sha256:1a2b3c4d5e6f"
    state: str = ""  # lifecycle name, e.g. "ready"
    fleet: str = DEFAULT_FLEET
    api: str = API_VERSION
    # A node group (docs/node-groups.md), announced by rank 0 only: ranks, mode, backend.
    group_size: int = 0
    group_mode: str = ""
    group_backend: str = ""

    def txt(self) -> dict[str, str]:
        txt = {
            "id": self.node_id,
            "engine": self.engine,
            "model": self.model_id[:_MAX_FIELD],
            "digest": self.digest[:19],
            "state": self.state,
            "fleet": self.fleet,
            "api": self.api,
        }
        if self.group_size:
            txt.update(
                group=str(self.group_size),
                group_mode=self.group_mode,
                group_backend=self.group_backend,
            )
        return txt

    @classmethod
    def from_txt(cls, props: dict) -> Optional["Advert"]:
        """Parse zeroconf's bytes-keyed properties; None when it is not a StudioFleet node."""
        text = {
            (k.decode() if isinstance(k, bytes) else k): (
                v.decode(errors="replace") if isinstance(v, bytes) else (v or "")
            )
            for k, v in props.items()
        }
        if not text.get("id"):
            return None
        return cls(
            node_id=text["id"],
            engine=text.get("engine", ""),
            model_id=text.get("model", ""),
            digest=text.get("digest", ""),
            state=text.get("state", ""),
            fleet=text.get("fleet", DEFAULT_FLEET),
            api=text.get("api", ""),
            group_size=int(text["group"]) if text.get("group", "").isdigit() else 0,
            group_mode=text.get("group_mode", ""),
            group_backend=text.get("group_backend", ""),
        )


def instance_name(node_id: str) -> str:
    """The node id, never the machine's hostname (mDNSResponder owns that on macOS)."""
    return f"{node_id}.{SERVICE_TYPE}"


def interfaces_for(host: str) -> tuple[Union[InterfaceChoice, Sequence[str]], list[str]]:
    """(zeroconf interfaces, addresses to announce) for a listen or browse host."""
    if host in ("0.0.0.0", "", "::", "*"):
        addrs = [
            a.address
            for nic in psutil.net_if_addrs().values()
            for a in nic
            if a.family.name == "AF_INET" and not a.address.startswith("127.")
        ]
        return InterfaceChoice.All, addrs or ["127.0.0.1"]
    return [host], [host]


IP_VERSION = IPVersion.V4Only
