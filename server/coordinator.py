"""The coordinator: data-parallel training jobs over workers and parameter shards.

:class:`Coordinator` holds the logic as plain Python (tests drive it directly);
:class:`CoordinatorServicer` puts it behind the ``Coordinator`` service of
coordinator.proto; ``run(args)`` is ``gradmesh coordinator``.

One step (DESIGN §6): the batch is cut into micro-batches (:mod:`.aggregate`); worker
threads take micro-batches from a shared queue and call ``Worker.ComputeGradients`` with
the micro-batch's loss scale and seed; each result's gradients are pushed to the shards
that own them as soon as it arrives (so pushing overlaps the other micro-batches'
compute); a micro-batch whose worker fails is queued again, one that runs past the
deadline is also given to an idle worker, and whichever result comes first counts (the
shards ignore the other by its (job, step, micro-batch) key). When every micro-batch is
pushed, the shards apply the step; their fixed summation tree makes the result bit for bit
independent of which worker did what.
"""
from __future__ import annotations

import argparse
import base64
import collections
import itertools
import logging
import os
import secrets
import sys
import threading
import time
import uuid
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import grpc
import numpy as np

from gradmesh.core import dtypes, serialize
from gradmesh.core import graph as core_graph
from gradmesh.server import checkpoint
from gradmesh.server.aggregate import TreeSum, loss_scales, micro_batch_seed, micro_batches, place
from gradmesh.server.runtime import (
    ConfigError,
    PeerConfig,
    ServerConfig,
    ServiceError,
    add_peer_arguments,
    add_server_arguments,
    config_from_args,
    configure_logging,
    env_default,
    peer_config_from_args,
    serve,
    status_code,
)
from gradmesh.server.shard import EmbeddedShard, ShardStore, check_job_id
from gradmesh.v1 import coordinator_pb2, coordinator_pb2_grpc, graph_pb2, tensor_pb2, worker_pb2
from gradmesh.wire import sharedmem
from gradmesh.wire.channel import channel, metadata
from gradmesh.wire.errors import GradmeshError, bad_request_field, from_rpc_error
from gradmesh.wire.shard import (
    RemoteShard,
    optimizer_from_proto,
    optimizer_to_proto,
    receive_frames,
    stream_frames,
)
from gradmesh.wire.stream import MAX_CHUNK_BYTES
from gradmesh.wire.worker import SHARED, Reply, WorkerTransport, shared_request

log = logging.getLogger("gradmesh.coordinator")

__all__ = ["Coordinator", "CoordinatorServicer", "WorkerPool", "add_arguments", "run",
           "start"]

INVALID = grpc.StatusCode.INVALID_ARGUMENT
FAILED = grpc.StatusCode.FAILED_PRECONDITION
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
DEFAULT_PORT = 50053
HISTORY = 1024                  # step results kept for idempotent replays
HEARTBEAT_SECONDS = 5.0
# Worker calls above this many bytes are streamed even when the unary limit would allow
# them: one huge unary message measured 3x slower than 4 MiB chunks (100 MB, loopback).
UNARY_MAX_BYTES = 8 << 20
# Errors after which the same request may succeed on another worker or later.
RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
             grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.CANCELLED,
             grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL, grpc.StatusCode.ABORTED,
             grpc.StatusCode.NOT_FOUND}


# ====================================================================== workers ==========

BYTES = "bytes"      # a call's tensors in its messages: unary when they fit, else streamed


def _batch_field(worker_field: str | None) -> str:
    """A worker's field as the Step request names it: the worker's ``data[x]`` is the
    step's ``batch[x]``; anything else the worker refused (a value out of range for an
    op, a size over its limits) was caused by the batch too."""
    if worker_field and worker_field.startswith("data"):
        return "batch" + worker_field[len("data"):]
    return "batch"


class WorkerHandle(WorkerTransport):
    """One worker: its channel, what the coordinator knows of it, and the call itself
    (the transport policy is :class:`~gradmesh.wire.worker.WorkerTransport`'s, as the
    SDK's)."""

    def __init__(self, address: str, source: str, timeout: float, token: str | None,
                 max_message_bytes: int, tls: Any = None, segments: Any = None):
        self.address = address
        self.source = source
        self.timeout = timeout
        self.state = "unknown"      # unknown -> ready | unreachable | refused
        self.reason = ""
        self.fingerprint = ""
        self.backend = ""
        self.completed = 0
        self.failures = 0
        self.worker_id = ""
        self.last_seen = time.monotonic()
        self.retry_at = 0.0
        self.max_message_bytes = max_message_bytes
        self.graphs: set[str] = set()          # graph ids this worker has
        # Bytes of parameters the worker keeps between calls, and the (job, version) it
        # was last sent: a second micro-batch of a step then goes without them.
        self.parameter_cache_bytes = 0
        self.kept: tuple | None = None
        self._metadata = metadata(token)
        self._channel = channel(address, tls=tls, max_message_bytes=max_message_bytes)
        # Shared memory when the worker is on this host and takes it; ``segments`` is the
        # coordinator's pool (None: never).
        super().__init__(self._channel, address, segments=segments,
                         chunk_bytes=MAX_CHUNK_BYTES)
        self._shared = False            # until Capabilities says

    def probe(self) -> None:
        """Ask for Capabilities; sets state, fingerprint and backend."""
        try:
            caps = self.stub.Capabilities(worker_pb2.CapabilitiesRequest(), timeout=5.0,
                                          metadata=self._metadata)
        except grpc.RpcError as e:
            self.state, self.reason = "unreachable", f"{e.code().name}: {e.details()}"
            self.retry_at = time.monotonic() + 1.0
            return
        self.fingerprint = caps.build_fingerprint
        self.backend = caps.backend
        self._shared = self.segments is not None and caps.shared_memory
        self.parameter_cache_bytes = caps.limits.parameter_cache_bytes
        self.kept = None
        self.state, self.reason = "ready", ""

    def compute(self, graph, graph_id: str, params: "ParamSet", data: dict[str, np.ndarray],
                scale: float, seed: int, outputs: Sequence[str]) -> Reply:
        """One ComputeGradients call (the graph inline until the worker has it); raises
        ``GradmeshError`` for a failed call."""
        unary_max = min(self.max_message_bytes // 2, UNARY_MAX_BYTES)
        data_bytes = sum(a.nbytes for a in data.values())
        shared = self._shared and data_bytes + (1 << 20) < unary_max

        def send(mode: str) -> Reply:
            req = worker_pb2.ComputeGradientsRequest(loss_scale=scale, seed=seed,
                                                     outputs=list(outputs))
            if graph_id in self.graphs:
                req.graph_id = graph_id
            else:
                req.graph.CopyFrom(graph)
            try:
                if mode == SHARED:
                    reply = self._compute_shared(req, params, data)
                else:
                    reply = self._compute_bytes(req, params, data, unary_max)
            except grpc.RpcError as e:
                raise from_rpc_error(e, "ComputeGradients") from None
            self.graphs.add(graph_id)
            return reply

        mode = SHARED if shared else BYTES
        reply, used = self._transport(send, mode, BYTES, lambda: self.graphs.discard(graph_id))
        if used != mode:
            log.warning("worker %s: no shared memory; sending bytes", self.address)
        return reply

    def _compute_bytes(self, req, params: "ParamSet", data: dict,
                       unary_max: int) -> Reply:
        """The call with every tensor as bytes, the parameters left out when the worker
        keeps them from an earlier call of this version."""
        key = (params.key, params.version)
        if params.nbytes > self.parameter_cache_bytes:
            return self._send_bytes(req, params, data, True, unary_max)
        req.parameter_set, req.parameter_version = key
        if self.kept == key:
            try:
                return self._send_bytes(req, params, data, False, unary_max)
            except grpc.RpcError as e:
                if (e.code() != grpc.StatusCode.FAILED_PRECONDITION
                        or bad_request_field(e) != "parameters"):
                    raise
                # The worker restarted or evicted them: send them again.
        self.kept = None
        result = self._send_bytes(req, params, data, True, unary_max)
        self.kept = key
        return result

    def _send_bytes(self, req, params: "ParamSet", data: dict, with_params: bool,
                    unary_max: int) -> Reply:
        """Unary when it fits, streamed otherwise (the parameters only ``with_params``)."""
        size = (params.nbytes if with_params else 0) + (1 << 20) + \
            sum(a.nbytes for a in data.values())
        fresh = type(req)()
        fresh.CopyFrom(req)         # a retry without the kept parameters starts over
        req = fresh
        kw = {"timeout": self.timeout, "metadata": self._metadata}
        if size >= unary_max:
            return self._send_stream(
                req, params.arrays.items() if with_params else (), data.items(),
                lambda message: GradmeshError(grpc.StatusCode.INTERNAL, message, None,
                                              "ComputeGradientsStream"), **kw)
        if with_params:
            req.parameters.extend(params.unary())
        for name, a in data.items():
            req.data.add(name=name).tensor.CopyFrom(serialize.to_proto(a))
        return self._send_unary(req, **kw)

    def _compute_shared(self, req, params: "ParamSet", data: dict) -> Reply:
        """A unary call with parameters and gradients in shared memory; the result's
        gradients are views of a segment that goes back to the pool when they are freed
        (after the step applied them, or dropped them)."""
        pool = self.segments
        segment, offsets = params.shared(pool)
        gseg, goffsets = sharedmem.place(pool, params.arrays, write=False)
        try:
            req.MergeFrom(shared_request(params.arrays, segment, offsets, gseg, goffsets))
            for name, a in data.items():
                req.data.add(name=name).tensor.CopyFrom(serialize.to_proto(a))
        except BaseException:
            gseg.close()
            raise
        return self._send_shared(req, gseg, goffsets, timeout=self.timeout,
                                 metadata=self._metadata)

    def close(self) -> None:
        self._channel.close()


class WorkerPool:
    """Static and registered workers; all usable ones share one build fingerprint."""

    def __init__(self, static: Sequence[str] = (), timeout: float = 300.0,
                 token: str | None = None, max_message_bytes: int = 64 << 20,
                 tls: Any = None, shared_memory: bool = True):
        self.timeout = timeout
        # Segments for workers on this host (see WorkerHandle).
        self.segments = (sharedmem.Pool(keep=8) if shared_memory and sharedmem.available()
                         else None)
        self.token = token
        self.tls = tls                  # how workers are dialled (wire/channel.py)
        self.max_message_bytes = max_message_bytes
        self.fingerprint: str | None = None
        self._lock = threading.Lock()
        self.workers: dict[str, WorkerHandle] = {}
        for address in static:
            self.workers[address] = self._handle(address, "static")

    def _handle(self, address: str, source: str) -> WorkerHandle:
        return WorkerHandle(address, source, self.timeout, self.token, self.max_message_bytes,
                            self.tls, self.segments)

    def _check(self, w: WorkerHandle) -> None:
        """Probe ``w`` and apply the fingerprint rule (the first ready worker fixes it)."""
        w.probe()
        if w.state != "ready":
            return
        with self._lock:
            if self.fingerprint is None:
                self.fingerprint = w.fingerprint
            elif w.fingerprint != self.fingerprint:
                w.state = "refused"
                w.reason = (f"build fingerprint {w.fingerprint!r} differs from the pool's "
                            f"{self.fingerprint!r}: results would not be bitwise identical")

    def register(self, address: str) -> WorkerHandle:
        if not address or ":" not in address:
            raise ServiceError(INVALID, f"address {address!r} must be host:port", "address")
        with self._lock:
            w = self.workers.get(address)
        if w is None:
            w = self._handle(address, "registered")
        self._check(w)
        if w.state == "unreachable":
            raise ServiceError(UNAVAILABLE, f"cannot reach the worker at {address}: "
                               f"{w.reason}", "address")
        if w.state == "refused":
            raise ServiceError(FAILED, w.reason, "address")
        with self._lock:
            w.worker_id = w.worker_id or uuid.uuid4().hex
            w.last_seen = time.monotonic()
            self.workers[address] = w
        return w

    def heartbeat(self, worker_id: str) -> bool:
        with self._lock:
            for w in self.workers.values():
                if w.worker_id and w.worker_id == worker_id:
                    w.last_seen = time.monotonic()
                    return True
        return False

    def usable(self) -> list[WorkerHandle]:
        """Workers to use now: ready ones, plus unreachable/unknown ones that answer again."""
        now = time.monotonic()
        with self._lock:
            # Registered workers that stopped heartbeating are forgotten.
            for address, w in list(self.workers.items()):
                if w.source == "registered" and now - w.last_seen > 3 * HEARTBEAT_SECONDS:
                    del self.workers[address]
                    w.close()
            candidates = list(self.workers.values())
        for w in candidates:
            if w.state == "unknown" or (w.state == "unreachable" and now >= w.retry_at):
                self._check(w)
        return [w for w in candidates if w.state == "ready"]

    def unusable_reasons(self) -> str:
        """``": ADDRESS STATE (REASON); ..."`` of the known workers that are not ready."""
        with self._lock:
            down = [w for w in self.workers.values() if w.state != "ready"]
        return "".join((": " if i == 0 else "; ") + f"{w.address} {w.state}" +
                       (f" ({w.reason})" if w.reason else "") for i, w in enumerate(down))

    def failed(self, w: WorkerHandle, error: GradmeshError) -> None:
        w.failures += 1
        if error.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            w.state, w.reason = "unreachable", f"{error.code.name}: {error.message}"
            w.retry_at = time.monotonic() + 1.0

    def close(self) -> None:
        for w in self.workers.values():
            w.close()
        if self.segments is not None:
            self.segments.close()


# ====================================================================== jobs =============

class ParamSet:
    """A job's parameters at one version, as the workers get them.

    Embedded shards hand out their live arrays: they are only read until the step's
    ``apply``, which waits for every micro-batch. Streamed requests send their bytes
    straight from the arrays; the unary encoding (one copy) is made on first use and kept.
    """

    def __init__(self, version: int, arrays: dict[str, np.ndarray], key: str = ""):
        self.version = version
        self.key = key              # the job id: with version, names them on the workers
        self.arrays = arrays
        self.nbytes = sum(int(a.nbytes) for a in arrays.values())
        self._lock = threading.Lock()
        self._unary: list | None = None
        self._shared: tuple | None = None
        self._pool: Any = None

    def unary(self) -> list:
        """NamedTensor messages with data (encoded once per version)."""
        with self._lock:
            if self._unary is None:
                self._unary = [tensor_pb2.NamedTensor(name=n, tensor=serialize.to_proto(a))
                               for n, a in self.arrays.items()]
            return self._unary

    def shared(self, pool) -> tuple:
        """``(segment, offsets)``: the parameters copied into shared memory, once per
        version."""
        with self._lock:
            if self._shared is None:
                self._shared, self._pool = sharedmem.place(pool, self.arrays), pool
            return self._shared

    def release(self) -> None:
        """Give the shared segment back (the next version reuses it). A late duplicate
        call may still read it; its result is dropped anyway (the step is done)."""
        with self._lock:
            if self._shared is not None:
                self._pool.release(self._shared[0])
                self._shared = None


@dataclass
class Job:
    job_id: str
    graph: Any                          # graph_pb2.Graph
    graph_id: str
    param_names: list[str]              # the graph's PARAM inputs, in order
    param_specs: dict[str, tuple]       # name -> (dtype name, shape)
    data_inputs: list[Any]              # the graph's DATA inputs (graph_pb2.Input)
    metric_names: list[str]             # extra outputs reported as metrics
    optimizer: dict
    micro_batch_size: int
    placement: dict[str, int]
    version: int = 0
    last_step_id: int = 0
    samples: int = 0
    last_loss: float = 0.0
    error: str = ""
    history: "collections.OrderedDict[int, bytes]" = field(
        default_factory=collections.OrderedDict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    # The parameters the workers get, at ``params.version``.
    params: "ParamSet | None" = None


def _graph_signature(graph) -> tuple[Any, list, dict, list, list]:
    """Validate a graph: the validated graph (its canonical form and id), its PARAM names,
    their specs, DATA inputs and scalar extra outputs."""
    try:
        vg = core_graph.validate(graph)
    except core_graph.GraphError as e:
        raise ServiceError(status_code(e.code), e.message, f"graph.{e.field}") from None
    names, specs, data = [], {}, []
    for i, inp in enumerate(graph.inputs):
        if inp.role == graph_pb2.Input.PARAM:
            names.append(inp.name)
            specs[inp.name] = (inp.dtype, tuple(inp.shape))
        elif inp.role == graph_pb2.Input.DATA:
            if not inp.shape or inp.shape[0] != -1:
                raise ServiceError(INVALID, f"DATA input {inp.name!r} has shape "
                                   f"{list(inp.shape)}; its first dimension must be -1 (the "
                                   f"batch), since batches are cut into micro-batches",
                                   f"graph.inputs[{i}].shape")
            data.append(inp)
    if not names:
        raise ServiceError(INVALID, "the graph has no PARAM inputs: nothing to train",
                           "graph.inputs")
    if not data:
        raise ServiceError(INVALID, "the graph has no DATA inputs to cut into micro-batches",
                           "graph.inputs")
    # Scalar extra outputs (accuracy, ...) are reported as metrics; others are not fetched.
    metrics = [o.name for o in graph.outputs[1:] if tuple(vg.specs[o.value].shape) == ()]
    return vg, names, specs, data, metrics


# ====================================================================== the logic ========

class Coordinator:
    """Jobs, workers and shards; every public method is one RPC's logic.

    ``shards``: handles with the methods of :class:`~gradmesh.server.shard.EmbeddedShard`
    (default: one embedded shard). ``state_dir``: where the coordinator's and the embedded
    shards' checkpoints go. ``checkpoint_every``: checkpoint every N steps (and always on
    ``close``). ``deadline``: seconds after which a micro-batch still running is also given
    to an idle worker.
    """

    def __init__(self, workers: WorkerPool, shards: Sequence | None = None,
                 state_dir: str | None = None, checkpoint_every: int = 10,
                 deadline: float = 30.0, max_elements: int | None = 1 << 28):
        self.workers = workers
        self.state_dir = state_dir
        if shards is None:
            shard_dir = os.path.join(state_dir, "shards", "0") if state_dir else None
            shards = [EmbeddedShard(ShardStore(shard_dir))]
        self.shards = list(shards)
        if not self.shards:
            raise ValueError("a coordinator needs at least one shard")
        self.checkpoint_every = checkpoint_every
        self.deadline = deadline
        self.max_elements = max_elements
        self.jobs: dict[str, Job] = {}
        self._lock = threading.Lock()
        self._io = futures.ThreadPoolExecutor(max_workers=max(4, 2 * len(self.shards)),
                                              thread_name_prefix="gradmesh-shard-io")
        if state_dir:
            self._restore()

    # -- CreateJob ------------------------------------------------------------------------
    def check_create_header(self, header) -> None:
        """CreateJob's checks on its stream's header (the parameters' dtypes and shapes, no
        bytes yet), so that nothing is allocated for a job that would be refused;
        ``create_job`` checks the decoded parameters again."""
        if not header.HasField("graph"):
            raise ServiceError(INVALID, "graph is missing", "graph")
        if not header.HasField("optimizer"):
            raise ServiceError(INVALID, "optimizer is missing", "optimizer")
        if header.job_id:
            check_job_id(header.job_id)
        if header.micro_batch_size < 1:
            raise ServiceError(INVALID, "micro_batch_size must be >= 1", "micro_batch_size")
        optimizer_from_proto(header.optimizer)
        _, _, specs, _, _ = _graph_signature(header.graph)
        serialize.check_headers(header.parameters, specs, "parameters",
                                "PARAM input of the graph")

    def create_job(self, job_id: str, graph, params: dict[str, np.ndarray], optimizer_msg,
                   micro_batch_size: int):
        """Create a job (idempotent for identical content); returns the Job."""
        job_id = job_id or uuid.uuid4().hex
        check_job_id(job_id)
        if micro_batch_size < 1:
            raise ServiceError(INVALID, "micro_batch_size must be >= 1", "micro_batch_size")
        optimizer = optimizer_from_proto(optimizer_msg)
        vg, names, specs, data, extra = _graph_signature(graph)
        graph, gid = vg.graph, vg.id        # the canonical form: the workers' id too
        for name in names:
            if name not in params:
                raise ServiceError(INVALID, f"no initial value for parameter {name!r}",
                                   "parameters")
        for name, a in params.items():
            spec = specs.get(name)
            if spec is None:
                raise ServiceError(INVALID, f"{name!r} is not a PARAM input of the graph "
                                   f"(parameters: {names[:8]})", f"parameters[{name}]")
            wire = serialize.DTYPE_TO_PROTO.get(_dtype_of(a))
            if wire != spec[0] or tuple(a.shape) != spec[1]:
                raise ServiceError(INVALID, f"parameter {name!r} has dtype {a.dtype} and shape "
                                   f"{list(a.shape)}; the graph declares "
                                   f"{serialize.dtype_name(spec[0])} {list(spec[1])}",
                                   f"parameters[{name}]")
        with self._lock:
            existing = self.jobs.get(job_id)
            if existing is not None:
                if (existing.graph_id != gid or existing.optimizer != optimizer
                        or existing.micro_batch_size != micro_batch_size):
                    raise ServiceError(grpc.StatusCode.ALREADY_EXISTS,
                                       f"job {job_id!r} exists with a different graph, "
                                       f"optimizer or micro-batch size", "job_id")
                return existing
            placement = place({n: int(params[n].nbytes) for n in names}, len(self.shards))
            job = Job(job_id, graph, gid, names, specs, data, extra, optimizer,
                      micro_batch_size, placement)
            self.jobs[job_id] = job
        try:
            with job.lock:
                self._on_shards(job, lambda s, i: s.load(job_id, {
                    n: params[n] for n in names if job.placement[n] == i}, optimizer))
                self._save(job)
        except Exception:
            with self._lock:
                self.jobs.pop(job_id, None)
            raise
        log.info("job created", extra={"job_id": job_id, "graph_id": gid,
                                        "parameters": len(names), "shards": len(self.shards)})
        return job

    def _on_shards(self, job: Job, fn: Callable[[Any, int], Any]) -> list:
        """Call ``fn(shard, index)`` on every shard that holds some of the job, at once."""
        used = sorted(set(job.placement.values()))
        if len(used) == 1:
            return [fn(self.shards[used[0]], used[0])]
        futs = [self._io.submit(fn, self.shards[i], i) for i in used]
        return [f.result() for f in futs]

    def job(self, job_id: str) -> Job:
        job = self.jobs.get(job_id)
        if job is None:
            check_job_id(job_id)
            raise ServiceError(grpc.StatusCode.NOT_FOUND, f"no job {job_id!r}", "job_id")
        return job

    # -- Step -----------------------------------------------------------------------------
    def step(self, job_id: str, step_id: int, batch: dict[str, np.ndarray]):
        """Run (or replay) one step; returns a StepResponse."""
        pb = coordinator_pb2
        job = self.job(job_id)
        if step_id < 1:
            raise ServiceError(INVALID, "step ids start at 1", "step_id")
        with job.lock:
            done = job.history.get(step_id)
            if done is not None:
                resp = pb.StepResponse.FromString(done)
                resp.replayed = True
                return resp
            if step_id <= job.last_step_id:
                raise ServiceError(FAILED, f"step {step_id} of job {job_id!r} was applied "
                                   f"but its result is no longer kept (the last "
                                   f"{HISTORY} are)", "step_id")
            if step_id != job.last_step_id + 1:
                raise ServiceError(FAILED, f"step {step_id} is out of sequence: job "
                                   f"{job_id!r} expects step {job.last_step_id + 1} next",
                                   "step_id")
            if job.error:
                raise ServiceError(FAILED, job.error, "job_id")
            resp = self._run_step(job, step_id, self._check_batch(job, batch))
            job.history[step_id] = resp.SerializeToString()
            while len(job.history) > HISTORY:
                job.history.popitem(last=False)
            if self.checkpoint_every and job.version % self.checkpoint_every == 0:
                self._save(job)
            return resp

    def _check_batch(self, job: Job, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        expected = {inp.name: inp for inp in job.data_inputs}
        for name in batch:
            if name not in expected:
                raise ServiceError(INVALID, f"{name!r} is not a DATA input of the graph "
                                   f"(expected {sorted(expected)})", f"batch[{name}]")
        size = None
        for name, inp in expected.items():
            a = batch.get(name)
            if a is None:
                raise ServiceError(INVALID, f"the batch has no {name!r}", "batch")
            want = serialize.PROTO_TO_DTYPE.get(inp.dtype)
            shape = list(inp.shape)
            if (_dtype_of(a) is not want or a.ndim != len(shape)
                    or any(s not in (-1, d) for s, d in zip(shape[1:], a.shape[1:]))):
                raise ServiceError(INVALID, f"{name!r} has dtype {a.dtype} and shape "
                                   f"{list(a.shape)}; the graph expects "
                                   f"{want.name if want else inp.dtype} {shape}",
                                   f"batch[{name}]")
            if a.ndim == 0 or a.shape[0] < 1:
                raise ServiceError(INVALID, f"{name!r} has no rows", f"batch[{name}]")
            if size is None:
                size = a.shape[0]
            elif a.shape[0] != size:
                raise ServiceError(INVALID, f"batch tensors disagree on the batch size: "
                                   f"{name!r} has {a.shape[0]} rows, others {size}",
                                   f"batch[{name}]")
        return batch

    def _params_for_workers(self, job: Job) -> tuple["ParamSet", float]:
        """The job's parameters at its version, pulled once per version."""
        if job.params is not None and job.params.version == job.version:
            return job.params, 0.0
        if job.params is not None:
            job.params.release()
        start = time.perf_counter()

        def pull(shard, i):
            names = [n for n in job.param_names if job.placement[n] == i]
            return shard.pull(job.job_id, job.version, names)[1]

        arrays: dict = {}
        for part in self._on_shards(job, pull):
            arrays.update(part)
        job.params = ParamSet(job.version, {n: arrays[n] for n in job.param_names}, job.job_id)
        return job.params, time.perf_counter() - start

    def _run_step(self, job: Job, step_id: int, batch: dict[str, np.ndarray]):
        pb = coordinator_pb2
        t0 = time.perf_counter()
        params, pull_seconds = self._params_for_workers(job)
        size = next(iter(batch.values())).shape[0]
        ranges = micro_batches(size, job.micro_batch_size)
        scales = loss_scales(size, job.micro_batch_size)
        n = len(ranges)
        losses = TreeSum(n)
        metrics = {name: TreeSum(n) for name in job.metric_names}
        push_seconds = [0.0]
        worker_seconds = [0.0]
        push_lock = threading.Lock()
        version = job.version
        by_shard = sorted(set(job.placement.values()))
        # A fresh attempt id per run: the shards drop gradients a failed attempt of this
        # step left behind instead of mixing them with this one's (the retry may carry
        # another batch).
        attempt = secrets.randbits(64)

        def compute(worker: WorkerHandle, m: int) -> Reply:
            start, stop = ranges[m]
            data = {name: a[start:stop] for name, a in batch.items()}
            return worker.compute(job.graph, job.graph_id, params, data, scales[m],
                                  micro_batch_seed(job.job_id, step_id, m), job.metric_names)

        def accept(m: int, r: Reply) -> None:
            missing = [nm for nm in job.param_names if nm not in r.gradients]
            if missing:
                raise ServiceError(grpc.StatusCode.INTERNAL, f"a worker returned no gradient "
                                   f"for {missing[:5]}")
            t = time.perf_counter()
            for i in by_shard:
                grads = {nm: r.gradients[nm] for nm in job.param_names
                         if job.placement[nm] == i}
                self.shards[i].push(job.job_id, step_id, m, n, version, grads, attempt)
            with push_lock:
                push_seconds[0] += time.perf_counter() - t
                worker_seconds[0] += r.compute_seconds
                losses.add(m, np.asarray(r.loss, dtype=np.float64))
                for name in job.metric_names:
                    value = r.outputs.get(name)
                    if value is not None and np.size(value) == 1:
                        w = (ranges[m][1] - ranges[m][0]) / size
                        metrics[name].add(m, float(np.asarray(value).reshape(())) * w)

        t1 = time.perf_counter()
        reassigned = self._dispatch(n, compute, accept)
        t2 = time.perf_counter()
        checkpoint_now = bool(self.checkpoint_every and
                              (version + 1) % self.checkpoint_every == 0)
        results = self._on_shards(job, lambda s, i: s.apply(
            job.job_id, step_id, n, version, checkpoint_now, attempt))
        t3 = time.perf_counter()
        job.version = version + 1
        job.last_step_id = step_id
        job.samples += size
        # Worker losses are in the graph's dtype; the tree sums them as float64 so the
        # reported loss does not depend on the loss dtype's rounding of the sum.
        loss = float(losses.result())
        job.last_loss = loss
        resp = pb.StepResponse(
            step_id=step_id, loss=loss, version=job.version, batch_size=size,
            micro_batches=n,
            metrics={k: float(t.result()) for k, t in metrics.items() if t.complete},
            timings=pb.StepTimings(pull_seconds=pull_seconds, compute_seconds=t2 - t1,
                                   push_seconds=push_seconds[0],
                                   apply_seconds=t3 - t2 if results else 0.0,
                                   total_seconds=time.perf_counter() - t0,
                                   reassigned=reassigned,
                                   worker_compute_seconds=worker_seconds[0]))
        return resp

    def _dispatch(self, n: int, compute: Callable, accept: Callable) -> int:
        """Run micro-batches 0..n-1 over the usable workers; returns how many were reassigned.

        Each worker has a thread that takes the next queued micro-batch; a failed one goes
        back to the queue (a worker that is unreachable stops taking work), and when the
        queue is empty an idle worker also takes a micro-batch that has run longer than the
        deadline elsewhere. ``accept`` runs once per micro-batch, for the first result.
        """
        workers = self.workers.usable()
        if not workers:
            raise ServiceError(UNAVAILABLE, "no worker is available (none configured, "
                               "registered or reachable); start workers and retry"
                               + self.workers.unusable_reasons())
        cond = threading.Condition()
        queue = collections.deque(range(n))
        running: dict[int, list] = {}           # micro-batch -> [(worker, start time)]
        done: set[int] = set()                 # micro-batches whose first result is claimed
        pushed: set[int] = set()               # ... and accepted (pushed to the shards)
        attempts = [0] * n
        state = {"error": None, "reassigned": 0, "active": len(workers), "accepting": 0}
        max_attempts = 3 + 2 * len(workers)

        def take(w: WorkerHandle) -> int | None:
            with cond:
                while True:
                    if state["error"] is not None or len(done) == n:
                        return None
                    if queue:
                        m = queue.popleft()
                        break
                    now = time.monotonic()
                    late = [m for m, runs in running.items() if m not in done
                            and len(runs) < 2 and all(x is not w for x, _ in runs)
                            and now - min(t for _, t in runs) > self.deadline]
                    if late:
                        m = late[0]
                        state["reassigned"] += 1
                        break
                    cond.wait(timeout=min(self.deadline, 1.0))
                attempts[m] += 1
                running.setdefault(m, []).append((w, time.monotonic()))
                return m

        def finish(w: WorkerHandle, m: int) -> None:
            runs = running.get(m, [])
            running[m] = [(x, t) for x, t in runs if x is not w]
            if not running[m]:
                del running[m]

        def lane(w: WorkerHandle) -> None:
            try:
                while True:
                    m = take(w)
                    if m is None:
                        return
                    try:
                        result = compute(w, m)
                    except GradmeshError as e:
                        self.workers.failed(w, e)
                        with cond:
                            finish(w, m)
                            if m not in done and m not in running and m not in queue:
                                if attempts[m] >= max_attempts or e.code not in RETRYABLE:
                                    # A non-retryable refusal (INVALID_ARGUMENT)
                                    # names the batch field that caused it.
                                    state["error"] = ServiceError(
                                        e.code if e.code not in RETRYABLE else UNAVAILABLE,
                                        f"micro-batch {m} failed on worker {w.address}: "
                                        f"{e.message}", None if e.code in RETRYABLE
                                        else _batch_field(e.field))
                                else:
                                    queue.appendleft(m)
                                    state["reassigned"] += 1
                            cond.notify_all()
                        if w.state != "ready" or e.code not in RETRYABLE:
                            return
                        continue
                    except Exception as e:  # noqa: BLE001  (a bad response: fail the step)
                        with cond:
                            state["error"] = e
                            cond.notify_all()
                        return
                    with cond:
                        finish(w, m)
                        # Nothing is pushed once the step has failed: its retry must not
                        # race with this attempt's pushes.
                        first = m not in done and state["error"] is None
                        if first:
                            done.add(m)
                            state["accepting"] += 1
                    if first:
                        w.completed += 1
                        try:
                            accept(m, result)
                        except Exception as e:  # noqa: BLE001  (shard failure: fail the step)
                            with cond:
                                state["accepting"] -= 1
                                state["error"] = state["error"] or e
                                cond.notify_all()
                            return
                        with cond:
                            state["accepting"] -= 1
                            pushed.add(m)
                    with cond:
                        cond.notify_all()
            finally:
                with cond:
                    state["active"] -= 1
                    if state["active"] == 0 and len(done) < n and state["error"] is None:
                        state["error"] = ServiceError(
                            UNAVAILABLE, f"every worker failed; micro-batches "
                            f"{sorted(set(range(n)) - done)[:20]} were not computed")
                    cond.notify_all()

        threads = [threading.Thread(target=lane, args=(w,), daemon=True,
                                    name=f"gradmesh-lane-{w.address}") for w in workers]
        for t in threads:
            t.start()
        with cond:
            while len(pushed) < n and state["error"] is None:
                cond.wait()
            # A failed step returns only when no push of it is still in flight.
            while state["accepting"]:
                cond.wait()
            error = state["error"]
        # Lanes still computing a late duplicate finish on their own; their results are
        # dropped (done already holds them).
        if error is not None:
            if isinstance(error, (ServiceError, serialize.WireError, GradmeshError)):
                raise error
            raise ServiceError(grpc.StatusCode.INTERNAL, f"step failed: "
                               f"{type(error).__name__}: {error}")
        return state["reassigned"]

    # -- GetParameters / status -----------------------------------------------------------
    def get_parameters(self, job_id: str, names: Sequence[str] = ()) -> tuple[int, dict]:
        job = self.job(job_id)
        for k, n in enumerate(names):
            if n not in job.placement:
                raise ServiceError(INVALID, f"job {job_id!r} has no parameter {n!r}",
                                   f"names[{k}]")
        wanted = list(names) or job.param_names
        with job.lock:
            def pull(shard, i):
                mine = [n for n in wanted if job.placement[n] == i]
                return shard.pull(job.job_id, job.version, mine, copy=True)[1] if mine else {}
            arrays: dict = {}
            for part in self._on_shards(job, pull):
                arrays.update(part)
            return job.version, {n: arrays[n] for n in wanted}

    def job_status(self, job_id: str):
        pb = coordinator_pb2
        job = self.job(job_id)
        return pb.JobStatusResponse(
            job_id=job.job_id, graph_id=job.graph_id, version=job.version,
            last_step_id=job.last_step_id, next_step_id=job.last_step_id + 1,
            micro_batch_size=job.micro_batch_size,
            optimizer=optimizer_to_proto(job.optimizer), placement=job.placement,
            samples=job.samples, last_loss=job.last_loss, shards=len(self.shards),
            workers=sum(1 for w in self.workers.workers.values() if w.state == "ready"),
            error=job.error, data_inputs=[i.name for i in job.data_inputs],
            metrics=job.metric_names)

    def list_workers(self):
        pb = coordinator_pb2
        self.workers.usable()           # refresh states
        resp = pb.ListWorkersResponse()
        for w in sorted(self.workers.workers.values(), key=lambda w: w.address):
            resp.workers.add(address=w.address, source=w.source, state=w.state,
                             build_fingerprint=w.fingerprint, backend=w.backend,
                             reason=w.reason, completed=w.completed, failures=w.failures,
                             worker_id=w.worker_id)
        return resp

    # -- checkpoints ----------------------------------------------------------------------
    def _job_path(self, job_id: str) -> str:
        return os.path.join(self.state_dir, "jobs", f"{job_id}.npz")

    def _save(self, job: Job) -> None:
        """Checkpoint one job's coordinator state (the caller holds ``job.lock``)."""
        if not self.state_dir:
            return
        for s in self.shards:
            if isinstance(s, EmbeddedShard):
                s.store.checkpoint(job.job_id)
        meta = {"job_id": job.job_id, "graph_id": job.graph_id, "optimizer": job.optimizer,
                "micro_batch_size": job.micro_batch_size, "placement": job.placement,
                "shards": len(self.shards), "version": job.version,
                "last_step_id": job.last_step_id, "samples": job.samples,
                "last_loss": job.last_loss,
                "history": [[k, base64.b64encode(v).decode()] for k, v in job.history.items()]}
        graph = np.frombuffer(job.graph.SerializeToString(deterministic=True), np.uint8)
        checkpoint.save(self._job_path(job.job_id), {"graph": graph}, meta)

    def checkpoint(self) -> None:
        """Checkpoint every job (on shutdown)."""
        for job in list(self.jobs.values()):
            with job.lock:
                self._save(job)

    def _restore(self) -> None:
        directory = os.path.join(self.state_dir, "jobs")
        if not os.path.isdir(directory):
            return
        for entry in sorted(os.listdir(directory)):
            if not entry.endswith(".npz") or entry.startswith("."):
                continue
            arrays, meta = checkpoint.load(os.path.join(directory, entry))
            graph = graph_pb2.Graph.FromString(arrays["graph"].tobytes())
            _, names, specs, data, extra = _graph_signature(graph)
            job = Job(meta["job_id"], graph, meta["graph_id"], names, specs, data, extra,
                      meta["optimizer"], meta["micro_batch_size"],
                      {k: int(v) for k, v in meta["placement"].items()}, meta["version"],
                      meta["last_step_id"], meta["samples"], meta["last_loss"])
            for k, v in meta["history"]:
                job.history[int(k)] = base64.b64decode(v)
            if meta["shards"] != len(self.shards):
                job.error = (f"job {job.job_id!r} was placed over {meta['shards']} shards, "
                             f"this coordinator has {len(self.shards)}")
            else:
                self._reconcile(job)
            self.jobs[job.job_id] = job
            log.info("restored job", extra={"job_id": job.job_id, "version": job.version,
                                             "error": job.error})

    def _reconcile(self, job: Job) -> None:
        """Agree with the shards on the version after a restart (see docs/training.md)."""
        try:
            states = {i: self.shards[i].status(job.job_id)
                      for i in sorted(set(job.placement.values()))}
        except (ServiceError, GradmeshError) as e:
            job.error = f"cannot reach the shards to restore job {job.job_id!r}: {e}"
            return
        lost = [i for i, s in states.items() if s is None]
        if lost:
            job.error = f"shards {lost} have no state for job {job.job_id!r}"
            return
        versions = {s for s in states.values()}
        if len(versions) != 1:
            job.error = (f"the shards disagree on job {job.job_id!r}'s version "
                         f"(version, last step per shard: {states}); restore them from "
                         f"checkpoints of the same step")
            return
        version, last = versions.pop()
        if version < job.version:
            job.error = (f"the shards are at version {version}, behind the coordinator's "
                         f"checkpoint at {job.version}")
        elif version > job.version:
            # The shards applied steps after the coordinator's last checkpoint: their
            # results are lost, the parameters are not.
            job.version, job.last_step_id = version, last

    def close(self) -> None:
        self.checkpoint()
        self._io.shutdown(wait=False)
        for s in self.shards:
            s.close()
        self.workers.close()


def _dtype_of(a: np.ndarray):
    try:
        return dtypes.from_numpy(a.dtype.newbyteorder("="))
    except TypeError:
        return None


# ====================================================================== the service ======

def _decode_named(items, field: str, max_elements: int | None) -> dict[str, np.ndarray]:
    out = {}
    for k, nt in enumerate(items):
        if not nt.name:
            raise ServiceError(INVALID, "every tensor needs a name", f"{field}[{k}].name")
        if nt.name in out:
            raise ServiceError(INVALID, f"{nt.name!r} is given twice", f"{field}[{nt.name}]")
        out[nt.name] = serialize.from_proto(nt.tensor, field=f"{field}[{nt.name}]",
                                            max_elements=max_elements)
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
        header, params = receive_frames(frames, "create_job", self.max_stream_bytes,
                                        self.c.max_elements)
        job = self.c.create_job(header.job_id, header.graph, params, header.optimizer,
                                header.micro_batch_size)
        return pb.CreateJobResponse(job_id=job.job_id, graph_id=job.graph_id,
                                    version=job.version, placement=job.placement)

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
        return pb.RegisterWorkerResponse(worker_id=w.worker_id,
                                         heartbeat_interval_seconds=HEARTBEAT_SECONDS)

    def Heartbeat(self, request, context):
        return coordinator_pb2.HeartbeatResponse(known=self.c.workers.heartbeat(request.worker_id))


# ====================================================================== starting =========

def _split(value: str | None) -> list[str]:
    return [x.strip() for x in (value or "").split(",") if x.strip()]


def start(*, workers: Sequence[str] = (), shards: Sequence[str] = (), embedded_shards: int = 1,
          state_dir: str | None = None, checkpoint_every: int = 10, deadline: float = 30.0,
          worker_timeout: float = 300.0, shared_memory: bool = True, config=None, peer=None,
          **config_kw):
    """Start a coordinator server in this process (tests, embedding).

    ``shards``: addresses of shard servers; without them ``embedded_shards`` shards run in
    this process. ``shared_memory``: pass tensors to workers on this host through shared
    memory. ``peer``: a :class:`~gradmesh.server.runtime.PeerConfig`, how workers
    and shards are dialled (default: plaintext, with the server's own token). Returns the
    RunningServer with ``.coordinator`` set.
    """
    config = config or ServerConfig(**config_kw)
    peer = peer or PeerConfig(None, config.token)
    pool = WorkerPool(workers, timeout=worker_timeout, token=peer.token,
                      max_message_bytes=config.max_message_bytes, tls=peer.tls,
                      shared_memory=shared_memory)
    if shards:
        handles = [RemoteShard(a, token=peer.token, tls=peer.tls,
                               max_message_bytes=config.max_message_bytes) for a in shards]
    else:
        handles = [EmbeddedShard(ShardStore(os.path.join(state_dir, "shards", str(i))
                                            if state_dir else None), name=f"embedded-{i}")
                   for i in range(embedded_shards)]
    coordinator = Coordinator(pool, handles, state_dir, checkpoint_every, deadline)
    try:
        running = serve(config, [(coordinator_pb2_grpc.add_CoordinatorServicer_to_server,
                                  CoordinatorServicer(coordinator),
                                  "gradmesh.v1.Coordinator")])
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
    g.add_argument("--workers", default=d("workers", ""),
                   help="static workers, host:port,... (workers may also register)")
    g.add_argument("--shards", default=d("shards", ""),
                   help="shard servers, host:port,...; default: shards inside this process")
    g.add_argument("--embedded-shards", type=int, default=d("embedded-shards", 1),
                   help="number of in-process shards when --shards is not given (default 1)")
    g.add_argument("--state-dir", default=d("state-dir", None),
                   help="checkpoint directory; the coordinator resumes from it on start")
    g.add_argument("--checkpoint-every", type=int, default=d("checkpoint-every", 10),
                   help="checkpoint every N steps (default 10; also on shutdown)")
    g.add_argument("--micro-batch-deadline", type=float, default=d("micro-batch-deadline", 30.0),
                   help="seconds before a running micro-batch is also given to an idle worker")
    g.add_argument("--shared-memory", choices=("on", "off"), default=d("shared-memory", "on"),
                   help="pass tensors to workers on this host through shared memory "
                        "(/dev/shm; default on; docs/worker.md)")
    g.add_argument("--worker-timeout", type=float, default=d("worker-timeout", 300.0),
                   help="deadline of each call to a worker, in seconds")


def run(args: argparse.Namespace) -> int:
    """``gradmesh coordinator``: serve until SIGTERM, then checkpoint."""
    config = config_from_args(args)
    configure_logging(config)
    if args.checkpoint_every < 0 or args.embedded_shards < 1 or args.micro_batch_deadline <= 0:
        print("error: --checkpoint-every must be >= 0, --embedded-shards >= 1 and "
              "--micro-batch-deadline > 0", file=sys.stderr)
        return 2
    try:
        peer = peer_config_from_args(args, config)
        running = start(workers=_split(args.workers), shards=_split(args.shards),
                        embedded_shards=args.embedded_shards, state_dir=args.state_dir,
                        checkpoint_every=args.checkpoint_every,
                        deadline=args.micro_batch_deadline,
                        worker_timeout=args.worker_timeout,
                        shared_memory=args.shared_memory == "on", config=config, peer=peer)
    except (ConfigError, checkpoint.CheckpointError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"gradmesh coordinator listening on {running.address}", flush=True)
    running.wait()
    running.coordinator.close()
    return 0
