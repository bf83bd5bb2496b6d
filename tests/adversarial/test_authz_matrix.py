"""Every method of every service on every daemon, called with every kind of caller, against
the role table (issue 19, finding 1).

The methods come from what each daemon serves (its own reflection service) and the
generated descriptors, never from a hand-kept list, so a method added to a contract
without a table entry fails here, and so does any call kind the authorizer does not wrap
(Node.PushWeights, client-streaming, used to run for any certificate, revoked included).

Requests are the empty message with every string field set to "not valid!": a caller
the table admits gets its answer from the handler's own validation (INVALID_ARGUMENT,
NOT_FOUND, ...), so no call here drains, restarts or pushes anything.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Optional

import grpc
import pytest
from google.protobuf import descriptor_pool, message_factory
from google.protobuf.descriptor import FieldDescriptor
from grpc_health.v1 import health_pb2  # noqa: F401 - registers grpc.health.v1 in the pool
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from cluster.security import ca
from cluster.security.authz import policy
from cluster.security.identity import Role, dns_name
from cluster.security.roles import COORDINATOR_TABLE, NODE_TABLE
from tests.procs import CoordinatorProcess, NodeProcess

BAD = "not valid!"
ADMITTED_BUT_REFUSED_BY_THE_HANDLER = {
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.UNAUTHENTICATED,
}


@dataclass(frozen=True)
class Caller:
    """How a test caller presents itself: a role certificate, or a broken credential."""

    label: str
    role: Optional[Role] = None  # a valid certificate of this role
    kind: str = "role"  # role | revoked | expired | foreign | none


CALLERS = [Caller(r.value, role=r) for r in Role] + [
    Caller("revoked", role=Role.OPERATOR, kind="revoked"),
    Caller("expired", role=Role.OPERATOR, kind="expired"),
    Caller("foreign-ca", role=Role.OPERATOR, kind="foreign"),
    Caller("no-certificate", kind="none"),
]


@pytest.fixture(scope="module")
def daemons(tiny_model, fleet_ca, tmp_path_factory):
    """A node and a coordinator, started after the revoked certificate was revoked (so the
    CRL they load at start already lists it)."""
    revoked = ca.issue(fleet_ca, Role.OPERATOR, "matrix-revoked")
    ca.revoke(fleet_ca, revoked.identity.serial)
    logs = tmp_path_factory.mktemp("matrix-logs")
    with NodeProcess(tiny_model, node_id="matrix-node") as node:
        node.start(logs)
        node.wait_serving()
        with CoordinatorProcess(nodes=[node.address], name="matrix-coordinator") as co:
            co.start(logs)
            co.wait_serving()
            yield {"node": (node, NODE_TABLE), "coordinator": (co, COORDINATOR_TABLE)}


def _credentials(daemon, caller: Caller, tmp_path) -> Optional[grpc.ChannelCredentials]:
    ca_dir = daemon.tls_dir
    root = (ca_dir / "ca.pem").read_bytes()
    if caller.kind == "none":
        return grpc.ssl_channel_credentials(root)
    if caller.kind == "revoked":
        name, directory = "matrix-revoked", ca_dir
    elif caller.kind == "expired":
        name, directory = "matrix-expired", tmp_path
        ca.issue(
            ca_dir,
            Role.OPERATOR,
            name,
            days=1,
            out_dir=tmp_path,
            not_before=dt.datetime.now(dt.UTC) - dt.timedelta(days=10),
        )
    elif caller.kind == "foreign":
        name, directory = "matrix-foreign", tmp_path / "other-ca"
        ca.init_ca(directory)
        ca.issue(directory, Role.OPERATOR, name)
    else:
        name, directory = f"matrix-{caller.role.value}", ca_dir
        if not (ca_dir / f"{name}.pem").exists():
            ca.issue(ca_dir, caller.role, name)
    return grpc.ssl_channel_credentials(
        root, (directory / f"{name}.key").read_bytes(), (directory / f"{name}.pem").read_bytes()
    )


def _served_methods(daemon) -> list:
    """(full method path, method descriptor) for every service the daemon serves, asked of
    its own reflection service (as an operator) and resolved in the generated descriptors."""
    with daemon.dial() as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        replies = list(
            stub.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10
            )
        )
    names = [s.name for s in replies[0].list_services_response.service]
    assert len(names) >= 3, names
    pool = descriptor_pool.Default()
    out = []
    for name in names:
        service = pool.FindServiceByName(name)
        out += [(f"/{service.full_name}/{m.name}", m) for m in service.methods]
    return out


def _request(method):
    cls = message_factory.GetMessageClass(method.input_type)
    msg = cls()
    for field in method.input_type.fields:
        if field.type == FieldDescriptor.TYPE_STRING and not _repeated(field):
            setattr(msg, field.name, BAD)
    return msg


def _repeated(field) -> bool:
    return field.is_repeated


def _call(channel, path: str, method) -> grpc.StatusCode:
    """The status a call ends with (OK when it answered); streams are read to their first
    message, with a short deadline for those that wait for events."""
    request = _request(method)
    ser = type(request).SerializeToString
    de = message_factory.GetMessageClass(method.output_type).FromString
    try:
        if method.client_streaming and method.server_streaming:
            call = channel.stream_stream(path, request_serializer=ser, response_deserializer=de)(
                iter([request]), timeout=3
            )
            next(iter(call), None)
        elif method.client_streaming:
            channel.stream_unary(path, request_serializer=ser, response_deserializer=de)(
                iter([request]), timeout=5
            )
        elif method.server_streaming:
            call = channel.unary_stream(path, request_serializer=ser, response_deserializer=de)(
                request, timeout=3
            )
            next(iter(call), None)
        else:
            channel.unary_unary(path, request_serializer=ser, response_deserializer=de)(
                request, timeout=5
            )
    except grpc.RpcError as err:
        return err.code()
    return grpc.StatusCode.OK


@pytest.mark.parametrize("caller", CALLERS, ids=lambda c: c.label)
@pytest.mark.parametrize("which", ["node", "coordinator"])
def test_every_method_answers_every_caller_as_the_role_table_says(daemons, which, caller, tmp_path):
    daemon, table = daemons[which]
    rules = policy(table)
    methods = _served_methods(daemon)
    unlisted = [path for path, _ in methods if path not in rules]
    assert not unlisted, (
        f"{which} serves methods with no role-table entry (default deny, but say so): {unlisted}"
    )
    kinds = {(m.client_streaming, m.server_streaming) for _, m in methods}
    assert (True, False) in kinds or which == "coordinator", (
        "the node must serve a client-streaming method"
    )
    target = dns_name(daemon.role, daemon.name)
    creds = _credentials(daemon, caller, tmp_path)
    wrong = []
    with grpc.secure_channel(
        daemon.address, creds, options=[("grpc.ssl_target_name_override", target)]
    ) as ch:
        for path, method in methods:
            code = _call(ch, path, method)
            if caller.kind in ("expired", "foreign", "none"):
                want_ok = code == grpc.StatusCode.UNAVAILABLE  # refused at the TLS handshake
                want = "UNAVAILABLE (handshake refused)"
            elif caller.kind == "revoked":
                want_ok, want = code == grpc.StatusCode.UNAUTHENTICATED, "UNAUTHENTICATED"
            elif caller.role in rules[path]:
                want_ok = (
                    code not in ADMITTED_BUT_REFUSED_BY_THE_HANDLER
                    and code != grpc.StatusCode.UNAVAILABLE
                )
                want = "admitted"
            else:
                want_ok, want = code == grpc.StatusCode.PERMISSION_DENIED, "PERMISSION_DENIED"
            if not want_ok:
                wrong.append(f"{path}: got {code.name}, want {want}")
    assert not wrong, f"{which} as {caller.label}:\n" + "\n".join(wrong)


def test_a_handler_of_a_kind_the_authorizer_cannot_wrap_is_refused_for_everyone():
    """Default deny holds for call kinds too: a handler with no kind the authorizer knows
    (here a bare object standing in for one a future grpc might add: no real server makes
    such a handler) is replaced by one that refuses every caller."""
    import asyncio

    from cluster.security.authz import Authorizer

    class UnknownKind:
        request_deserializer = response_serializer = None
        unary_unary = unary_stream = stream_unary = stream_stream = None

    class Context:
        code = None

        async def abort(self, code, message):
            self.code, self.message = code, message
            raise RuntimeError("aborted")

    guarded = Authorizer({}, revocations=None, plaintext=True).guard(UnknownKind(), "/x.Y/Z")
    ctx = Context()
    with pytest.raises(RuntimeError):
        asyncio.run(guarded.unary_unary(b"", ctx))
    assert ctx.code == grpc.StatusCode.PERMISSION_DENIED and "/x.Y/Z" in ctx.message
