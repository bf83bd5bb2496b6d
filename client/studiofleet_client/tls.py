"""A caller's TLS credentials and channels, with the standard library's checks only.

`ClientTLS(DIR, NAME)` reads DIR/ca.pem (the fleet CA) and DIR/NAME.pem + DIR/NAME.key
(the caller's certificate, e.g. an app's from `fleetctl certs issue --role app`), and
rebuilds its gRPC credentials when the files change, so a long-lived client picks up a
re-issued certificate on its next channel. Here the files are checked for presence, for
parsing and for the key matching the certificate; the daemons' and fleetctl's subclass
(cluster.security.tls) also checks issuer, expiry and role before the first handshake.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import grpc.aio

log = logging.getLogger(__name__)

ENV_DIR, ENV_NAME = "STUDIOFLEET_TLS_DIR", "STUDIOFLEET_TLS_NAME"

__all__ = [
    "ENV_DIR",
    "ENV_NAME",
    "ClientTLS",
    "TLSConfigError",
    "TLSFiles",
    "is_loopback",
    "open_channel",
    "tls_refusal",
]


class TLSConfigError(ValueError):
    """Credentials that cannot be used; the message names the file and the fix."""


@dataclass(frozen=True)
class TLSFiles:
    directory: Path
    name: str

    @property
    def ca(self) -> Path:
        return self.directory / "ca.pem"

    @property
    def crl(self) -> Path:
        return self.directory / "crl.pem"

    @property
    def cert(self) -> Path:
        return self.directory / f"{self.name}.pem"

    @property
    def key(self) -> Path:
        return self.directory / f"{self.name}.key"

    def stamp(self) -> tuple:
        """Changes whenever any of the files is replaced."""
        out = []
        for p in (self.ca, self.cert, self.key):
            try:
                st = os.stat(p)
                out.append((st.st_mtime_ns, st.st_ino, st.st_size))
            except FileNotFoundError:
                out.append(None)
        return tuple(out)

    def read(self, role_hint: str = "ROLE") -> tuple[bytes, bytes, bytes]:
        """(ca, key, cert) PEM bytes; a missing file raises TLSConfigError with the fix."""
        try:
            return self.ca.read_bytes(), self.key.read_bytes(), self.cert.read_bytes()
        except FileNotFoundError as exc:
            raise TLSConfigError(
                f"TLS file {exc.filename} is missing; issue it with `fleetctl certs issue "
                f"--role {role_hint} --name {self.name}` and copy ca.pem, crl.pem, "
                f"{self.name}.pem and {self.name}.key into {self.directory}"
            ) from None

    def load(self, role: Any = None) -> tuple[bytes, bytes, bytes, Any]:
        """(ca, key, cert, identity): present, parseable, and the key belongs to the
        certificate. The identity is the certificate's file name here (no X.509 parser)."""
        ca, key, cert = self.read(getattr(role, "value", None) or "app")
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        try:
            ctx.load_verify_locations(cadata=ca.decode("ascii", "replace"))
        except (ssl.SSLError, ValueError) as exc:
            raise TLSConfigError(
                f"{self.ca} does not parse as a PEM certificate ({exc}); copy the fleet's ca.pem "
                "again"
            ) from None
        try:
            ctx.load_cert_chain(self.cert, self.key)
        except ssl.SSLError as exc:
            if "KEY_VALUES_MISMATCH" in str(exc):
                raise TLSConfigError(
                    f"{self.key} does not belong to {self.cert}; re-issue the pair"
                ) from None
            raise TLSConfigError(
                f"TLS files for {self.name} in {self.directory} do not parse ({exc})"
            ) from None
        return ca, key, cert, self.name


class ClientTLS:
    """A caller's credentials (its own certificate + the fleet CA); `credentials()` is
    rebuilt when the files change, so long-lived callers can open fresh channels."""

    files_type: type[TLSFiles] = TLSFiles

    def __init__(self, directory: Path | str, name: str, role: Any = None):
        self.files = self.files_type(Path(directory), name)
        self._stamp = (
            self.files.stamp()
        )  # before reading: a change during the read is seen next time
        ca, key, cert, self.identity = self.files.load(role)
        self._creds = grpc.ssl_channel_credentials(ca, key, cert)
        self._role = role

    @classmethod
    def from_env(cls) -> ClientTLS | None:
        """STUDIOFLEET_TLS_DIR + STUDIOFLEET_TLS_NAME, if set."""
        directory, name = os.environ.get(ENV_DIR), os.environ.get(ENV_NAME)
        if not directory:
            return None
        if not name:
            raise TLSConfigError(
                f"{ENV_DIR} is set but {ENV_NAME} is not; set it to the certificate name to use"
            )
        return cls(directory, name)

    def changed(self) -> bool:
        return self.files.stamp() != self._stamp

    def credentials(self) -> grpc.ChannelCredentials:
        if self.changed():
            self._stamp = self.files.stamp()
            try:
                ca, key, cert, ident = self.files.load(self._role)
                self._creds, self.identity = grpc.ssl_channel_credentials(ca, key, cert), ident
            except (TLSConfigError, OSError, TypeError) as exc:  # keep the pair that works
                log.error(
                    "certificate reload for %s skipped: %s: %s",
                    self.identity,
                    type(exc).__name__,
                    exc,
                )
        return self._creds


def tls_refusal(details: str) -> str | None:
    """Why a TLS handshake failed, in words, from a gRPC error's details; None if it was not TLS."""
    text = details or ""
    if "Hostname Verification" in text or "No match found for server name" in text:
        return (
            "its certificate does not name the server expected (a node id it claims, or the host)"
        )
    if "CERTIFICATE_VERIFY_FAILED" in text or "certificate verify failed" in text.lower():
        return "its certificate was not issued by this fleet's CA, or has expired"
    if "Ssl handshake failed" in text or "SSL_ERROR" in text or "TSI_" in text:
        return "the TLS handshake failed (is it serving TLS from this fleet's CA?)"
    return None


def is_loopback(host_port: str) -> bool:
    host = host_port.rpartition(":")[0].strip("[]") if ":" in host_port else host_port
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def open_channel(
    address: str,
    tls: ClientTLS | None,
    *,
    server_name: str | None = None,
    options: Sequence[tuple] = (),
    aio: bool = False,
    credentials: grpc.ChannelCredentials | None = None,
):
    """A channel to `address`: mTLS with `tls`, plaintext (loopback only) with None.
    `server_name` is the certificate name to expect instead of the address's host;
    `credentials`, if given, are tls.credentials() already read (off an event loop)."""
    opts = list(options)
    if tls is None:
        if not is_loopback(address):
            raise TLSConfigError(
                f"refusing a plaintext connection to {address}: plaintext is for loopback "
                "development only; give TLS credentials (--tls-dir/--tls-name)"
            )
        return (grpc.aio.insecure_channel if aio else grpc.insecure_channel)(address, options=opts)
    if server_name:
        opts.append(("grpc.ssl_target_name_override", server_name))
    creds = credentials if credentials is not None else tls.credentials()
    return (grpc.aio.secure_channel if aio else grpc.secure_channel)(address, creds, options=opts)
