"""The parameter shard service: ``ShardServicer`` puts a
:class:`~gradmesh.server.shard_store.ShardStore` behind the ``ParameterShard`` service of
shard.proto (decode, call, encode), with gradmesh's frame codec for the streams;
``run(args)`` is ``gradmesh shard``.
"""

from __future__ import annotations

import argparse
import itertools
import sys

import grpc

from gradmesh.core import serialize
from gradmesh.server import checkpoint
from gradmesh.server.runtime import (
    ConfigError,
    ServiceError,
    add_server_arguments,
    announce,
    config_from_args,
    configure_logging,
    env_default,
    serve,
)
from gradmesh.server.shard_store import ShardStore, check_job_id
from gradmesh.v1 import shard_pb2, tensor_pb2
from gradmesh.wire import compression
from gradmesh.wire.frames import SHARD_FRAME_CHUNK_FIELD, frame_decoder, serialize_message
from gradmesh.wire.shard import (
    SERVICE_NAME,
    named_headers,
    optimizer_from_proto,
    receive_frames,
    shard_frames,
    step_args_from_proto,
)
from gradmesh.wire.stream import BufferPool

__all__ = ["ShardServicer", "add_arguments", "add_to_server", "run", "serve_shard"]

# Streamed tensors live in memory reused once nothing refers to them any more: a fresh
# buffer's pages cost the kernel more than gRPC costs their bytes (wire.stream.BufferPool).
# At most this much is kept idle by a shard server (pushed gradients, Pull's copies).
POOL_BYTES = 1 << 30


# ------------------------------------------------------------------ the service ---------


INVALID = grpc.StatusCode.INVALID_ARGUMENT


def _check_compressed_headers(job, header) -> None:
    """A compressed push's blobs against the job's parameters, before allocation: each
    names a parameter of this shard and is a 1-D int32 tensor no larger than its top-k
    encoding with every element kept could be."""
    if header.compressed_gradients and header.compression not in ("topk", "sign"):
        raise ServiceError(
            INVALID, f"unknown compression {header.compression!r} (topk or sign)", "compression"
        )
    for nt in header.compressed_gradients:
        where = f"compressed_gradients[{nt.name}]"
        p = job.params.get(nt.name)
        if p is None:
            raise ServiceError(
                INVALID, f"no parameter {nt.name!r} on this shard for job {job.job_id!r}", where
            )
        bound = (p.size * (4 + p.itemsize) + p.itemsize) // 4 + 1  # words
        shape = list(nt.tensor.shape)
        if nt.tensor.dtype != tensor_pb2.INT32 or len(shape) != 1 or shape[0] > bound:
            raise ServiceError(
                INVALID,
                f"a compressed gradient is a 1-D int32 tensor of at most {bound} words for "
                f"{nt.name!r}; got {serialize.dtype_name(nt.tensor.dtype)} {shape}",
                where,
            )


def _decompressed(job, header, grads: dict) -> dict:
    """The push's gradients with the compressed ones decoded against their parameters."""
    out = dict(grads)
    for nt in header.compressed_gradients:
        p = job.params[nt.name]
        try:
            out[nt.name] = compression.decode(header.compression, grads[nt.name], p.dtype, p.shape)
        except ValueError as e:
            raise ServiceError(
                INVALID,
                f"compressed gradient of {nt.name!r}: {e}",
                f"compressed_gradients[{nt.name}]",
            ) from None
    return out


class ShardServicer:
    """``ParameterShard`` over a :class:`ShardStore`; methods are thin."""

    def __init__(
        self,
        store: ShardStore,
        max_stream_bytes: int = 16 << 30,
        max_elements: int | None = None,
        pool_bytes: int = POOL_BYTES,
    ):
        self.store = store
        self.max_stream_bytes = max_stream_bytes
        self.max_elements = max_elements
        # Pushed gradients (dropped once their step is applied) and Pull's copies of the
        # parameters (dropped once sent) are the same sizes step after step: the next
        # ones reuse their memory. (Loaded parameters stay for the job's lifetime.)
        self.buffers = BufferPool(pool_bytes)

    def Load(self, request_iterator, context):
        header, params = receive_frames(
            request_iterator, "load", self.max_stream_bytes, self.max_elements
        )
        optimizer = optimizer_from_proto(header.optimizer)
        version, last = self.store.load(header.job_id, params, optimizer)
        return shard_pb2.LoadResponse(version=version, last_step_id=last)

    def Pull(self, request, context):
        # Copies taken under the job's lock: the stream stays consistent if a step applies.
        version, arrays = self.store.pull(
            request.job_id,
            request.version,
            request.names,
            copy=True,
            allocate=self.buffers.allocate,
        )
        header = shard_pb2.PullResponse(version=version)
        values = named_headers(header.parameters, arrays)
        yield from shard_frames("pulled", header, values)

    def PushGradients(self, request_iterator, context):
        first = next(request_iterator, None)
        if first is not None and first.WhichOneof("kind") == "push":
            # The header against the job's parameters before anything is allocated.
            self.store.job(first.push.job_id).check_gradient_headers(first.push.gradients)
            _check_compressed_headers(self.store.job(first.push.job_id), first.push)
        frames = itertools.chain([first] if first is not None else [], request_iterator)
        header, grads = receive_frames(
            frames, "push", self.max_stream_bytes, self.max_elements, self.buffers.allocate
        )
        if header.compressed_gradients:
            grads = _decompressed(self.store.job(header.job_id), header, grads)
        duplicate, received = self.store.push(
            header.job_id,
            header.step_id,
            header.micro_batch,
            header.micro_batches,
            header.version,
            grads,
            header.attempt,
            header.unused_parameters,
        )
        return shard_pb2.PushGradientsResponse(duplicate=duplicate, received=received)

    def Apply(self, request, context):
        version, already, seconds = self.store.apply(
            request.job_id,
            request.step_id,
            request.micro_batches,
            request.version,
            request.checkpoint,
            request.attempt,
            step_args_from_proto(request),
        )
        return shard_pb2.ApplyResponse(
            version=version, already_applied=already, apply_seconds=seconds
        )

    def GradientNorms(self, request, context):
        norms = self.store.gradient_norms(
            request.job_id,
            request.step_id,
            request.micro_batches,
            request.version,
            request.attempt,
            request.norm_type if request.HasField("norm_type") else 2.0,
        )
        return shard_pb2.GradientNormsResponse(norms=norms)

    def Status(self, request, context):
        resp = shard_pb2.ShardStatusResponse()
        for job_id in sorted(self.store.jobs):
            job = self.store.jobs[job_id]
            resp.jobs.add(
                job_id=job_id,
                version=job.version,
                last_step_id=job.last_step_id,
                parameters=sorted(job.params),
                parameter_bytes=job.parameter_bytes,
            )
        return resp

    def DropJob(self, request, context):
        check_job_id(request.job_id)
        return shard_pb2.DropJobResponse(dropped=self.store.drop(request.job_id))


def add_to_server(servicer: ShardServicer, server: grpc.Server) -> None:
    """``add_ParameterShardServicer_to_server`` with gradmesh's codec for the streams'
    tensor bytes: the same bytes on the wire, one copy per side (wire/frames.py).

    An undecodable frame still raises in the deserializer, so that ``runtime.serve``
    answers INVALID_ARGUMENT naming ``gradmesh.v1.ShardFrame`` as before."""
    pb = shard_pb2
    decode_frame = frame_decoder(pb.ShardFrame, SHARD_FRAME_CHUNK_FIELD)
    handlers = {
        "Load": grpc.stream_unary_rpc_method_handler(
            servicer.Load,
            request_deserializer=decode_frame,
            response_serializer=pb.LoadResponse.SerializeToString,
        ),
        "Pull": grpc.unary_stream_rpc_method_handler(
            servicer.Pull,
            request_deserializer=pb.PullRequest.FromString,
            response_serializer=serialize_message,
        ),
        "PushGradients": grpc.stream_unary_rpc_method_handler(
            servicer.PushGradients,
            request_deserializer=decode_frame,
            response_serializer=pb.PushGradientsResponse.SerializeToString,
        ),
        "Apply": grpc.unary_unary_rpc_method_handler(
            servicer.Apply,
            request_deserializer=pb.ApplyRequest.FromString,
            response_serializer=pb.ApplyResponse.SerializeToString,
        ),
        "GradientNorms": grpc.unary_unary_rpc_method_handler(
            servicer.GradientNorms,
            request_deserializer=pb.GradientNormsRequest.FromString,
            response_serializer=pb.GradientNormsResponse.SerializeToString,
        ),
        "Status": grpc.unary_unary_rpc_method_handler(
            servicer.Status,
            request_deserializer=pb.ShardStatusRequest.FromString,
            response_serializer=pb.ShardStatusResponse.SerializeToString,
        ),
        "DropJob": grpc.unary_unary_rpc_method_handler(
            servicer.DropJob,
            request_deserializer=pb.DropJobRequest.FromString,
            response_serializer=pb.DropJobResponse.SerializeToString,
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)


# ------------------------------------------------------------------ the command ---------

DEFAULT_PORT = 50052


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``gradmesh shard``."""
    add_server_arguments(parser, DEFAULT_PORT)
    g = parser.add_argument_group("shard")
    g.add_argument(
        "--state-dir",
        default=env_default("state-dir", None),
        help="directory for checkpoints; restored from on start (default: none, "
        "state is lost on exit)",
    )
    g.add_argument(
        "--checkpoint-every",
        type=int,
        default=env_default("checkpoint-every", 0),
        help="also checkpoint every N versions by itself (default 0: only when "
        "the coordinator asks)",
    )
    g.add_argument(
        "--step-log-sync",
        choices=("on", "off"),
        default=env_default("step-log-sync", "on"),
        help="fsync each applied step's record in the step log before answering "
        "(default on: survives power loss; off: survives the process being "
        "killed, not the machine, and saves about one flush per step; the measured "
        "cost is in docs/training.md, Durability)",
    )


def serve_shard(config, store: ShardStore):
    """Start a shard server for ``store``; returns the RunningServer."""
    servicer = ShardServicer(store)
    return serve(config, [(add_to_server, servicer, SERVICE_NAME)])


def run(args: argparse.Namespace) -> int:
    """``gradmesh shard``: serve until SIGTERM (state is durable as it changes: the
    checkpoints and the step log)."""
    config = config_from_args(args)
    configure_logging(config)
    if args.checkpoint_every < 0:
        print("error: --checkpoint-every must be >= 0", file=sys.stderr)
        return 2
    try:
        store = ShardStore(
            args.state_dir, args.checkpoint_every, sync_log=args.step_log_sync == "on"
        )
        running = serve_shard(config, store)
    except (ConfigError, checkpoint.CheckpointError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    announce(config, "gradmesh shard", running.address)
    running.wait()
    # Nothing to write: every acknowledged step is in a checkpoint or the step log. (A
    # checkpoint now would hold the last step, and the version before it could no longer
    # be rebuilt for a coordinator retrying a step that other shards had not applied.)
    store.close()
    return 0
