"""Find node agents over mDNS: every announcement becomes a candidate address to verify.

Only this fleet's announcements are taken (TXT `fleet`). Every announcement is a claim:
a node that moves keeps its instance name, and the fleet accepts the move only once the
new address proves the id and the old one stops answering as that node; another id
claimed for a known address is verified on a separate connection. A goodbye (for the
entry's own instance name) makes the fleet probe the node and forget it if it stopped
answering.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Optional

from zeroconf import ServiceStateChange
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from cluster.mdns import IP_VERSION, SERVICE_TYPE, Advert, interfaces_for
from cluster.security.identity import NAME_RE
from coordinator.fleet import Fleet

log = logging.getLogger(__name__)

RESOLVE_TIMEOUT_MS = 3000


class MdnsDiscovery:
    def __init__(self, *, fleet: Fleet, fleet_name: str, interface: str):
        self._fleet = fleet
        self._fleet_name = fleet_name
        self._interface = interface
        self._zc: Optional[AsyncZeroconf] = None
        self._browser: Optional[AsyncServiceBrowser] = None
        self._where: dict[str, str] = {}  # instance name -> address in use
        self._seen: dict[
            str, set[str]
        ] = {}  # instance name -> every address it announced (a goodbye probes each)
        self._removals: dict[
            str, int
        ] = {}  # instance name -> goodbyes seen (a resolve in flight checks it)
        self._tasks: set[asyncio.Task] = set()

    async def start(self) -> None:
        interfaces, _ = interfaces_for(self._interface)
        self._zc = AsyncZeroconf(interfaces=interfaces, ip_version=IP_VERSION)
        self._browser = AsyncServiceBrowser(
            self._zc.zeroconf, SERVICE_TYPE, handlers=[self._on_change]
        )
        log.info(
            "browsing mDNS for %s (fleet %s) on %s", SERVICE_TYPE, self._fleet_name, self._interface
        )

    def _on_change(
        self, zeroconf, service_type: str, name: str, state_change: ServiceStateChange
    ) -> None:
        if state_change is ServiceStateChange.Removed:
            self._removals[name] = self._removals.get(name, 0) + 1
            self._where.pop(name, None)
            for address in sorted(self._seen.pop(name, ())):
                self._fleet.goodbye(address, f"mDNS goodbye from {name}", mdns_name=name)
            return
        task = asyncio.get_running_loop().create_task(self._resolve(name))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _resolve(self, name: str) -> None:
        removals = self._removals.get(name, 0)
        info = AsyncServiceInfo(SERVICE_TYPE, name)
        if not await info.async_request(self._zc.zeroconf, RESOLVE_TIMEOUT_MS):
            log.info("mDNS: %s did not resolve in %d ms", name, RESOLVE_TIMEOUT_MS)
            return
        if self._removals.get(name, 0) != removals:
            return  # it said goodbye while we were resolving
        advert = Advert.from_txt(info.properties or {})
        addresses = [a for a in info.parsed_addresses(IP_VERSION) if info.port]
        if advert is None or not addresses:
            return
        if advert.fleet != self._fleet_name:
            log.debug(
                "mDNS: %s belongs to fleet %s, not %s; ignored",
                name,
                advert.fleet,
                self._fleet_name,
            )
            return
        if not NAME_RE.fullmatch(advert.node_id):  # no certificate could ever prove it
            log.info(
                "mDNS: %s announces a node id that is not a valid certificate name; ignored", name
            )
            return
        announced = [f"{a}:{info.port}" for a in addresses]
        old = self._where.get(name)
        # A host announces every interface's address: keep the one in use while it is still
        # announced, so a TXT update never looks like a move; else prefer a routable one.
        address = (
            old if old in announced else min(announced, key=lambda a: a.startswith("169.254."))
        )
        self._where[name] = address
        self._seen.setdefault(name, set()).add(address)
        self._fleet.add(
            address,
            source="mdns",
            mdns_name=name,
            moved_from=old if old != address else "",
            claimed_id=advert.node_id,
        )

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._browser is not None:
            await self._browser.async_cancel()
        if self._zc is not None:
            await self._zc.async_close()
        self._browser = self._zc = None
