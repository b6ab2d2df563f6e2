from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    FLOAT32: _ClassVar[DType]
    BFLOAT16: _ClassVar[DType]
    FLOAT16: _ClassVar[DType]
    INT8: _ClassVar[DType]
    FLOAT8_E4M3FN: _ClassVar[DType]
DTYPE_UNSPECIFIED: DType
FLOAT32: DType
BFLOAT16: DType
FLOAT16: DType
INT8: DType
FLOAT8_E4M3FN: DType

class TensorHeader(_message.Message):
    __slots__ = ("dtype", "numel", "chunk_count")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    NUMEL_FIELD_NUMBER: _ClassVar[int]
    CHUNK_COUNT_FIELD_NUMBER: _ClassVar[int]
    dtype: DType
    numel: int
    chunk_count: int
    def __init__(self, dtype: _Optional[_Union[DType, str]] = ..., numel: _Optional[int] = ..., chunk_count: _Optional[int] = ...) -> None: ...

class Chunk(_message.Message):
    __slots__ = ("index", "data", "crc32c")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    CRC32C_FIELD_NUMBER: _ClassVar[int]
    index: int
    data: bytes
    crc32c: int
    def __init__(self, index: _Optional[int] = ..., data: _Optional[bytes] = ..., crc32c: _Optional[int] = ...) -> None: ...

class ParamSpec(_message.Message):
    __slots__ = ("name", "shape", "dtype")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: str
    def __init__(self, name: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[str] = ...) -> None: ...

class BufferSpec(_message.Message):
    __slots__ = ("name", "shape", "dtype")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: str
    def __init__(self, name: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[str] = ...) -> None: ...

class ParamLayout(_message.Message):
    __slots__ = ("params", "fingerprint", "buffers", "frozen", "frozen_crc32c")
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    BUFFERS_FIELD_NUMBER: _ClassVar[int]
    FROZEN_FIELD_NUMBER: _ClassVar[int]
    FROZEN_CRC32C_FIELD_NUMBER: _ClassVar[int]
    params: _containers.RepeatedCompositeFieldContainer[ParamSpec]
    fingerprint: str
    buffers: _containers.RepeatedCompositeFieldContainer[BufferSpec]
    frozen: _containers.RepeatedCompositeFieldContainer[BufferSpec]
    frozen_crc32c: int
    def __init__(self, params: _Optional[_Iterable[_Union[ParamSpec, _Mapping]]] = ..., fingerprint: _Optional[str] = ..., buffers: _Optional[_Iterable[_Union[BufferSpec, _Mapping]]] = ..., frozen: _Optional[_Iterable[_Union[BufferSpec, _Mapping]]] = ..., frozen_crc32c: _Optional[int] = ...) -> None: ...

class JoinRequest(_message.Message):
    __slots__ = ("layout", "hostname", "device", "run_config_sha256", "observer")
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    RUN_CONFIG_SHA256_FIELD_NUMBER: _ClassVar[int]
    OBSERVER_FIELD_NUMBER: _ClassVar[int]
    layout: ParamLayout
    hostname: str
    device: str
    run_config_sha256: str
    observer: bool
    def __init__(self, layout: _Optional[_Union[ParamLayout, _Mapping]] = ..., hostname: _Optional[str] = ..., device: _Optional[str] = ..., run_config_sha256: _Optional[str] = ..., observer: _Optional[bool] = ...) -> None: ...

class JoinReply(_message.Message):
    __slots__ = ("worker_id", "run_config_json", "layout", "version", "finished", "lease_seconds", "worker_secret", "send_initial")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    RUN_CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    LEASE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    WORKER_SECRET_FIELD_NUMBER: _ClassVar[int]
    SEND_INITIAL_FIELD_NUMBER: _ClassVar[int]
    worker_id: int
    run_config_json: str
    layout: ParamLayout
    version: int
    finished: bool
    lease_seconds: float
    worker_secret: bytes
    send_initial: bool
    def __init__(self, worker_id: _Optional[int] = ..., run_config_json: _Optional[str] = ..., layout: _Optional[_Union[ParamLayout, _Mapping]] = ..., version: _Optional[int] = ..., finished: _Optional[bool] = ..., lease_seconds: _Optional[float] = ..., worker_secret: _Optional[bytes] = ..., send_initial: _Optional[bool] = ...) -> None: ...

class PullRequest(_message.Message):
    __slots__ = ("worker_id", "dtype", "worker_secret", "delta_base")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    WORKER_SECRET_FIELD_NUMBER: _ClassVar[int]
    DELTA_BASE_FIELD_NUMBER: _ClassVar[int]
    worker_id: int
    dtype: DType
    worker_secret: bytes
    delta_base: int
    def __init__(self, worker_id: _Optional[int] = ..., dtype: _Optional[_Union[DType, str]] = ..., worker_secret: _Optional[bytes] = ..., delta_base: _Optional[int] = ...) -> None: ...

class PushReply(_message.Message):
    __slots__ = ("version", "staleness", "mean_gap", "finished", "applied")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STALENESS_FIELD_NUMBER: _ClassVar[int]
    MEAN_GAP_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    APPLIED_FIELD_NUMBER: _ClassVar[int]
    version: int
    staleness: int
    mean_gap: float
    finished: bool
    applied: bool
    def __init__(self, version: _Optional[int] = ..., staleness: _Optional[int] = ..., mean_gap: _Optional[float] = ..., finished: _Optional[bool] = ..., applied: _Optional[bool] = ...) -> None: ...

class PullHeader(_message.Message):
    __slots__ = ("version", "tensor", "finished", "push", "buffers", "buffers_crc32c", "delta", "delta_id")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    PUSH_FIELD_NUMBER: _ClassVar[int]
    BUFFERS_FIELD_NUMBER: _ClassVar[int]
    BUFFERS_CRC32C_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    DELTA_ID_FIELD_NUMBER: _ClassVar[int]
    version: int
    tensor: TensorHeader
    finished: bool
    push: PushReply
    buffers: bytes
    buffers_crc32c: int
    delta: bool
    delta_id: int
    def __init__(self, version: _Optional[int] = ..., tensor: _Optional[_Union[TensorHeader, _Mapping]] = ..., finished: _Optional[bool] = ..., push: _Optional[_Union[PushReply, _Mapping]] = ..., buffers: _Optional[bytes] = ..., buffers_crc32c: _Optional[int] = ..., delta: _Optional[bool] = ..., delta_id: _Optional[int] = ...) -> None: ...

class PushReady(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PullFrame(_message.Message):
    __slots__ = ("header", "chunk", "ready")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    header: PullHeader
    chunk: Chunk
    ready: PushReady
    def __init__(self, header: _Optional[_Union[PullHeader, _Mapping]] = ..., chunk: _Optional[_Union[Chunk, _Mapping]] = ..., ready: _Optional[_Union[PushReady, _Mapping]] = ...) -> None: ...

class PushHeader(_message.Message):
    __slots__ = ("worker_id", "base_version", "seq", "samples", "loss", "tensor", "pull", "pull_dtype", "buffers", "buffers_crc32c", "worker_secret", "delta_base", "initial")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    BASE_VERSION_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    PULL_FIELD_NUMBER: _ClassVar[int]
    PULL_DTYPE_FIELD_NUMBER: _ClassVar[int]
    BUFFERS_FIELD_NUMBER: _ClassVar[int]
    BUFFERS_CRC32C_FIELD_NUMBER: _ClassVar[int]
    WORKER_SECRET_FIELD_NUMBER: _ClassVar[int]
    DELTA_BASE_FIELD_NUMBER: _ClassVar[int]
    INITIAL_FIELD_NUMBER: _ClassVar[int]
    worker_id: int
    base_version: int
    seq: int
    samples: int
    loss: float
    tensor: TensorHeader
    pull: bool
    pull_dtype: DType
    buffers: bytes
    buffers_crc32c: int
    worker_secret: bytes
    delta_base: int
    initial: bool
    def __init__(self, worker_id: _Optional[int] = ..., base_version: _Optional[int] = ..., seq: _Optional[int] = ..., samples: _Optional[int] = ..., loss: _Optional[float] = ..., tensor: _Optional[_Union[TensorHeader, _Mapping]] = ..., pull: _Optional[bool] = ..., pull_dtype: _Optional[_Union[DType, str]] = ..., buffers: _Optional[bytes] = ..., buffers_crc32c: _Optional[int] = ..., worker_secret: _Optional[bytes] = ..., delta_base: _Optional[int] = ..., initial: _Optional[bool] = ...) -> None: ...

class PushFrame(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: PushHeader
    chunk: Chunk
    def __init__(self, header: _Optional[_Union[PushHeader, _Mapping]] = ..., chunk: _Optional[_Union[Chunk, _Mapping]] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("worker_id", "worker_secret")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    WORKER_SECRET_FIELD_NUMBER: _ClassVar[int]
    worker_id: int
    worker_secret: bytes
    def __init__(self, worker_id: _Optional[int] = ..., worker_secret: _Optional[bytes] = ...) -> None: ...

class HeartbeatReply(_message.Message):
    __slots__ = ("finished",)
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    finished: bool
    def __init__(self, finished: _Optional[bool] = ...) -> None: ...

class LeaveRequest(_message.Message):
    __slots__ = ("worker_id", "worker_secret", "run_finished")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    WORKER_SECRET_FIELD_NUMBER: _ClassVar[int]
    RUN_FINISHED_FIELD_NUMBER: _ClassVar[int]
    worker_id: int
    worker_secret: bytes
    run_finished: bool
    def __init__(self, worker_id: _Optional[int] = ..., worker_secret: _Optional[bytes] = ..., run_finished: _Optional[bool] = ...) -> None: ...

class LeaveReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ReportRequest(_message.Message):
    __slots__ = ("worker_id", "worker_secret", "version", "metrics", "error")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    WORKER_SECRET_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    worker_id: int
    worker_secret: bytes
    version: int
    metrics: _containers.ScalarMap[str, float]
    error: str
    def __init__(self, worker_id: _Optional[int] = ..., worker_secret: _Optional[bytes] = ..., version: _Optional[int] = ..., metrics: _Optional[_Mapping[str, float]] = ..., error: _Optional[str] = ...) -> None: ...

class ReportReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WorkerStatus(_message.Message):
    __slots__ = ("worker_id", "hostname", "device", "staleness", "pushes", "last_seen_seconds", "mean_gap")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    STALENESS_FIELD_NUMBER: _ClassVar[int]
    PUSHES_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MEAN_GAP_FIELD_NUMBER: _ClassVar[int]
    worker_id: int
    hostname: str
    device: str
    staleness: int
    pushes: int
    last_seen_seconds: float
    mean_gap: float
    def __init__(self, worker_id: _Optional[int] = ..., hostname: _Optional[str] = ..., device: _Optional[str] = ..., staleness: _Optional[int] = ..., pushes: _Optional[int] = ..., last_seen_seconds: _Optional[float] = ..., mean_gap: _Optional[float] = ...) -> None: ...

class StatusReply(_message.Message):
    __slots__ = ("version", "policy", "updates", "samples", "epoch", "workers", "finished", "run_config_json", "last_accuracy", "last_loss", "mean_staleness", "mean_gap", "uptime_seconds", "max_updates", "held_snapshots", "nonfinite_pushes", "oversized_pushes", "nonfinite_updates", "grad_norm_limit", "checkpoint_failures", "last_checkpoint_error", "checkpoint_version", "last_metrics", "eval_errors", "last_eval_error", "evals_skipped", "shard_index", "shard_count", "parameters", "awaiting_model")
    class LastMetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    VERSION_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    UPDATES_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    RUN_CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    LAST_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    LAST_LOSS_FIELD_NUMBER: _ClassVar[int]
    MEAN_STALENESS_FIELD_NUMBER: _ClassVar[int]
    MEAN_GAP_FIELD_NUMBER: _ClassVar[int]
    UPTIME_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MAX_UPDATES_FIELD_NUMBER: _ClassVar[int]
    HELD_SNAPSHOTS_FIELD_NUMBER: _ClassVar[int]
    NONFINITE_PUSHES_FIELD_NUMBER: _ClassVar[int]
    OVERSIZED_PUSHES_FIELD_NUMBER: _ClassVar[int]
    NONFINITE_UPDATES_FIELD_NUMBER: _ClassVar[int]
    GRAD_NORM_LIMIT_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_FAILURES_FIELD_NUMBER: _ClassVar[int]
    LAST_CHECKPOINT_ERROR_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_VERSION_FIELD_NUMBER: _ClassVar[int]
    LAST_METRICS_FIELD_NUMBER: _ClassVar[int]
    EVAL_ERRORS_FIELD_NUMBER: _ClassVar[int]
    LAST_EVAL_ERROR_FIELD_NUMBER: _ClassVar[int]
    EVALS_SKIPPED_FIELD_NUMBER: _ClassVar[int]
    SHARD_INDEX_FIELD_NUMBER: _ClassVar[int]
    SHARD_COUNT_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    AWAITING_MODEL_FIELD_NUMBER: _ClassVar[int]
    version: int
    policy: str
    updates: int
    samples: int
    epoch: float
    workers: _containers.RepeatedCompositeFieldContainer[WorkerStatus]
    finished: bool
    run_config_json: str
    last_accuracy: float
    last_loss: float
    mean_staleness: float
    mean_gap: float
    uptime_seconds: float
    max_updates: int
    held_snapshots: int
    nonfinite_pushes: int
    oversized_pushes: int
    nonfinite_updates: int
    grad_norm_limit: float
    checkpoint_failures: int
    last_checkpoint_error: str
    checkpoint_version: int
    last_metrics: _containers.ScalarMap[str, float]
    eval_errors: int
    last_eval_error: str
    evals_skipped: int
    shard_index: int
    shard_count: int
    parameters: int
    awaiting_model: bool
    def __init__(self, version: _Optional[int] = ..., policy: _Optional[str] = ..., updates: _Optional[int] = ..., samples: _Optional[int] = ..., epoch: _Optional[float] = ..., workers: _Optional[_Iterable[_Union[WorkerStatus, _Mapping]]] = ..., finished: _Optional[bool] = ..., run_config_json: _Optional[str] = ..., last_accuracy: _Optional[float] = ..., last_loss: _Optional[float] = ..., mean_staleness: _Optional[float] = ..., mean_gap: _Optional[float] = ..., uptime_seconds: _Optional[float] = ..., max_updates: _Optional[int] = ..., held_snapshots: _Optional[int] = ..., nonfinite_pushes: _Optional[int] = ..., oversized_pushes: _Optional[int] = ..., nonfinite_updates: _Optional[int] = ..., grad_norm_limit: _Optional[float] = ..., checkpoint_failures: _Optional[int] = ..., last_checkpoint_error: _Optional[str] = ..., checkpoint_version: _Optional[int] = ..., last_metrics: _Optional[_Mapping[str, float]] = ..., eval_errors: _Optional[int] = ..., last_eval_error: _Optional[str] = ..., evals_skipped: _Optional[int] = ..., shard_index: _Optional[int] = ..., shard_count: _Optional[int] = ..., parameters: _Optional[int] = ..., awaiting_model: _Optional[bool] = ...) -> None: ...
