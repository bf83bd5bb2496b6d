from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class StartShadowRequest(_message.Message):
    __slots__ = ("model", "fraction", "templates", "margin", "min_samples", "max_in_flight", "timeout_s")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    FRACTION_FIELD_NUMBER: _ClassVar[int]
    TEMPLATES_FIELD_NUMBER: _ClassVar[int]
    MARGIN_FIELD_NUMBER: _ClassVar[int]
    MIN_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    MAX_IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    model: str
    fraction: float
    templates: _containers.RepeatedScalarFieldContainer[str]
    margin: float
    min_samples: int
    max_in_flight: int
    timeout_s: float
    def __init__(self, model: _Optional[str] = ..., fraction: _Optional[float] = ..., templates: _Optional[_Iterable[str]] = ..., margin: _Optional[float] = ..., min_samples: _Optional[int] = ..., max_in_flight: _Optional[int] = ..., timeout_s: _Optional[float] = ...) -> None: ...

class StopShadowRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetShadowRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ShadowSide(_message.Message):
    __slots__ = ("scored", "completed", "failed", "score", "schema_valid", "parts", "latency_p50_ms", "latency_p95_ms", "ttft_p50_ms", "models", "digests")
    class PartsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    SCORED_FIELD_NUMBER: _ClassVar[int]
    COMPLETED_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    SCHEMA_VALID_FIELD_NUMBER: _ClassVar[int]
    PARTS_FIELD_NUMBER: _ClassVar[int]
    LATENCY_P50_MS_FIELD_NUMBER: _ClassVar[int]
    LATENCY_P95_MS_FIELD_NUMBER: _ClassVar[int]
    TTFT_P50_MS_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    DIGESTS_FIELD_NUMBER: _ClassVar[int]
    scored: int
    completed: int
    failed: int
    score: float
    schema_valid: float
    parts: _containers.ScalarMap[str, float]
    latency_p50_ms: float
    latency_p95_ms: float
    ttft_p50_ms: float
    models: _containers.RepeatedScalarFieldContainer[str]
    digests: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, scored: _Optional[int] = ..., completed: _Optional[int] = ..., failed: _Optional[int] = ..., score: _Optional[float] = ..., schema_valid: _Optional[float] = ..., parts: _Optional[_Mapping[str, float]] = ..., latency_p50_ms: _Optional[float] = ..., latency_p95_ms: _Optional[float] = ..., ttft_p50_ms: _Optional[float] = ..., models: _Optional[_Iterable[str]] = ..., digests: _Optional[_Iterable[str]] = ...) -> None: ...

class ShadowTemplate(_message.Message):
    __slots__ = ("template", "live", "candidate", "verdict", "reason")
    TEMPLATE_FIELD_NUMBER: _ClassVar[int]
    LIVE_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_FIELD_NUMBER: _ClassVar[int]
    VERDICT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    template: str
    live: ShadowSide
    candidate: ShadowSide
    verdict: str
    reason: str
    def __init__(self, template: _Optional[str] = ..., live: _Optional[_Union[ShadowSide, _Mapping]] = ..., candidate: _Optional[_Union[ShadowSide, _Mapping]] = ..., verdict: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class ShadowReport(_message.Message):
    __slots__ = ("shadow_id", "active", "model", "fraction", "templates", "margin", "min_samples", "max_in_flight", "timeout_s", "started_by", "started_unix_s", "stopped_unix_s", "eligible", "sampled", "sent", "dropped_busy", "dropped_no_node", "dropped_phi", "in_flight", "by_template", "verdict", "reason", "coordinator_id", "figures_since_unix_s", "figures_pooled")
    SHADOW_ID_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    FRACTION_FIELD_NUMBER: _ClassVar[int]
    TEMPLATES_FIELD_NUMBER: _ClassVar[int]
    MARGIN_FIELD_NUMBER: _ClassVar[int]
    MIN_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    MAX_IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    STARTED_BY_FIELD_NUMBER: _ClassVar[int]
    STARTED_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    STOPPED_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    ELIGIBLE_FIELD_NUMBER: _ClassVar[int]
    SAMPLED_FIELD_NUMBER: _ClassVar[int]
    SENT_FIELD_NUMBER: _ClassVar[int]
    DROPPED_BUSY_FIELD_NUMBER: _ClassVar[int]
    DROPPED_NO_NODE_FIELD_NUMBER: _ClassVar[int]
    DROPPED_PHI_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    BY_TEMPLATE_FIELD_NUMBER: _ClassVar[int]
    VERDICT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    COORDINATOR_ID_FIELD_NUMBER: _ClassVar[int]
    FIGURES_SINCE_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    FIGURES_POOLED_FIELD_NUMBER: _ClassVar[int]
    shadow_id: str
    active: bool
    model: str
    fraction: float
    templates: _containers.RepeatedScalarFieldContainer[str]
    margin: float
    min_samples: int
    max_in_flight: int
    timeout_s: float
    started_by: str
    started_unix_s: float
    stopped_unix_s: float
    eligible: int
    sampled: int
    sent: int
    dropped_busy: int
    dropped_no_node: int
    dropped_phi: int
    in_flight: int
    by_template: _containers.RepeatedCompositeFieldContainer[ShadowTemplate]
    verdict: str
    reason: str
    coordinator_id: str
    figures_since_unix_s: float
    figures_pooled: bool
    def __init__(self, shadow_id: _Optional[str] = ..., active: _Optional[bool] = ..., model: _Optional[str] = ..., fraction: _Optional[float] = ..., templates: _Optional[_Iterable[str]] = ..., margin: _Optional[float] = ..., min_samples: _Optional[int] = ..., max_in_flight: _Optional[int] = ..., timeout_s: _Optional[float] = ..., started_by: _Optional[str] = ..., started_unix_s: _Optional[float] = ..., stopped_unix_s: _Optional[float] = ..., eligible: _Optional[int] = ..., sampled: _Optional[int] = ..., sent: _Optional[int] = ..., dropped_busy: _Optional[int] = ..., dropped_no_node: _Optional[int] = ..., dropped_phi: _Optional[int] = ..., in_flight: _Optional[int] = ..., by_template: _Optional[_Iterable[_Union[ShadowTemplate, _Mapping]]] = ..., verdict: _Optional[str] = ..., reason: _Optional[str] = ..., coordinator_id: _Optional[str] = ..., figures_since_unix_s: _Optional[float] = ..., figures_pooled: _Optional[bool] = ...) -> None: ...
