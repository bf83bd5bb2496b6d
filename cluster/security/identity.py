"""Who a certificate says its holder is: role + name, and the names TLS checks against."""

from __future__ import annotations

import datetime as dt
import enum
import re
from dataclasses import dataclass
from typing import Optional

from cryptography import x509

URI_SCHEME = "studiofleet://"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
# Every node certificate also carries this DNS name. A coordinator that does not yet know
# which node answers at an address (a static --node entry) connects with it only to read
# the node id; traffic goes over a channel whose handshake proved that id (dns_name).
ANY_NODE = "node.studiofleet"


class Role(str, enum.Enum):
    APP = "app"  # clinical applications: inference only
    OPERATOR = "operator"  # people and scripts running the fleet: admin operations
    COORDINATOR = "coordinator"  # the coordinator, calling nodes
    NODE = "node"  # a node agent: its identity only, calls nothing
    MONITOR = "monitor"  # a metrics scraper (Prometheus): /metrics only


@dataclass(frozen=True)
class Identity:
    role: Role
    name: str
    serial: int = 0
    not_after: Optional[dt.datetime] = None

    def __str__(self) -> str:
        return f"{self.role.value}/{self.name}"

    @property
    def uri(self) -> str:
        return uri(self.role, self.name)


# Plaintext loopback development: there is no certificate, so every caller is this.
DEVELOPER = Identity(Role.OPERATOR, "plaintext-developer")


def check_name(name: str) -> str:
    if not NAME_RE.fullmatch(name or ""):
        raise ValueError(
            f"certificate name {name!r} must be 1-63 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


def uri(role: Role, name: str) -> str:
    return f"{URI_SCHEME}{Role(role).value}/{name}"


def dns_name(role: Role, name: str) -> str:
    """The DNS SAN a channel checks when it must reach exactly this daemon."""
    return f"{name}.{Role(role).value}.studiofleet"


def parse_uri(value: str) -> Optional[Identity]:
    if not value.startswith(URI_SCHEME):
        return None
    role, _, name = value[len(URI_SCHEME) :].partition("/")
    try:
        return Identity(Role(role), check_name(name))
    except ValueError:
        return None


def identity_of(cert: x509.Certificate) -> Identity:
    """The certificate's StudioFleet identity; ValueError if it has none (not one of ours)."""
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        sans = []
    found = (
        [
            i
            for i in (
                parse_uri(u)
                for u in sans.get_values_for_type(x509.UniformResourceIdentifier)
                if sans
            )
            if i is not None
        ]
        if sans
        else []
    )
    if len(found) != 1:
        raise ValueError(
            f"certificate {cert.subject.rfc4514_string()} carries {len(found)} StudioFleet "
            "identities (URI SAN studiofleet://ROLE/NAME); issue it with `fleetctl certs issue`"
        )
    return Identity(found[0].role, found[0].name, cert.serial_number, cert.not_valid_after_utc)
