"""Announce this node over mDNS and keep its TXT summary current; goodbye on shutdown."""

from __future__ import annotations

import asyncio
import logging
from typing import Optional

from zeroconf import ServiceInfo
from zeroconf.asyncio import AsyncZeroconf

from cluster.mdns import IP_VERSION, SERVICE_TYPE, Advert, instance_name, interfaces_for

log = logging.getLogger(__name__)

GOODBYE_TIMEOUT_S = 2.0


class Advertiser:
    """One registration; `update` replaces the TXT (latest wins), `close` says goodbye."""

    def __init__(self, *, host: str, port: int):
        self._host = host
        self._port = port
        self._zc: Optional[AsyncZeroconf] = None
        self._info: Optional[ServiceInfo] = None
        self._lock = asyncio.Lock()

    def _service(self, advert: Advert, name: str) -> ServiceInfo:
        _, addresses = interfaces_for(self._host)
        return ServiceInfo(
            SERVICE_TYPE,
            name,
            port=self._port,
            properties=advert.txt(),
            server=f"{advert.node_id}.local.",
            parsed_addresses=addresses,
        )

    async def start(self, advert: Advert) -> None:
        """Register (renaming on a name conflict); returns once the announcement went out."""
        interfaces, _ = interfaces_for(self._host)
        async with self._lock:
            self._zc = AsyncZeroconf(interfaces=interfaces, ip_version=IP_VERSION)
            info = self._service(advert, instance_name(advert.node_id))
            await _settled(self._zc.async_register_service(info, allow_name_change=True))
            self._info = info
        log.info(
            "node=%s announced over mDNS as %r on %s:%d",
            advert.node_id,
            info.name,
            self._host,
            self._port,
        )

    async def update(self, advert: Advert) -> None:
        async with self._lock:
            if self._zc is None or self._info is None:
                return
            info = self._service(advert, self._info.name)
            await _settled(self._zc.async_update_service(info))
            self._info = info

    async def close(self) -> None:
        """Send the goodbye (bounded in time) and close; safe to call twice."""
        async with self._lock:
            zc, info, self._zc, self._info = self._zc, self._info, None, None
            if zc is None:
                return
            try:
                if info is not None:
                    await asyncio.wait_for(
                        _settled(zc.async_unregister_service(info)), GOODBYE_TIMEOUT_S
                    )
            except Exception as exc:  # noqa: BLE001 - a lost goodbye must never block the drain
                log.warning(
                    "mDNS goodbye for %s not sent: %s: %s",
                    info.name if info else "?",
                    type(exc).__name__,
                    exc,
                )
            finally:
                try:
                    await asyncio.wait_for(zc.async_close(), GOODBYE_TIMEOUT_S)
                except Exception as exc:  # noqa: BLE001
                    log.warning("mDNS close failed: %s: %s", type(exc).__name__, exc)


async def _settled(call) -> None:
    """zeroconf's async_* calls return a task once queued; await the task as well."""
    await (await call)
