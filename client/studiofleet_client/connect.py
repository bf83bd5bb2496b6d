"""How a client reaches the fleet: mTLS with its own certificate (default), or plaintext
to a loopback development fleet when asked for explicitly."""

from __future__ import annotations

from typing import Optional

from studiofleet_client.tls import ENV_DIR, ENV_NAME, ClientTLS


def resolve_tls(tls: Optional[ClientTLS], plaintext: bool) -> Optional[ClientTLS]:
    """The credentials to use: `tls`, else STUDIOFLEET_TLS_DIR/NAME; None only for plaintext."""
    if plaintext:
        if tls is not None:
            raise ValueError("tls= and plaintext=True exclude each other")
        return None
    tls = tls or ClientTLS.from_env()
    if tls is None:
        raise ValueError(
            f"no TLS credentials: pass tls=ClientTLS(DIR, NAME) or set {ENV_DIR} and {ENV_NAME} "
            "(an app certificate from `fleetctl certs issue --role app`); plaintext=True only "
            "reaches a loopback development fleet"
        )
    return tls
