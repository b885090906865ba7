from gradmesh.v1 import graph_pb2 as _graph_pb2
from gradmesh.v1 import shard_pb2 as _shard_pb2
from gradmesh.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class CoordinatorFrame(_message.Message):
    __slots__ = ("create_job", "parameters", "chunk")
    CREATE_JOB_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    create_job: CreateJobRequest
    parameters: GetParametersResponse
    chunk: _tensor_pb2.Chunk
    def __init__(self, create_job: _Optional[_Union[CreateJobRequest, _Mapping]] = ..., parameters: _Optional[_Union[GetParametersResponse, _Mapping]] = ..., chunk: _Optional[_Union[_tensor_pb2.Chunk, _Mapping]] = ...) -> None: ...

class CreateJobRequest(_message.Message):
    __slots__ = ("job_id", "graph", "parameters", "optimizer", "micro_batch_size", "schedule", "clipping", "compression", "staleness")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    GRAPH_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    MICRO_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    SCHEDULE_FIELD_NUMBER: _ClassVar[int]
    CLIPPING_FIELD_NUMBER: _ClassVar[int]
    COMPRESSION_FIELD_NUMBER: _ClassVar[int]
    STALENESS_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    graph: _graph_pb2.Graph
    parameters: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.NamedTensor]
    optimizer: _shard_pb2.Optimizer
    micro_batch_size: int
    schedule: LRSchedule
    clipping: GradientClipping
    compression: GradientCompression
    staleness: int
    def __init__(self, job_id: _Optional[str] = ..., graph: _Optional[_Union[_graph_pb2.Graph, _Mapping]] = ..., parameters: _Optional[_Iterable[_Union[_tensor_pb2.NamedTensor, _Mapping]]] = ..., optimizer: _Optional[_Union[_shard_pb2.Optimizer, _Mapping]] = ..., micro_batch_size: _Optional[int] = ..., schedule: _Optional[_Union[LRSchedule, _Mapping]] = ..., clipping: _Optional[_Union[GradientClipping, _Mapping]] = ..., compression: _Optional[_Union[GradientCompression, _Mapping]] = ..., staleness: _Optional[int] = ...) -> None: ...

class GradientCompression(_message.Message):
    __slots__ = ("kind", "ratio", "where")
    KIND_FIELD_NUMBER: _ClassVar[int]
    RATIO_FIELD_NUMBER: _ClassVar[int]
    WHERE_FIELD_NUMBER: _ClassVar[int]
    kind: str
    ratio: float
    where: str
    def __init__(self, kind: _Optional[str] = ..., ratio: _Optional[float] = ..., where: _Optional[str] = ...) -> None: ...

class LRSchedule(_message.Message):
    __slots__ = ("step", "multi_step", "exponential", "cosine_annealing", "linear", "one_cycle", "sequential", "reduce_on_plateau")
    STEP_FIELD_NUMBER: _ClassVar[int]
    MULTI_STEP_FIELD_NUMBER: _ClassVar[int]
    EXPONENTIAL_FIELD_NUMBER: _ClassVar[int]
    COSINE_ANNEALING_FIELD_NUMBER: _ClassVar[int]
    LINEAR_FIELD_NUMBER: _ClassVar[int]
    ONE_CYCLE_FIELD_NUMBER: _ClassVar[int]
    SEQUENTIAL_FIELD_NUMBER: _ClassVar[int]
    REDUCE_ON_PLATEAU_FIELD_NUMBER: _ClassVar[int]
    step: StepLR
    multi_step: MultiStepLR
    exponential: ExponentialLR
    cosine_annealing: CosineAnnealingLR
    linear: LinearLR
    one_cycle: OneCycleLR
    sequential: SequentialLR
    reduce_on_plateau: ReduceLROnPlateau
    def __init__(self, step: _Optional[_Union[StepLR, _Mapping]] = ..., multi_step: _Optional[_Union[MultiStepLR, _Mapping]] = ..., exponential: _Optional[_Union[ExponentialLR, _Mapping]] = ..., cosine_annealing: _Optional[_Union[CosineAnnealingLR, _Mapping]] = ..., linear: _Optional[_Union[LinearLR, _Mapping]] = ..., one_cycle: _Optional[_Union[OneCycleLR, _Mapping]] = ..., sequential: _Optional[_Union[SequentialLR, _Mapping]] = ..., reduce_on_plateau: _Optional[_Union[ReduceLROnPlateau, _Mapping]] = ...) -> None: ...

class StepLR(_message.Message):
    __slots__ = ("step_size", "gamma")
    STEP_SIZE_FIELD_NUMBER: _ClassVar[int]
    GAMMA_FIELD_NUMBER: _ClassVar[int]
    step_size: int
    gamma: float
    def __init__(self, step_size: _Optional[int] = ..., gamma: _Optional[float] = ...) -> None: ...

class MultiStepLR(_message.Message):
    __slots__ = ("milestones", "gamma")
    MILESTONES_FIELD_NUMBER: _ClassVar[int]
    GAMMA_FIELD_NUMBER: _ClassVar[int]
    milestones: _containers.RepeatedScalarFieldContainer[int]
    gamma: float
    def __init__(self, milestones: _Optional[_Iterable[int]] = ..., gamma: _Optional[float] = ...) -> None: ...

class ExponentialLR(_message.Message):
    __slots__ = ("gamma",)
    GAMMA_FIELD_NUMBER: _ClassVar[int]
    gamma: float
    def __init__(self, gamma: _Optional[float] = ...) -> None: ...

class CosineAnnealingLR(_message.Message):
    __slots__ = ("T_max", "eta_min")
    T_MAX_FIELD_NUMBER: _ClassVar[int]
    ETA_MIN_FIELD_NUMBER: _ClassVar[int]
    T_max: int
    eta_min: float
    def __init__(self, T_max: _Optional[int] = ..., eta_min: _Optional[float] = ...) -> None: ...

class LinearLR(_message.Message):
    __slots__ = ("start_factor", "end_factor", "total_iters")
    START_FACTOR_FIELD_NUMBER: _ClassVar[int]
    END_FACTOR_FIELD_NUMBER: _ClassVar[int]
    TOTAL_ITERS_FIELD_NUMBER: _ClassVar[int]
    start_factor: float
    end_factor: float
    total_iters: int
    def __init__(self, start_factor: _Optional[float] = ..., end_factor: _Optional[float] = ..., total_iters: _Optional[int] = ...) -> None: ...

class OneCycleLR(_message.Message):
    __slots__ = ("max_lr", "total_steps", "pct_start", "anneal_strategy", "cycle_momentum", "base_momentum", "max_momentum", "div_factor", "final_div_factor", "three_phase")
    MAX_LR_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    PCT_START_FIELD_NUMBER: _ClassVar[int]
    ANNEAL_STRATEGY_FIELD_NUMBER: _ClassVar[int]
    CYCLE_MOMENTUM_FIELD_NUMBER: _ClassVar[int]
    BASE_MOMENTUM_FIELD_NUMBER: _ClassVar[int]
    MAX_MOMENTUM_FIELD_NUMBER: _ClassVar[int]
    DIV_FACTOR_FIELD_NUMBER: _ClassVar[int]
    FINAL_DIV_FACTOR_FIELD_NUMBER: _ClassVar[int]
    THREE_PHASE_FIELD_NUMBER: _ClassVar[int]
    max_lr: float
    total_steps: int
    pct_start: float
    anneal_strategy: str
    cycle_momentum: bool
    base_momentum: float
    max_momentum: float
    div_factor: float
    final_div_factor: float
    three_phase: bool
    def __init__(self, max_lr: _Optional[float] = ..., total_steps: _Optional[int] = ..., pct_start: _Optional[float] = ..., anneal_strategy: _Optional[str] = ..., cycle_momentum: _Optional[bool] = ..., base_momentum: _Optional[float] = ..., max_momentum: _Optional[float] = ..., div_factor: _Optional[float] = ..., final_div_factor: _Optional[float] = ..., three_phase: _Optional[bool] = ...) -> None: ...

class SequentialLR(_message.Message):
    __slots__ = ("schedulers", "milestones")
    SCHEDULERS_FIELD_NUMBER: _ClassVar[int]
    MILESTONES_FIELD_NUMBER: _ClassVar[int]
    schedulers: _containers.RepeatedCompositeFieldContainer[LRSchedule]
    milestones: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, schedulers: _Optional[_Iterable[_Union[LRSchedule, _Mapping]]] = ..., milestones: _Optional[_Iterable[int]] = ...) -> None: ...

class ReduceLROnPlateau(_message.Message):
    __slots__ = ("mode", "factor", "patience", "threshold", "threshold_mode", "cooldown", "min_lr", "eps")
    MODE_FIELD_NUMBER: _ClassVar[int]
    FACTOR_FIELD_NUMBER: _ClassVar[int]
    PATIENCE_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_MODE_FIELD_NUMBER: _ClassVar[int]
    COOLDOWN_FIELD_NUMBER: _ClassVar[int]
    MIN_LR_FIELD_NUMBER: _ClassVar[int]
    EPS_FIELD_NUMBER: _ClassVar[int]
    mode: str
    factor: float
    patience: int
    threshold: float
    threshold_mode: str
    cooldown: int
    min_lr: float
    eps: float
    def __init__(self, mode: _Optional[str] = ..., factor: _Optional[float] = ..., patience: _Optional[int] = ..., threshold: _Optional[float] = ..., threshold_mode: _Optional[str] = ..., cooldown: _Optional[int] = ..., min_lr: _Optional[float] = ..., eps: _Optional[float] = ...) -> None: ...

class GradientClipping(_message.Message):
    __slots__ = ("norm", "value")
    NORM_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    norm: ClipGradNorm
    value: ClipGradValue
    def __init__(self, norm: _Optional[_Union[ClipGradNorm, _Mapping]] = ..., value: _Optional[_Union[ClipGradValue, _Mapping]] = ...) -> None: ...

class ClipGradNorm(_message.Message):
    __slots__ = ("max_norm", "norm_type", "error_if_nonfinite")
    MAX_NORM_FIELD_NUMBER: _ClassVar[int]
    NORM_TYPE_FIELD_NUMBER: _ClassVar[int]
    ERROR_IF_NONFINITE_FIELD_NUMBER: _ClassVar[int]
    max_norm: float
    norm_type: float
    error_if_nonfinite: bool
    def __init__(self, max_norm: _Optional[float] = ..., norm_type: _Optional[float] = ..., error_if_nonfinite: _Optional[bool] = ...) -> None: ...

class ClipGradValue(_message.Message):
    __slots__ = ("clip_value",)
    CLIP_VALUE_FIELD_NUMBER: _ClassVar[int]
    clip_value: float
    def __init__(self, clip_value: _Optional[float] = ...) -> None: ...

class CreateJobResponse(_message.Message):
    __slots__ = ("job_id", "graph_id", "version", "placement")
    class PlacementEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    GRAPH_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    graph_id: str
    version: int
    placement: _containers.ScalarMap[str, int]
    def __init__(self, job_id: _Optional[str] = ..., graph_id: _Optional[str] = ..., version: _Optional[int] = ..., placement: _Optional[_Mapping[str, int]] = ...) -> None: ...

class StepRequest(_message.Message):
    __slots__ = ("job_id", "step_id", "batch")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    step_id: int
    batch: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.NamedTensor]
    def __init__(self, job_id: _Optional[str] = ..., step_id: _Optional[int] = ..., batch: _Optional[_Iterable[_Union[_tensor_pb2.NamedTensor, _Mapping]]] = ...) -> None: ...

class StepResponse(_message.Message):
    __slots__ = ("step_id", "loss", "metrics", "version", "batch_size", "micro_batches", "replayed", "timings", "lr", "grad_norm", "staleness")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    MICRO_BATCHES_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    LR_FIELD_NUMBER: _ClassVar[int]
    GRAD_NORM_FIELD_NUMBER: _ClassVar[int]
    STALENESS_FIELD_NUMBER: _ClassVar[int]
    step_id: int
    loss: float
    metrics: _containers.ScalarMap[str, float]
    version: int
    batch_size: int
    micro_batches: int
    replayed: bool
    timings: StepTimings
    lr: float
    grad_norm: float
    staleness: int
    def __init__(self, step_id: _Optional[int] = ..., loss: _Optional[float] = ..., metrics: _Optional[_Mapping[str, float]] = ..., version: _Optional[int] = ..., batch_size: _Optional[int] = ..., micro_batches: _Optional[int] = ..., replayed: _Optional[bool] = ..., timings: _Optional[_Union[StepTimings, _Mapping]] = ..., lr: _Optional[float] = ..., grad_norm: _Optional[float] = ..., staleness: _Optional[int] = ...) -> None: ...

class StepTimings(_message.Message):
    __slots__ = ("pull_seconds", "compute_seconds", "push_seconds", "apply_seconds", "total_seconds", "reassigned", "worker_compute_seconds")
    PULL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PUSH_SECONDS_FIELD_NUMBER: _ClassVar[int]
    APPLY_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    REASSIGNED_FIELD_NUMBER: _ClassVar[int]
    WORKER_COMPUTE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    pull_seconds: float
    compute_seconds: float
    push_seconds: float
    apply_seconds: float
    total_seconds: float
    reassigned: int
    worker_compute_seconds: float
    def __init__(self, pull_seconds: _Optional[float] = ..., compute_seconds: _Optional[float] = ..., push_seconds: _Optional[float] = ..., apply_seconds: _Optional[float] = ..., total_seconds: _Optional[float] = ..., reassigned: _Optional[int] = ..., worker_compute_seconds: _Optional[float] = ...) -> None: ...

class GetParametersRequest(_message.Message):
    __slots__ = ("job_id", "names")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    NAMES_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    names: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, job_id: _Optional[str] = ..., names: _Optional[_Iterable[str]] = ...) -> None: ...

class GetParametersResponse(_message.Message):
    __slots__ = ("version", "parameters")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    version: int
    parameters: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.NamedTensor]
    def __init__(self, version: _Optional[int] = ..., parameters: _Optional[_Iterable[_Union[_tensor_pb2.NamedTensor, _Mapping]]] = ...) -> None: ...

class JobStatusRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class JobStatusResponse(_message.Message):
    __slots__ = ("job_id", "graph_id", "version", "last_step_id", "next_step_id", "micro_batch_size", "optimizer", "placement", "samples", "last_loss", "shards", "workers", "error", "data_inputs", "metrics", "schedule", "clipping", "next_lr", "last_grad_norm", "mode", "deterministic", "compression", "gradient_bytes", "compressed_bytes", "staleness", "max_staleness", "recomputed")
    class PlacementEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    GRAPH_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    LAST_STEP_ID_FIELD_NUMBER: _ClassVar[int]
    NEXT_STEP_ID_FIELD_NUMBER: _ClassVar[int]
    MICRO_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    LAST_LOSS_FIELD_NUMBER: _ClassVar[int]
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    DATA_INPUTS_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    SCHEDULE_FIELD_NUMBER: _ClassVar[int]
    CLIPPING_FIELD_NUMBER: _ClassVar[int]
    NEXT_LR_FIELD_NUMBER: _ClassVar[int]
    LAST_GRAD_NORM_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    DETERMINISTIC_FIELD_NUMBER: _ClassVar[int]
    COMPRESSION_FIELD_NUMBER: _ClassVar[int]
    GRADIENT_BYTES_FIELD_NUMBER: _ClassVar[int]
    COMPRESSED_BYTES_FIELD_NUMBER: _ClassVar[int]
    STALENESS_FIELD_NUMBER: _ClassVar[int]
    MAX_STALENESS_FIELD_NUMBER: _ClassVar[int]
    RECOMPUTED_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    graph_id: str
    version: int
    last_step_id: int
    next_step_id: int
    micro_batch_size: int
    optimizer: _shard_pb2.Optimizer
    placement: _containers.ScalarMap[str, int]
    samples: int
    last_loss: float
    shards: int
    workers: int
    error: str
    data_inputs: _containers.RepeatedScalarFieldContainer[str]
    metrics: _containers.RepeatedScalarFieldContainer[str]
    schedule: LRSchedule
    clipping: GradientClipping
    next_lr: float
    last_grad_norm: float
    mode: str
    deterministic: bool
    compression: GradientCompression
    gradient_bytes: int
    compressed_bytes: int
    staleness: int
    max_staleness: int
    recomputed: int
    def __init__(self, job_id: _Optional[str] = ..., graph_id: _Optional[str] = ..., version: _Optional[int] = ..., last_step_id: _Optional[int] = ..., next_step_id: _Optional[int] = ..., micro_batch_size: _Optional[int] = ..., optimizer: _Optional[_Union[_shard_pb2.Optimizer, _Mapping]] = ..., placement: _Optional[_Mapping[str, int]] = ..., samples: _Optional[int] = ..., last_loss: _Optional[float] = ..., shards: _Optional[int] = ..., workers: _Optional[int] = ..., error: _Optional[str] = ..., data_inputs: _Optional[_Iterable[str]] = ..., metrics: _Optional[_Iterable[str]] = ..., schedule: _Optional[_Union[LRSchedule, _Mapping]] = ..., clipping: _Optional[_Union[GradientClipping, _Mapping]] = ..., next_lr: _Optional[float] = ..., last_grad_norm: _Optional[float] = ..., mode: _Optional[str] = ..., deterministic: _Optional[bool] = ..., compression: _Optional[_Union[GradientCompression, _Mapping]] = ..., gradient_bytes: _Optional[int] = ..., compressed_bytes: _Optional[int] = ..., staleness: _Optional[int] = ..., max_staleness: _Optional[int] = ..., recomputed: _Optional[int] = ...) -> None: ...

class ListWorkersRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListWorkersResponse(_message.Message):
    __slots__ = ("workers",)
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    workers: _containers.RepeatedCompositeFieldContainer[WorkerInfo]
    def __init__(self, workers: _Optional[_Iterable[_Union[WorkerInfo, _Mapping]]] = ...) -> None: ...

class WorkerInfo(_message.Message):
    __slots__ = ("address", "source", "state", "build_fingerprint", "backend", "reason", "completed", "failures", "worker_id")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    BUILD_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    COMPLETED_FIELD_NUMBER: _ClassVar[int]
    FAILURES_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    address: str
    source: str
    state: str
    build_fingerprint: str
    backend: str
    reason: str
    completed: int
    failures: int
    worker_id: str
    def __init__(self, address: _Optional[str] = ..., source: _Optional[str] = ..., state: _Optional[str] = ..., build_fingerprint: _Optional[str] = ..., backend: _Optional[str] = ..., reason: _Optional[str] = ..., completed: _Optional[int] = ..., failures: _Optional[int] = ..., worker_id: _Optional[str] = ...) -> None: ...

class RegisterWorkerRequest(_message.Message):
    __slots__ = ("address",)
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    address: str
    def __init__(self, address: _Optional[str] = ...) -> None: ...

class RegisterWorkerResponse(_message.Message):
    __slots__ = ("worker_id", "heartbeat_interval_seconds")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    heartbeat_interval_seconds: float
    def __init__(self, worker_id: _Optional[str] = ..., heartbeat_interval_seconds: _Optional[float] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("worker_id",)
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    def __init__(self, worker_id: _Optional[str] = ...) -> None: ...

class DeregisterWorkerRequest(_message.Message):
    __slots__ = ("worker_id",)
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    def __init__(self, worker_id: _Optional[str] = ...) -> None: ...

class DeregisterWorkerResponse(_message.Message):
    __slots__ = ("known",)
    KNOWN_FIELD_NUMBER: _ClassVar[int]
    known: bool
    def __init__(self, known: _Optional[bool] = ...) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ("known",)
    KNOWN_FIELD_NUMBER: _ClassVar[int]
    known: bool
    def __init__(self, known: _Optional[bool] = ...) -> None: ...
