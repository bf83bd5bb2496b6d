"""`fleetctl certs ...`: the fleet CA, role certificates, rotation and revocation.

Every issue and revocation is recorded in the CA directory's own audit chain
(CA_DIR/audit, verified with `fleetctl audit verify CA_DIR/audit`).
"""

from __future__ import annotations

import getpass
import json
import socket
from pathlib import Path
from typing import List, Optional

import typer

from cluster.fleetctl.exits import EXIT_BAD_INPUT
from cluster.security import ca
from cluster.security.identity import Role

app = typer.Typer(
    rich_markup_mode=None,
    add_completion=False,
    no_args_is_help=True,
    help="The fleet CA: create it, issue role certificates, rotate and revoke them.",
)

CA_DIR = typer.Option(
    ..., "--ca-dir", envvar="STUDIOFLEET_CA_DIR", help="The CA directory (from `certs init`)."
)


def _audit(directory: Path, action: str, **fields) -> None:
    """Record a CA action in CA_DIR/audit; durable before the command reports success."""
    from cluster.audit import AuditKeys, AuditLog
    from cluster.audit.keys import default_key_dir

    log = AuditLog(
        directory / "audit",
        keys=AuditKeys.load_or_create(default_key_dir(directory / "audit")),
        source="fleetctl-certs",
    )
    log.open()
    try:
        log.submit(
            {
                "type": "admin",
                "action": action,
                "caller": getpass.getuser(),
                "role": "ca-holder",
                "peer": socket.gethostname(),
                "outcome": "ok",
                "code": "OK",
                **fields,
            }
        ).result()
    finally:
        log.close()


def _fail(exc: Exception) -> typer.Exit:
    typer.echo(f"fleetctl: {exc}", err=True)
    return typer.Exit(EXIT_BAD_INPUT)


@app.command("init")
def init(
    directory: Path = typer.Argument(..., help="New CA directory (created, mode 0700)."),
    fleet: str = typer.Option("default", help="Fleet name written into the CA's subject."),
    days: int = typer.Option(ca.CA_DAYS, help="CA validity in days."),
) -> None:
    """Create the fleet CA: ca.pem (give it to every host), ca.key (keep it offline), crl.pem."""
    try:
        path = ca.init_ca(directory, fleet=fleet, days=days)
    except ca.CAError as exc:
        raise _fail(exc) from None
    _audit(directory, "certs.init", fleet=fleet, days=days)
    typer.echo(
        f"created CA {path}; issue certificates with `fleetctl certs issue --ca-dir {directory} "
        "--role ROLE --name NAME`"
    )


@app.command("issue")
def issue(
    role: Role = typer.Option(
        ..., help="node, coordinator, app, operator or monitor (a metrics scraper: /metrics only)."
    ),
    name: str = typer.Option(..., help="Unique name: the node id, coordinator id, app or person."),
    ca_dir: Path = CA_DIR,
    days: int = typer.Option(ca.LEAF_DAYS, help="Validity in days."),
    san: List[str] = typer.Option(
        [], "--san", help="Extra host name or IP the daemon is reached at (repeatable)."
    ),
    out: Optional[Path] = typer.Option(
        None, help="Write NAME.pem/NAME.key here. [default: the CA directory]"
    ),
    output: str = typer.Option("text", "--output", "-o", help="text or json."),
) -> None:
    """Issue (or re-issue: rotation) a certificate; daemons reload it without a restart."""
    try:
        issued = ca.issue(ca_dir, role, name, days=days, sans=san, out_dir=out)
    except (ca.CAError, ValueError) as exc:
        raise _fail(exc) from None
    ident = issued.identity
    _audit(
        ca_dir,
        "certs.issue",
        subject=str(ident),
        serial=f"{ident.serial:x}",
        not_after=f"{ident.not_after:%Y-%m-%dT%H:%M:%SZ}",
        sans=list(san),
    )
    if output == "json":
        typer.echo(
            json.dumps(
                {
                    "identity": str(ident),
                    "serial": f"{ident.serial:x}",
                    "cert": str(issued.cert_path),
                    "key": str(issued.key_path),
                    "not_after": ident.not_after.isoformat(),
                }
            )
        )
        return
    typer.echo(
        f"issued {ident} serial {ident.serial:x}, valid until {ident.not_after:%Y-%m-%d}: "
        f"{issued.cert_path} {issued.key_path}"
    )


@app.command("revoke")
def revoke(
    ca_dir: Path = CA_DIR,
    name: Optional[str] = typer.Option(None, help="Revoke the certificate CA_DIR/NAME.pem."),
    serial: Optional[str] = typer.Option(None, help="Revoke this serial (hex)."),
    reason: str = typer.Option("", help="Why (kept in the CA's audit chain)."),
) -> None:
    """Put a certificate on the revocation list; copy crl.pem to every host (daemons reload it)."""
    if (name is None) == (serial is None):
        raise _fail(ValueError("give exactly one of --name or --serial"))
    try:
        number = (
            ca.read_certificate(ca_dir / f"{name}.pem").serial_number if name else int(serial, 16)
        )
        count = ca.revoke(ca_dir, number)
    except (ca.CAError, ValueError) as exc:
        raise _fail(exc) from None
    _audit(ca_dir, "certs.revoke", serial=f"{number:x}", subject=name or "", reason=reason)
    typer.echo(
        f"revoked serial {number:x}; {ca_dir / 'crl.pem'} now lists {count}; copy it to every host's TLS directory"
    )


@app.command("show")
def show(
    cert: Path = typer.Argument(..., help="A certificate (NAME.pem)."),
    ca_dir: Optional[Path] = typer.Option(
        None, "--ca-dir", envvar="STUDIOFLEET_CA_DIR", help="Also say whether it is revoked."
    ),
) -> None:
    """Identity, role, serial, validity and names of a certificate."""
    from cryptography import x509

    from cluster.security.identity import identity_of

    try:
        c = ca.read_certificate(cert)
        ident = identity_of(c)
    except (ca.CAError, ValueError) as exc:
        raise _fail(exc) from None
    sans = c.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    revoked = ca_dir is not None and c.serial_number in ca.revoked_serials(ca_dir)
    typer.echo(
        f"identity  {ident}\nserial    {c.serial_number:x}\nvalid     {c.not_valid_before_utc:%Y-%m-%d} .. "
        f"{c.not_valid_after_utc:%Y-%m-%d}\nnames     {', '.join(str(v) for v in sans.get_values_for_type(x509.DNSName))}"
        + ("\nREVOKED" if revoked else "")
    )
