from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Iterable as _Iterable, Mapping as _Mapping, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TaskKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TASK_IDLE: _ClassVar[TaskKind]
    TASK_FIT: _ClassVar[TaskKind]
    TASK_EVALUATE: _ClassVar[TaskKind]
    TASK_STOP: _ClassVar[TaskKind]
    TASK_EXCHANGE: _ClassVar[TaskKind]
    TASK_PAUSE: _ClassVar[TaskKind]
TASK_IDLE: TaskKind
TASK_FIT: TaskKind
TASK_EVALUATE: TaskKind
TASK_STOP: TaskKind
TASK_EXCHANGE: TaskKind
TASK_PAUSE: TaskKind

class RegisterRequest(_message.Message):
    __slots__ = ("protocol_version", "token", "partition", "name", "num_examples", "role", "previous_session", "replace_stale")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    PARTITION_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    NUM_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_SESSION_FIELD_NUMBER: _ClassVar[int]
    REPLACE_STALE_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    token: str
    partition: int
    name: str
    num_examples: int
    role: str
    previous_session: str
    replace_stale: bool
    def __init__(self, protocol_version: _Optional[int] = ..., token: _Optional[str] = ..., partition: _Optional[int] = ..., name: _Optional[str] = ..., num_examples: _Optional[int] = ..., role: _Optional[str] = ..., previous_session: _Optional[str] = ..., replace_stale: bool = ...) -> None: ...

class RegisterReply(_message.Message):
    __slots__ = ("accepted", "reason", "session_id", "client_id", "config_json", "vector_size", "heartbeat_interval_s", "run_id")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    VECTOR_SIZE_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    reason: str
    session_id: str
    client_id: int
    config_json: str
    vector_size: int
    heartbeat_interval_s: float
    run_id: str
    def __init__(self, accepted: bool = ..., reason: _Optional[str] = ..., session_id: _Optional[str] = ..., client_id: _Optional[int] = ..., config_json: _Optional[str] = ..., vector_size: _Optional[int] = ..., heartbeat_interval_s: _Optional[float] = ..., run_id: _Optional[str] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class HeartbeatReply(_message.Message):
    __slots__ = ("known",)
    KNOWN_FIELD_NUMBER: _ClassVar[int]
    known: bool
    def __init__(self, known: bool = ...) -> None: ...

class PullRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class DeregisterRequest(_message.Message):
    __slots__ = ("session_id", "reason")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    reason: str
    def __init__(self, session_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class DeregisterReply(_message.Message):
    __slots__ = ("known",)
    KNOWN_FIELD_NUMBER: _ClassVar[int]
    known: bool
    def __init__(self, known: bool = ...) -> None: ...

class VectorInfo(_message.Message):
    __slots__ = ("name", "size", "dtype")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    size: int
    dtype: str
    def __init__(self, name: _Optional[str] = ..., size: _Optional[int] = ..., dtype: _Optional[str] = ...) -> None: ...

class TaskHeader(_message.Message):
    __slots__ = ("kind", "task_id", "round", "client_id", "deadline_s", "payload_size", "model_version", "config_json", "vectors", "protocol", "stage")
    KIND_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_S_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_SIZE_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    VECTORS_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    kind: TaskKind
    task_id: str
    round: int
    client_id: int
    deadline_s: float
    payload_size: int
    model_version: int
    config_json: str
    vectors: _containers.RepeatedCompositeFieldContainer[VectorInfo]
    protocol: str
    stage: int
    def __init__(self, kind: _Optional[_Union[TaskKind, str]] = ..., task_id: _Optional[str] = ..., round: _Optional[int] = ..., client_id: _Optional[int] = ..., deadline_s: _Optional[float] = ..., payload_size: _Optional[int] = ..., model_version: _Optional[int] = ..., config_json: _Optional[str] = ..., vectors: _Optional[_Iterable[_Union[VectorInfo, _Mapping]]] = ..., protocol: _Optional[str] = ..., stage: _Optional[int] = ...) -> None: ...

class TaskMessage(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: TaskHeader
    chunk: bytes
    def __init__(self, header: _Optional[_Union[TaskHeader, _Mapping]] = ..., chunk: _Optional[bytes] = ...) -> None: ...

class ResultHeader(_message.Message):
    __slots__ = ("session_id", "task_id", "round", "num_examples", "straggler", "metrics_json", "error", "payload_size", "held", "vectors")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    NUM_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    STRAGGLER_FIELD_NUMBER: _ClassVar[int]
    METRICS_JSON_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_SIZE_FIELD_NUMBER: _ClassVar[int]
    HELD_FIELD_NUMBER: _ClassVar[int]
    VECTORS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    task_id: str
    round: int
    num_examples: int
    straggler: bool
    metrics_json: str
    error: str
    payload_size: int
    held: bool
    vectors: _containers.RepeatedCompositeFieldContainer[VectorInfo]
    def __init__(self, session_id: _Optional[str] = ..., task_id: _Optional[str] = ..., round: _Optional[int] = ..., num_examples: _Optional[int] = ..., straggler: bool = ..., metrics_json: _Optional[str] = ..., error: _Optional[str] = ..., payload_size: _Optional[int] = ..., held: bool = ..., vectors: _Optional[_Iterable[_Union[VectorInfo, _Mapping]]] = ...) -> None: ...

class ResultMessage(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: ResultHeader
    chunk: bytes
    def __init__(self, header: _Optional[_Union[ResultHeader, _Mapping]] = ..., chunk: _Optional[bytes] = ...) -> None: ...

class PushReply(_message.Message):
    __slots__ = ("accepted", "reason")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    reason: str
    def __init__(self, accepted: bool = ..., reason: _Optional[str] = ...) -> None: ...
