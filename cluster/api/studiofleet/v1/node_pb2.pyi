from cluster.api.studiofleet.v1 import common_pb2 as _common_pb2
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GetStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

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
    __slots__ = ("running", "queued", "queued_prompt_tokens", "tokens_generated_total", "prompt_tokens_total", "requests_accepted_total", "requests_completed_total", "requests_cancelled_total", "requests_deadline_total", "requests_failed_total", "requests_rejected_total", "decode_tokens_per_s", "engine_sequences", "engine_waiting", "prompt_cache_entries", "prompt_cache_bytes", "cached_prompt_tokens_total")
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
    def __init__(self, running: _Optional[int] = ..., queued: _Optional[int] = ..., queued_prompt_tokens: _Optional[int] = ..., tokens_generated_total: _Optional[int] = ..., prompt_tokens_total: _Optional[int] = ..., requests_accepted_total: _Optional[int] = ..., requests_completed_total: _Optional[int] = ..., requests_cancelled_total: _Optional[int] = ..., requests_deadline_total: _Optional[int] = ..., requests_failed_total: _Optional[int] = ..., requests_rejected_total: _Optional[int] = ..., decode_tokens_per_s: _Optional[float] = ..., engine_sequences: _Optional[int] = ..., engine_waiting: _Optional[int] = ..., prompt_cache_entries: _Optional[int] = ..., prompt_cache_bytes: _Optional[int] = ..., cached_prompt_tokens_total: _Optional[int] = ...) -> None: ...

class Memory(_message.Message):
    __slots__ = ("total_bytes", "available_bytes", "process_rss_bytes", "engine_active_bytes", "engine_peak_bytes", "unified", "gpu_recommended_working_set_bytes")
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_BYTES_FIELD_NUMBER: _ClassVar[int]
    PROCESS_RSS_BYTES_FIELD_NUMBER: _ClassVar[int]
    ENGINE_ACTIVE_BYTES_FIELD_NUMBER: _ClassVar[int]
    ENGINE_PEAK_BYTES_FIELD_NUMBER: _ClassVar[int]
    UNIFIED_FIELD_NUMBER: _ClassVar[int]
    GPU_RECOMMENDED_WORKING_SET_BYTES_FIELD_NUMBER: _ClassVar[int]
    total_bytes: int
    available_bytes: int
    process_rss_bytes: int
    engine_active_bytes: int
    engine_peak_bytes: int
    unified: bool
    gpu_recommended_working_set_bytes: int
    def __init__(self, total_bytes: _Optional[int] = ..., available_bytes: _Optional[int] = ..., process_rss_bytes: _Optional[int] = ..., engine_active_bytes: _Optional[int] = ..., engine_peak_bytes: _Optional[int] = ..., unified: _Optional[bool] = ..., gpu_recommended_working_set_bytes: _Optional[int] = ...) -> None: ...

class NodeStatus(_message.Message):
    __slots__ = ("node_id", "lifecycle", "lifecycle_reason", "cordoned", "model", "capacity", "load", "memory", "uptime_s", "agent_version", "api_version", "hostname", "cpu_load_1m")
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
    def __init__(self, node_id: _Optional[str] = ..., lifecycle: _Optional[_Union[_common_pb2.Lifecycle, str]] = ..., lifecycle_reason: _Optional[str] = ..., cordoned: _Optional[bool] = ..., model: _Optional[_Union[_common_pb2.ModelInfo, _Mapping]] = ..., capacity: _Optional[_Union[Capacity, _Mapping]] = ..., load: _Optional[_Union[Load, _Mapping]] = ..., memory: _Optional[_Union[Memory, _Mapping]] = ..., uptime_s: _Optional[float] = ..., agent_version: _Optional[str] = ..., api_version: _Optional[str] = ..., hostname: _Optional[str] = ..., cpu_load_1m: _Optional[float] = ...) -> None: ...
