from studiofleet_client.api.studiofleet.v1 import node_pb2 as _node_pb2
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
    EVENT_KIND_OPERATION: _ClassVar[EventKind]
    EVENT_KIND_ROLLOUT: _ClassVar[EventKind]
    EVENT_KIND_RESTART: _ClassVar[EventKind]
    EVENT_KIND_AUDIT: _ClassVar[EventKind]
    EVENT_KIND_TRAFFIC: _ClassVar[EventKind]

class RolloutState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ROLLOUT_STATE_UNSPECIFIED: _ClassVar[RolloutState]
    ROLLOUT_STATE_RUNNING: _ClassVar[RolloutState]
    ROLLOUT_STATE_PAUSED: _ClassVar[RolloutState]
    ROLLOUT_STATE_SUCCEEDED: _ClassVar[RolloutState]
    ROLLOUT_STATE_FAILED: _ClassVar[RolloutState]
    ROLLOUT_STATE_ABORTED: _ClassVar[RolloutState]
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
EVENT_KIND_OPERATION: EventKind
EVENT_KIND_ROLLOUT: EventKind
EVENT_KIND_RESTART: EventKind
EVENT_KIND_AUDIT: EventKind
EVENT_KIND_TRAFFIC: EventKind
ROLLOUT_STATE_UNSPECIFIED: RolloutState
ROLLOUT_STATE_RUNNING: RolloutState
ROLLOUT_STATE_PAUSED: RolloutState
ROLLOUT_STATE_SUCCEEDED: RolloutState
ROLLOUT_STATE_FAILED: RolloutState
ROLLOUT_STATE_ABORTED: RolloutState

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
    __slots__ = ("seq", "time_unix_s", "kind", "node_id", "address", "reason", "request_id", "to_node_id", "tokens_delivered", "rollout_id", "step")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    TIME_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TO_NODE_ID_FIELD_NUMBER: _ClassVar[int]
    TOKENS_DELIVERED_FIELD_NUMBER: _ClassVar[int]
    ROLLOUT_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    seq: int
    time_unix_s: float
    kind: EventKind
    node_id: str
    address: str
    reason: str
    request_id: str
    to_node_id: str
    tokens_delivered: int
    rollout_id: str
    step: str
    def __init__(self, seq: _Optional[int] = ..., time_unix_s: _Optional[float] = ..., kind: _Optional[_Union[EventKind, str]] = ..., node_id: _Optional[str] = ..., address: _Optional[str] = ..., reason: _Optional[str] = ..., request_id: _Optional[str] = ..., to_node_id: _Optional[str] = ..., tokens_delivered: _Optional[int] = ..., rollout_id: _Optional[str] = ..., step: _Optional[str] = ...) -> None: ...

class CordonNodeRequest(_message.Message):
    __slots__ = ("node_id", "cordoned", "operation_id", "reason")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    CORDONED_FIELD_NUMBER: _ClassVar[int]
    OPERATION_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    cordoned: bool
    operation_id: str
    reason: str
    def __init__(self, node_id: _Optional[str] = ..., cordoned: _Optional[bool] = ..., operation_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class DrainNodeRequest(_message.Message):
    __slots__ = ("node_id", "timeout_s", "operation_id", "reason")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    OPERATION_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    timeout_s: float
    operation_id: str
    reason: str
    def __init__(self, node_id: _Optional[str] = ..., timeout_s: _Optional[float] = ..., operation_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class NodeOperationReply(_message.Message):
    __slots__ = ("node_id", "operation", "status")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    OPERATION_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    operation: _node_pb2.Operation
    status: _node_pb2.NodeStatus
    def __init__(self, node_id: _Optional[str] = ..., operation: _Optional[_Union[_node_pb2.Operation, _Mapping]] = ..., status: _Optional[_Union[_node_pb2.NodeStatus, _Mapping]] = ...) -> None: ...

class RolloutTarget(_message.Message):
    __slots__ = ("model_path", "model_id", "version", "weights_digest", "shared_path", "restart")
    MODEL_PATH_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_DIGEST_FIELD_NUMBER: _ClassVar[int]
    SHARED_PATH_FIELD_NUMBER: _ClassVar[int]
    RESTART_FIELD_NUMBER: _ClassVar[int]
    model_path: str
    model_id: str
    version: str
    weights_digest: str
    shared_path: bool
    restart: bool
    def __init__(self, model_path: _Optional[str] = ..., model_id: _Optional[str] = ..., version: _Optional[str] = ..., weights_digest: _Optional[str] = ..., shared_path: _Optional[bool] = ..., restart: _Optional[bool] = ...) -> None: ...

class StartRolloutRequest(_message.Message):
    __slots__ = ("target", "max_unavailable", "node_ids", "rollout_id", "drain_timeout_s", "engine", "rename_model", "wait_timeout_s")
    TARGET_FIELD_NUMBER: _ClassVar[int]
    MAX_UNAVAILABLE_FIELD_NUMBER: _ClassVar[int]
    NODE_IDS_FIELD_NUMBER: _ClassVar[int]
    ROLLOUT_ID_FIELD_NUMBER: _ClassVar[int]
    DRAIN_TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    ENGINE_FIELD_NUMBER: _ClassVar[int]
    RENAME_MODEL_FIELD_NUMBER: _ClassVar[int]
    WAIT_TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    target: RolloutTarget
    max_unavailable: int
    node_ids: _containers.RepeatedScalarFieldContainer[str]
    rollout_id: str
    drain_timeout_s: float
    engine: str
    rename_model: bool
    wait_timeout_s: float
    def __init__(self, target: _Optional[_Union[RolloutTarget, _Mapping]] = ..., max_unavailable: _Optional[int] = ..., node_ids: _Optional[_Iterable[str]] = ..., rollout_id: _Optional[str] = ..., drain_timeout_s: _Optional[float] = ..., engine: _Optional[str] = ..., rename_model: _Optional[bool] = ..., wait_timeout_s: _Optional[float] = ...) -> None: ...

class GetRolloutRequest(_message.Message):
    __slots__ = ("rollout_id",)
    ROLLOUT_ID_FIELD_NUMBER: _ClassVar[int]
    rollout_id: str
    def __init__(self, rollout_id: _Optional[str] = ...) -> None: ...

class RolloutControl(_message.Message):
    __slots__ = ("rollout_id",)
    ROLLOUT_ID_FIELD_NUMBER: _ClassVar[int]
    rollout_id: str
    def __init__(self, rollout_id: _Optional[str] = ...) -> None: ...

class RolloutNode(_message.Message):
    __slots__ = ("node_id", "step", "from_digest", "message", "started_unix_s", "finished_unix_s", "bytes_done", "bytes_total")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    FROM_DIGEST_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    STARTED_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    FINISHED_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    BYTES_DONE_FIELD_NUMBER: _ClassVar[int]
    BYTES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    step: str
    from_digest: str
    message: str
    started_unix_s: float
    finished_unix_s: float
    bytes_done: int
    bytes_total: int
    def __init__(self, node_id: _Optional[str] = ..., step: _Optional[str] = ..., from_digest: _Optional[str] = ..., message: _Optional[str] = ..., started_unix_s: _Optional[float] = ..., finished_unix_s: _Optional[float] = ..., bytes_done: _Optional[int] = ..., bytes_total: _Optional[int] = ...) -> None: ...

class Rollout(_message.Message):
    __slots__ = ("rollout_id", "state", "target", "max_unavailable", "nodes", "message", "created_unix_s", "updated_unix_s", "owner", "started_by")
    ROLLOUT_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    MAX_UNAVAILABLE_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    UPDATED_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    STARTED_BY_FIELD_NUMBER: _ClassVar[int]
    rollout_id: str
    state: RolloutState
    target: RolloutTarget
    max_unavailable: int
    nodes: _containers.RepeatedCompositeFieldContainer[RolloutNode]
    message: str
    created_unix_s: float
    updated_unix_s: float
    owner: str
    started_by: str
    def __init__(self, rollout_id: _Optional[str] = ..., state: _Optional[_Union[RolloutState, str]] = ..., target: _Optional[_Union[RolloutTarget, _Mapping]] = ..., max_unavailable: _Optional[int] = ..., nodes: _Optional[_Iterable[_Union[RolloutNode, _Mapping]]] = ..., message: _Optional[str] = ..., created_unix_s: _Optional[float] = ..., updated_unix_s: _Optional[float] = ..., owner: _Optional[str] = ..., started_by: _Optional[str] = ...) -> None: ...

class ListRequestsRequest(_message.Message):
    __slots__ = ("since_s", "slow_only", "failed_only", "caller", "limit", "rejected_only")
    SINCE_S_FIELD_NUMBER: _ClassVar[int]
    SLOW_ONLY_FIELD_NUMBER: _ClassVar[int]
    FAILED_ONLY_FIELD_NUMBER: _ClassVar[int]
    CALLER_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    REJECTED_ONLY_FIELD_NUMBER: _ClassVar[int]
    since_s: float
    slow_only: bool
    failed_only: bool
    caller: str
    limit: int
    rejected_only: bool
    def __init__(self, since_s: _Optional[float] = ..., slow_only: _Optional[bool] = ..., failed_only: _Optional[bool] = ..., caller: _Optional[str] = ..., limit: _Optional[int] = ..., rejected_only: _Optional[bool] = ...) -> None: ...

class RequestRecord(_message.Message):
    __slots__ = ("request_id", "caller", "started_at", "ended_at", "outcome", "code", "queue_ms", "ttft_ms", "decode_ms", "latency_ms", "prompt_tokens", "completion_tokens", "nodes", "failovers", "retries", "restarts", "finish_reason", "quality_score", "priority", "template", "output_format", "schema_valid", "quality_parts")
    class QualityPartsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CALLER_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    ENDED_AT_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    TTFT_MS_FIELD_NUMBER: _ClassVar[int]
    DECODE_MS_FIELD_NUMBER: _ClassVar[int]
    LATENCY_MS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    FAILOVERS_FIELD_NUMBER: _ClassVar[int]
    RETRIES_FIELD_NUMBER: _ClassVar[int]
    RESTARTS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    QUALITY_SCORE_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    TEMPLATE_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FORMAT_FIELD_NUMBER: _ClassVar[int]
    SCHEMA_VALID_FIELD_NUMBER: _ClassVar[int]
    QUALITY_PARTS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    caller: str
    started_at: float
    ended_at: float
    outcome: str
    code: str
    queue_ms: float
    ttft_ms: float
    decode_ms: float
    latency_ms: float
    prompt_tokens: int
    completion_tokens: int
    nodes: _containers.RepeatedScalarFieldContainer[str]
    failovers: int
    retries: int
    restarts: int
    finish_reason: str
    quality_score: float
    priority: str
    template: str
    output_format: str
    schema_valid: bool
    quality_parts: _containers.ScalarMap[str, float]
    def __init__(self, request_id: _Optional[str] = ..., caller: _Optional[str] = ..., started_at: _Optional[float] = ..., ended_at: _Optional[float] = ..., outcome: _Optional[str] = ..., code: _Optional[str] = ..., queue_ms: _Optional[float] = ..., ttft_ms: _Optional[float] = ..., decode_ms: _Optional[float] = ..., latency_ms: _Optional[float] = ..., prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ..., nodes: _Optional[_Iterable[str]] = ..., failovers: _Optional[int] = ..., retries: _Optional[int] = ..., restarts: _Optional[int] = ..., finish_reason: _Optional[str] = ..., quality_score: _Optional[float] = ..., priority: _Optional[str] = ..., template: _Optional[str] = ..., output_format: _Optional[str] = ..., schema_valid: _Optional[bool] = ..., quality_parts: _Optional[_Mapping[str, float]] = ...) -> None: ...

class ListRequestsResponse(_message.Message):
    __slots__ = ("requests", "matched", "slow_ttft_ms", "slow_latency_ms", "retention_days")
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    MATCHED_FIELD_NUMBER: _ClassVar[int]
    SLOW_TTFT_MS_FIELD_NUMBER: _ClassVar[int]
    SLOW_LATENCY_MS_FIELD_NUMBER: _ClassVar[int]
    RETENTION_DAYS_FIELD_NUMBER: _ClassVar[int]
    requests: _containers.RepeatedCompositeFieldContainer[RequestRecord]
    matched: int
    slow_ttft_ms: float
    slow_latency_ms: float
    retention_days: float
    def __init__(self, requests: _Optional[_Iterable[_Union[RequestRecord, _Mapping]]] = ..., matched: _Optional[int] = ..., slow_ttft_ms: _Optional[float] = ..., slow_latency_ms: _Optional[float] = ..., retention_days: _Optional[float] = ...) -> None: ...

class GetTrafficRequest(_message.Message):
    __slots__ = ("window_s", "bucket_s")
    WINDOW_S_FIELD_NUMBER: _ClassVar[int]
    BUCKET_S_FIELD_NUMBER: _ClassVar[int]
    window_s: int
    bucket_s: int
    def __init__(self, window_s: _Optional[int] = ..., bucket_s: _Optional[int] = ...) -> None: ...

class TrafficBucket(_message.Message):
    __slots__ = ("start", "requests", "errors", "tokens", "ttft_p50_ms", "ttft_p95_ms", "latency_p95_ms", "itl_p50_ms", "rejected")
    START_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    TTFT_P50_MS_FIELD_NUMBER: _ClassVar[int]
    TTFT_P95_MS_FIELD_NUMBER: _ClassVar[int]
    LATENCY_P95_MS_FIELD_NUMBER: _ClassVar[int]
    ITL_P50_MS_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    start: float
    requests: int
    errors: int
    tokens: int
    ttft_p50_ms: float
    ttft_p95_ms: float
    latency_p95_ms: float
    itl_p50_ms: float
    rejected: int
    def __init__(self, start: _Optional[float] = ..., requests: _Optional[int] = ..., errors: _Optional[int] = ..., tokens: _Optional[int] = ..., ttft_p50_ms: _Optional[float] = ..., ttft_p95_ms: _Optional[float] = ..., latency_p95_ms: _Optional[float] = ..., itl_p50_ms: _Optional[float] = ..., rejected: _Optional[int] = ...) -> None: ...

class Traffic(_message.Message):
    __slots__ = ("bucket_s", "buckets", "running", "queued", "tokens_per_s", "headroom", "classes")
    BUCKET_S_FIELD_NUMBER: _ClassVar[int]
    BUCKETS_FIELD_NUMBER: _ClassVar[int]
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    QUEUED_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_S_FIELD_NUMBER: _ClassVar[int]
    HEADROOM_FIELD_NUMBER: _ClassVar[int]
    CLASSES_FIELD_NUMBER: _ClassVar[int]
    bucket_s: int
    buckets: _containers.RepeatedCompositeFieldContainer[TrafficBucket]
    running: int
    queued: int
    tokens_per_s: float
    headroom: Headroom
    classes: _containers.RepeatedCompositeFieldContainer[TrafficClass]
    def __init__(self, bucket_s: _Optional[int] = ..., buckets: _Optional[_Iterable[_Union[TrafficBucket, _Mapping]]] = ..., running: _Optional[int] = ..., queued: _Optional[int] = ..., tokens_per_s: _Optional[float] = ..., headroom: _Optional[_Union[Headroom, _Mapping]] = ..., classes: _Optional[_Iterable[_Union[TrafficClass, _Mapping]]] = ...) -> None: ...

class Headroom(_message.Message):
    __slots__ = ("known", "arrival_rate_per_s", "predicted_p95_s", "sla_p95_s", "sla_rate_per_s", "capacity_per_s", "profiled_nodes", "unprofiled_nodes", "window_s", "mix")
    KNOWN_FIELD_NUMBER: _ClassVar[int]
    ARRIVAL_RATE_PER_S_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_P95_S_FIELD_NUMBER: _ClassVar[int]
    SLA_P95_S_FIELD_NUMBER: _ClassVar[int]
    SLA_RATE_PER_S_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_PER_S_FIELD_NUMBER: _ClassVar[int]
    PROFILED_NODES_FIELD_NUMBER: _ClassVar[int]
    UNPROFILED_NODES_FIELD_NUMBER: _ClassVar[int]
    WINDOW_S_FIELD_NUMBER: _ClassVar[int]
    MIX_FIELD_NUMBER: _ClassVar[int]
    known: bool
    arrival_rate_per_s: float
    predicted_p95_s: float
    sla_p95_s: float
    sla_rate_per_s: float
    capacity_per_s: float
    profiled_nodes: int
    unprofiled_nodes: int
    window_s: float
    mix: str
    def __init__(self, known: _Optional[bool] = ..., arrival_rate_per_s: _Optional[float] = ..., predicted_p95_s: _Optional[float] = ..., sla_p95_s: _Optional[float] = ..., sla_rate_per_s: _Optional[float] = ..., capacity_per_s: _Optional[float] = ..., profiled_nodes: _Optional[int] = ..., unprofiled_nodes: _Optional[int] = ..., window_s: _Optional[float] = ..., mix: _Optional[str] = ...) -> None: ...

class OpenDashboardRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DashboardLink(_message.Message):
    __slots__ = ("url", "expires_in_s")
    URL_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_IN_S_FIELD_NUMBER: _ClassVar[int]
    url: str
    expires_in_s: float
    def __init__(self, url: _Optional[str] = ..., expires_in_s: _Optional[float] = ...) -> None: ...

class ApiToken(_message.Message):
    __slots__ = ("id", "name", "role", "created_unix_s", "expires_unix_s", "revoked_unix_s", "created_by", "revoked_reason")
    ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    REVOKED_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    CREATED_BY_FIELD_NUMBER: _ClassVar[int]
    REVOKED_REASON_FIELD_NUMBER: _ClassVar[int]
    id: str
    name: str
    role: str
    created_unix_s: float
    expires_unix_s: float
    revoked_unix_s: float
    created_by: str
    revoked_reason: str
    def __init__(self, id: _Optional[str] = ..., name: _Optional[str] = ..., role: _Optional[str] = ..., created_unix_s: _Optional[float] = ..., expires_unix_s: _Optional[float] = ..., revoked_unix_s: _Optional[float] = ..., created_by: _Optional[str] = ..., revoked_reason: _Optional[str] = ...) -> None: ...

class IssueApiTokenRequest(_message.Message):
    __slots__ = ("name", "role", "ttl_s")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    TTL_S_FIELD_NUMBER: _ClassVar[int]
    name: str
    role: str
    ttl_s: float
    def __init__(self, name: _Optional[str] = ..., role: _Optional[str] = ..., ttl_s: _Optional[float] = ...) -> None: ...

class ApiTokenIssued(_message.Message):
    __slots__ = ("token", "secret")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    SECRET_FIELD_NUMBER: _ClassVar[int]
    token: ApiToken
    secret: str
    def __init__(self, token: _Optional[_Union[ApiToken, _Mapping]] = ..., secret: _Optional[str] = ...) -> None: ...

class RevokeApiTokenRequest(_message.Message):
    __slots__ = ("id", "reason")
    ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    id: str
    reason: str
    def __init__(self, id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class ListApiTokensRequest(_message.Message):
    __slots__ = ("all",)
    ALL_FIELD_NUMBER: _ClassVar[int]
    all: bool
    def __init__(self, all: _Optional[bool] = ...) -> None: ...

class ListApiTokensResponse(_message.Message):
    __slots__ = ("tokens",)
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    tokens: _containers.RepeatedCompositeFieldContainer[ApiToken]
    def __init__(self, tokens: _Optional[_Iterable[_Union[ApiToken, _Mapping]]] = ...) -> None: ...

class TrafficPolicy(_message.Message):
    __slots__ = ("model", "weights", "overflow")
    class WeightsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    MODEL_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    OVERFLOW_FIELD_NUMBER: _ClassVar[int]
    model: str
    weights: _containers.ScalarMap[str, int]
    overflow: str
    def __init__(self, model: _Optional[str] = ..., weights: _Optional[_Mapping[str, int]] = ..., overflow: _Optional[str] = ...) -> None: ...

class SetTrafficPolicyRequest(_message.Message):
    __slots__ = ("policy", "clear")
    POLICY_FIELD_NUMBER: _ClassVar[int]
    CLEAR_FIELD_NUMBER: _ClassVar[int]
    policy: TrafficPolicy
    clear: bool
    def __init__(self, policy: _Optional[_Union[TrafficPolicy, _Mapping]] = ..., clear: _Optional[bool] = ...) -> None: ...

class GetTrafficPoliciesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TrafficClass(_message.Message):
    __slots__ = ("node_class", "routed_total", "routed_recent", "share", "routable_nodes", "window_s")
    NODE_CLASS_FIELD_NUMBER: _ClassVar[int]
    ROUTED_TOTAL_FIELD_NUMBER: _ClassVar[int]
    ROUTED_RECENT_FIELD_NUMBER: _ClassVar[int]
    SHARE_FIELD_NUMBER: _ClassVar[int]
    ROUTABLE_NODES_FIELD_NUMBER: _ClassVar[int]
    WINDOW_S_FIELD_NUMBER: _ClassVar[int]
    node_class: str
    routed_total: int
    routed_recent: int
    share: float
    routable_nodes: int
    window_s: float
    def __init__(self, node_class: _Optional[str] = ..., routed_total: _Optional[int] = ..., routed_recent: _Optional[int] = ..., share: _Optional[float] = ..., routable_nodes: _Optional[int] = ..., window_s: _Optional[float] = ...) -> None: ...

class TrafficPolicyState(_message.Message):
    __slots__ = ("policy", "set_by", "set_unix_s", "overflow_active", "overflow_signal", "predicted_p95_s", "queue_wait_s", "overflow_share", "arrival_rate_per_s", "sla_rate_per_s", "overflow_since_unix_s", "overflow_episodes", "overflow_routed_total", "fallbacks_total", "reason")
    POLICY_FIELD_NUMBER: _ClassVar[int]
    SET_BY_FIELD_NUMBER: _ClassVar[int]
    SET_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    OVERFLOW_ACTIVE_FIELD_NUMBER: _ClassVar[int]
    OVERFLOW_SIGNAL_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_P95_S_FIELD_NUMBER: _ClassVar[int]
    QUEUE_WAIT_S_FIELD_NUMBER: _ClassVar[int]
    OVERFLOW_SHARE_FIELD_NUMBER: _ClassVar[int]
    ARRIVAL_RATE_PER_S_FIELD_NUMBER: _ClassVar[int]
    SLA_RATE_PER_S_FIELD_NUMBER: _ClassVar[int]
    OVERFLOW_SINCE_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    OVERFLOW_EPISODES_FIELD_NUMBER: _ClassVar[int]
    OVERFLOW_ROUTED_TOTAL_FIELD_NUMBER: _ClassVar[int]
    FALLBACKS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    policy: TrafficPolicy
    set_by: str
    set_unix_s: float
    overflow_active: bool
    overflow_signal: str
    predicted_p95_s: float
    queue_wait_s: float
    overflow_share: float
    arrival_rate_per_s: float
    sla_rate_per_s: float
    overflow_since_unix_s: float
    overflow_episodes: int
    overflow_routed_total: int
    fallbacks_total: int
    reason: str
    def __init__(self, policy: _Optional[_Union[TrafficPolicy, _Mapping]] = ..., set_by: _Optional[str] = ..., set_unix_s: _Optional[float] = ..., overflow_active: _Optional[bool] = ..., overflow_signal: _Optional[str] = ..., predicted_p95_s: _Optional[float] = ..., queue_wait_s: _Optional[float] = ..., overflow_share: _Optional[float] = ..., arrival_rate_per_s: _Optional[float] = ..., sla_rate_per_s: _Optional[float] = ..., overflow_since_unix_s: _Optional[float] = ..., overflow_episodes: _Optional[int] = ..., overflow_routed_total: _Optional[int] = ..., fallbacks_total: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class TrafficPolicies(_message.Message):
    __slots__ = ("policies", "classes", "sla_p95_s", "overflow_window_s", "overflow_hold_s", "overflow_queue_wait_s")
    POLICIES_FIELD_NUMBER: _ClassVar[int]
    CLASSES_FIELD_NUMBER: _ClassVar[int]
    SLA_P95_S_FIELD_NUMBER: _ClassVar[int]
    OVERFLOW_WINDOW_S_FIELD_NUMBER: _ClassVar[int]
    OVERFLOW_HOLD_S_FIELD_NUMBER: _ClassVar[int]
    OVERFLOW_QUEUE_WAIT_S_FIELD_NUMBER: _ClassVar[int]
    policies: _containers.RepeatedCompositeFieldContainer[TrafficPolicyState]
    classes: _containers.RepeatedCompositeFieldContainer[TrafficClass]
    sla_p95_s: float
    overflow_window_s: float
    overflow_hold_s: float
    overflow_queue_wait_s: float
    def __init__(self, policies: _Optional[_Iterable[_Union[TrafficPolicyState, _Mapping]]] = ..., classes: _Optional[_Iterable[_Union[TrafficClass, _Mapping]]] = ..., sla_p95_s: _Optional[float] = ..., overflow_window_s: _Optional[float] = ..., overflow_hold_s: _Optional[float] = ..., overflow_queue_wait_s: _Optional[float] = ...) -> None: ...
