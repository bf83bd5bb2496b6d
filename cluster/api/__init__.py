"""The gRPC contracts: the client library's generated code (studiofleet_client.api),
under the name the daemons use. Regenerate with `python -m cluster.protogen`."""

from studiofleet_client.api import (
    API_VERSION,
    FLEET_SERVICE,
    INFERENCE_SERVICE,
    NODE_SERVICE,
    SHADOW_SERVICE,
    SMOKE_METADATA_KEY,
    common_pb2,
    fleet_pb2,
    fleet_pb2_grpc,
    inference_pb2,
    inference_pb2_grpc,
    node_pb2,
    node_pb2_grpc,
    shadow_pb2,
    shadow_pb2_grpc,
)

__all__ = [
    "API_VERSION",
    "FLEET_SERVICE",
    "INFERENCE_SERVICE",
    "NODE_SERVICE",
    "SHADOW_SERVICE",
    "SMOKE_METADATA_KEY",
    "common_pb2",
    "fleet_pb2",
    "fleet_pb2_grpc",
    "inference_pb2",
    "inference_pb2_grpc",
    "node_pb2",
    "node_pb2_grpc",
    "shadow_pb2",
    "shadow_pb2_grpc",
]
