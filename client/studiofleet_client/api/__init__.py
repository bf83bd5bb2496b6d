"""The gRPC contracts, generated from proto/ by `python -m cluster.protogen` (in the
StudioFleet repository); the daemons import them as cluster.api."""

from studiofleet_client.api.studiofleet.v1 import (
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

API_VERSION = "studiofleet.v1"
INFERENCE_SERVICE = "studiofleet.v1.Inference"
NODE_SERVICE = "studiofleet.v1.Node"
FLEET_SERVICE = "studiofleet.v1.Fleet"
SHADOW_SERVICE = "studiofleet.v1.Shadow"
# Request metadata: a coordinator's smoke test of a cordoned or drained node (a rollout's
# gate, before the node rejoins); nodes admit it only from callers allowed to Generate.
SMOKE_METADATA_KEY = "studiofleet-smoke"

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
