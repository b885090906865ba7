from gradmesh.v1 import graph_pb2 as _graph_pb2
from gradmesh.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RegisterGraphRequest(_message.Message):
    __slots__ = ("graph",)
    GRAPH_FIELD_NUMBER: _ClassVar[int]
    graph: _graph_pb2.Graph
    def __init__(self, graph: _Optional[_Union[_graph_pb2.Graph, _Mapping]] = ...) -> None: ...

class RegisterGraphResponse(_message.Message):
    __slots__ = ("graph_id",)
    GRAPH_ID_FIELD_NUMBER: _ClassVar[int]
    graph_id: str
    def __init__(self, graph_id: _Optional[str] = ...) -> None: ...

class ComputeGradientsRequest(_message.Message):
    __slots__ = ("graph_id", "graph", "parameters", "data", "gradients", "loss_scale", "seed", "outputs", "stream_gradients_early", "shared_memory", "parameter_set", "parameter_version", "compression")
    GRAPH_ID_FIELD_NUMBER: _ClassVar[int]
    GRAPH_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    GRADIENTS_FIELD_NUMBER: _ClassVar[int]
    LOSS_SCALE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    STREAM_GRADIENTS_EARLY_FIELD_NUMBER: _ClassVar[int]
    SHARED_MEMORY_FIELD_NUMBER: _ClassVar[int]
    PARAMETER_SET_FIELD_NUMBER: _ClassVar[int]
    PARAMETER_VERSION_FIELD_NUMBER: _ClassVar[int]
    COMPRESSION_FIELD_NUMBER: _ClassVar[int]
    graph_id: str
    graph: _graph_pb2.Graph
    parameters: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.NamedTensor]
    data: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.NamedTensor]
    gradients: _containers.RepeatedScalarFieldContainer[str]
    loss_scale: float
    seed: int
    outputs: _containers.RepeatedScalarFieldContainer[str]
    stream_gradients_early: bool
    shared_memory: SharedMemory
    parameter_set: str
    parameter_version: int
    compression: WorkerCompression
    def __init__(self, graph_id: _Optional[str] = ..., graph: _Optional[_Union[_graph_pb2.Graph, _Mapping]] = ..., parameters: _Optional[_Iterable[_Union[_tensor_pb2.NamedTensor, _Mapping]]] = ..., data: _Optional[_Iterable[_Union[_tensor_pb2.NamedTensor, _Mapping]]] = ..., gradients: _Optional[_Iterable[str]] = ..., loss_scale: _Optional[float] = ..., seed: _Optional[int] = ..., outputs: _Optional[_Iterable[str]] = ..., stream_gradients_early: _Optional[bool] = ..., shared_memory: _Optional[_Union[SharedMemory, _Mapping]] = ..., parameter_set: _Optional[str] = ..., parameter_version: _Optional[int] = ..., compression: _Optional[_Union[WorkerCompression, _Mapping]] = ...) -> None: ...

class WorkerCompression(_message.Message):
    __slots__ = ("kind", "ratio", "residual_set", "residual_index", "residual_round")
    KIND_FIELD_NUMBER: _ClassVar[int]
    RATIO_FIELD_NUMBER: _ClassVar[int]
    RESIDUAL_SET_FIELD_NUMBER: _ClassVar[int]
    RESIDUAL_INDEX_FIELD_NUMBER: _ClassVar[int]
    RESIDUAL_ROUND_FIELD_NUMBER: _ClassVar[int]
    kind: str
    ratio: float
    residual_set: str
    residual_index: int
    residual_round: int
    def __init__(self, kind: _Optional[str] = ..., ratio: _Optional[float] = ..., residual_set: _Optional[str] = ..., residual_index: _Optional[int] = ..., residual_round: _Optional[int] = ...) -> None: ...

class SharedMemory(_message.Message):
    __slots__ = ("segment", "parameter_offsets", "gradient_segment", "gradient_offsets", "data_offsets", "parameter_segment")
    class ParameterOffsetsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    class GradientOffsetsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    class DataOffsetsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    SEGMENT_FIELD_NUMBER: _ClassVar[int]
    PARAMETER_OFFSETS_FIELD_NUMBER: _ClassVar[int]
    GRADIENT_SEGMENT_FIELD_NUMBER: _ClassVar[int]
    GRADIENT_OFFSETS_FIELD_NUMBER: _ClassVar[int]
    DATA_OFFSETS_FIELD_NUMBER: _ClassVar[int]
    PARAMETER_SEGMENT_FIELD_NUMBER: _ClassVar[int]
    segment: str
    parameter_offsets: _containers.ScalarMap[str, int]
    gradient_segment: str
    gradient_offsets: _containers.ScalarMap[str, int]
    data_offsets: _containers.ScalarMap[str, int]
    parameter_segment: str
    def __init__(self, segment: _Optional[str] = ..., parameter_offsets: _Optional[_Mapping[str, int]] = ..., gradient_segment: _Optional[str] = ..., gradient_offsets: _Optional[_Mapping[str, int]] = ..., data_offsets: _Optional[_Mapping[str, int]] = ..., parameter_segment: _Optional[str] = ...) -> None: ...

class ComputeGradientsResponse(_message.Message):
    __slots__ = ("loss", "outputs", "gradients", "timings", "graph_id", "gradients_in_shared_memory", "buffers", "unused_parameters", "compressed_gradients", "compression")
    LOSS_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    GRADIENTS_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    GRAPH_ID_FIELD_NUMBER: _ClassVar[int]
    GRADIENTS_IN_SHARED_MEMORY_FIELD_NUMBER: _ClassVar[int]
    BUFFERS_FIELD_NUMBER: _ClassVar[int]
    UNUSED_PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    COMPRESSED_GRADIENTS_FIELD_NUMBER: _ClassVar[int]
    COMPRESSION_FIELD_NUMBER: _ClassVar[int]
    loss: _tensor_pb2.Tensor
    outputs: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.NamedTensor]
    gradients: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.NamedTensor]
    timings: Timings
    graph_id: str
    gradients_in_shared_memory: bool
    buffers: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.NamedTensor]
    unused_parameters: _containers.RepeatedScalarFieldContainer[str]
    compressed_gradients: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.NamedTensor]
    compression: str
    def __init__(self, loss: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., outputs: _Optional[_Iterable[_Union[_tensor_pb2.NamedTensor, _Mapping]]] = ..., gradients: _Optional[_Iterable[_Union[_tensor_pb2.NamedTensor, _Mapping]]] = ..., timings: _Optional[_Union[Timings, _Mapping]] = ..., graph_id: _Optional[str] = ..., gradients_in_shared_memory: _Optional[bool] = ..., buffers: _Optional[_Iterable[_Union[_tensor_pb2.NamedTensor, _Mapping]]] = ..., unused_parameters: _Optional[_Iterable[str]] = ..., compressed_gradients: _Optional[_Iterable[_Union[_tensor_pb2.NamedTensor, _Mapping]]] = ..., compression: _Optional[str] = ...) -> None: ...

class Timings(_message.Message):
    __slots__ = ("decode_seconds", "forward_seconds", "backward_seconds", "encode_seconds", "plan_cached")
    DECODE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    FORWARD_SECONDS_FIELD_NUMBER: _ClassVar[int]
    BACKWARD_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ENCODE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PLAN_CACHED_FIELD_NUMBER: _ClassVar[int]
    decode_seconds: float
    forward_seconds: float
    backward_seconds: float
    encode_seconds: float
    plan_cached: bool
    def __init__(self, decode_seconds: _Optional[float] = ..., forward_seconds: _Optional[float] = ..., backward_seconds: _Optional[float] = ..., encode_seconds: _Optional[float] = ..., plan_cached: _Optional[bool] = ...) -> None: ...

class StreamFrame(_message.Message):
    __slots__ = ("request", "response", "chunk")
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    request: ComputeGradientsRequest
    response: ComputeGradientsResponse
    chunk: _tensor_pb2.Chunk
    def __init__(self, request: _Optional[_Union[ComputeGradientsRequest, _Mapping]] = ..., response: _Optional[_Union[ComputeGradientsResponse, _Mapping]] = ..., chunk: _Optional[_Union[_tensor_pb2.Chunk, _Mapping]] = ...) -> None: ...

class CapabilitiesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CapabilitiesResponse(_message.Message):
    __slots__ = ("ops", "dtypes", "backend", "limits", "versions", "blas_threads", "build_fingerprint", "shared_memory", "op_schemas", "compression_kinds")
    class VersionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    OPS_FIELD_NUMBER: _ClassVar[int]
    DTYPES_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    BLAS_THREADS_FIELD_NUMBER: _ClassVar[int]
    BUILD_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    SHARED_MEMORY_FIELD_NUMBER: _ClassVar[int]
    OP_SCHEMAS_FIELD_NUMBER: _ClassVar[int]
    COMPRESSION_KINDS_FIELD_NUMBER: _ClassVar[int]
    ops: _containers.RepeatedScalarFieldContainer[str]
    dtypes: _containers.RepeatedScalarFieldContainer[_tensor_pb2.DType]
    backend: str
    limits: Limits
    versions: _containers.ScalarMap[str, str]
    blas_threads: int
    build_fingerprint: str
    shared_memory: bool
    op_schemas: _containers.RepeatedCompositeFieldContainer[OpSchema]
    compression_kinds: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, ops: _Optional[_Iterable[str]] = ..., dtypes: _Optional[_Iterable[_Union[_tensor_pb2.DType, str]]] = ..., backend: _Optional[str] = ..., limits: _Optional[_Union[Limits, _Mapping]] = ..., versions: _Optional[_Mapping[str, str]] = ..., blas_threads: _Optional[int] = ..., build_fingerprint: _Optional[str] = ..., shared_memory: _Optional[bool] = ..., op_schemas: _Optional[_Iterable[_Union[OpSchema, _Mapping]]] = ..., compression_kinds: _Optional[_Iterable[str]] = ...) -> None: ...

class OpSchema(_message.Message):
    __slots__ = ("name", "inputs", "attributes", "output_dtype", "broadcast", "differentiable")
    NAME_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTES_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_DTYPE_FIELD_NUMBER: _ClassVar[int]
    BROADCAST_FIELD_NUMBER: _ClassVar[int]
    DIFFERENTIABLE_FIELD_NUMBER: _ClassVar[int]
    name: str
    inputs: _containers.RepeatedCompositeFieldContainer[OpInputSchema]
    attributes: _containers.RepeatedCompositeFieldContainer[OpAttributeSchema]
    output_dtype: OutputDTypeRule
    broadcast: bool
    differentiable: bool
    def __init__(self, name: _Optional[str] = ..., inputs: _Optional[_Iterable[_Union[OpInputSchema, _Mapping]]] = ..., attributes: _Optional[_Iterable[_Union[OpAttributeSchema, _Mapping]]] = ..., output_dtype: _Optional[_Union[OutputDTypeRule, _Mapping]] = ..., broadcast: _Optional[bool] = ..., differentiable: _Optional[bool] = ...) -> None: ...

class OpInputSchema(_message.Message):
    __slots__ = ("name", "variadic", "optional", "differentiable", "broadcasts")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VARIADIC_FIELD_NUMBER: _ClassVar[int]
    OPTIONAL_FIELD_NUMBER: _ClassVar[int]
    DIFFERENTIABLE_FIELD_NUMBER: _ClassVar[int]
    BROADCASTS_FIELD_NUMBER: _ClassVar[int]
    name: str
    variadic: bool
    optional: bool
    differentiable: bool
    broadcasts: bool
    def __init__(self, name: _Optional[str] = ..., variadic: _Optional[bool] = ..., optional: _Optional[bool] = ..., differentiable: _Optional[bool] = ..., broadcasts: _Optional[bool] = ...) -> None: ...

class OpAttributeSchema(_message.Message):
    __slots__ = ("name", "field", "nullable", "default", "allowed_values")
    NAME_FIELD_NUMBER: _ClassVar[int]
    FIELD_FIELD_NUMBER: _ClassVar[int]
    NULLABLE_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_FIELD_NUMBER: _ClassVar[int]
    ALLOWED_VALUES_FIELD_NUMBER: _ClassVar[int]
    name: str
    field: str
    nullable: bool
    default: _graph_pb2.Attribute
    allowed_values: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., field: _Optional[str] = ..., nullable: _Optional[bool] = ..., default: _Optional[_Union[_graph_pb2.Attribute, _Mapping]] = ..., allowed_values: _Optional[_Iterable[str]] = ...) -> None: ...

class OutputDTypeRule(_message.Message):
    __slots__ = ("rule", "inputs", "attr")
    RULE_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    ATTR_FIELD_NUMBER: _ClassVar[int]
    rule: str
    inputs: _containers.RepeatedScalarFieldContainer[str]
    attr: str
    def __init__(self, rule: _Optional[str] = ..., inputs: _Optional[_Iterable[str]] = ..., attr: _Optional[str] = ...) -> None: ...

class Limits(_message.Message):
    __slots__ = ("max_graph_nodes", "max_tensor_elements", "max_message_bytes", "max_stream_bytes", "max_concurrent_requests", "chunk_bytes", "parameter_cache_bytes", "residual_bytes")
    MAX_GRAPH_NODES_FIELD_NUMBER: _ClassVar[int]
    MAX_TENSOR_ELEMENTS_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_STREAM_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_CONCURRENT_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    PARAMETER_CACHE_BYTES_FIELD_NUMBER: _ClassVar[int]
    RESIDUAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    max_graph_nodes: int
    max_tensor_elements: int
    max_message_bytes: int
    max_stream_bytes: int
    max_concurrent_requests: int
    chunk_bytes: int
    parameter_cache_bytes: int
    residual_bytes: int
    def __init__(self, max_graph_nodes: _Optional[int] = ..., max_tensor_elements: _Optional[int] = ..., max_message_bytes: _Optional[int] = ..., max_stream_bytes: _Optional[int] = ..., max_concurrent_requests: _Optional[int] = ..., chunk_bytes: _Optional[int] = ..., parameter_cache_bytes: _Optional[int] = ..., residual_bytes: _Optional[int] = ...) -> None: ...
