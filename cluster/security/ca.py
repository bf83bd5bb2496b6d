"""The fleet CA: create it, issue role certificates, revoke them (`fleetctl certs`).

A CA directory holds `ca.pem`, `ca.key` (0600; keep it off the serving hosts), `crl.pem`
(the revocation list every daemon reloads), and the certificates it issued as
`NAME.pem` + `NAME.key`. A daemon's TLS directory needs `ca.pem`, `crl.pem` and its own
pair only. Keys are ECDSA P-256; certificates carry the identity as a URI SAN.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from cluster.security.identity import (
    ANY_NODE,
    Identity,
    Role,
    check_name,
    dns_name,
    identity_of,
    uri,
)

CA_DAYS = 3650
LEAF_DAYS = 90
CRL_DAYS = 30
LOOPBACK_SANS = ("localhost", "127.0.0.1", "::1")
SERVING_ROLES = (Role.NODE, Role.COORDINATOR)


class CAError(Exception):
    """A CA operation that cannot be done; the message says what to do instead."""


@dataclass(frozen=True)
class Issued:
    identity: Identity
    cert_path: Path
    key_path: Path


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _write(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, mode)
    os.replace(tmp, path)  # readers (daemons reloading) never see half a file


def _key_pem(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _cert_pem(cert) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def init_ca(directory: Path, *, fleet: str = "default", days: int = CA_DAYS) -> Path:
    """Create a new CA in `directory` (refuses to overwrite one); returns ca.pem's path."""
    directory = Path(directory)
    if (directory / "ca.key").exists() or (directory / "ca.pem").exists():
        raise CAError(
            f"{directory} already holds a CA; use another directory, or `fleetctl certs issue` "
            "to issue from this one"
        )
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "StudioFleet"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"StudioFleet CA ({fleet})"),
        ]
    )
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write(directory / "ca.key", _key_pem(key), 0o600)
    _write(directory / "ca.pem", _cert_pem(cert), 0o644)
    _write_crl(directory, key, cert, [])
    return directory / "ca.pem"


def load_ca(directory: Path):
    directory = Path(directory)
    try:
        cert = x509.load_pem_x509_certificate((directory / "ca.pem").read_bytes())
        key = serialization.load_pem_private_key((directory / "ca.key").read_bytes(), None)
    except FileNotFoundError as exc:
        raise CAError(
            f"{directory} holds no CA ({exc.filename} is missing); create one with "
            "`fleetctl certs init DIR`"
        ) from None
    return key, cert


def _sans(role: Role, name: str, extra: Sequence[str]) -> list:
    out: list = [
        x509.UniformResourceIdentifier(uri(role, name)),
        x509.DNSName(dns_name(role, name)),
    ]
    if role is Role.NODE:
        out.append(x509.DNSName(ANY_NODE))
    for host in extra:  # the fleet's own names are derived from role + name, never given
        if host.lower().rstrip(".").endswith("studiofleet"):
            raise CAError(
                f"--san {host}: names under .studiofleet are reserved for identities; "
                "give the host's own DNS name or IP"
            )
    hosts = list(extra) + (list(LOOPBACK_SANS) if role in SERVING_ROLES else [])
    for host in dict.fromkeys(hosts):
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            out.append(x509.DNSName(host))
    return out


def issue(
    directory: Path,
    role: Role,
    name: str,
    *,
    days: int = LEAF_DAYS,
    sans: Sequence[str] = (),
    out_dir: Optional[Path] = None,
    not_before: Optional[dt.datetime] = None,
) -> Issued:
    """A certificate for `role`/`name` signed by the CA in `directory`, written to
    `out_dir` (default: the CA directory) as NAME.pem and NAME.key. Re-issuing a name
    (rotation) replaces the pair atomically; daemons pick the new one up without restart."""
    role = Role(role)
    check_name(name)
    if days < 1:
        raise CAError(f"--days must be at least 1, got {days}")
    ca_key, ca_cert = load_ca(directory)
    key = ec.generate_private_key(ec.SECP256R1())
    start = not_before or (_now() - dt.timedelta(minutes=5))
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH] + (
        [ExtendedKeyUsageOID.SERVER_AUTH] if role in SERVING_ROLES else []
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role.value),
                    x509.NameAttribute(NameOID.COMMON_NAME, name),
                ]
            )
        )
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.SubjectAlternativeName(_sans(role, name, sans)), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    out = Path(out_dir or directory)
    out.mkdir(parents=True, exist_ok=True)
    key_path, cert_path = out / f"{name}.key", out / f"{name}.pem"
    _write(
        key_path, _key_pem(key), 0o600
    )  # the key first: a reloading daemon checks the pair matches
    _write(cert_path, _cert_pem(cert), 0o644)
    return Issued(identity_of(cert), cert_path, key_path)


def revoked_serials(directory: Path) -> set[int]:
    path = Path(directory) / "crl.pem"
    if not path.exists():
        return set()
    crl = x509.load_pem_x509_crl(path.read_bytes())
    return {r.serial_number for r in crl}


def revoke(directory: Path, serial: int) -> int:
    """Add `serial` to the CA's revocation list; returns how many serials it now holds.
    Copy crl.pem to every host's TLS directory: daemons reload it within seconds."""
    key, cert = load_ca(directory)
    serials = revoked_serials(directory) | {serial}
    _write_crl(Path(directory), key, cert, sorted(serials))
    return len(serials)


def crl_number(path: Path) -> int:
    """The CRL number of the list at `path`; 0 when there is none (or it has no number)."""
    try:
        crl = x509.load_pem_x509_crl(Path(path).read_bytes())
        return crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    except (OSError, ValueError, x509.ExtensionNotFound):
        return 0


def _write_crl(directory: Path, key, cert, serials: Sequence[int]) -> None:
    """Each list carries a CRL number one past the previous list's, so daemons can tell a
    newer list from an older one put back (they keep the newest they have seen)."""
    now = _now()
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(cert.subject)
        .last_update(now)
        .next_update(now + dt.timedelta(days=CRL_DAYS))
        .add_extension(x509.CRLNumber(crl_number(directory / "crl.pem") + 1), critical=False)
    )
    for serial in serials:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(now).build()
        )
    _write(
        directory / "crl.pem",
        builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM),
        0o644,
    )


def read_certificate(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(Path(path).read_bytes())
    except FileNotFoundError:
        raise CAError(f"no certificate at {path}") from None
