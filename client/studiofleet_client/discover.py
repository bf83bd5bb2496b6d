"""Find coordinators over mDNS (docs/ha.md "Finding coordinators").

    from studiofleet_client.discover import discover_coordinators
    targets = discover_coordinators(fleet="clinic", static=["10.0.0.1:7800"])
    client = FleetClient(targets, tls=ClientTLS("/etc/studiofleet", "notes-app"))

Coordinators announce `_sf-coordinator._tcp` with TXT `id`, `fleet`, `openai` (the port of
its OpenAI front door), `tls`. An announcement is only a claim: the client's TLS still
checks that the coordinator holds a certificate of the fleet's CA. Browsing needs the
optional `zeroconf` package (`pip install 'studiofleet-client[discovery]'`); a static list
alone needs nothing.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

from studiofleet_client.errors import FleetError, UnavailableError

SERVICE_TYPE = "_sf-coordinator._tcp.local."  # coordinator/announce.py announces this
DEFAULT_TIMEOUT_S = 3.0


class DiscoveryUnavailableError(FleetError):
    """Browsing for coordinators needs the optional zeroconf package."""

    code = "FAILED_PRECONDITION"
    next_step = "pip install 'studiofleet-client[discovery]', or give the coordinators' addresses"


@dataclass(frozen=True)
class Coordinator:
    """One announced coordinator: `address` is what FleetClient takes (HOST:PORT of gRPC)."""

    coordinator_id: str
    address: str
    openai_address: str  # HOST:PORT of its OpenAI front door, "" when it runs none
    fleet: str
    tls: bool


def browse_coordinators(
    fleet: str = "default",
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    interface: Optional[str] = None,
    want: Optional[int] = None,
) -> list[Coordinator]:
    """Coordinators of `fleet` announced within `timeout_s` (sooner once `want` are found),
    sorted by id. `interface`: an IPv4 address to browse on (default: all)."""
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be positive, got {timeout_s!r}")
    try:
        from zeroconf import (
            InterfaceChoice,
            IPVersion,
            ServiceBrowser,
            ServiceStateChange,
            Zeroconf,
        )
    except ImportError:
        raise DiscoveryUnavailableError(
            "finding coordinators over mDNS needs zeroconf: pip install 'studiofleet-client[discovery]' "
            "(or give the coordinators' addresses)"
        ) from None
    import threading

    found: dict[str, Coordinator] = {}
    names: set[str] = set()
    changed = threading.Event()

    def on_change(zeroconf, service_type, name, state_change):
        if state_change is not ServiceStateChange.Removed:
            names.add(name)
            changed.set()

    zc = Zeroconf(
        interfaces=[interface] if interface else InterfaceChoice.All, ip_version=IPVersion.V4Only
    )
    try:
        browser = ServiceBrowser(zc, SERVICE_TYPE, handlers=[on_change])
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and (want is None or len(found) < want):
            changed.wait(max(0.0, deadline - time.monotonic()))
            changed.clear()
            for name in sorted(names - set(found)):
                left_ms = int(max(0.0, deadline - time.monotonic()) * 1000)
                coordinator = _resolve(zc, name, fleet, left_ms)
                if coordinator is not None:
                    found[name] = coordinator
        browser.cancel()
    finally:
        zc.close()
    return sorted(found.values(), key=lambda c: (c.coordinator_id, c.address))


def discover_coordinators(
    fleet: str = "default",
    *,
    static: Iterable[str] = (),
    timeout_s: float = DEFAULT_TIMEOUT_S,
    interface: Optional[str] = None,
    want: Optional[int] = None,
) -> list[str]:
    """The addresses FleetClient / AsyncFleetClient take: `static` first, in order, then
    those discovered for `fleet` (without repeats). UnavailableError when there is none at all;
    DiscoveryUnavailableError when browsing is needed and zeroconf is not installed."""
    targets = list(dict.fromkeys(static))
    targets += [
        c.address
        for c in browse_coordinators(fleet, timeout_s=timeout_s, interface=interface, want=want)
        if c.address not in targets
    ]
    if not targets:
        raise UnavailableError(
            f"no coordinator of fleet {fleet!r} announced itself within {timeout_s:g} s and none was "
            "given; check the fleet name and that multicast reaches this host, or pass addresses"
        )
    return targets


def _resolve(zc, name: str, fleet: str, timeout_ms: int) -> Optional[Coordinator]:
    from zeroconf import IPVersion, ServiceInfo

    info = ServiceInfo(SERVICE_TYPE, name)
    if not info.request(zc, max(timeout_ms, 1)) or not info.port:
        return None
    txt = {_text(k): _text(v) for k, v in (info.properties or {}).items()}
    addresses = _routable_first(info.parsed_addresses(IPVersion.V4Only))
    if txt.get("fleet", "default") != fleet or not txt.get("id") or not addresses:
        return None
    host = addresses[0]
    openai = txt.get("openai", "")
    return Coordinator(
        coordinator_id=txt["id"],
        address=f"{host}:{info.port}",
        openai_address=f"{host}:{openai}" if openai.isdigit() and openai != "0" else "",
        fleet=txt.get("fleet", "default"),
        tls=txt.get("tls", "1") != "0",
    )


def _routable_first(addresses: Sequence[str]) -> list[str]:
    return sorted(addresses, key=lambda a: a.startswith("169.254."))


def _text(value) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else (value or "")
