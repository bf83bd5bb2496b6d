"""A daemon's security setup from its settings: server credentials, its own client
credentials (for the calls it makes), and the authorizer. mTLS unless `plaintext`."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, Sequence

import grpc

from cluster.security.authz import Authorizer, OnDenied
from cluster.security.identity import Identity, Role
from cluster.security.tls import (
    ENV_DIR,
    ClientTLS,
    ServerTLS,
    TLSConfigError,
    TLSFiles,
    is_loopback,
)

log = logging.getLogger(__name__)

EXPIRY_WARNING_DAYS = 14
PLAINTEXT_BANNER = (
    "\n" + "!" * 78 + "\n"
    "!! PLAINTEXT MODE: no TLS, no client certificates, no roles. Anyone who can reach\n"
    "!! {listen} can call everything. Loopback development only: never send PHI.\n" + "!" * 78
)


def plaintext_exposure(settings, ports: Sequence[tuple[str, str, int]]) -> Optional[str]:
    """In plaintext mode every port a daemon serves must be a loopback one: (flag, its
    value, port offset from --listen) for each HTTP port. One line naming the fix; None if fine."""
    from cluster.config import http_address

    if not settings.plaintext:
        return None
    for flag, value, offset in ports:
        address = http_address(settings.listen, value, offset)
        if address is not None and not is_loopback(address):
            return (
                f"--plaintext serves {flag} on loopback only (no TLS, no certificates): give a 127.0.0.1 "
                f"address, or {flag} off, or use mTLS (--tls-dir)"
            )
    return None


@dataclass
class DaemonSecurity:
    plaintext: bool
    server: Optional[ServerTLS] = None
    client: Optional[ClientTLS] = None

    @property
    def identity(self) -> Optional[Identity]:
        return self.server.identity if self.server else None

    @classmethod
    def from_settings(cls, settings, role: Role, default_name: str) -> "DaemonSecurity":
        """Raises TLSConfigError naming the setting or file at fault."""
        directory = settings.tls_dir or os.environ.get(ENV_DIR)
        if settings.plaintext:
            if settings.tls_dir:
                raise TLSConfigError("--plaintext and --tls-dir exclude each other; pick one")
            if not is_loopback(settings.listen):
                raise TLSConfigError(
                    f"--plaintext is for loopback development only, and {settings.listen} is "
                    "not a loopback address; give --tls-dir/--tls-name instead"
                )
            return cls(plaintext=True)
        if not directory:
            raise TLSConfigError(
                "mTLS is on by default and no certificates were given: pass --tls-dir DIR "
                f"(ca.pem, crl.pem, NAME.pem, NAME.key; see `fleetctl certs`) or set {ENV_DIR}; "
                "--plaintext runs without TLS on loopback, for development only"
            )
        files = TLSFiles(Path(directory), settings.tls_name or default_name)
        server = ServerTLS(files, role)
        return cls(
            plaintext=False, server=server, client=ClientTLS(files.directory, files.name, role)
        )

    def bind(self, server: grpc.aio.Server, listen: str) -> int:
        try:
            if self.plaintext:
                port = server.add_insecure_port(listen)
            else:
                port = server.add_secure_port(listen, self.server.credentials())
        except RuntimeError:  # gRPC's "Failed to bind": in use, or not an address of this host
            raise OSError(
                f"cannot listen on {listen}: the port is in use or the address is not this host's "
                "(each daemon's monitoring port is its gRPC port + 1 unless --http-listen says "
                "otherwise)"
            ) from None
        if self.plaintext:
            log.warning(PLAINTEXT_BANNER.format(listen=listen))
            return port
        ident = self.server.identity
        log.info(
            "mTLS on %s as %s (certificate serial %x, expires %s); clients need a certificate "
            "from the same CA",
            listen,
            ident,
            ident.serial,
            f"{ident.not_after:%Y-%m-%d}",
        )
        days = (ident.not_after.timestamp() - time.time()) / 86400
        if days < EXPIRY_WARNING_DAYS:
            log.warning(
                "certificate of %s expires in %.0f days; re-issue it with `fleetctl certs issue --role %s "
                "--name %s` (picked up without a restart)",
                ident,
                days,
                ident.role.value,
                ident.name,
            )
        return port

    def authorizer(
        self, table: Mapping[str, frozenset], *, where: str, on_denied: Optional[OnDenied] = None
    ) -> Authorizer:
        return Authorizer(
            table,
            revocations=None if self.plaintext else self.server.revocations,
            plaintext=self.plaintext,
            on_denied=on_denied,
            where=where,
        )
