"""Requests, from gRPC messages to the plain values of :mod:`.calls`: a
``ComputeGradientsRequest`` as a :class:`GradientRequest`, and a stream's frames as its
header and arrays."""

from __future__ import annotations

from typing import Iterator

import numpy as np

from gradmesh.server.runtime import ServiceError
from gradmesh.server.worker.calls import (
    GradientRequest,
    Prepared,
    SharedMemoryRef,
    TensorRef,
    WorkerLimits,
)
from gradmesh.server.worker.checks import INVALID
from gradmesh.server.worker.residuals import check_compression
from gradmesh.v1 import worker_pb2
from gradmesh.wire import frames, stream


def _tensor_refs(named_tensors) -> list[TensorRef]:
    refs = []
    for nt in named_tensors:
        t = nt.tensor
        # Every read of a bytes field copies it: read once here, decoded as views of this.
        refs.append(TensorRef(nt.name, t.dtype, tuple(t.shape), t.data))
    return refs


def gradient_request(message: worker_pb2.ComputeGradientsRequest) -> GradientRequest:
    """The plain form of a request message; each tensor's bytes read once, not copied
    again."""
    which = message.WhichOneof("graph_ref")
    shared = repeat_key = None
    if message.HasField("shared_memory"):
        s = message.shared_memory
        shared = SharedMemoryRef(
            s.segment,
            s.parameter_segment,
            s.gradient_segment,
            dict(s.parameter_offsets),
            dict(s.data_offsets),
            dict(s.gradient_offsets),
        )
        # A client reusing its segments sends these same bytes call after call.
        repeat_key = message.SerializeToString(deterministic=True)
    compression = None
    if message.HasField("compression"):
        c = message.compression
        compression = check_compression(
            c.kind, c.ratio, c.residual_set, c.residual_index, c.residual_round
        )
    return GradientRequest(
        graph_id=message.graph_id if which == "graph_id" else None,
        graph=message.graph if which == "graph" else None,
        parameters=_tensor_refs(message.parameters),
        data=_tensor_refs(message.data),
        gradients=list(message.gradients),
        outputs=list(message.outputs),
        loss_scale=message.loss_scale,
        seed=message.seed,
        shared_memory=shared,
        parameter_set=message.parameter_set,
        parameter_version=message.parameter_version,
        stream_gradients_early=message.stream_gradients_early,
        repeat_key=repeat_key,
        compression=compression,
    )


# ---------------------------------------------------------------------------------------
# Streams: a header frame, then chunk frames
# ---------------------------------------------------------------------------------------


class _UndecodableFrame:
    """What the stream's deserializer gives for bytes that are no ``StreamFrame``: gRPC
    answers INTERNAL when a deserializer raises, but a malformed frame is the client's
    fault, so the servicer answers INVALID_ARGUMENT instead (``WhichOneof`` is None)."""

    __slots__ = ("error",)

    def __init__(self, error: str):
        self.error = error

    def WhichOneof(self, _name: str) -> None:  # noqa: N802  (protobuf's spelling)
        return None


def decode_request_frame(buf: bytes):
    """The deserializer of ``ComputeGradientsStream``'s frames (never raises)."""
    try:
        return frames.decode_stream_frame(buf)
    except Exception as e:  # noqa: BLE001  (protobuf's DecodeError, or a fast-path error)
        return _UndecodableFrame(f"{type(e).__name__}: {e}")


def _undecodable(frame) -> str:
    """The error text for a frame that could not be decoded ("" for any other frame)."""
    if isinstance(frame, _UndecodableFrame):
        return f" (a frame was not a valid StreamFrame: {frame.error})"
    return ""


def stream_header(frames: Iterator) -> worker_pb2.ComputeGradientsRequest:
    """The request header, the stream's first frame."""
    first = next(frames, None)
    if first is None or first.WhichOneof("kind") != "request":
        raise ServiceError(
            INVALID,
            "the first frame of a stream must be the request header" + _undecodable(first),
            "request",
        )
    return first.request


def stream_tensors(
    header: worker_pb2.ComputeGradientsRequest,
    frames: Iterator,
    prepared: Prepared,
    limits: WorkerLimits,
    buffers: stream.BufferPool,
) -> tuple[dict, dict]:
    """The parameters and data of a stream whose ``header`` was prepared, assembled from
    its chunk frames (the kept parameters when the request names them)."""
    # Checks every limit from the header, then allocates each tensor once, in memory
    # that earlier streams used when it is free (nothing refers to it any more).
    assembler = stream.Assembler(
        header,
        limits.max_stream_bytes,
        tensor_fields=("parameters", "data"),
        max_elements=limits.max_tensor_elements,
        allocate=buffers.allocate,
    )
    add = assembler.add
    for frame in frames:
        if frame.WhichOneof("kind") != "chunk":
            raise ServiceError(
                INVALID,
                "after the header only chunk frames may follow" + _undecodable(frame),
                "chunk",
            )
        add(frame.chunk)
    arrays: dict[str, np.ndarray] = {
        slot.path: a for slot, a in zip(assembler.slots, assembler.finish())
    }
    params = {
        s.name: arrays[s.field] if prepared.kept is None else prepared.kept[s.name]
        for s in prepared.params
    }
    data = {s.name: arrays[s.field] for s in prepared.data}
    return params, data
