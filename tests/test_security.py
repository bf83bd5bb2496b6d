"""mTLS, roles and certificates against real daemons on loopback (issue: security and audit).

Every test fleet already runs with mTLS (conftest's `fleet_ca`); here are the refusals:
no certificate, another CA, expired, revoked, TLS 1.1, the wrong role, a stranger on
mDNS, and rotation without a restart.
"""

from __future__ import annotations

import datetime as dt
import socket
import ssl
import subprocess
import sys
import time

import grpc
import pytest
from cryptography import x509

from cluster.api import inference_pb2_grpc, node_pb2, node_pb2_grpc
from cluster.client import FleetClient, build_request
from cluster.client.errors import UnavailableError
from cluster.localfleet import HARNESS_NODE_CALLER
from cluster.security import ca
from cluster.security.identity import ANY_NODE, Role, dns_name, identity_of
from cluster.security.tls import ClientTLS, open_channel, served_serial
from tests.procs import NodeProcess

NODE_NAME = dns_name(Role.NODE, "shared-node")


def _status(channel, timeout=5):
    return node_pb2_grpc.NodeStub(channel).GetStatus(node_pb2.GetStatusRequest(), timeout=timeout)


def _generate(channel, **kw):
    call = inference_pb2_grpc.InferenceStub(channel).Generate(
        build_request(prompt="Plan:", max_tokens=kw.pop("max_tokens", 3), **kw), timeout=30
    )
    return list(call)


# -- the CA ----------------------------------------------------------------------------


def test_issued_certificates_carry_role_and_name(tmp_path):
    ca.init_ca(tmp_path, fleet="t")
    with pytest.raises(ca.CAError, match="already holds a CA"):
        ca.init_ca(tmp_path)
    issued = ca.issue(tmp_path, Role.NODE, "mac-01", sans=["10.0.0.5", "mac-01.clinic.lan"])
    cert = x509.load_pem_x509_certificate(issued.cert_path.read_bytes())
    ident = identity_of(cert)
    assert (ident.role, ident.name) == (Role.NODE, "mac-01")
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"mac-01.node.studiofleet", ANY_NODE, "mac-01.clinic.lan", "localhost"} <= set(
        names.get_values_for_type(x509.DNSName)
    )
    assert (tmp_path / "mac-01.key").stat().st_mode & 0o077 == 0 and (
        tmp_path / "ca.key"
    ).stat().st_mode & 0o077 == 0
    app = identity_of(
        x509.load_pem_x509_certificate(ca.issue(tmp_path, Role.APP, "notes").cert_path.read_bytes())
    )
    assert str(app) == "app/notes"
    for bad in ("bad name", "alice\n", "-x", ""):
        with pytest.raises(ValueError, match="must be 1-63"):
            ca.issue(tmp_path, Role.APP, bad)
    with pytest.raises(
        ca.CAError, match="reserved"
    ):  # no certificate may claim another identity's name
        ca.issue(tmp_path, Role.COORDINATOR, "co", sans=["mac-01.node.studiofleet"])
    assert ca.revoke(tmp_path, ident.serial) == 1 and ident.serial in ca.revoked_serials(tmp_path)


def test_fleetctl_certs_init_issue_revoke_show(tmp_path):
    def fleetctl(*args):
        return subprocess.run(
            [sys.executable, "-m", "cluster.fleetctl.app", *args],
            capture_output=True,
            text=True,
            timeout=60,
        )

    d = tmp_path / "ca"
    assert fleetctl("certs", "init", str(d)).returncode == 0
    out = fleetctl("certs", "issue", "--ca-dir", str(d), "--role", "operator", "--name", "dana")
    assert out.returncode == 0 and "operator/dana" in out.stdout, out.stderr
    shown = fleetctl("certs", "show", str(d / "dana.pem"), "--ca-dir", str(d))
    assert "operator/dana" in shown.stdout and "REVOKED" not in shown.stdout
    assert (
        fleetctl(
            "certs", "revoke", "--ca-dir", str(d), "--name", "dana", "--reason", "left"
        ).returncode
        == 0
    )
    assert "REVOKED" in fleetctl("certs", "show", str(d / "dana.pem"), "--ca-dir", str(d)).stdout
    bad = fleetctl("certs", "issue", "--ca-dir", str(d), "--role", "wizard", "--name", "x")
    assert bad.returncode == 2
    # Every CA action is in the CA's own audit chain, which verifies.
    verify = fleetctl("audit", "verify", str(d / "audit"))
    assert verify.returncode == 0, verify.stdout + verify.stderr
    actions = fleetctl("audit", "query", str(d / "audit"), "-o", "json").stdout
    assert (
        actions.count('"certs.issue"') == 1
        and '"certs.revoke"' in actions
        and '"certs.init"' in actions
    )


# -- refusals at the handshake ------------------------------------------------------------


def test_no_client_certificate_is_refused(node, fleet_ca):
    creds = grpc.ssl_channel_credentials((fleet_ca / "ca.pem").read_bytes())
    with grpc.secure_channel(
        node.address, creds, options=[("grpc.ssl_target_name_override", NODE_NAME)]
    ) as ch:
        with pytest.raises(grpc.RpcError) as err:
            _status(ch)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_plaintext_client_is_refused(node):
    with grpc.insecure_channel(node.address) as ch:
        with pytest.raises(grpc.RpcError) as err:
            _status(ch)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_certificate_from_another_ca_is_refused_with_a_clear_error(node, tmp_path):
    other = tmp_path / "other-ca"
    ca.init_ca(other)
    ca.issue(other, Role.APP, "app")
    with pytest.raises(UnavailableError) as err:
        with FleetClient(
            node.address, tls=ClientTLS(other, "app"), server_name=NODE_NAME, max_attempts=1
        ) as c:
            c.generate(prompt="Plan:", max_tokens=2, timeout_s=10)
    assert "TLS handshake refused" in str(err.value) and "fleet's CA" in str(err.value)


def test_expired_certificate_is_refused(node, fleet_ca, tmp_path):
    old = dt.datetime.now(dt.UTC) - dt.timedelta(days=10)
    ca.issue(fleet_ca, Role.APP, "expired-app", days=1, not_before=old, out_dir=tmp_path)
    ca_pem = (fleet_ca / "ca.pem").read_bytes()
    creds = grpc.ssl_channel_credentials(
        ca_pem,
        (tmp_path / "expired-app.key").read_bytes(),
        (tmp_path / "expired-app.pem").read_bytes(),
    )
    with grpc.secure_channel(
        node.address, creds, options=[("grpc.ssl_target_name_override", NODE_NAME)]
    ) as ch:
        with pytest.raises(grpc.RpcError) as err:
            _generate(ch)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    # The client library refuses to even load it, saying why.
    (tmp_path / "ca.pem").write_bytes(ca_pem)
    with pytest.raises(ValueError, match="expired"):
        ClientTLS(tmp_path, "expired-app")


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated:DeprecationWarning")
def test_tls_1_1_is_refused(node, fleet_ca):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(fleet_ca / "ca.pem")
    ctx.load_cert_chain(fleet_ca / "app.pem", fleet_ca / "app.key")
    ctx.check_hostname = False
    try:
        ctx.minimum_version = ssl.TLSVersion.TLSv1_1
        ctx.maximum_version = ssl.TLSVersion.TLSv1_1
        ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    except (ValueError, ssl.SSLError):
        pytest.skip("this OpenSSL cannot even offer TLS 1.1")
    ctx.set_alpn_protocols(["h2"])
    host, port = node.address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as raw:
        with pytest.raises((ssl.SSLError, ConnectionResetError)) as err:
            ctx.wrap_socket(raw, server_hostname=NODE_NAME).close()
    # The hello went out (a client unable to offer 1.1 fails locally with NO_PROTOCOLS_AVAILABLE)
    # and the server answered it with an alert or by hanging up.
    assert "NO_PROTOCOLS" not in str(err.value), err.value
    assert (
        isinstance(err.value, (ssl.SSLEOFError, ConnectionResetError))
        or "VERSION" in str(err.value).upper()
    )
    # The same client at TLS 1.2 gets through: the refusal was the version.
    ctx12 = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx12.load_verify_locations(fleet_ca / "ca.pem")
    ctx12.load_cert_chain(fleet_ca / "app.pem", fleet_ca / "app.key")
    ctx12.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx12.set_alpn_protocols(["h2"])
    with socket.create_connection((host, int(port)), timeout=10) as raw:
        with ctx12.wrap_socket(raw, server_hostname=NODE_NAME) as tls:
            assert tls.version() == "TLSv1.2"


# -- roles --------------------------------------------------------------------------------


def test_roles_on_a_node(node, fleet_ca):
    with open_channel(
        node.address, ClientTLS(fleet_ca, HARNESS_NODE_CALLER), server_name=NODE_NAME
    ) as as_co:
        assert _generate(as_co)[-1].HasField("final") and _status(as_co).node_id == "shared-node"
    # An app goes through a coordinator (which audits it), never straight to a node.
    with open_channel(node.address, ClientTLS(fleet_ca, "app"), server_name=NODE_NAME) as as_app:
        for call, allowed in (
            (_generate, "allowed: coordinator"),
            (_status, "allowed: coordinator, operator"),
        ):
            with pytest.raises(grpc.RpcError) as err:
                call(as_app)
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "app/app" in err.value.details() and err.value.details().endswith(allowed)
    with open_channel(
        node.address, ClientTLS(fleet_ca, "operator"), server_name=NODE_NAME
    ) as as_operator:
        assert _status(as_operator).node_id == "shared-node"
        with pytest.raises(grpc.RpcError) as err:
            _generate(as_operator)  # operators run the fleet; they do not read notes
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    ca.issue(fleet_ca, Role.NODE, "impostor-node")
    with open_channel(
        node.address, ClientTLS(fleet_ca, "impostor-node"), server_name=NODE_NAME
    ) as as_node:
        for call in (_status, _generate):
            with pytest.raises(grpc.RpcError) as err:
                call(as_node)
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_revoked_certificate_is_refused_within_seconds(start_node, fleet_ca, tmp_path):
    node = start_node(node_id="crl-node")
    issued = ca.issue(fleet_ca, Role.COORDINATOR, "soon-revoked")
    tls = ClientTLS(fleet_ca, "soon-revoked")
    with open_channel(node.address, tls, server_name=dns_name(Role.NODE, "crl-node")) as ch:
        assert _generate(ch)[-1].HasField("final")
        ca.revoke(fleet_ca, issued.identity.serial)
        deadline = time.monotonic() + 10
        while True:  # the node re-reads crl.pem at most once a second
            try:
                _generate(ch)
            except grpc.RpcError as err:
                assert err.code() == grpc.StatusCode.UNAUTHENTICATED
                assert "revoked" in err.details() and "coordinator/soon-revoked" in err.details()
                break
            assert time.monotonic() < deadline, "revocation not enforced within 10 s"


# -- rotation -----------------------------------------------------------------------------


def _served_serial(address: str, tls_dir, server_name: str) -> int:
    """The serial a daemon serves, read as an operator with the coordinator's own check."""
    return served_serial(address, ClientTLS(tls_dir, "operator"), server_name, timeout_s=10)


def test_rotation_without_restart_keeps_streams_running(start_node, fleet_ca):
    node = start_node(node_id="rotating-node")
    name = dns_name(Role.NODE, "rotating-node")
    before = _served_serial(node.address, fleet_ca, name)
    stream = node.inference.Generate(build_request(prompt="Note:", max_tokens=200), timeout=60)
    first = next(stream)
    new = ca.issue(fleet_ca, Role.NODE, "rotating-node").identity.serial
    deadline = time.monotonic() + 10
    while _served_serial(node.address, fleet_ca, name) != new:
        assert time.monotonic() < deadline, "the re-issued certificate was not served within 10 s"
    assert before != new
    chunks = [first, *stream]  # the stream that began under the old certificate ends normally
    assert chunks[-1].final.usage.completion_tokens >= 1
    assert node.proc.poll() is None


# -- start-up checks ------------------------------------------------------------------------


def test_daemons_refuse_to_start_without_credentials_or_with_public_plaintext(
    tiny_model, tmp_path, monkeypatch
):
    monkeypatch.delenv("STUDIOFLEET_TLS_DIR")
    base = [sys.executable, "-m", "node_agent.main", "--model", str(tiny_model), "--no-mdns"]
    none = subprocess.run(
        [*base, "--listen", "127.0.0.1:0"], capture_output=True, text=True, timeout=60
    )
    assert none.returncode == 2 and "mTLS is on by default" in none.stderr
    public = subprocess.run(
        [*base, "--listen", "0.0.0.0:0", "--plaintext"], capture_output=True, text=True, timeout=60
    )
    assert public.returncode == 2 and "loopback development only" in public.stderr
    co = subprocess.run(
        [
            sys.executable,
            "-m",
            "coordinator.main",
            "--no-mdns",
            "--listen",
            "127.0.0.1:0",
            "--plaintext",
            "--node",
            "10.1.2.3:7700",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert co.returncode == 2 and "10.1.2.3:7700 needs mTLS" in co.stderr
    api = subprocess.run(
        [
            sys.executable,
            "-m",
            "coordinator.main",
            "--no-mdns",
            "--listen",
            "127.0.0.1:0",
            "--plaintext",
            "--openai-listen",
            "0.0.0.0:0",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert api.returncode == 2 and "--openai-listen on loopback only" in api.stderr


def test_plaintext_mode_says_so_loudly(start_node, tiny_model, tmp_path):
    proc = NodeProcess(tiny_model, node_id="plain-node", plaintext=True)
    with proc:
        proc.start(tmp_path / "logs")
        proc.wait_serving()
        assert "PLAINTEXT MODE" in proc.stderr() and "never send PHI" in proc.stderr()
        with FleetClient(proc.address, plaintext=True) as client:
            assert (
                client.generate(prompt="Plan:", max_tokens=2, timeout_s=30).completion_tokens >= 1
            )


def test_node_id_must_match_its_certificate(tiny_model, fleet_ca):
    ca.issue(fleet_ca, Role.NODE, "real-id")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "node_agent.main",
            "--model",
            str(tiny_model),
            "--no-mdns",
            "--listen",
            "127.0.0.1:0",
            "--tls-dir",
            str(fleet_ca),
            "--tls-name",
            "real-id",
            "--node-id",
            "other-id",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2 and "does not match the certificate" in out.stderr
    ca.issue(fleet_ca, Role.APP, "an-app")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "node_agent.main",
            "--model",
            str(tiny_model),
            "--no-mdns",
            "--listen",
            "127.0.0.1:0",
            "--tls-dir",
            str(fleet_ca),
            "--tls-name",
            "an-app",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2 and "needs a node certificate" in out.stderr


def test_a_revocation_list_must_come_from_the_fleet_ca(tmp_path):
    from cluster.security.tls import Revocations

    fleet, other = tmp_path / "fleet", tmp_path / "other"
    ca.init_ca(fleet)
    ca.init_ca(other)
    victim = ca.issue(fleet, Role.APP, "victim").identity.serial
    ca.revoke(fleet, victim)
    crl = Revocations(fleet / "crl.pem", fleet / "ca.pem")
    assert crl.revoked(victim)
    # A list signed by another CA (here: an empty one) is refused; the last good list stays.
    (fleet / "crl.pem").write_bytes((other / "crl.pem").read_bytes())
    crl.refresh(force=True)
    assert crl.revoked(victim)
    (fleet / "crl.pem").unlink()  # a vanished list does not un-revoke either
    crl.refresh(force=True)
    assert crl.revoked(victim)
