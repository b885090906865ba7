from gradmesh.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Optimizer(_message.Message):
    __slots__ = ("name", "lr", "momentum", "dampening", "nesterov", "weight_decay", "beta1", "beta2", "eps", "amsgrad", "maximize", "alpha", "centered", "lr_decay", "initial_accumulator_value", "momentum_decay", "decoupled_weight_decay", "weight_decay_by_parameter")
    class WeightDecayByParameterEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    LR_FIELD_NUMBER: _ClassVar[int]
    MOMENTUM_FIELD_NUMBER: _ClassVar[int]
    DAMPENING_FIELD_NUMBER: _ClassVar[int]
    NESTEROV_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_DECAY_FIELD_NUMBER: _ClassVar[int]
    BETA1_FIELD_NUMBER: _ClassVar[int]
    BETA2_FIELD_NUMBER: _ClassVar[int]
    EPS_FIELD_NUMBER: _ClassVar[int]
    AMSGRAD_FIELD_NUMBER: _ClassVar[int]
    MAXIMIZE_FIELD_NUMBER: _ClassVar[int]
    ALPHA_FIELD_NUMBER: _ClassVar[int]
    CENTERED_FIELD_NUMBER: _ClassVar[int]
    LR_DECAY_FIELD_NUMBER: _ClassVar[int]
    INITIAL_ACCUMULATOR_VALUE_FIELD_NUMBER: _ClassVar[int]
    MOMENTUM_DECAY_FIELD_NUMBER: _ClassVar[int]
    DECOUPLED_WEIGHT_DECAY_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_DECAY_BY_PARAMETER_FIELD_NUMBER: _ClassVar[int]
    name: str
    lr: float
    momentum: float
    dampening: float
    nesterov: bool
    weight_decay: float
    beta1: float
    beta2: float
    eps: float
    amsgrad: bool
    maximize: bool
    alpha: float
    centered: bool
    lr_decay: float
    initial_accumulator_value: float
    momentum_decay: float
    decoupled_weight_decay: bool
    weight_decay_by_parameter: _containers.ScalarMap[str, float]
    def __init__(self, name: _Optional[str] = ..., lr: _Optional[float] = ..., momentum: _Optional[float] = ..., dampening: _Optional[float] = ..., nesterov: _Optional[bool] = ..., weight_decay: _Optional[float] = ..., beta1: _Optional[float] = ..., beta2: _Optional[float] = ..., eps: _Optional[float] = ..., amsgrad: _Optional[bool] = ..., maximize: _Optional[bool] = ..., alpha: _Optional[float] = ..., centered: _Optional[bool] = ..., lr_decay: _Optional[float] = ..., initial_accumulator_value: _Optional[float] = ..., momentum_decay: _Optional[float] = ..., decoupled_weight_decay: _Optional[bool] = ..., weight_decay_by_parameter: _Optional[_Mapping[str, float]] = ...) -> None: ...

class ShardFrame(_message.Message):
    __slots__ = ("load", "push", "pulled", "chunk")
    LOAD_FIELD_NUMBER: _ClassVar[int]
    PUSH_FIELD_NUMBER: _ClassVar[int]
    PULLED_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    load: LoadRequest
    push: PushGradientsRequest
    pulled: PullResponse
    chunk: _tensor_pb2.Chunk
    def __init__(self, load: _Optional[_Union[LoadRequest, _Mapping]] = ..., push: _Optional[_Union[PushGradientsRequest, _Mapping]] = ..., pulled: _Optional[_Union[PullResponse, _Mapping]] = ..., chunk: _Optional[_Union[_tensor_pb2.Chunk, _Mapping]] = ...) -> None: ...

class LoadRequest(_message.Message):
    __slots__ = ("job_id", "parameters", "optimizer")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    parameters: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.NamedTensor]
    optimizer: Optimizer
    def __init__(self, job_id: _Optional[str] = ..., parameters: _Optional[_Iterable[_Union[_tensor_pb2.NamedTensor, _Mapping]]] = ..., optimizer: _Optional[_Union[Optimizer, _Mapping]] = ...) -> None: ...

class LoadResponse(_message.Message):
    __slots__ = ("version", "last_step_id")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    LAST_STEP_ID_FIELD_NUMBER: _ClassVar[int]
    version: int
    last_step_id: int
    def __init__(self, version: _Optional[int] = ..., last_step_id: _Optional[int] = ...) -> None: ...

class PullRequest(_message.Message):
    __slots__ = ("job_id", "version", "names")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    NAMES_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    version: int
    names: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, job_id: _Optional[str] = ..., version: _Optional[int] = ..., names: _Optional[_Iterable[str]] = ...) -> None: ...

class PullResponse(_message.Message):
    __slots__ = ("version", "parameters")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    version: int
    parameters: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.NamedTensor]
    def __init__(self, version: _Optional[int] = ..., parameters: _Optional[_Iterable[_Union[_tensor_pb2.NamedTensor, _Mapping]]] = ...) -> None: ...

class PushGradientsRequest(_message.Message):
    __slots__ = ("job_id", "step_id", "micro_batch", "micro_batches", "version", "gradients", "attempt", "unused_parameters", "compression", "compressed_gradients")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    MICRO_BATCH_FIELD_NUMBER: _ClassVar[int]
    MICRO_BATCHES_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    GRADIENTS_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    UNUSED_PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    COMPRESSION_FIELD_NUMBER: _ClassVar[int]
    COMPRESSED_GRADIENTS_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    step_id: int
    micro_batch: int
    micro_batches: int
    version: int
    gradients: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.NamedTensor]
    attempt: int
    unused_parameters: _containers.RepeatedScalarFieldContainer[str]
    compression: str
    compressed_gradients: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.NamedTensor]
    def __init__(self, job_id: _Optional[str] = ..., step_id: _Optional[int] = ..., micro_batch: _Optional[int] = ..., micro_batches: _Optional[int] = ..., version: _Optional[int] = ..., gradients: _Optional[_Iterable[_Union[_tensor_pb2.NamedTensor, _Mapping]]] = ..., attempt: _Optional[int] = ..., unused_parameters: _Optional[_Iterable[str]] = ..., compression: _Optional[str] = ..., compressed_gradients: _Optional[_Iterable[_Union[_tensor_pb2.NamedTensor, _Mapping]]] = ...) -> None: ...

class PushGradientsResponse(_message.Message):
    __slots__ = ("duplicate", "received")
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    RECEIVED_FIELD_NUMBER: _ClassVar[int]
    duplicate: bool
    received: int
    def __init__(self, duplicate: _Optional[bool] = ..., received: _Optional[int] = ...) -> None: ...

class ApplyRequest(_message.Message):
    __slots__ = ("job_id", "step_id", "micro_batches", "version", "checkpoint", "attempt", "lr", "momentum", "beta1", "clip_coefficient", "clip_value")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    MICRO_BATCHES_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    LR_FIELD_NUMBER: _ClassVar[int]
    MOMENTUM_FIELD_NUMBER: _ClassVar[int]
    BETA1_FIELD_NUMBER: _ClassVar[int]
    CLIP_COEFFICIENT_FIELD_NUMBER: _ClassVar[int]
    CLIP_VALUE_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    step_id: int
    micro_batches: int
    version: int
    checkpoint: bool
    attempt: int
    lr: float
    momentum: float
    beta1: float
    clip_coefficient: float
    clip_value: float
    def __init__(self, job_id: _Optional[str] = ..., step_id: _Optional[int] = ..., micro_batches: _Optional[int] = ..., version: _Optional[int] = ..., checkpoint: _Optional[bool] = ..., attempt: _Optional[int] = ..., lr: _Optional[float] = ..., momentum: _Optional[float] = ..., beta1: _Optional[float] = ..., clip_coefficient: _Optional[float] = ..., clip_value: _Optional[float] = ...) -> None: ...

class GradientNormsRequest(_message.Message):
    __slots__ = ("job_id", "step_id", "micro_batches", "version", "attempt", "norm_type")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    MICRO_BATCHES_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    NORM_TYPE_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    step_id: int
    micro_batches: int
    version: int
    attempt: int
    norm_type: float
    def __init__(self, job_id: _Optional[str] = ..., step_id: _Optional[int] = ..., micro_batches: _Optional[int] = ..., version: _Optional[int] = ..., attempt: _Optional[int] = ..., norm_type: _Optional[float] = ...) -> None: ...

class GradientNormsResponse(_message.Message):
    __slots__ = ("norms",)
    class NormsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    NORMS_FIELD_NUMBER: _ClassVar[int]
    norms: _containers.ScalarMap[str, float]
    def __init__(self, norms: _Optional[_Mapping[str, float]] = ...) -> None: ...

class ApplyResponse(_message.Message):
    __slots__ = ("version", "already_applied", "apply_seconds")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ALREADY_APPLIED_FIELD_NUMBER: _ClassVar[int]
    APPLY_SECONDS_FIELD_NUMBER: _ClassVar[int]
    version: int
    already_applied: bool
    apply_seconds: float
    def __init__(self, version: _Optional[int] = ..., already_applied: _Optional[bool] = ..., apply_seconds: _Optional[float] = ...) -> None: ...

class ShardStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ShardStatusResponse(_message.Message):
    __slots__ = ("jobs",)
    JOBS_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[ShardJob]
    def __init__(self, jobs: _Optional[_Iterable[_Union[ShardJob, _Mapping]]] = ...) -> None: ...

class ShardJob(_message.Message):
    __slots__ = ("job_id", "version", "last_step_id", "parameters", "parameter_bytes")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    LAST_STEP_ID_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    PARAMETER_BYTES_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    version: int
    last_step_id: int
    parameters: _containers.RepeatedScalarFieldContainer[str]
    parameter_bytes: int
    def __init__(self, job_id: _Optional[str] = ..., version: _Optional[int] = ..., last_step_id: _Optional[int] = ..., parameters: _Optional[_Iterable[str]] = ..., parameter_bytes: _Optional[int] = ...) -> None: ...

class DropJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class DropJobResponse(_message.Message):
    __slots__ = ("dropped",)
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    dropped: bool
    def __init__(self, dropped: _Optional[bool] = ...) -> None: ...
