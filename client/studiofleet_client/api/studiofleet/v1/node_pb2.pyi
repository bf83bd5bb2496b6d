from studiofleet_client.api.studiofleet.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class OperationState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OPERATION_STATE_UNSPECIFIED: _ClassVar[OperationState]
    OPERATION_STATE_RUNNING: _ClassVar[OperationState]
    OPERATION_STATE_DONE: _ClassVar[OperationState]
    OPERATION_STATE_FAILED: _ClassVar[OperationState]

class StageState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STAGE_STATE_UNSPECIFIED: _ClassVar[StageState]
    STAGE_STATE_RECEIVING: _ClassVar[StageState]
    STAGE_STATE_VERIFYING: _ClassVar[StageState]
    STAGE_STATE_STAGED: _ClassVar[StageState]
    STAGE_STATE_FAILED: _ClassVar[StageState]
OPERATION_STATE_UNSPECIFIED: OperationState
OPERATION_STATE_RUNNING: OperationState
OPERATION_STATE_DONE: OperationState
OPERATION_STATE_FAILED: OperationState
STAGE_STATE_UNSPECIFIED: StageState
STAGE_STATE_RECEIVING: StageState
STAGE_STATE_VERIFYING: StageState
STAGE_STATE_STAGED: StageState
STAGE_STATE_FAILED: StageState

class GetStatusRequest(_message.Message):
    __slots__ = ("audit_head",)
    AUDIT_HEAD_FIELD_NUMBER: _ClassVar[int]
    audit_head: _common_pb2.AuditHead
    def __init__(self, audit_head: _Optional[_Union[_common_pb2.AuditHead, _Mapping]] = ...) -> None: ...

class Capacity(_message.Message):
    __slots__ = ("max_running", "max_queued", "max_tokens_per_request", "max_prompt_tokens")
    MAX_RUNNING_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUED_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_PER_REQUEST_FIELD_NUMBER: _ClassVar[int]
    MAX_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    max_running: int
    max_queued: int
    max_tokens_per_request: int
    max_prompt_tokens: int
    def __init__(self, max_running: _Optional[int] = ..., max_queued: _Optional[int] = ..., max_tokens_per_request: _Optional[int] = ..., max_prompt_tokens: _Optional[int] = ...) -> None: ...

class Load(_message.Message):
    __slots__ = ("running", "queued", "queued_prompt_tokens", "tokens_generated_total", "prompt_tokens_total", "requests_accepted_total", "requests_completed_total", "requests_cancelled_total", "requests_deadline_total", "requests_failed_total", "requests_rejected_total", "decode_tokens_per_s", "engine_sequences", "engine_waiting", "prompt_cache_entries", "prompt_cache_bytes", "cached_prompt_tokens_total", "kv_cache_usage")
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    QUEUED_FIELD_NUMBER: _ClassVar[int]
    QUEUED_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_GENERATED_TOTAL_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_ACCEPTED_TOTAL_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_COMPLETED_TOTAL_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_CANCELLED_TOTAL_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_DEADLINE_TOTAL_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FAILED_TOTAL_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_REJECTED_TOTAL_FIELD_NUMBER: _ClassVar[int]
    DECODE_TOKENS_PER_S_FIELD_NUMBER: _ClassVar[int]
    ENGINE_SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    ENGINE_WAITING_FIELD_NUMBER: _ClassVar[int]
    PROMPT_CACHE_ENTRIES_FIELD_NUMBER: _ClassVar[int]
    PROMPT_CACHE_BYTES_FIELD_NUMBER: _ClassVar[int]
    CACHED_PROMPT_TOKENS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    KV_CACHE_USAGE_FIELD_NUMBER: _ClassVar[int]
    running: int
    queued: int
    queued_prompt_tokens: int
    tokens_generated_total: int
    prompt_tokens_total: int
    requests_accepted_total: int
    requests_completed_total: int
    requests_cancelled_total: int
    requests_deadline_total: int
    requests_failed_total: int
    requests_rejected_total: int
    decode_tokens_per_s: float
    engine_sequences: int
    engine_waiting: int
    prompt_cache_entries: int
    prompt_cache_bytes: int
    cached_prompt_tokens_total: int
    kv_cache_usage: float
    def __init__(self, running: _Optional[int] = ..., queued: _Optional[int] = ..., queued_prompt_tokens: _Optional[int] = ..., tokens_generated_total: _Optional[int] = ..., prompt_tokens_total: _Optional[int] = ..., requests_accepted_total: _Optional[int] = ..., requests_completed_total: _Optional[int] = ..., requests_cancelled_total: _Optional[int] = ..., requests_deadline_total: _Optional[int] = ..., requests_failed_total: _Optional[int] = ..., requests_rejected_total: _Optional[int] = ..., decode_tokens_per_s: _Optional[float] = ..., engine_sequences: _Optional[int] = ..., engine_waiting: _Optional[int] = ..., prompt_cache_entries: _Optional[int] = ..., prompt_cache_bytes: _Optional[int] = ..., cached_prompt_tokens_total: _Optional[int] = ..., kv_cache_usage: _Optional[float] = ...) -> None: ...

class Memory(_message.Message):
    __slots__ = ("total_bytes", "available_bytes", "process_rss_bytes", "engine_active_bytes", "engine_peak_bytes", "unified", "gpu_recommended_working_set_bytes", "gpus")
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_BYTES_FIELD_NUMBER: _ClassVar[int]
    PROCESS_RSS_BYTES_FIELD_NUMBER: _ClassVar[int]
    ENGINE_ACTIVE_BYTES_FIELD_NUMBER: _ClassVar[int]
    ENGINE_PEAK_BYTES_FIELD_NUMBER: _ClassVar[int]
    UNIFIED_FIELD_NUMBER: _ClassVar[int]
    GPU_RECOMMENDED_WORKING_SET_BYTES_FIELD_NUMBER: _ClassVar[int]
    GPUS_FIELD_NUMBER: _ClassVar[int]
    total_bytes: int
    available_bytes: int
    process_rss_bytes: int
    engine_active_bytes: int
    engine_peak_bytes: int
    unified: bool
    gpu_recommended_working_set_bytes: int
    gpus: _containers.RepeatedCompositeFieldContainer[Gpu]
    def __init__(self, total_bytes: _Optional[int] = ..., available_bytes: _Optional[int] = ..., process_rss_bytes: _Optional[int] = ..., engine_active_bytes: _Optional[int] = ..., engine_peak_bytes: _Optional[int] = ..., unified: _Optional[bool] = ..., gpu_recommended_working_set_bytes: _Optional[int] = ..., gpus: _Optional[_Iterable[_Union[Gpu, _Mapping]]] = ...) -> None: ...

class Gpu(_message.Message):
    __slots__ = ("index", "name", "memory_used_bytes", "memory_total_bytes", "utilization")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    MEMORY_USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    UTILIZATION_FIELD_NUMBER: _ClassVar[int]
    index: int
    name: str
    memory_used_bytes: int
    memory_total_bytes: int
    utilization: float
    def __init__(self, index: _Optional[int] = ..., name: _Optional[str] = ..., memory_used_bytes: _Optional[int] = ..., memory_total_bytes: _Optional[int] = ..., utilization: _Optional[float] = ...) -> None: ...

class EngineServer(_message.Message):
    __slots__ = ("pid", "url", "restarts", "last_exit", "up_s")
    PID_FIELD_NUMBER: _ClassVar[int]
    URL_FIELD_NUMBER: _ClassVar[int]
    RESTARTS_FIELD_NUMBER: _ClassVar[int]
    LAST_EXIT_FIELD_NUMBER: _ClassVar[int]
    UP_S_FIELD_NUMBER: _ClassVar[int]
    pid: int
    url: str
    restarts: int
    last_exit: str
    up_s: float
    def __init__(self, pid: _Optional[int] = ..., url: _Optional[str] = ..., restarts: _Optional[int] = ..., last_exit: _Optional[str] = ..., up_s: _Optional[float] = ...) -> None: ...

class NodeStatus(_message.Message):
    __slots__ = ("node_id", "lifecycle", "lifecycle_reason", "cordoned", "model", "capacity", "load", "memory", "uptime_s", "agent_version", "api_version", "hostname", "cpu_load_1m", "staged", "previous_model", "drain_deadline_left_s", "operations", "engine_server", "fencing_token", "audit_heads", "chip", "cpu_cores", "phi_allowed", "node_class", "group")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    LIFECYCLE_FIELD_NUMBER: _ClassVar[int]
    LIFECYCLE_REASON_FIELD_NUMBER: _ClassVar[int]
    CORDONED_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    MEMORY_FIELD_NUMBER: _ClassVar[int]
    UPTIME_S_FIELD_NUMBER: _ClassVar[int]
    AGENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    API_VERSION_FIELD_NUMBER: _ClassVar[int]
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    CPU_LOAD_1M_FIELD_NUMBER: _ClassVar[int]
    STAGED_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_MODEL_FIELD_NUMBER: _ClassVar[int]
    DRAIN_DEADLINE_LEFT_S_FIELD_NUMBER: _ClassVar[int]
    OPERATIONS_FIELD_NUMBER: _ClassVar[int]
    ENGINE_SERVER_FIELD_NUMBER: _ClassVar[int]
    FENCING_TOKEN_FIELD_NUMBER: _ClassVar[int]
    AUDIT_HEADS_FIELD_NUMBER: _ClassVar[int]
    CHIP_FIELD_NUMBER: _ClassVar[int]
    CPU_CORES_FIELD_NUMBER: _ClassVar[int]
    PHI_ALLOWED_FIELD_NUMBER: _ClassVar[int]
    NODE_CLASS_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    lifecycle: _common_pb2.Lifecycle
    lifecycle_reason: str
    cordoned: bool
    model: _common_pb2.ModelInfo
    capacity: Capacity
    load: Load
    memory: Memory
    uptime_s: float
    agent_version: str
    api_version: str
    hostname: str
    cpu_load_1m: float
    staged: _containers.RepeatedCompositeFieldContainer[StagedModel]
    previous_model: _common_pb2.ModelInfo
    drain_deadline_left_s: float
    operations: _containers.RepeatedCompositeFieldContainer[Operation]
    engine_server: EngineServer
    fencing_token: int
    audit_heads: _containers.RepeatedCompositeFieldContainer[_common_pb2.AuditHead]
    chip: str
    cpu_cores: int
    phi_allowed: bool
    node_class: str
    group: NodeGroup
    def __init__(self, node_id: _Optional[str] = ..., lifecycle: _Optional[_Union[_common_pb2.Lifecycle, str]] = ..., lifecycle_reason: _Optional[str] = ..., cordoned: _Optional[bool] = ..., model: _Optional[_Union[_common_pb2.ModelInfo, _Mapping]] = ..., capacity: _Optional[_Union[Capacity, _Mapping]] = ..., load: _Optional[_Union[Load, _Mapping]] = ..., memory: _Optional[_Union[Memory, _Mapping]] = ..., uptime_s: _Optional[float] = ..., agent_version: _Optional[str] = ..., api_version: _Optional[str] = ..., hostname: _Optional[str] = ..., cpu_load_1m: _Optional[float] = ..., staged: _Optional[_Iterable[_Union[StagedModel, _Mapping]]] = ..., previous_model: _Optional[_Union[_common_pb2.ModelInfo, _Mapping]] = ..., drain_deadline_left_s: _Optional[float] = ..., operations: _Optional[_Iterable[_Union[Operation, _Mapping]]] = ..., engine_server: _Optional[_Union[EngineServer, _Mapping]] = ..., fencing_token: _Optional[int] = ..., audit_heads: _Optional[_Iterable[_Union[_common_pb2.AuditHead, _Mapping]]] = ..., chip: _Optional[str] = ..., cpu_cores: _Optional[int] = ..., phi_allowed: _Optional[bool] = ..., node_class: _Optional[str] = ..., group: _Optional[_Union[NodeGroup, _Mapping]] = ...) -> None: ...

class NodeGroup(_message.Message):
    __slots__ = ("size", "rank", "mode", "backend", "ranks", "model_digest")
    SIZE_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    RANKS_FIELD_NUMBER: _ClassVar[int]
    MODEL_DIGEST_FIELD_NUMBER: _ClassVar[int]
    size: int
    rank: int
    mode: str
    backend: str
    ranks: _containers.RepeatedCompositeFieldContainer[GroupRank]
    model_digest: str
    def __init__(self, size: _Optional[int] = ..., rank: _Optional[int] = ..., mode: _Optional[str] = ..., backend: _Optional[str] = ..., ranks: _Optional[_Iterable[_Union[GroupRank, _Mapping]]] = ..., model_digest: _Optional[str] = ...) -> None: ...

class GroupRank(_message.Message):
    __slots__ = ("rank", "address", "hostname", "health", "last_heard_s", "memory_total_bytes", "memory_available_bytes", "process_rss_bytes")
    RANK_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    HEALTH_FIELD_NUMBER: _ClassVar[int]
    LAST_HEARD_S_FIELD_NUMBER: _ClassVar[int]
    MEMORY_TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_AVAILABLE_BYTES_FIELD_NUMBER: _ClassVar[int]
    PROCESS_RSS_BYTES_FIELD_NUMBER: _ClassVar[int]
    rank: int
    address: str
    hostname: str
    health: str
    last_heard_s: float
    memory_total_bytes: int
    memory_available_bytes: int
    process_rss_bytes: int
    def __init__(self, rank: _Optional[int] = ..., address: _Optional[str] = ..., hostname: _Optional[str] = ..., health: _Optional[str] = ..., last_heard_s: _Optional[float] = ..., memory_total_bytes: _Optional[int] = ..., memory_available_bytes: _Optional[int] = ..., process_rss_bytes: _Optional[int] = ...) -> None: ...

class Operation(_message.Message):
    __slots__ = ("operation_id", "kind", "state", "message", "started_unix_s", "finished_unix_s")
    OPERATION_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    STARTED_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    FINISHED_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    operation_id: str
    kind: str
    state: OperationState
    message: str
    started_unix_s: float
    finished_unix_s: float
    def __init__(self, operation_id: _Optional[str] = ..., kind: _Optional[str] = ..., state: _Optional[_Union[OperationState, str]] = ..., message: _Optional[str] = ..., started_unix_s: _Optional[float] = ..., finished_unix_s: _Optional[float] = ...) -> None: ...

class OperationReply(_message.Message):
    __slots__ = ("operation", "status")
    OPERATION_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    operation: Operation
    status: NodeStatus
    def __init__(self, operation: _Optional[_Union[Operation, _Mapping]] = ..., status: _Optional[_Union[NodeStatus, _Mapping]] = ...) -> None: ...

class CordonRequest(_message.Message):
    __slots__ = ("operation_id", "cordoned", "reason", "fencing_token")
    OPERATION_ID_FIELD_NUMBER: _ClassVar[int]
    CORDONED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    FENCING_TOKEN_FIELD_NUMBER: _ClassVar[int]
    operation_id: str
    cordoned: bool
    reason: str
    fencing_token: int
    def __init__(self, operation_id: _Optional[str] = ..., cordoned: _Optional[bool] = ..., reason: _Optional[str] = ..., fencing_token: _Optional[int] = ...) -> None: ...

class DrainRequest(_message.Message):
    __slots__ = ("operation_id", "timeout_s", "reason", "fencing_token")
    OPERATION_ID_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    FENCING_TOKEN_FIELD_NUMBER: _ClassVar[int]
    operation_id: str
    timeout_s: float
    reason: str
    fencing_token: int
    def __init__(self, operation_id: _Optional[str] = ..., timeout_s: _Optional[float] = ..., reason: _Optional[str] = ..., fencing_token: _Optional[int] = ...) -> None: ...

class StageModelRequest(_message.Message):
    __slots__ = ("operation_id", "source_path", "model_id", "version", "expected_digest", "fencing_token")
    OPERATION_ID_FIELD_NUMBER: _ClassVar[int]
    SOURCE_PATH_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_DIGEST_FIELD_NUMBER: _ClassVar[int]
    FENCING_TOKEN_FIELD_NUMBER: _ClassVar[int]
    operation_id: str
    source_path: str
    model_id: str
    version: str
    expected_digest: str
    fencing_token: int
    def __init__(self, operation_id: _Optional[str] = ..., source_path: _Optional[str] = ..., model_id: _Optional[str] = ..., version: _Optional[str] = ..., expected_digest: _Optional[str] = ..., fencing_token: _Optional[int] = ...) -> None: ...

class WeightsFile(_message.Message):
    __slots__ = ("name", "size")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    name: str
    size: int
    def __init__(self, name: _Optional[str] = ..., size: _Optional[int] = ...) -> None: ...

class WeightsManifest(_message.Message):
    __slots__ = ("operation_id", "model_id", "version", "expected_digest", "files", "fencing_token")
    OPERATION_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_DIGEST_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    FENCING_TOKEN_FIELD_NUMBER: _ClassVar[int]
    operation_id: str
    model_id: str
    version: str
    expected_digest: str
    files: _containers.RepeatedCompositeFieldContainer[WeightsFile]
    fencing_token: int
    def __init__(self, operation_id: _Optional[str] = ..., model_id: _Optional[str] = ..., version: _Optional[str] = ..., expected_digest: _Optional[str] = ..., files: _Optional[_Iterable[_Union[WeightsFile, _Mapping]]] = ..., fencing_token: _Optional[int] = ...) -> None: ...

class PushOffsets(_message.Message):
    __slots__ = ("held", "complete")
    HELD_FIELD_NUMBER: _ClassVar[int]
    COMPLETE_FIELD_NUMBER: _ClassVar[int]
    held: _containers.RepeatedCompositeFieldContainer[WeightsFile]
    complete: bool
    def __init__(self, held: _Optional[_Iterable[_Union[WeightsFile, _Mapping]]] = ..., complete: _Optional[bool] = ...) -> None: ...

class WeightsChunk(_message.Message):
    __slots__ = ("manifest", "file", "offset", "data")
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    FILE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    manifest: WeightsManifest
    file: str
    offset: int
    data: bytes
    def __init__(self, manifest: _Optional[_Union[WeightsManifest, _Mapping]] = ..., file: _Optional[str] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class ActivateRequest(_message.Message):
    __slots__ = ("operation_id", "weights_digest", "previous", "fencing_token")
    OPERATION_ID_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_DIGEST_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_FIELD_NUMBER: _ClassVar[int]
    FENCING_TOKEN_FIELD_NUMBER: _ClassVar[int]
    operation_id: str
    weights_digest: str
    previous: bool
    fencing_token: int
    def __init__(self, operation_id: _Optional[str] = ..., weights_digest: _Optional[str] = ..., previous: _Optional[bool] = ..., fencing_token: _Optional[int] = ...) -> None: ...

class RestartRequest(_message.Message):
    __slots__ = ("operation_id", "drain_timeout_s", "fencing_token")
    OPERATION_ID_FIELD_NUMBER: _ClassVar[int]
    DRAIN_TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    FENCING_TOKEN_FIELD_NUMBER: _ClassVar[int]
    operation_id: str
    drain_timeout_s: float
    fencing_token: int
    def __init__(self, operation_id: _Optional[str] = ..., drain_timeout_s: _Optional[float] = ..., fencing_token: _Optional[int] = ...) -> None: ...

class StagedModel(_message.Message):
    __slots__ = ("weights_digest", "model_id", "version", "state", "bytes_done", "bytes_total", "message", "path")
    WEIGHTS_DIGEST_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    BYTES_DONE_FIELD_NUMBER: _ClassVar[int]
    BYTES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    weights_digest: str
    model_id: str
    version: str
    state: StageState
    bytes_done: int
    bytes_total: int
    message: str
    path: str
    def __init__(self, weights_digest: _Optional[str] = ..., model_id: _Optional[str] = ..., version: _Optional[str] = ..., state: _Optional[_Union[StageState, str]] = ..., bytes_done: _Optional[int] = ..., bytes_total: _Optional[int] = ..., message: _Optional[str] = ..., path: _Optional[str] = ...) -> None: ...
