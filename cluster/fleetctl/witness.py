"""The witnesses `fleetctl audit verify --witness` reads: signed audit HEADs kept off the
coordinator's host, by node agents (GetStatus) or in files an operator saved."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import grpc
from google.protobuf.json_format import MessageToDict

from cluster.api import node_pb2, node_pb2_grpc
from cluster.fleetctl.connect import credentials, dial
from cluster.security.identity import ANY_NODE

TIMEOUT_S = 5.0
MAX_FILE_BYTES = 1 << 20


class WitnessError(Exception):
    """A witness could not be read; the message names it and the fix."""


def gather(
    witnesses: list[str], tls_dir: Optional[Path], tls_name: Optional[str], plaintext: bool
) -> list[tuple[str, dict]]:
    """(witness name, HEAD document) for every HEAD each witness holds."""
    heads: list[tuple[str, dict]] = []
    tls = None
    for spec in witnesses:
        path = Path(spec)
        if path.is_file():
            heads += [(str(path), h) for h in _from_file(path)]
            continue
        if ":" not in spec:
            raise WitnessError(f"witness {spec}: no such file, and not a node's HOST:PORT")
        if tls is None and not plaintext:
            tls = credentials(tls_dir, tls_name, plaintext)
        heads += _from_node(spec, tls)
    return heads


def _from_file(path: Path) -> list[dict]:
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            raise WitnessError(
                f"witness {path}: larger than {MAX_FILE_BYTES} bytes; give a HEAD file or "
                "`fleetctl node status -o json` output"
            )
        doc = json.loads(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise WitnessError(
            f"witness {path} cannot be read as JSON ({type(exc).__name__})"
        ) from None
    docs = doc.get("audit_heads", []) if isinstance(doc, dict) and "audit_heads" in doc else [doc]
    return [_normal(d) for d in docs if isinstance(d, dict)]


def _from_node(address: str, tls) -> list[tuple[str, dict]]:
    with dial(address, tls, ANY_NODE) as channel:
        try:
            st = node_pb2_grpc.NodeStub(channel).GetStatus(
                node_pb2.GetStatusRequest(), timeout=TIMEOUT_S
            )
        except grpc.RpcError as err:
            raise WitnessError(f"witness {address}: {err.code().name}: {err.details()}") from None
    name = f"node {st.node_id or address}"
    return [
        (name, _normal(MessageToDict(h, preserving_proto_field_name=True))) for h in st.audit_heads
    ]


def _normal(doc: dict) -> dict:
    """A HEAD as chain.verify reads it (protobuf JSON writes a uint64 as a string)."""
    seq = doc.get("seq")
    if isinstance(seq, str) and seq.isdigit():
        doc = dict(doc, seq=int(seq))
    return doc
