"""Calls to the ParameterShard service (shard.proto), and what its messages carry.

Optimizer descriptions to and from ``Optimizer`` messages; the frame streams every
streaming RPC of shards and coordinators uses (a header frame, then the tensors' chunks:
:func:`stream_frames` as protobuf messages for generated stubs, :func:`shard_frames` with
the frame codec, :func:`receive_frames` to read either); and :class:`RemoteShard`, the
client of a shard server, with the methods of the coordinator's embedded shard.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator

import grpc
import numpy as np

from gradmesh.core import optim
from gradmesh.core.serialize import WireError, to_proto
from gradmesh.v1 import shard_pb2, shard_pb2_grpc

from .channel import call_metadata, channel, metadata
from .errors import GradmeshError, error_class, request_id_of
from .frames import SHARD_FRAME_CHUNK_FIELD, chunk_frames, frame_decoder, serialize_message
from .stream import DEFAULT_CHUNK_BYTES, Assembler, BufferPool, chunks, tensor_buffer

__all__ = [
    "RemoteShard",
    "optimizer_to_proto",
    "optimizer_from_proto",
    "step_args_from_proto",
    "stream_frames",
    "shard_frames",
    "receive_frames",
    "named_headers",
    "SERVICE_NAME",
    "STREAM_CHUNK_BYTES",
]

SERVICE_NAME = shard_pb2.DESCRIPTOR.services_by_name["ParameterShard"].full_name
# Chunk size of the shard's streams (frames are encoded straight from the arrays); 1, 2
# and 4 MiB measured alike for 100 MB over loopback.
STREAM_CHUNK_BYTES = DEFAULT_CHUNK_BYTES
# Parameters pulled by all RemoteShards of a process live in memory reused once nothing
# refers to them any more (fresh pages cost the kernel more than gRPC costs their bytes);
# at most this much is kept idle.
PULL_POOL_BYTES = 512 << 20
_pulled_buffers = BufferPool(PULL_POOL_BYTES)


# ------------------------------------------------------------------ optimizer messages --

_PROTO_FIELDS = (
    "lr",
    "momentum",
    "dampening",
    "nesterov",
    "weight_decay",
    "eps",
    "amsgrad",
    "maximize",
    "alpha",
    "centered",
    "lr_decay",
    "initial_accumulator_value",
    "momentum_decay",
    "decoupled_weight_decay",
)


def optimizer_from_proto(msg: shard_pb2.Optimizer, field: str = "optimizer") -> dict:
    """A validated optimizer description (``optim.validate``'s form) from an Optimizer
    message; ``WireError`` (INVALID_ARGUMENT, ``field``) for an invalid one."""
    desc: dict = {"name": msg.name}
    for key in _PROTO_FIELDS:
        if msg.HasField(key):
            desc[key] = getattr(msg, key)
    if msg.HasField("beta1") or msg.HasField("beta2"):
        default = optim.HYPERPARAMETERS.get(msg.name, {}).get("betas", (0.9, 0.999))
        desc["betas"] = [
            msg.beta1 if msg.HasField("beta1") else default[0],
            msg.beta2 if msg.HasField("beta2") else default[1],
        ]
    if msg.weight_decay_by_parameter:
        desc[optim.WEIGHT_DECAY_BY_PARAMETER] = dict(msg.weight_decay_by_parameter)
    try:
        return optim.validate(desc)
    except ValueError as e:
        raise WireError(field, str(e)) from None


def optimizer_to_proto(description: dict) -> shard_pb2.Optimizer:
    """The Optimizer message of a description (every hyper-parameter set explicitly)."""
    d = optim.validate(description)
    msg = shard_pb2.Optimizer(name=d["name"])
    for key in _PROTO_FIELDS:
        if key in d:
            setattr(msg, key, d[key])
    if "betas" in d:
        msg.beta1, msg.beta2 = d["betas"]
    msg.weight_decay_by_parameter.update(d.get(optim.WEIGHT_DECAY_BY_PARAMETER, {}))
    return msg


# The optional fields of ApplyRequest that carry a step's scheduled hyper-parameters and
# clipping, named as the shard's step arguments.
STEP_ARG_FIELDS = ("lr", "momentum", "beta1", "clip_coefficient", "clip_value")


def step_args_from_proto(request: shard_pb2.ApplyRequest) -> dict:
    """The step arguments an ApplyRequest sets (empty: the optimizer's own values)."""
    return {k: getattr(request, k) for k in STEP_ARG_FIELDS if request.HasField(k)}


# ------------------------------------------------------------------ frame streams -------


def stream_frames(
    frame_cls, kind: str, header, arrays: Iterable, chunk_bytes: int | None = None
) -> Iterator:
    """A header frame (``frame_cls(**{kind: header})``) then the Chunk frames of ``arrays``,
    as protobuf messages (for generated stubs; the shard's own streams use
    :func:`shard_frames`).

    ``header``'s tensors must carry dtype and shape only (``to_proto(a, data=False)``).
    """
    yield frame_cls(**{kind: header})
    buffers = [tensor_buffer(a) for a in arrays]
    for c in chunks(buffers, chunk_bytes or DEFAULT_CHUNK_BYTES):
        yield frame_cls(chunk=c)


def shard_frames(kind: str, header, arrays: Iterable, chunk_bytes: int | None = None) -> Iterator:
    """The ``ShardFrame`` stream of ``header`` (field ``kind``) and ``arrays``: the header
    as a message, then chunk frames encoded straight from the arrays' memory (one copy of
    their bytes; send with ``serialize_message``)."""
    yield shard_pb2.ShardFrame(**{kind: header})
    yield from chunk_frames(
        arrays, chunk_bytes or STREAM_CHUNK_BYTES, field=SHARD_FRAME_CHUNK_FIELD
    )


def receive_frames(
    frames: Iterator,
    kind: str,
    max_total_bytes: int,
    max_elements: int | None = None,
    allocate: Callable[[int], np.ndarray] | None = None,
) -> tuple[Any, dict[str, np.ndarray]]:
    """Read a header frame of ``kind`` and its chunks: ``(header, {name: array})``.

    Frames are protobuf messages or the codec's :class:`~gradmesh.wire.frames.ChunkFrame`
    alike; ``allocate`` supplies the tensors' buffers (see ``Assembler``). Raises
    ``WireError`` (INVALID_ARGUMENT naming the field) for a stream that does not start with
    the header, a second header, a duplicate name or a bad chunk.
    """
    first = next(frames, None)
    if first is None or first.WhichOneof("kind") != kind:
        raise WireError(kind, f"the stream must start with a frame holding `{kind}`")
    header = getattr(first, kind)
    asm = Assembler(header, max_total_bytes, max_elements=max_elements, allocate=allocate)
    for frame in frames:
        if frame.WhichOneof("kind") != "chunk":
            raise WireError(
                frame.WhichOneof("kind") or "kind",
                f"only chunk frames may follow the `{kind}` header",
            )
        asm.add(frame.chunk)
    arrays = asm.finish()
    out: dict[str, np.ndarray] = {}
    for slot, a in zip(asm.slots, arrays):
        if slot.name in out:
            raise WireError(slot.path, f"name {slot.name!r} appears twice")
        if not slot.name:
            raise WireError(slot.path + ".name", "every tensor needs a name")
        out[slot.name] = a
    return header, out


def named_headers(repeated, arrays: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Add a header (dtype and shape, no bytes) per array to the repeated NamedTensor
    field ``repeated``; returns the arrays in that order."""
    for name, a in arrays.items():
        repeated.add(name=name).tensor.CopyFrom(to_proto(a, data=False))
    return list(arrays.values())


# ------------------------------------------------------------------ the client ----------


class RemoteShard:
    """A shard server, with the same methods as the coordinator's embedded shard (failures
    raise ``GradmeshError`` with the remote status code, so the coordinator treats both
    alike)."""

    def __init__(
        self,
        target: str,
        timeout: float = 60.0,
        token: str | None = None,
        max_message_bytes: int = 64 << 20,
        tls: Any = None,
    ):
        self.name = target
        self.timeout = timeout
        # tls: None (plaintext) or a gradmesh TLS (see wire/channel.py).
        # A shard that restarts is dialled again within a second (gRPC's default backoff
        # grows to two minutes): a wedged job resumes as soon as its shard is back.
        self._channel = channel(
            target,
            tls=tls,
            max_message_bytes=max_message_bytes,
            options=[
                ("grpc.initial_reconnect_backoff_ms", 100),
                ("grpc.min_reconnect_backoff_ms", 100),
                ("grpc.max_reconnect_backoff_ms", 1000),
            ],
        )
        self._stub = shard_pb2_grpc.ParameterShardStub(self._channel)
        self._metadata = metadata(token)
        # The streams with gradmesh's frame codec (wire/frames.py): the same bytes as
        # protobuf's, with one copy of the tensors' bytes per side instead of three or four.
        method = f"/{SERVICE_NAME}/"
        self._load_call = self._channel.stream_unary(
            method + "Load",
            request_serializer=serialize_message,
            response_deserializer=shard_pb2.LoadResponse.FromString,
            _registered_method=True,
        )
        self._push_call = self._channel.stream_unary(
            method + "PushGradients",
            request_serializer=serialize_message,
            response_deserializer=shard_pb2.PushGradientsResponse.FromString,
            _registered_method=True,
        )
        self._pull_call = self._channel.unary_stream(
            method + "Pull",
            request_serializer=shard_pb2.PullRequest.SerializeToString,
            response_deserializer=frame_decoder(shard_pb2.ShardFrame, SHARD_FRAME_CHUNK_FIELD),
            _registered_method=True,
        )

    def _error(self, e: grpc.RpcError, method: str) -> GradmeshError:
        # No field: the shard's field names its own request, not the caller's.
        code = e.code() if hasattr(e, "code") else grpc.StatusCode.UNKNOWN
        return error_class(code)(
            code, f"shard {self.name}: {e.details()}", None, method, request_id_of(e)
        )

    def _call(self, method: str, fn, *args):
        try:
            return fn(*args, timeout=self.timeout, metadata=call_metadata(self._metadata))
        except grpc.RpcError as e:
            raise self._error(e, method) from None

    def load(self, job_id, params, optimizer):
        header = shard_pb2.LoadRequest(job_id=job_id, optimizer=optimizer_to_proto(optimizer))
        values = named_headers(header.parameters, params)
        r = self._call("Load", self._load_call, shard_frames("load", header, values))
        return r.version, r.last_step_id

    def pull(self, job_id, version=0, names=(), copy=True):
        frames = self._call(
            "Pull",
            self._pull_call,
            shard_pb2.PullRequest(job_id=job_id, version=version, names=list(names)),
        )
        try:
            # The caller drops a version's arrays when it pulls the next: pooled memory.
            header, arrays = receive_frames(
                iter(frames), "pulled", 1 << 40, allocate=_pulled_buffers.allocate
            )
        except grpc.RpcError as e:
            raise self._error(e, "Pull") from None
        return header.version, arrays

    def push(
        self,
        job_id,
        step_id,
        micro_batch,
        micro_batches,
        version,
        gradients,
        attempt=0,
        unused=(),
        compressed=None,
    ):
        """``compressed``: ``(kind, {name: encoded uint8 array})`` for a job in compressed
        mode (:mod:`gradmesh.wire.compression`); those parameters are not in ``gradients``."""
        header = shard_pb2.PushGradientsRequest(
            job_id=job_id,
            step_id=step_id,
            micro_batch=micro_batch,
            micro_batches=micro_batches,
            version=version,
            attempt=attempt,
            unused_parameters=sorted(unused),
        )
        values = named_headers(header.gradients, gradients)
        if compressed is not None:
            header.compression = compressed[0]
            values += named_headers(header.compressed_gradients, compressed[1])
        r = self._call("PushGradients", self._push_call, shard_frames("push", header, values))
        return r.duplicate, r.received

    def apply(
        self,
        job_id,
        step_id,
        micro_batches,
        version,
        checkpoint_now=False,
        attempt=0,
        step_args=None,
    ):
        r = self._call(
            "Apply",
            self._stub.Apply,
            shard_pb2.ApplyRequest(
                job_id=job_id,
                step_id=step_id,
                micro_batches=micro_batches,
                version=version,
                checkpoint=checkpoint_now,
                attempt=attempt,
                **(step_args or {}),
            ),
        )
        return r.version, r.already_applied, r.apply_seconds

    def gradient_norms(self, job_id, step_id, micro_batches, version, attempt=0, norm_type=2.0):
        r = self._call(
            "GradientNorms",
            self._stub.GradientNorms,
            shard_pb2.GradientNormsRequest(
                job_id=job_id,
                step_id=step_id,
                micro_batches=micro_batches,
                version=version,
                attempt=attempt,
                norm_type=norm_type,
            ),
        )
        return dict(r.norms)

    def status(self, job_id, wait: float = 2.0):
        """``(version, last step id)`` of the job, None when the shard lacks it; waits up
        to ``wait`` seconds for a shard that is (re)starting."""
        try:
            r = self._stub.Status(
                shard_pb2.ShardStatusRequest(),
                metadata=self._metadata,
                timeout=min(self.timeout, wait),
                wait_for_ready=True,
            )
        except grpc.RpcError as e:
            raise self._error(e, "Status") from None
        for j in r.jobs:
            if j.job_id == job_id:
                return j.version, j.last_step_id
        return None

    def checkpoint(self):
        pass  # a shard server checkpoints itself (Apply's flag, and on shutdown)

    def close(self):
        self._channel.close()
