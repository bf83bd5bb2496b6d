from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class Lifecycle(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LIFECYCLE_UNSPECIFIED: _ClassVar[Lifecycle]
    LIFECYCLE_STARTING: _ClassVar[Lifecycle]
    LIFECYCLE_LOADING: _ClassVar[Lifecycle]
    LIFECYCLE_WARMING: _ClassVar[Lifecycle]
    LIFECYCLE_READY: _ClassVar[Lifecycle]
    LIFECYCLE_DRAINING: _ClassVar[Lifecycle]
    LIFECYCLE_DRAINED: _ClassVar[Lifecycle]
    LIFECYCLE_FAILED: _ClassVar[Lifecycle]
LIFECYCLE_UNSPECIFIED: Lifecycle
LIFECYCLE_STARTING: Lifecycle
LIFECYCLE_LOADING: Lifecycle
LIFECYCLE_WARMING: Lifecycle
LIFECYCLE_READY: Lifecycle
LIFECYCLE_DRAINING: Lifecycle
LIFECYCLE_DRAINED: Lifecycle
LIFECYCLE_FAILED: Lifecycle

class ModelInfo(_message.Message):
    __slots__ = ("model_id", "version", "weights_digest", "context_length", "engine", "engine_version", "vocab_size", "family", "parameters", "quantization")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_DIGEST_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_LENGTH_FIELD_NUMBER: _ClassVar[int]
    ENGINE_FIELD_NUMBER: _ClassVar[int]
    ENGINE_VERSION_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    FAMILY_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    QUANTIZATION_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    version: str
    weights_digest: str
    context_length: int
    engine: str
    engine_version: str
    vocab_size: int
    family: str
    parameters: int
    quantization: str
    def __init__(self, model_id: _Optional[str] = ..., version: _Optional[str] = ..., weights_digest: _Optional[str] = ..., context_length: _Optional[int] = ..., engine: _Optional[str] = ..., engine_version: _Optional[str] = ..., vocab_size: _Optional[int] = ..., family: _Optional[str] = ..., parameters: _Optional[int] = ..., quantization: _Optional[str] = ...) -> None: ...

class AuditHead(_message.Message):
    __slots__ = ("seq", "hash", "sig", "key")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    HASH_FIELD_NUMBER: _ClassVar[int]
    SIG_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    seq: int
    hash: str
    sig: str
    key: str
    def __init__(self, seq: _Optional[int] = ..., hash: _Optional[str] = ..., sig: _Optional[str] = ..., key: _Optional[str] = ...) -> None: ...
