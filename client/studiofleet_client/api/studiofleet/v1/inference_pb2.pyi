from studiofleet_client.api.studiofleet.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Priority(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PRIORITY_UNSPECIFIED: _ClassVar[Priority]
    PRIORITY_INTERACTIVE: _ClassVar[Priority]
    PRIORITY_BATCH: _ClassVar[Priority]

class FinishReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FINISH_REASON_UNSPECIFIED: _ClassVar[FinishReason]
    FINISH_REASON_STOP: _ClassVar[FinishReason]
    FINISH_REASON_LENGTH: _ClassVar[FinishReason]
    FINISH_REASON_CANCELLED: _ClassVar[FinishReason]
    FINISH_REASON_ERROR: _ClassVar[FinishReason]
PRIORITY_UNSPECIFIED: Priority
PRIORITY_INTERACTIVE: Priority
PRIORITY_BATCH: Priority
FINISH_REASON_UNSPECIFIED: FinishReason
FINISH_REASON_STOP: FinishReason
FINISH_REASON_LENGTH: FinishReason
FINISH_REASON_CANCELLED: FinishReason
FINISH_REASON_ERROR: FinishReason

class ChatMessage(_message.Message):
    __slots__ = ("role", "content")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    role: str
    content: str
    def __init__(self, role: _Optional[str] = ..., content: _Optional[str] = ...) -> None: ...

class ChatInput(_message.Message):
    __slots__ = ("messages",)
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    messages: _containers.RepeatedCompositeFieldContainer[ChatMessage]
    def __init__(self, messages: _Optional[_Iterable[_Union[ChatMessage, _Mapping]]] = ...) -> None: ...

class SamplingParams(_message.Message):
    __slots__ = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed", "ignore_eos")
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    MIN_P_FIELD_NUMBER: _ClassVar[int]
    REPETITION_PENALTY_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    IGNORE_EOS_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_p: float
    top_k: int
    min_p: float
    repetition_penalty: float
    seed: int
    ignore_eos: bool
    def __init__(self, temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., top_k: _Optional[int] = ..., min_p: _Optional[float] = ..., repetition_penalty: _Optional[float] = ..., seed: _Optional[int] = ..., ignore_eos: _Optional[bool] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("request_id", "chat", "prompt", "template", "sampling", "max_tokens", "stop", "prefix_token_ids", "require_weights_digest", "priority", "session_key", "prefix_text_chars", "allow_restart", "output_format", "model", "fit_context", "resumed_from_coordinator")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CHAT_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    TEMPLATE_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    PREFIX_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    REQUIRE_WEIGHTS_DIGEST_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    SESSION_KEY_FIELD_NUMBER: _ClassVar[int]
    PREFIX_TEXT_CHARS_FIELD_NUMBER: _ClassVar[int]
    ALLOW_RESTART_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FORMAT_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    FIT_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    RESUMED_FROM_COORDINATOR_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    chat: ChatInput
    prompt: str
    template: TemplateInput
    sampling: SamplingParams
    max_tokens: int
    stop: _containers.RepeatedScalarFieldContainer[str]
    prefix_token_ids: _containers.RepeatedScalarFieldContainer[int]
    require_weights_digest: str
    priority: Priority
    session_key: str
    prefix_text_chars: int
    allow_restart: bool
    output_format: OutputFormat
    model: str
    fit_context: bool
    resumed_from_coordinator: str
    def __init__(self, request_id: _Optional[str] = ..., chat: _Optional[_Union[ChatInput, _Mapping]] = ..., prompt: _Optional[str] = ..., template: _Optional[_Union[TemplateInput, _Mapping]] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ..., max_tokens: _Optional[int] = ..., stop: _Optional[_Iterable[str]] = ..., prefix_token_ids: _Optional[_Iterable[int]] = ..., require_weights_digest: _Optional[str] = ..., priority: _Optional[_Union[Priority, str]] = ..., session_key: _Optional[str] = ..., prefix_text_chars: _Optional[int] = ..., allow_restart: _Optional[bool] = ..., output_format: _Optional[_Union[OutputFormat, _Mapping]] = ..., model: _Optional[str] = ..., fit_context: _Optional[bool] = ..., resumed_from_coordinator: _Optional[str] = ...) -> None: ...

class TemplateInput(_message.Message):
    __slots__ = ("name", "version", "variables")
    class VariablesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    VARIABLES_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    variables: _containers.ScalarMap[str, str]
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., variables: _Optional[_Mapping[str, str]] = ...) -> None: ...

class OutputFormat(_message.Message):
    __slots__ = ("json_schema", "note_template")
    JSON_SCHEMA_FIELD_NUMBER: _ClassVar[int]
    NOTE_TEMPLATE_FIELD_NUMBER: _ClassVar[int]
    json_schema: str
    note_template: str
    def __init__(self, json_schema: _Optional[str] = ..., note_template: _Optional[str] = ...) -> None: ...

class Usage(_message.Message):
    __slots__ = ("prompt_tokens", "prefix_tokens", "completion_tokens", "cached_prompt_tokens")
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PREFIX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CACHED_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    prompt_tokens: int
    prefix_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int
    def __init__(self, prompt_tokens: _Optional[int] = ..., prefix_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ..., cached_prompt_tokens: _Optional[int] = ...) -> None: ...

class Timings(_message.Message):
    __slots__ = ("queue_wait_ms", "time_to_first_token_ms", "total_ms", "decode_tokens_per_s")
    QUEUE_WAIT_MS_FIELD_NUMBER: _ClassVar[int]
    TIME_TO_FIRST_TOKEN_MS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    DECODE_TOKENS_PER_S_FIELD_NUMBER: _ClassVar[int]
    queue_wait_ms: float
    time_to_first_token_ms: float
    total_ms: float
    decode_tokens_per_s: float
    def __init__(self, queue_wait_ms: _Optional[float] = ..., time_to_first_token_ms: _Optional[float] = ..., total_ms: _Optional[float] = ..., decode_tokens_per_s: _Optional[float] = ...) -> None: ...

class FinalInfo(_message.Message):
    __slots__ = ("finish_reason", "usage", "timings", "node_id", "model", "request_id", "seed", "message", "failovers", "nodes", "restarts", "structured", "quality", "template", "coordinator_failovers")
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    FAILOVERS_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    RESTARTS_FIELD_NUMBER: _ClassVar[int]
    STRUCTURED_FIELD_NUMBER: _ClassVar[int]
    QUALITY_FIELD_NUMBER: _ClassVar[int]
    TEMPLATE_FIELD_NUMBER: _ClassVar[int]
    COORDINATOR_FAILOVERS_FIELD_NUMBER: _ClassVar[int]
    finish_reason: FinishReason
    usage: Usage
    timings: Timings
    node_id: str
    model: _common_pb2.ModelInfo
    request_id: str
    seed: int
    message: str
    failovers: int
    nodes: _containers.RepeatedScalarFieldContainer[str]
    restarts: int
    structured: StructuredResult
    quality: QualityScore
    template: str
    coordinator_failovers: int
    def __init__(self, finish_reason: _Optional[_Union[FinishReason, str]] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ..., timings: _Optional[_Union[Timings, _Mapping]] = ..., node_id: _Optional[str] = ..., model: _Optional[_Union[_common_pb2.ModelInfo, _Mapping]] = ..., request_id: _Optional[str] = ..., seed: _Optional[int] = ..., message: _Optional[str] = ..., failovers: _Optional[int] = ..., nodes: _Optional[_Iterable[str]] = ..., restarts: _Optional[int] = ..., structured: _Optional[_Union[StructuredResult, _Mapping]] = ..., quality: _Optional[_Union[QualityScore, _Mapping]] = ..., template: _Optional[str] = ..., coordinator_failovers: _Optional[int] = ...) -> None: ...

class StructuredResult(_message.Message):
    __slots__ = ("valid", "json", "rule", "path", "error", "format")
    VALID_FIELD_NUMBER: _ClassVar[int]
    JSON_FIELD_NUMBER: _ClassVar[int]
    RULE_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    valid: bool
    json: str
    rule: str
    path: str
    error: str
    format: str
    def __init__(self, valid: _Optional[bool] = ..., json: _Optional[str] = ..., rule: _Optional[str] = ..., path: _Optional[str] = ..., error: _Optional[str] = ..., format: _Optional[str] = ...) -> None: ...

class SubScore(_message.Message):
    __slots__ = ("name", "score", "weight", "detail")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    name: str
    score: float
    weight: float
    detail: str
    def __init__(self, name: _Optional[str] = ..., score: _Optional[float] = ..., weight: _Optional[float] = ..., detail: _Optional[str] = ...) -> None: ...

class QualityScore(_message.Message):
    __slots__ = ("total", "parts", "rubric")
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    PARTS_FIELD_NUMBER: _ClassVar[int]
    RUBRIC_FIELD_NUMBER: _ClassVar[int]
    total: float
    parts: _containers.RepeatedCompositeFieldContainer[SubScore]
    rubric: str
    def __init__(self, total: _Optional[float] = ..., parts: _Optional[_Iterable[_Union[SubScore, _Mapping]]] = ..., rubric: _Optional[str] = ...) -> None: ...

class GenerateChunk(_message.Message):
    __slots__ = ("text", "token_ids", "final", "restarted", "resume")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    FINAL_FIELD_NUMBER: _ClassVar[int]
    RESTARTED_FIELD_NUMBER: _ClassVar[int]
    RESUME_FIELD_NUMBER: _ClassVar[int]
    text: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    final: FinalInfo
    restarted: bool
    resume: ResumeInfo
    def __init__(self, text: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., final: _Optional[_Union[FinalInfo, _Mapping]] = ..., restarted: _Optional[bool] = ..., resume: _Optional[_Union[ResumeInfo, _Mapping]] = ...) -> None: ...

class ResumeInfo(_message.Message):
    __slots__ = ("seed", "weights_digest", "max_tokens", "coordinator_id")
    SEED_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_DIGEST_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COORDINATOR_ID_FIELD_NUMBER: _ClassVar[int]
    seed: int
    weights_digest: str
    max_tokens: int
    coordinator_id: str
    def __init__(self, seed: _Optional[int] = ..., weights_digest: _Optional[str] = ..., max_tokens: _Optional[int] = ..., coordinator_id: _Optional[str] = ...) -> None: ...
