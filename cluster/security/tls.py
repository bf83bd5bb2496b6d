"""TLS credentials for daemons and clients, reloaded from disk while serving.

`--tls-dir DIR --tls-name NAME` means DIR/ca.pem (the fleet CA), DIR/crl.pem (its
revocation list), DIR/NAME.pem and DIR/NAME.key. Re-issuing NAME (or replacing the CA
bundle) takes effect on the next TLS handshake: servers use gRPC's dynamic credentials,
clients build new channels when the files change. No restart, no dropped stream.
TLS 1.2 is the floor (gRPC's default; NIST SP 800-52r2), 1.3 is negotiated when both ends can.
The client side (files, channels, handshake wording) is the client library's
studiofleet_client.tls; here its files get the full X.509 checks, and servers their credentials.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from cluster.security.identity import Identity, Role, identity_of
from studiofleet_client import tls as _client_tls
from studiofleet_client.tls import (
    ENV_DIR,
    ENV_NAME,
    TLSConfigError,
    is_loopback,
    open_channel,
    tls_refusal,
)

log = logging.getLogger(__name__)

__all__ = [
    "ENV_DIR",
    "ENV_NAME",
    "RECHECK_S",
    "ClientTLS",
    "Revocations",
    "ServerTLS",
    "TLSConfigError",
    "TLSFiles",
    "is_loopback",
    "open_channel",
    "served_serial",
    "tls_refusal",
]

RECHECK_S = 1.0  # how often the files' mtimes are looked at, at most


@dataclass(frozen=True)
class TLSFiles(_client_tls.TLSFiles):
    """The client library's files, checked fully with an X.509 parser."""

    def load(self, role: Optional[Role] = None) -> tuple[bytes, bytes, bytes, Identity]:
        """(ca, key, cert) PEM bytes and the identity, checked: present, parseable, a pair,
        issued by this CA, in date, and of `role` if given."""
        ca, key, cert = self.read(role.value if role else "ROLE")
        try:
            cert_obj = x509.load_pem_x509_certificate(cert)
            ca_obj = x509.load_pem_x509_certificate(ca)
            key_obj = serialization.load_pem_private_key(key, None)
        except ValueError as exc:
            raise TLSConfigError(
                f"TLS files for {self.name} in {self.directory} do not parse ({exc})"
            ) from None
        if key_obj.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        ) != cert_obj.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        ):
            raise TLSConfigError(f"{self.key} does not belong to {self.cert}; re-issue the pair")
        try:
            cert_obj.verify_directly_issued_by(ca_obj)
        except Exception as exc:  # noqa: BLE001 - InvalidSignature, ValueError, TypeError: all "not this CA's"
            raise TLSConfigError(
                f"{self.cert} was not issued by the CA in {self.ca} ({type(exc).__name__}); "
                "issue it from this fleet's CA"
            ) from None
        try:
            ident = identity_of(cert_obj)
        except ValueError as exc:
            raise TLSConfigError(str(exc)) from None
        now = time.time()
        if cert_obj.not_valid_after_utc.timestamp() < now:
            raise TLSConfigError(
                f"{self.cert} ({ident}) expired at {cert_obj.not_valid_after_utc:%Y-%m-%d %H:%M} UTC; "
                f"re-issue it with `fleetctl certs issue --role {ident.role.value} --name {ident.name}`"
            )
        if role is not None and ident.role is not role:
            raise TLSConfigError(
                f"{self.cert} is a {ident.role.value} certificate ({ident}); this needs a "
                f"{role.value} certificate: `fleetctl certs issue --role {role.value} --name NAME`"
            )
        return ca, key, cert, ident


class Revocations:
    """The CA's revocation list (crl.pem), re-read when it changes; a missing file = none."""

    def __init__(self, path: Path, ca: Optional[Path] = None):
        self.path = path
        self._ca = ca  # the list must be signed by this CA
        self._serials: frozenset[int] = frozenset()
        self._stamp = None
        self._order = _OLDEST  # (CRL number, issued): an older list never replaces a newer one
        self.generation = 0  # +1 each time a new list is loaded
        self._checked = 0.0
        self._lock = threading.Lock()
        self.refresh(force=True)

    def refresh(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._checked < RECHECK_S:
            return
        with self._lock:
            self._checked = now
            try:
                st = os.stat(self.path)
                stamp = (st.st_mtime_ns, st.st_ino, st.st_size)
                if stamp == self._stamp:
                    return
                crl = x509.load_pem_x509_crl(self.path.read_bytes())
                if self._ca is not None and not crl.is_signature_valid(
                    x509.load_pem_x509_certificate(self._ca.read_bytes()).public_key()
                ):
                    raise ValueError("not signed by the fleet CA")
                if (order := _crl_order(crl)) < self._order:
                    raise ValueError(
                        f"it is older than the list already loaded (CRL number {order[0]}, issued "
                        f"{order[1]:%Y-%m-%d %H:%M:%S} UTC, against number {self._order[0]}, "
                        f"issued {self._order[1]:%Y-%m-%d %H:%M:%S} UTC); copy the CA's newest crl.pem"
                    )
            except FileNotFoundError:
                if (
                    self._stamp is not None
                ):  # it was there: a missing file must not un-revoke anything
                    log.error(
                        "revocation list %s disappeared; keeping the %d revocations loaded before",
                        self.path,
                        len(self._serials),
                    )
                return
            except (
                OSError,
                ValueError,
            ) as exc:  # keep the last good list: a bad file is not "none revoked"
                log.error(
                    "revocation list %s cannot be used (%s: %s); keeping the previous one",
                    self.path,
                    type(exc).__name__,
                    exc,
                )
                return
            self._serials, self._stamp, self._order = (
                frozenset(r.serial_number for r in crl),
                stamp,
                order,
            )
            self.generation += 1
            log.info(
                "revocation list %s loaded: %d revoked certificates", self.path, len(self._serials)
            )

    def revoked(self, serial: int) -> bool:
        self.refresh()
        return serial in self._serials


_OLDEST = (-1, dt.datetime.min.replace(tzinfo=dt.UTC))


def _crl_order(crl: x509.CertificateRevocationList) -> tuple[int, dt.datetime]:
    """How new a list is: its CRL number (0 when it has none), then when it was issued."""
    try:
        number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    except x509.ExtensionNotFound:
        number = 0
    return number, crl.last_update_utc


class ServerTLS:
    """A daemon's server credentials: mTLS required, reloaded on each new handshake when
    the files changed (a bad new file is logged and the previous pair kept)."""

    def __init__(self, files: TLSFiles, role: Role):
        self.files, self.role = files, role
        self._stamp = files.stamp()  # before reading: a change during the read is seen next time
        ca, key, cert, self.identity = files.load(role)
        self._checked = time.monotonic()
        self.revocations = Revocations(files.crl, files.ca)
        self._initial = grpc.ssl_server_certificate_configuration(
            [(key, cert)], root_certificates=ca
        )

    def _fetch(self):
        now = time.monotonic()
        if now - self._checked < RECHECK_S:
            return None
        self._checked = now
        stamp = self.files.stamp()
        if stamp == self._stamp:
            return None
        try:
            ca, key, cert, ident = self.files.load(self.role)
        except (TLSConfigError, OSError, TypeError) as exc:  # keep serving the pair that works
            log.error(
                "certificate reload for %s skipped: %s: %s", self.identity, type(exc).__name__, exc
            )
            return None
        self._stamp, self.identity = stamp, ident
        log.info(
            "reloaded TLS certificate %s serial %x (expires %s)",
            ident,
            ident.serial,
            f"{ident.not_after:%Y-%m-%d}",
        )
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(
            self._initial, self._fetch, require_client_authentication=True
        )


class ClientTLS(_client_tls.ClientTLS):
    """The client library's credentials, with issuer, expiry and `role` checked up front."""

    files_type = TLSFiles

    def __init__(self, directory: Path | str, name: str, role: Optional[Role] = None):
        super().__init__(directory, name, role)


def served_serial(
    address: str, tls: ClientTLS, server_name: Optional[str], timeout_s: float = 5.0
) -> int:
    """The serial of the certificate a server presents (a separate TLS handshake, with
    this caller's certificate, checked against the CA and `server_name`); blocking."""
    import socket
    import ssl

    from cluster.config import split_host_port

    host, port = split_host_port(address)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_verify_locations(tls.files.ca)
    ctx.load_cert_chain(tls.files.cert, tls.files.key)
    ctx.set_alpn_protocols(["h2"])
    with socket.create_connection((host, port), timeout=timeout_s) as raw:
        with ctx.wrap_socket(raw, server_hostname=server_name or host) as conn:
            return x509.load_der_x509_certificate(conn.getpeercert(binary_form=True)).serial_number
