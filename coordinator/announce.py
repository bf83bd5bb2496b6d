"""Announce this coordinator over mDNS for clients (docs/ha.md "Finding coordinators").

Its own service type, so node browsers never see it: the instance is the coordinator id,
TXT says the fleet, the OpenAI port, whether it speaks TLS and the API version; the
service port is the gRPC one. Like a node's announcement it is a claim: a client still
verifies the coordinator's certificate. Registration runs in the background (its probing
takes about a second), so it never delays the start; close() sends the goodbye.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Optional

from zeroconf import ServiceInfo
from zeroconf.asyncio import AsyncZeroconf

from cluster.api import API_VERSION
from cluster.config import CoordinatorSettings
from cluster.mdns import IP_VERSION, interfaces_for

log = logging.getLogger(__name__)

# studiofleet_client/discover.py browses this (the client imports nothing of ours; a test keeps both equal).
COORDINATOR_SERVICE_TYPE = "_sf-coordinator._tcp.local."
GOODBYE_TIMEOUT_S = 2.0


class Announcer:
    """One registration, started in the background; `close` says goodbye (safe twice)."""

    def __init__(self, info: ServiceInfo, interfaces, coordinator_id: str):
        self._info, self._interfaces, self._id = info, interfaces, coordinator_id
        self._zc: Optional[AsyncZeroconf] = None
        self._registered = False
        self._task = asyncio.get_running_loop().create_task(self._register())

    async def _register(self) -> None:
        try:
            self._zc = AsyncZeroconf(interfaces=self._interfaces, ip_version=IP_VERSION)
            await (await self._zc.async_register_service(self._info, allow_name_change=True))
            self._registered = True
            log.info("coordinator=%s announced over mDNS as %r", self._id, self._info.name)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - clients with a static list still find it
            log.warning(
                "coordinator=%s not announced over mDNS (%s: %s); clients need its address",
                self._id,
                type(exc).__name__,
                exc,
            )

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        zc, self._zc = self._zc, None
        if zc is None:
            return
        try:
            if self._registered:
                await asyncio.wait_for(
                    await zc.async_unregister_service(self._info), GOODBYE_TIMEOUT_S
                )
        except Exception as exc:  # noqa: BLE001 - a lost goodbye must never block the drain
            log.warning("coordinator=%s mDNS goodbye not sent: %s", self._id, type(exc).__name__)
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(zc.async_close(), GOODBYE_TIMEOUT_S)


def announce(settings: CoordinatorSettings, grpc_port: int, openai_port: int) -> Announcer:
    """Start announcing (the listen host's addresses, or --mdns-interface's when it listens on all)."""
    host = settings.listen.rpartition(":")[0].strip("[]")
    if host in ("0.0.0.0", "", "::", "*"):
        host = settings.mdns_interface
    interfaces, addresses = interfaces_for(host)
    txt = {
        "id": settings.coordinator_id[:48],
        "fleet": settings.fleet,
        "openai": str(openai_port or ""),
        "tls": "0" if settings.plaintext else "1",
        "api": API_VERSION,
    }
    info = ServiceInfo(
        COORDINATOR_SERVICE_TYPE,
        f"{settings.coordinator_id}.{COORDINATOR_SERVICE_TYPE}",
        port=grpc_port,
        properties=txt,
        server=f"{settings.coordinator_id}.local.",
        parsed_addresses=addresses,
    )
    return Announcer(info, interfaces, settings.coordinator_id)
