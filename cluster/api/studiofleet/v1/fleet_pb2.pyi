from cluster.api.studiofleet.v1 import node_pb2 as _node_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class NodeHealth(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    NODE_HEALTH_UNSPECIFIED: _ClassVar[NodeHealth]
    NODE_HEALTH_PENDING: _ClassVar[NodeHealth]
    NODE_HEALTH_HEALTHY: _ClassVar[NodeHealth]
    NODE_HEALTH_SUSPECT: _ClassVar[NodeHealth]
    NODE_HEALTH_EJECTED: _ClassVar[NodeHealth]
    NODE_HEALTH_PROBING: _ClassVar[NodeHealth]
    NODE_HEALTH_REJECTED: _ClassVar[NodeHealth]

class EventKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EVENT_KIND_UNSPECIFIED: _ClassVar[EventKind]
    EVENT_KIND_DISCOVERED: _ClassVar[EventKind]
    EVENT_KIND_JOINED: _ClassVar[EventKind]
    EVENT_KIND_STATE_CHANGED: _ClassVar[EventKind]
    EVENT_KIND_EJECTED: _ClassVar[EventKind]
    EVENT_KIND_READMITTED: _ClassVar[EventKind]
    EVENT_KIND_LEFT: _ClassVar[EventKind]
    EVENT_KIND_ADDRESS_CHANGED: _ClassVar[EventKind]
    EVENT_KIND_REJECTED: _ClassVar[EventKind]
    EVENT_KIND_FAILOVER: _ClassVar[EventKind]
NODE_HEALTH_UNSPECIFIED: NodeHealth
NODE_HEALTH_PENDING: NodeHealth
NODE_HEALTH_HEALTHY: NodeHealth
NODE_HEALTH_SUSPECT: NodeHealth
NODE_HEALTH_EJECTED: NodeHealth
NODE_HEALTH_PROBING: NodeHealth
NODE_HEALTH_REJECTED: NodeHealth
EVENT_KIND_UNSPECIFIED: EventKind
EVENT_KIND_DISCOVERED: EventKind
EVENT_KIND_JOINED: EventKind
EVENT_KIND_STATE_CHANGED: EventKind
EVENT_KIND_EJECTED: EventKind
EVENT_KIND_READMITTED: EventKind
EVENT_KIND_LEFT: EventKind
EVENT_KIND_ADDRESS_CHANGED: EventKind
EVENT_KIND_REJECTED: EventKind
EVENT_KIND_FAILOVER: EventKind

class ListNodesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class FleetNode(_message.Message):
    __slots__ = ("address", "source", "mdns_name", "health", "health_reason", "routable", "consecutive_failures", "ejections", "ejected_for_s", "in_flight", "outstanding_tokens", "routed_total", "failovers_total", "last_status_age_s", "status")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    MDNS_NAME_FIELD_NUMBER: _ClassVar[int]
    HEALTH_FIELD_NUMBER: _ClassVar[int]
    HEALTH_REASON_FIELD_NUMBER: _ClassVar[int]
    ROUTABLE_FIELD_NUMBER: _ClassVar[int]
    CONSECUTIVE_FAILURES_FIELD_NUMBER: _ClassVar[int]
    EJECTIONS_FIELD_NUMBER: _ClassVar[int]
    EJECTED_FOR_S_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    OUTSTANDING_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ROUTED_TOTAL_FIELD_NUMBER: _ClassVar[int]
    FAILOVERS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    LAST_STATUS_AGE_S_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    address: str
    source: str
    mdns_name: str
    health: NodeHealth
    health_reason: str
    routable: bool
    consecutive_failures: int
    ejections: int
    ejected_for_s: float
    in_flight: int
    outstanding_tokens: int
    routed_total: int
    failovers_total: int
    last_status_age_s: float
    status: _node_pb2.NodeStatus
    def __init__(self, address: _Optional[str] = ..., source: _Optional[str] = ..., mdns_name: _Optional[str] = ..., health: _Optional[_Union[NodeHealth, str]] = ..., health_reason: _Optional[str] = ..., routable: _Optional[bool] = ..., consecutive_failures: _Optional[int] = ..., ejections: _Optional[int] = ..., ejected_for_s: _Optional[float] = ..., in_flight: _Optional[int] = ..., outstanding_tokens: _Optional[int] = ..., routed_total: _Optional[int] = ..., failovers_total: _Optional[int] = ..., last_status_age_s: _Optional[float] = ..., status: _Optional[_Union[_node_pb2.NodeStatus, _Mapping]] = ...) -> None: ...

class ListNodesResponse(_message.Message):
    __slots__ = ("nodes", "queued", "in_flight", "coordinator_version")
    NODES_FIELD_NUMBER: _ClassVar[int]
    QUEUED_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    COORDINATOR_VERSION_FIELD_NUMBER: _ClassVar[int]
    nodes: _containers.RepeatedCompositeFieldContainer[FleetNode]
    queued: int
    in_flight: int
    coordinator_version: str
    def __init__(self, nodes: _Optional[_Iterable[_Union[FleetNode, _Mapping]]] = ..., queued: _Optional[int] = ..., in_flight: _Optional[int] = ..., coordinator_version: _Optional[str] = ...) -> None: ...

class WatchEventsRequest(_message.Message):
    __slots__ = ("replay",)
    REPLAY_FIELD_NUMBER: _ClassVar[int]
    replay: bool
    def __init__(self, replay: _Optional[bool] = ...) -> None: ...

class FleetEvent(_message.Message):
    __slots__ = ("seq", "time_unix_s", "kind", "node_id", "address", "reason", "request_id", "to_node_id", "tokens_delivered")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    TIME_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TO_NODE_ID_FIELD_NUMBER: _ClassVar[int]
    TOKENS_DELIVERED_FIELD_NUMBER: _ClassVar[int]
    seq: int
    time_unix_s: float
    kind: EventKind
    node_id: str
    address: str
    reason: str
    request_id: str
    to_node_id: str
    tokens_delivered: int
    def __init__(self, seq: _Optional[int] = ..., time_unix_s: _Optional[float] = ..., kind: _Optional[_Union[EventKind, str]] = ..., node_id: _Optional[str] = ..., address: _Optional[str] = ..., reason: _Optional[str] = ..., request_id: _Optional[str] = ..., to_node_id: _Optional[str] = ..., tokens_delivered: _Optional[int] = ...) -> None: ...
