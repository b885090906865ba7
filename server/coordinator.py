"""The coordinator service: :class:`CoordinatorServicer` puts the logic of
:class:`~gradmesh.server.jobs.Coordinator` behind the ``Coordinator`` service of
coordinator.proto (decode, call, encode); :func:`start` runs one in this process and
``run(args)`` is ``gradmesh coordinator``.

The parts: :mod:`.jobs` (jobs and steps), :mod:`.dispatch` (micro-batches over workers),
:mod:`.workers` (the worker pool), :mod:`.shard` (the parameter shards).
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
from typing import Sequence

import grpc
import numpy as np

from gradmesh.core import serialize
from gradmesh.server import checkpoint
from gradmesh.server.jobs import Coordinator
from gradmesh.server.runtime import (
    ConfigError,
    PeerConfig,
    ServerConfig,
    ServiceError,
    add_peer_arguments,
    add_server_arguments,
    announce,
    check_address,
    config_from_args,
    configure_logging,
    env_default,
    peer_config_from_args,
    serve,
)
from gradmesh.server.shard_store import EmbeddedShard, ShardStore
from gradmesh.server.workers import HEARTBEAT_SECONDS, WorkerPool
from gradmesh.v1 import coordinator_pb2, coordinator_pb2_grpc
from gradmesh.wire.shard import RemoteShard, receive_frames, stream_frames

__all__ = ["CoordinatorServicer", "add_arguments", "run", "start"]

INVALID = grpc.StatusCode.INVALID_ARGUMENT
DEFAULT_PORT = 50053


# ====================================================================== the service ======


def _decode_named(items, field: str, max_elements: int | None) -> dict[str, np.ndarray]:
    out = {}
    for k, nt in enumerate(items):
        if not nt.name:
            raise ServiceError(INVALID, "every tensor needs a name", f"{field}[{k}].name")
        if nt.name in out:
            raise ServiceError(INVALID, f"{nt.name!r} is given twice", f"{field}[{nt.name}]")
        out[nt.name] = serialize.from_proto(
            nt.tensor, field=f"{field}[{nt.name}]", max_elements=max_elements
        )
    return out


class CoordinatorServicer:
    """``Coordinator`` over a :class:`Coordinator`; methods are thin."""

    def __init__(self, coordinator: Coordinator, max_stream_bytes: int = 16 << 30):
        self.c = coordinator
        self.max_stream_bytes = max_stream_bytes

    def CreateJob(self, request_iterator, context):
        pb = coordinator_pb2
        first = next(request_iterator, None)
        if first is not None and first.WhichOneof("kind") == "create_job":
            # Everything the header says is checked before anything is allocated for the
            # parameters' bytes (a header may promise gigabytes for a 3 x 2 parameter).
            self.c.check_create_header(first.create_job)
        frames = itertools.chain([first] if first is not None else [], request_iterator)
        header, params = receive_frames(
            frames, "create_job", self.max_stream_bytes, self.c.max_elements
        )
        job = self.c.create_job(
            header.job_id,
            header.graph,
            params,
            header.optimizer,
            header.micro_batch_size,
            header.schedule if header.HasField("schedule") else None,
            header.clipping if header.HasField("clipping") else None,
            compression_msg=header.compression if header.HasField("compression") else None,
            staleness=header.staleness,
        )
        return pb.CreateJobResponse(
            job_id=job.job_id, graph_id=job.graph_id, version=job.version, placement=job.placement
        )

    def Step(self, request, context):
        batch = _decode_named(request.batch, "batch", self.c.max_elements)
        return self.c.step(request.job_id, request.step_id, batch)

    def GetParameters(self, request, context):
        pb = coordinator_pb2
        version, arrays = self.c.get_parameters(request.job_id, list(request.names))
        header = pb.GetParametersResponse(version=version)
        for name, a in arrays.items():
            header.parameters.add(name=name).tensor.CopyFrom(serialize.to_proto(a, data=False))
        yield from stream_frames(pb.CoordinatorFrame, "parameters", header, arrays.values())

    def JobStatus(self, request, context):
        return self.c.job_status(request.job_id)

    def ListWorkers(self, request, context):
        return self.c.list_workers()

    def RegisterWorker(self, request, context):
        pb = coordinator_pb2
        w = self.c.workers.register(request.address)
        return pb.RegisterWorkerResponse(
            worker_id=w.worker_id, heartbeat_interval_seconds=HEARTBEAT_SECONDS
        )

    def Heartbeat(self, request, context):
        return coordinator_pb2.HeartbeatResponse(known=self.c.workers.heartbeat(request.worker_id))

    def DeregisterWorker(self, request, context):
        known = self.c.workers.deregister(request.worker_id)
        return coordinator_pb2.DeregisterWorkerResponse(known=known)


# ====================================================================== starting =========


def _split(value: str | None) -> list[str]:
    return [x.strip() for x in (value or "").split(",") if x.strip()]


def start(
    *,
    workers: Sequence[str] = (),
    shards: Sequence[str] = (),
    embedded_shards: int = 1,
    state_dir: str | None = None,
    checkpoint_every: int = 10,
    deadline: float = 30.0,
    worker_timeout: float = 300.0,
    shared_memory: bool = True,
    config=None,
    peer=None,
    **config_kw,
):
    """Start a coordinator server in this process (tests, embedding).

    ``shards``: addresses of shard servers; without them ``embedded_shards`` shards run in
    this process. ``shared_memory``: pass tensors to workers on this host through shared
    memory. ``peer``: a :class:`~gradmesh.server.runtime.PeerConfig`, how workers
    and shards are dialled (default: plaintext, with the server's own token). Returns the
    RunningServer with ``.coordinator`` set.
    """
    config = config or ServerConfig(**config_kw)
    peer = peer or PeerConfig(None, config.token)
    pool = WorkerPool(
        workers,
        timeout=worker_timeout,
        token=peer.token,
        max_message_bytes=config.max_message_bytes,
        tls=peer.tls,
        shared_memory=shared_memory,
    )
    handles: list[RemoteShard | EmbeddedShard]
    if shards:
        handles = [
            RemoteShard(
                a, token=peer.token, tls=peer.tls, max_message_bytes=config.max_message_bytes
            )
            for a in shards
        ]
    else:
        handles = [
            EmbeddedShard(
                ShardStore(os.path.join(state_dir, "shards", str(i)) if state_dir else None),
                name=f"embedded-{i}",
            )
            for i in range(embedded_shards)
        ]
    coordinator = Coordinator(pool, handles, state_dir, checkpoint_every, deadline)
    try:
        running = serve(
            config,
            [
                (
                    coordinator_pb2_grpc.add_CoordinatorServicer_to_server,
                    CoordinatorServicer(coordinator),
                    "gradmesh.v1.Coordinator",
                )
            ],
        )
    except Exception:
        coordinator.close()
        raise
    running.coordinator = coordinator
    return running


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``gradmesh coordinator``."""
    add_server_arguments(parser, DEFAULT_PORT)
    add_peer_arguments(parser, "workers and shards")
    d = env_default
    g = parser.add_argument_group("coordinator")
    g.add_argument(
        "--workers",
        default=d("workers", ""),
        help="static workers, host:port,... (workers may also register)",
    )
    g.add_argument(
        "--shards",
        default=d("shards", ""),
        help="shard servers, host:port,...; default: shards inside this process",
    )
    g.add_argument(
        "--embedded-shards",
        type=int,
        default=d("embedded-shards", 1),
        help="number of in-process shards when --shards is not given (default 1)",
    )
    g.add_argument(
        "--state-dir",
        default=d("state-dir", None),
        help="checkpoint directory; the coordinator resumes from it on start",
    )
    g.add_argument(
        "--checkpoint-every",
        type=int,
        default=d("checkpoint-every", 10),
        help="checkpoint every N steps (default 10; also on shutdown)",
    )
    g.add_argument(
        "--micro-batch-deadline",
        type=float,
        default=d("micro-batch-deadline", 30.0),
        help="seconds before a running micro-batch is also given to an idle worker",
    )
    g.add_argument(
        "--shared-memory",
        choices=("on", "off"),
        default=d("shared-memory", "on"),
        help="pass tensors to workers on this host through shared memory "
        "(default on; docs/worker.md)",
    )
    g.add_argument(
        "--worker-timeout",
        type=float,
        default=d("worker-timeout", 300.0),
        help="deadline of each call to a worker, in seconds",
    )


def run(args: argparse.Namespace) -> int:
    """``gradmesh coordinator``: serve until SIGTERM, then checkpoint."""
    config = config_from_args(args)
    configure_logging(config)
    for flag, bad, want in (
        ("--checkpoint-every", args.checkpoint_every < 0, ">= 0"),
        ("--embedded-shards", args.embedded_shards < 1, ">= 1"),
        ("--micro-batch-deadline", not args.micro_batch_deadline > 0, "> 0"),
        ("--worker-timeout", not args.worker_timeout > 0, "> 0"),
    ):
        if bad:
            value = getattr(args, flag[2:].replace("-", "_"))
            print(f"error: {flag} must be {want}, got {value}", file=sys.stderr)
            return 2
    try:
        workers = [check_address("--workers", a) for a in _split(args.workers)]
        shards = [check_address("--shards", a) for a in _split(args.shards)]
        if args.state_dir:
            try:
                os.makedirs(args.state_dir, exist_ok=True)
            except OSError as e:
                raise ConfigError(f"--state-dir {args.state_dir}: {e.strerror or e}") from None
        peer = peer_config_from_args(args, config)
        running = start(
            workers=workers,
            shards=shards,
            embedded_shards=args.embedded_shards,
            state_dir=args.state_dir,
            checkpoint_every=args.checkpoint_every,
            deadline=args.micro_batch_deadline,
            worker_timeout=args.worker_timeout,
            shared_memory=args.shared_memory == "on",
            config=config,
            peer=peer,
        )
    except (ConfigError, checkpoint.CheckpointError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    announce(config, "gradmesh coordinator", running.address)
    running.wait()
    running.coordinator.close()
    return 0
