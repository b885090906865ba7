"""The coordinator's logic: training jobs and their steps, as plain Python.

:class:`Coordinator` holds jobs, workers (:mod:`.workers`) and shards; every public method
is one RPC's logic (:mod:`.coordinator` puts them behind the service; tests drive them
directly). One step (DESIGN §6): the batch is cut into micro-batches (:mod:`.aggregate`);
:func:`~gradmesh.server.dispatch.dispatch` runs them over the workers with the
micro-batch's loss scale and seed; each result's gradients are pushed to the shards that
own them as soon as it arrives (so pushing overlaps the other micro-batches' compute).
When every micro-batch is pushed, the shards apply the step; their fixed summation tree
makes the result bit for bit independent of which worker did what.

Buffers (BUFFER inputs: BatchNorm running statistics) are job state kept by the
coordinator, at the job's version: every micro-batch of a step gets the step's starting
buffers with the parameters, and the step's new buffers are the micro-batches' updates
combined in micro-batch order (:func:`~gradmesh.server.aggregate.combine_buffers`). They
are logged with the step's Apply intent and checkpointed with the job, so they survive
the restarts the parameters survive (docs/training.md, "Buffers").
"""

from __future__ import annotations

import base64
import collections
import contextvars
import hashlib
import json
import logging
import os
import secrets
import threading
import time
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import grpc
import numpy as np

from gradmesh.core import dtypes, lr_scheduler, serialize
from gradmesh.core import graph as core_graph
from gradmesh.core.nn import utils as nn_utils
from gradmesh.server import checkpoint, compression
from gradmesh.server.aggregate import (
    TreeSum,
    combine_buffers,
    loss_scales,
    micro_batch_seed,
    micro_batches,
    place_rows,
)
from gradmesh.server.dispatch import dispatch
from gradmesh.server.runtime import ServiceError, status_code
from gradmesh.server.shard_store import EmbeddedShard, ShardStore, check_job_id
from gradmesh.server.workers import ParamSet, WorkerHandle, WorkerPool
from gradmesh.v1 import coordinator_pb2, graph_pb2
from gradmesh.wire import compression as wire_compression
from gradmesh.wire.errors import GradmeshError
from gradmesh.wire.schedule import (
    clipping_from_proto,
    clipping_to_proto,
    schedule_from_proto,
    schedule_to_proto,
)
from gradmesh.wire.shard import optimizer_from_proto, optimizer_to_proto
from gradmesh.wire.worker import Reply

log = logging.getLogger("gradmesh.coordinator")

__all__ = ["Coordinator", "Job"]

INVALID = grpc.StatusCode.INVALID_ARGUMENT
FAILED = grpc.StatusCode.FAILED_PRECONDITION
HISTORY = 1024  # step results kept for idempotent replays


@dataclass
class Job:
    job_id: str
    graph: Any  # graph_pb2.Graph
    graph_id: str
    param_names: list[str]  # the graph's PARAM inputs, in order
    param_specs: dict[str, tuple]  # name -> (dtype name, shape)
    data_inputs: list[Any]  # the graph's DATA inputs (graph_pb2.Input)
    metric_names: list[str]  # extra outputs reported as metrics
    optimizer: dict
    micro_batch_size: int
    placement: dict[str, int]
    version: int = 0
    last_step_id: int = 0
    samples: int = 0
    last_loss: float = 0.0
    error: str = ""
    history: "collections.OrderedDict[int, bytes]" = field(default_factory=collections.OrderedDict)
    # SHA-256 of each kept step's batch: a step id re-sent with another batch is refused.
    digests: dict[int, str] = field(default_factory=dict)
    # SHA-256 of the initial parameters (CreateJob with other values is refused).
    params_digest: str = ""
    # The step whose Apply was sent and not acknowledged by every shard: (step id, batch
    # digest). Some shards may have applied it, so it may only be retried with that batch.
    pinned: "tuple[int, str] | None" = None
    # Why steps fail now (a shard unreachable or behind); cleared when the shards agree
    # again. ``error`` is permanent (a restore that cannot be completed).
    fault: str = ""
    log: "checkpoint.RecordLog | None" = None
    # Step-log records that could not be written after Apply (disk full): written before
    # the next record, so the log stays in step order (see ``JobTable._log``).
    unlogged: list = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    # The parameters the workers get, at ``params.version``.
    params: "ParamSet | None" = None
    # The graph's BUFFER inputs (name -> (wire dtype, shape)) and their values at
    # ``version``; empty for a graph without buffers.
    buffer_specs: dict[str, tuple] = field(default_factory=dict)
    buffers: dict[str, np.ndarray] = field(default_factory=dict)
    # The learning-rate schedule and clipping descriptions (None: none), the schedule
    # driven as data (advanced once per applied step), why it cannot go on (a OneCycleLR
    # past its steps), and the last step's total gradient norm.
    schedule: "dict | None" = None
    clipping: "dict | None" = None
    runner: "lr_scheduler.ScheduleRunner | None" = None
    schedule_error: str = ""
    last_grad_norm: "float | None" = None
    # The step arguments (lr, clipping coefficient, ...) and total norm of the pinned step:
    # a retry sends the shards that did not apply it the same ones.
    pinned_args: "tuple[dict, float | None] | None" = None
    # The parameters cut into row slices over several shards (aggregate.place_rows):
    # name -> [(shard, start row, stop row), ...]; ``placement`` holds the first one's shard.
    pieces: dict[str, list] = field(default_factory=dict)
    # Opt-in compressed mode (None: the synchronous, bitwise mode) and its error-feedback
    # residuals, in memory only (docs/training.md, "Compressed gradients").
    residuals: "compression.Residuals | None" = None


def tensors_digest(arrays: dict[str, np.ndarray]) -> str:
    """SHA-256 over names, dtypes, shapes and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(json.dumps([name, a.dtype.str, list(a.shape)]).encode())
        h.update(serialize.byte_view(a))
    return h.hexdigest()


def _check_initial_parameters(names: list[str], specs: dict, params: dict[str, np.ndarray]) -> None:
    """Every PARAM input of the graph has an initial value of its dtype and shape, and
    nothing else is given (INVALID_ARGUMENT naming the parameter otherwise)."""
    for name in names:
        if name not in params:
            raise ServiceError(INVALID, f"no initial value for parameter {name!r}", "parameters")
    for name, a in params.items():
        spec = specs.get(name)
        if spec is None:
            raise ServiceError(
                INVALID,
                f"{name!r} is not a PARAM input of the graph (parameters: {names[:8]})",
                f"parameters[{name}]",
            )
        wire = serialize.DTYPE_TO_PROTO.get(_dtype_of(a))
        if wire != spec[0] or tuple(a.shape) != spec[1]:
            raise ServiceError(
                INVALID,
                f"parameter {name!r} has dtype {a.dtype} and shape "
                f"{list(a.shape)}; the graph declares "
                f"{serialize.dtype_name(spec[0])} {list(spec[1])}",
                f"parameters[{name}]",
            )


def _graph_buffers(graph) -> dict[str, tuple]:
    """The graph's BUFFER inputs: name -> (wire dtype, shape), in graph order."""
    return {
        i.name: (i.dtype, tuple(i.shape)) for i in graph.inputs if i.role == graph_pb2.Input.BUFFER
    }


def _split_buffers(
    specs: dict[str, tuple], given: dict[str, np.ndarray]
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """CreateJob's tensors as (parameters, buffers): every BUFFER input needs its initial
    value, of its dtype and shape (INVALID_ARGUMENT naming it otherwise)."""
    params = {n: a for n, a in given.items() if n not in specs}
    buffers = {}
    for name, (wire, shape) in specs.items():
        a = given.get(name)
        if a is None:
            raise ServiceError(
                INVALID,
                f"no initial value for buffer {name!r} (a BUFFER input of the graph: "
                f"send the model's buffers with the parameters)",
                f"parameters[{name}]",
            )
        if serialize.DTYPE_TO_PROTO.get(_dtype_of(a)) != wire or tuple(a.shape) != shape:
            raise ServiceError(
                INVALID,
                f"buffer {name!r} has dtype {a.dtype} and shape {list(a.shape)}; the graph "
                f"declares {serialize.dtype_name(wire)} {list(shape)}",
                f"parameters[{name}]",
            )
        buffers[name] = np.array(a)  # the job's own copy, replaced step by step
    return params, buffers


def _buffer_arrays(buffers: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Buffers as a checkpoint's or step log record's arrays (prefixed: never the graph)."""
    return {f"buffer:{n}": a for n, a in buffers.items()}


def _buffers_of(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {n[len("buffer:") :]: a for n, a in arrays.items() if n.startswith("buffer:")}


def _differences(
    existing,
    gid: str,
    optimizer: dict,
    micro_batch_size: int,
    digest: str,
    schedule: dict | None = None,
    clipping: dict | None = None,
    compress: dict | None = None,
) -> list[str]:
    """What a CreateJob for an existing job id asks differently from the job (empty: the
    same content, an idempotent re-create)."""
    checks = (
        (f"graph (existing {existing.graph_id[:12]}, new {gid[:12]})", existing.graph_id == gid),
        (
            f"optimizer (existing {existing.optimizer}, new {optimizer})",
            existing.optimizer == optimizer,
        ),
        (
            f"micro_batch_size (existing {existing.micro_batch_size}, new {micro_batch_size})",
            existing.micro_batch_size == micro_batch_size,
        ),
        (
            "initial parameters (another digest)",
            not existing.params_digest or existing.params_digest == digest,
        ),
        (
            f"schedule (existing {existing.schedule}, new {schedule})",
            existing.schedule == schedule,
        ),
        (
            f"clipping (existing {existing.clipping}, new {clipping})",
            existing.clipping == clipping,
        ),
        (
            f"compression (existing {_compression_of(existing)}, new {compress})",
            _compression_of(existing) == compress,
        ),
    )
    return [what for what, same in checks if not same]


def default_job_id(
    graph_id: str,
    params_digest: str,
    optimizer: dict,
    micro_batch_size: int,
    schedule: dict | None = None,
    clipping: dict | None = None,
    compress: dict | None = None,
) -> str:
    """The id of a job created without one: a digest of its content (graph, initial
    parameters, optimizer, micro-batch size, schedule and clipping when given), so that
    dropout seeds, which derive from the job id, are the same in two identical runs."""
    content: list = [graph_id, params_digest, optimizer, micro_batch_size]
    if schedule is not None or clipping is not None:
        content += [schedule, clipping]
    if compress is not None:
        content += [{"compression": compress}]
    key = json.dumps(content, sort_keys=True)
    return "job-" + hashlib.sha256(key.encode()).hexdigest()[:32]


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
                raise ServiceError(
                    INVALID,
                    f"DATA input {inp.name!r} has shape "
                    f"{list(inp.shape)}; its first dimension must be -1 (the "
                    f"batch), since batches are cut into micro-batches",
                    f"graph.inputs[{i}].shape",
                )
            data.append(inp)
    if not names:
        raise ServiceError(
            INVALID, "the graph has no PARAM inputs: nothing to train", "graph.inputs"
        )
    if not data:
        raise ServiceError(
            INVALID, "the graph has no DATA inputs to cut into micro-batches", "graph.inputs"
        )
    # Scalar extra outputs (accuracy, ...) are reported as metrics; others are not fetched.
    metrics = [o.name for o in graph.outputs[1:] if tuple(vg.specs[o.value].shape) == ()]
    return vg, names, specs, data, metrics


def _schedule_messages(header) -> tuple:
    """A CreateJobRequest's LRSchedule and GradientClipping, None where unset."""
    return (
        header.schedule if header.HasField("schedule") else None,
        header.clipping if header.HasField("clipping") else None,
    )


def _schedule_and_clipping(optimizer: dict, schedule_msg, clipping_msg) -> tuple:
    """The validated schedule and clipping descriptions (None where unset); a schedule the
    optimizer cannot follow (OneCycleLR cycling the momentum of an optimizer without one)
    is INVALID_ARGUMENT too."""
    schedule = schedule_from_proto(schedule_msg) if schedule_msg is not None else None
    clipping = clipping_from_proto(clipping_msg) if clipping_msg is not None else None
    if schedule is not None:
        try:
            lr_scheduler.ScheduleRunner(optimizer, schedule)
        except (ValueError, TypeError, KeyError) as e:
            raise ServiceError(INVALID, f"schedule: {e}", "schedule") from None
    return schedule, clipping


def _set_schedule(job: Job, schedule, clipping, state: dict | None = None) -> None:
    job.schedule, job.clipping = schedule, clipping
    if schedule is not None:
        job.runner = lr_scheduler.ScheduleRunner(job.optimizer, schedule, state)


def _advance_schedule(job: Job, loss: float) -> None:
    """Step the job's schedule after a step applied (its loss: ReduceLROnPlateau's metric).
    A schedule that cannot go on (OneCycleLR past its total steps, where torch's
    scheduler raises) stops the job's next steps with that reason."""
    if job.runner is None or job.schedule_error:
        return
    try:
        job.runner.advance(loss)
    except ValueError as e:
        job.schedule_error = f"the job's learning-rate schedule ended: {e}"


def _compression_of(job: Job) -> dict | None:
    return job.residuals.spec if job.residuals is not None else None


def _compression_spec(msg) -> dict | None:
    """A CreateJobRequest's GradientCompression as a validated description (None:
    unset, the synchronous mode); INVALID_ARGUMENT naming the field when bad."""
    if msg is None:
        return None
    try:
        return compression.validate({"kind": msg.kind, "ratio": msg.ratio})
    except ValueError as e:
        raise ServiceError(INVALID, str(e), str(e).split()[0]) from None  # names the field


def _set_compression(job: Job, spec: dict | None) -> None:
    job.residuals = compression.Residuals(spec) if spec is not None else None


def _mode_fields(job: Job) -> dict:
    """JobStatus's mode fields: what the job trades for speed, if anything."""
    r = job.residuals
    if r is None:
        return {"mode": "synchronous", "deterministic": True}
    return {
        "mode": "compressed",
        "deterministic": False,
        "compression": coordinator_pb2.GradientCompression(**r.spec),
        "gradient_bytes": r.dense_bytes,
        "compressed_bytes": r.sent_bytes,
    }


def _job_dtype(job: Job, name: str) -> np.dtype:
    return np.dtype(serialize.PROTO_TO_DTYPE[job.param_specs[name][0]].name)


class Coordinator:
    """Jobs, workers and shards; every public method is one RPC's logic.

    ``shards``: handles with the methods of
    :class:`~gradmesh.server.shard_store.EmbeddedShard` (default: one embedded shard).
    ``state_dir``: where the coordinator's and the embedded shards' checkpoints go.
    ``checkpoint_every``: checkpoint every N steps (and always on ``close``). ``deadline``:
    seconds after which a micro-batch still running is also given to an idle worker.
    """

    def __init__(
        self,
        workers: WorkerPool,
        shards: Sequence | None = None,
        state_dir: str | None = None,
        checkpoint_every: int = 10,
        deadline: float = 30.0,
        max_elements: int | None = 1 << 28,
    ):
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
        self._io = futures.ThreadPoolExecutor(
            max_workers=max(4, 2 * len(self.shards)), thread_name_prefix="gradmesh-shard-io"
        )
        # After a step, the next version's parameters are pulled and encoded here while the
        # client prepares its next batch (``_prefetch``); False: at the next step, in it.
        self.prefetch = True
        self._prefetcher = futures.ThreadPoolExecutor(1, thread_name_prefix="gradmesh-prefetch")
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
        _schedule_and_clipping(optimizer_from_proto(header.optimizer), *_schedule_messages(header))
        _compression_spec(header.compression if header.HasField("compression") else None)
        _, _, specs, _, _ = _graph_signature(header.graph)
        specs = {**specs, **_graph_buffers(header.graph)}
        serialize.check_headers(
            header.parameters, specs, "parameters", "PARAM or BUFFER input of the graph"
        )

    def create_job(
        self,
        job_id: str,
        graph,
        params: dict[str, np.ndarray],
        optimizer_msg,
        micro_batch_size: int,
        schedule_msg=None,
        clipping_msg=None,
        compression_msg=None,
    ):
        """Create a job (idempotent for identical content); returns the Job.
        ``schedule_msg``/``clipping_msg``: an LRSchedule and a GradientClipping, or None."""
        if job_id:
            check_job_id(job_id)
        if micro_batch_size < 1:
            raise ServiceError(INVALID, "micro_batch_size must be >= 1", "micro_batch_size")
        optimizer = optimizer_from_proto(optimizer_msg)
        schedule, clipping = _schedule_and_clipping(optimizer, schedule_msg, clipping_msg)
        compress = _compression_spec(compression_msg)
        vg, names, specs, data, extra = _graph_signature(graph)
        graph, gid = vg.graph, vg.id  # the canonical form: the workers' id too
        buffer_specs = _graph_buffers(graph)
        params, buffers = _split_buffers(buffer_specs, params)
        _check_initial_parameters(names, specs, params)
        # Buffers count as initial state (a graph without them digests as before).
        digest = tensors_digest({**{n: params[n] for n in names}, **buffers})
        job_id = job_id or default_job_id(
            gid, digest, optimizer, micro_batch_size, schedule, clipping, compress
        )
        with self._lock:
            existing = self.jobs.get(job_id)
            if existing is not None:
                differ = _differences(
                    existing, gid, optimizer, micro_batch_size, digest, schedule, clipping, compress
                )
                if differ:
                    raise ServiceError(
                        grpc.StatusCode.ALREADY_EXISTS,
                        f"job {job_id!r} exists with another " + "; another ".join(differ),
                        "job_id",
                    )
                return existing
            placement, pieces = _placement(names, params, len(self.shards), clipping)
            job = Job(
                job_id,
                graph,
                gid,
                names,
                specs,
                data,
                extra,
                optimizer,
                micro_batch_size,
                placement,
                params_digest=digest,
                buffer_specs=buffer_specs,
                buffers=buffers,
                pieces=pieces,
            )
            _set_schedule(job, schedule, clipping)
            _set_compression(job, compress)
            self.jobs[job_id] = job
        try:
            with job.lock:
                self._on_shards(
                    job,
                    lambda s, i: s.load(job_id, _parts_on(job, i, params, names), optimizer),
                )
                if self.state_dir:
                    job.log = checkpoint.RecordLog(self._log_path(job_id))
                self._save(job)
        except Exception:
            with self._lock:
                self.jobs.pop(job_id, None)
            raise
        log.info(
            "job created",
            extra={
                "job_id": job_id,
                "graph_id": gid,
                "parameters": len(names),
                "shards": len(self.shards),
            },
        )
        return job

    def _on_shards(self, job: Job, fn: Callable[[Any, int], Any]) -> list:
        """Call ``fn(shard, index)`` on every shard that holds some of the job, at once."""
        used = _used_shards(job)
        if len(used) == 1:
            return [fn(self.shards[used[0]], used[0])]
        futs = [
            self._io.submit(contextvars.copy_context().run, fn, self.shards[i], i) for i in used
        ]  # in this context: the calls carry the request id
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
        job = self.job(job_id)
        if step_id < 1:
            raise ServiceError(INVALID, "step ids start at 1", "step_id")
        with job.lock:
            replayed = self._earlier_result(job, step_id, batch)
            if replayed is not None:
                return replayed
            if job.error:
                raise ServiceError(FAILED, job.error, "job_id")
            batch = self._check_batch(job, batch)
            digest = tensors_digest(batch)
            if job.pinned is not None and job.pinned[0] == step_id and job.pinned[1] != digest:
                raise ServiceError(
                    FAILED,
                    f"step_id {step_id} of job {job_id!r}: an earlier "
                    f"attempt reached the shards' Apply with another batch "
                    f"and some may have applied it; retry it with the same "
                    f"batch",
                    "step_id",
                )
            if job.fault or job.pinned is not None:
                self._resync(job)
            try:
                resp = self._run_step(job, step_id, batch, digest)
            except (ServiceError, GradmeshError):
                if job.fault:
                    # A shard call failed: say what is wrong with the shards now (down,
                    # back without its state) as UNAVAILABLE, else the original error.
                    self._resync(job)
                raise
            _advance_schedule(job, resp.loss)
            self._record(job, step_id, resp, digest)
        self._prefetch(job)
        return resp

    def _earlier_result(self, job: Job, step_id: int, batch: dict[str, np.ndarray]):
        """The recorded response of a step id seen before (refused if its batch differs),
        None for the next step id; an older or a later id is out of sequence."""
        done = job.history.get(step_id)
        if done is not None:
            kept = job.digests.get(step_id)
            if kept and kept != tensors_digest(batch):
                raise ServiceError(
                    FAILED,
                    f"step_id {step_id} of job {job.job_id!r} was "
                    f"applied with another batch (SHA-256 {kept[:16]}...); "
                    f"a step id is applied once, with one batch",
                    "step_id",
                )
            resp = coordinator_pb2.StepResponse.FromString(done)
            resp.replayed = True
            return resp
        if step_id <= job.last_step_id:
            raise ServiceError(
                FAILED,
                f"step {step_id} of job {job.job_id!r} was applied "
                f"but its result is no longer kept (the last "
                f"{HISTORY} are)",
                "step_id",
            )
        if step_id != job.last_step_id + 1:
            raise ServiceError(
                FAILED,
                f"step {step_id} is out of sequence: job "
                f"{job.job_id!r} expects step {job.last_step_id + 1} next",
                "step_id",
            )
        return None

    def _record(self, job: Job, step_id: int, resp, digest: str) -> None:
        """Keep an applied step's response for replays, log it, checkpoint when due."""
        job.pinned = None
        job.history[step_id] = resp.SerializeToString()
        job.digests[step_id] = digest
        while len(job.history) > HISTORY:
            old, _ = job.history.popitem(last=False)
            job.digests.pop(old, None)
        self._log(
            job,
            {
                "kind": "done",
                "step_id": step_id,
                "digest": digest,
                "version": job.version,
                "samples": job.samples,
                "loss": job.last_loss,
                "grad_norm": job.last_grad_norm,
                "response": base64.b64encode(job.history[step_id]).decode(),
            },
            must=False,
        )
        if self.checkpoint_every and job.version % self.checkpoint_every == 0:
            try:
                self._save(job)
            except OSError as e:
                # Disk full, ...: the step is applied and in the step logs; the
                # previous checkpoint stays whole (written atomically) and the logs
                # keep growing until a checkpoint succeeds.
                log.warning("checkpoint failed", extra={"job_id": job.job_id, "error": str(e)})

    def _log(self, job: Job, record: dict, must: bool = True, arrays: dict | None = None) -> None:
        """Append to the job's step log (fsynced); ``must``: a failure fails the step."""
        if job.log is None:
            return
        try:
            while job.unlogged:  # an earlier step's result first: replay reads in order
                job.log.append(*job.unlogged[0])
                job.unlogged.pop(0)
            job.log.append(record, arrays)
        except OSError as e:
            if must:
                raise ServiceError(
                    grpc.StatusCode.UNAVAILABLE,
                    f"cannot write the coordinator's step log {job.log.path}: {e}",
                    "step_id",
                ) from None
            # The shards logged the step; its result is written with the next record.
            job.unlogged.append((record, arrays))
            log.warning("cannot log a step's result", extra={"job_id": job.job_id, "error": str(e)})

    def _shard_states(self, job: Job) -> dict[int, Any]:
        states = {}
        for i in _used_shards(job):
            try:
                states[i] = self.shards[i].status(job.job_id)
            except (ServiceError, GradmeshError) as e:
                job.fault = (
                    f"shard {i} ({self.shards[i].name}) is unreachable: "
                    f"{getattr(e, 'message', e)}; steps resume when it is back"
                )
                raise ServiceError(grpc.StatusCode.UNAVAILABLE, job.fault, "job_id") from None
        return states

    def _resync(self, job: Job) -> None:
        """Check that every shard of the job is where the job is (or has applied only the
        pinned step, which the retry completes); clear ``fault`` or raise UNAVAILABLE
        with it set. A restarted shard restores its checkpoint and step log: it is back at
        its last acknowledged step, whatever its address."""
        states = self._shard_states(job)
        here = (job.version, job.last_step_id)
        ahead = (job.version + 1, job.pinned[0]) if job.pinned else None
        bad = {i: s for i, s in states.items() if s is None or s not in (here, ahead)}
        if bad:
            parts = []
            for i, st in bad.items():
                name = f"shard {i} ({self.shards[i].name})"
                parts.append(
                    f"{name} has no state for the job (restarted without its state directory?)"
                    if st is None
                    else f"{name} is at version {st[0]} (last step {st[1]})"
                )
            job.fault = (
                f"job {job.job_id!r} is at version {job.version} (last step "
                f"{job.last_step_id}) but "
                + "; ".join(parts)
                + "; restore the shards' state directories"
            )
            raise ServiceError(grpc.StatusCode.UNAVAILABLE, job.fault, "job_id")
        job.fault = ""

    def _check_batch(self, job: Job, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        expected = {inp.name: inp for inp in job.data_inputs}
        for name in batch:
            if name not in expected:
                raise ServiceError(
                    INVALID,
                    f"{name!r} is not a DATA input of the graph (expected {sorted(expected)})",
                    f"batch[{name}]",
                )
        size = None
        for name, inp in expected.items():
            a = batch.get(name)
            if a is None:
                raise ServiceError(INVALID, f"the batch has no {name!r}", "batch")
            want = serialize.PROTO_TO_DTYPE.get(inp.dtype)
            shape = list(inp.shape)
            if (
                _dtype_of(a) is not want
                or a.ndim != len(shape)
                or any(s not in (-1, d) for s, d in zip(shape[1:], a.shape[1:]))
            ):
                raise ServiceError(
                    INVALID,
                    f"{name!r} has dtype {a.dtype} and shape "
                    f"{list(a.shape)}; the graph expects "
                    f"{want.name if want else inp.dtype} {shape}",
                    f"batch[{name}]",
                )
            if a.ndim == 0 or a.shape[0] < 1:
                raise ServiceError(INVALID, f"{name!r} has no rows", f"batch[{name}]")
            if size is None:
                size = a.shape[0]
            elif a.shape[0] != size:
                raise ServiceError(
                    INVALID,
                    f"batch tensors disagree on the batch size: "
                    f"{name!r} has {a.shape[0]} rows, others {size}",
                    f"batch[{name}]",
                )
        return batch

    def _params_for_workers(self, job: Job) -> tuple["ParamSet", float]:
        """The job's parameters at its version, pulled once per version."""
        if job.params is not None and job.params.version == job.version:
            return job.params, 0.0
        if job.params is not None:
            job.params.release()
        start = time.perf_counter()

        def pull(shard, i):
            names = _names_on(job, i, job.param_names)
            return shard.pull(job.job_id, job.version, names)[1]

        arrays = _assemble(job, self._on_shards(job, pull))
        arrays = {**{n: arrays[n] for n in job.param_names}, **job.buffers}
        job.params = ParamSet(job.version, arrays, job.job_id, gradients=job.param_names)
        return job.params, time.perf_counter() - start

    def _prefetch(self, job: Job) -> None:
        """Pull the job's new version and encode it as the last one was (unary bytes, a
        shared-memory segment), in the background: the next step finds it ready. The
        same arrays and bytes the step would make itself, so nothing changes but when."""
        if not self.prefetch:
            return
        try:
            self._prefetcher.submit(contextvars.copy_context().run, self._prefetch_now, job)
        except RuntimeError:  # closing
            pass

    def _prefetch_now(self, job: Job) -> None:
        with job.lock:
            old = job.params
            if old is None or old.version == job.version or job.error or job.fault:
                return
            encoded = old.encodings()
            try:
                params, _ = self._params_for_workers(job)
                params.encode(*encoded)
            except Exception as e:  # the next step pulls again and reports it
                log.info("prefetch failed", extra={"job_id": job.job_id, "error": _text(e)})

    def _run_step(self, job: Job, step_id: int, batch: dict[str, np.ndarray], digest: str):
        if job.schedule_error:
            raise ServiceError(FAILED, job.schedule_error, "step_id")
        t0 = time.perf_counter()
        try:
            params, pull_seconds = self._params_for_workers(job)
        except (ServiceError, GradmeshError) as e:
            job.fault = f"cannot pull the parameters from the shards: {_text(e)}"
            raise
        run = _StepRun(job, step_id, batch, params, self.shards)
        t1 = time.perf_counter()
        reassigned = dispatch(self.workers, run.n, run.compute, run.accept, self.deadline)
        t2 = time.perf_counter()
        version = run.version
        checkpoint_now = bool(self.checkpoint_every and (version + 1) % self.checkpoint_every == 0)
        step_args, grad_norm = self._step_args(job, run, digest)
        # From here some shards may apply the step and others not (one dies): the step is
        # pinned to this batch until every shard has it, and logged so across a restart.
        new_buffers = run.new_buffers()
        intent = {"kind": "intent", "step_id": step_id, "digest": digest}
        if step_args:
            intent.update(args=step_args, grad_norm=grad_norm)
        self._log(job, intent, arrays=_buffer_arrays(new_buffers))
        job.pinned = (step_id, digest)
        job.pinned_args = (step_args, grad_norm)
        try:
            results = self._on_shards(
                job,
                lambda s, i: s.apply(
                    job.job_id,
                    step_id,
                    run.n,
                    version,
                    checkpoint_now,
                    run.attempt,
                    **({"step_args": step_args} if step_args else {}),
                ),
            )
        except (ServiceError, GradmeshError) as e:
            job.fault = f"step {step_id} failed in a shard's Apply: {_text(e)}"
            raise
        t3 = time.perf_counter()
        if run.residuals is not None:
            run.residuals.commit()
        job.version = version + 1
        job.buffers = new_buffers
        job.last_step_id = step_id
        job.samples += run.size
        # Worker losses are in the graph's dtype; the tree sums them as float64 so the
        # reported loss does not depend on the loss dtype's rounding of the sum.
        loss = float(run.losses.result())
        job.last_loss = loss
        job.last_grad_norm = grad_norm
        pb = coordinator_pb2
        return pb.StepResponse(
            step_id=step_id,
            loss=loss,
            lr=step_args.get("lr", job.optimizer["lr"]),
            grad_norm=grad_norm,
            version=job.version,
            batch_size=run.size,
            micro_batches=run.n,
            metrics={k: float(t.result()) for k, t in run.metrics.items() if t.complete},
            timings=pb.StepTimings(
                pull_seconds=pull_seconds,
                compute_seconds=t2 - t1,
                push_seconds=run.push_seconds,
                apply_seconds=t3 - t2 if results else 0.0,
                total_seconds=time.perf_counter() - t0,
                reassigned=reassigned,
                worker_compute_seconds=run.worker_seconds,
            ),
        )

    def _step_args(self, job: Job, run: "_StepRun", digest: str) -> tuple[dict, float | None]:
        """What this step's Apply carries besides the step: the schedule's hyper-parameters
        and the clipping (with clip_grad_norm, the total norm over every shard's
        per-parameter norms, in the job's parameter order); and that total norm. The
        retry of a pinned step gets the arguments its first Apply had."""
        if job.pinned == (run.step_id, digest) and job.pinned_args is not None:
            return job.pinned_args
        args: dict = {}
        if job.runner is not None:
            hyper = job.runner.hyper()
            args["lr"] = hyper["lr"]
            if "momentum" in hyper:
                args["momentum"] = hyper["momentum"]
            if "betas" in hyper:
                args["beta1"] = hyper["betas"][0]
        clip = job.clipping
        if clip is None:
            return args, None
        if clip["kind"] == "value":
            return {**args, "clip_value": clip["clip_value"]}, None
        total = self._total_norm(job, run, clip["norm_type"])
        if clip["error_if_nonfinite"] and not np.isfinite(total):
            raise ServiceError(INVALID, nn_utils.nonfinite_message(clip["norm_type"]), "batch")
        coefficient = nn_utils.clip_coefficient(np, total, clip["max_norm"])
        return {**args, "clip_coefficient": float(coefficient)}, float(total)

    def _total_norm(self, job: Job, run: "_StepRun", norm_type: float):
        """clip_grad_norm_'s total over the shards' per-parameter norms of the summed step
        gradient: each norm back in its parameter's dtype (a double holds it exactly),
        stacked in the graph's parameter order, as local training's model.parameters()."""
        norms: dict[str, float] = {}
        try:
            parts = self._on_shards(
                job,
                lambda s, i: s.gradient_norms(
                    job.job_id, run.step_id, run.n, run.version, run.attempt, norm_type
                ),
            )
        except (ServiceError, GradmeshError) as e:
            job.fault = f"step {run.step_id} failed in a shard's GradientNorms: {_text(e)}"
            raise
        for part in parts:
            norms.update(part)
        arrays = [np.asarray(norms[n], dtype=_job_dtype(job, n)) for n in job.param_names]
        return nn_utils.total_norm(np, arrays, norm_type)

    # -- GetParameters / status -----------------------------------------------------------
    def get_parameters(self, job_id: str, names: Sequence[str] = ()) -> tuple[int, dict]:
        job = self.job(job_id)
        for k, n in enumerate(names):
            if n not in job.placement and n not in job.buffer_specs:
                raise ServiceError(INVALID, f"job {job_id!r} has no parameter {n!r}", f"names[{k}]")
        # The buffers after the parameters: together, the model's whole state.
        wanted = list(names) or job.param_names + list(job.buffer_specs)
        with job.lock:

            def pull(shard, i):
                mine = _names_on(job, i, wanted)
                return shard.pull(job.job_id, job.version, mine, copy=True)[1] if mine else {}

            arrays: dict = {n: job.buffers[n].copy() for n in wanted if n in job.buffer_specs}
            arrays.update(_assemble(job, self._on_shards(job, pull)))
            return job.version, {n: arrays[n] for n in wanted}

    def job_status(self, job_id: str):
        pb = coordinator_pb2
        job = self.job(job_id)
        if job.fault and job.lock.acquire(timeout=1.0):
            try:  # is the shard back? (clears the fault if so)
                if job.fault:
                    self._resync(job)
            except ServiceError:
                pass
            finally:
                job.lock.release()
        return pb.JobStatusResponse(
            job_id=job.job_id,
            graph_id=job.graph_id,
            version=job.version,
            last_step_id=job.last_step_id,
            next_step_id=job.last_step_id + 1,
            micro_batch_size=job.micro_batch_size,
            optimizer=optimizer_to_proto(job.optimizer),
            placement=job.placement,
            samples=job.samples,
            last_loss=job.last_loss,
            shards=len(self.shards),
            workers=sum(1 for w in self.workers.workers.values() if w.state == "ready"),
            error=job.error or job.fault,
            data_inputs=[i.name for i in job.data_inputs],
            metrics=job.metric_names,
            schedule=schedule_to_proto(job.schedule) if job.schedule else None,
            clipping=clipping_to_proto(job.clipping) if job.clipping else None,
            next_lr=job.runner.hyper()["lr"] if job.runner else job.optimizer["lr"],
            last_grad_norm=job.last_grad_norm,
            **_mode_fields(job),
        )

    def list_workers(self):
        pb = coordinator_pb2
        self.workers.usable()  # refresh states
        resp = pb.ListWorkersResponse()
        for w in sorted(self.workers.workers.values(), key=lambda w: w.address):
            resp.workers.add(
                address=w.address,
                source=w.source,
                state=w.state,
                build_fingerprint=w.fingerprint,
                backend=w.backend,
                reason=w.reason,
                completed=w.completed,
                failures=w.failures,
                worker_id=w.worker_id,
            )
        return resp

    # -- checkpoints ----------------------------------------------------------------------
    def _job_path(self, job_id: str) -> str:
        return os.path.join(self.state_dir, "jobs", f"{job_id}.npz")

    def _log_path(self, job_id: str) -> str:
        return os.path.join(self.state_dir, "jobs", f"{job_id}.steps.log")

    def _save(self, job: Job) -> None:
        """Checkpoint one job's coordinator state (the caller holds ``job.lock``)."""
        if not self.state_dir:
            return
        for s in self.shards:
            if isinstance(s, EmbeddedShard):
                s.store.checkpoint(job.job_id)
        meta = {
            "job_id": job.job_id,
            "graph_id": job.graph_id,
            "optimizer": job.optimizer,
            "micro_batch_size": job.micro_batch_size,
            "placement": job.placement,
            "pieces": job.pieces,
            "shards": len(self.shards),
            "version": job.version,
            "last_step_id": job.last_step_id,
            "samples": job.samples,
            "last_loss": job.last_loss,
            "params_digest": job.params_digest,
            "digests": {str(k): v for k, v in job.digests.items()},
            "pinned": list(job.pinned) if job.pinned else None,
            "history": [[k, base64.b64encode(v).decode()] for k, v in job.history.items()],
            **_schedule_meta(job),
            **({"compression": job.residuals.spec} if job.residuals else {}),
        }
        graph = np.frombuffer(job.graph.SerializeToString(deterministic=True), np.uint8)
        arrays = {"graph": graph, **_buffer_arrays(job.buffers)}
        checkpoint.save(self._job_path(job.job_id), arrays, meta)
        if job.log is not None:
            job.log.truncate()  # its steps are in the checkpoint now
            job.unlogged.clear()

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
            job = Job(
                meta["job_id"],
                graph,
                meta["graph_id"],
                names,
                specs,
                data,
                extra,
                meta["optimizer"],
                meta["micro_batch_size"],
                {k: int(v) for k, v in meta["placement"].items()},
                meta["version"],
                meta["last_step_id"],
                meta["samples"],
                meta["last_loss"],
            )
            for k, v in meta["history"]:
                job.history[int(k)] = base64.b64decode(v)
            job.params_digest = meta.get("params_digest", "")
            job.pieces = {n: [tuple(p) for p in ps] for n, ps in meta.get("pieces", {}).items()}
            job.digests = {int(k): v for k, v in meta.get("digests", {}).items()}
            job.pinned = tuple(meta["pinned"]) if meta.get("pinned") else None
            job.buffer_specs = _graph_buffers(graph)
            job.buffers = _buffers_of(arrays)
            _restore_schedule(job, meta)
            # The residuals are not checkpointed: they restart from zero (documented).
            _set_compression(job, meta.get("compression"))
            job.log = checkpoint.RecordLog(self._log_path(job.job_id))
            self._replay(job)
            if meta["shards"] != len(self.shards):
                job.error = (
                    f"job {job.job_id!r} was placed over {meta['shards']} shards, "
                    f"this coordinator has {len(self.shards)}"
                )
            else:
                self._reconcile(job)
            self.jobs[job.job_id] = job
            log.info(
                "restored job",
                extra={"job_id": job.job_id, "version": job.version, "error": job.error},
            )

    def _replay(self, job: Job) -> None:
        """Re-read the step log written since the checkpoint: each step's result
        (``done``, fsynced before the client was answered) and the step whose Apply was
        sent last (``intent``: some shards may have applied it)."""
        intended: dict = {}  # the new buffers of the step whose Apply was sent
        for rec, arrays in job.log.records():
            sid = rec["step_id"]
            if rec["kind"] == "intent" and sid == job.last_step_id + 1:
                job.pinned = (sid, rec["digest"])
                intended = _buffers_of(arrays)
                job.pinned_args = (rec.get("args", {}), rec.get("grad_norm"))
            elif rec["kind"] == "done" and sid == job.last_step_id + 1:
                if intended:
                    job.buffers = {**job.buffers, **intended}
                job.history[sid] = base64.b64decode(rec["response"])
                job.digests[sid] = rec["digest"]
                job.version, job.last_step_id = rec["version"], sid
                job.samples, job.last_loss = rec["samples"], rec["loss"]
                job.pinned = None
                _advance_schedule(job, rec["loss"])
                job.last_grad_norm = rec.get("grad_norm")
        while len(job.history) > HISTORY:
            old, _ = job.history.popitem(last=False)
            job.digests.pop(old, None)

    def _reconcile(self, job: Job) -> None:
        """Agree with the shards on the version after a restart (see docs/training.md).
        What cannot be agreed now (a shard down) is the job's ``fault``, checked again
        before each step and by JobStatus."""
        try:
            states = self._shard_states(job)
        except ServiceError:
            return
        versions = set(states.values())
        if len(versions) == 1 and None not in versions:
            version, last = versions.pop()
            if version > job.version + (1 if job.pinned else 0):
                # Shards applied steps the coordinator has no record of (a coordinator
                # without a step log): the parameters are kept, those results are lost.
                # The schedule catches up on the last known loss (exact unless it is
                # ReduceLROnPlateau, whose metric those steps' losses were).
                for _ in range(version - job.version):
                    _advance_schedule(job, job.last_loss)
                job.version, job.last_step_id, job.pinned = version, last, None
        try:
            self._resync(job)
        except ServiceError:
            pass

    def close(self) -> None:
        self._prefetcher.shutdown(wait=True, cancel_futures=True)
        self.checkpoint()
        for job in list(self.jobs.values()):
            if job.log is not None:
                job.log.close()
        self._io.shutdown(wait=False)
        for s in self.shards:
            s.close()
        self.workers.close()


def _schedule_meta(job: Job) -> dict:
    """The schedule's and clipping's part of a job's checkpoint (nothing without them)."""
    if job.schedule is None and job.clipping is None:
        return {}
    return {
        "schedule": job.schedule,
        "clipping": job.clipping,
        "schedule_state": job.runner.state() if job.runner else None,
        "schedule_error": job.schedule_error,
        "last_grad_norm": job.last_grad_norm,
        # A pinned step's retry must send the shards its first Apply's arguments.
        "pinned_args": list(job.pinned_args) if job.pinned and job.pinned_args else None,
    }


def _restore_schedule(job: Job, meta: dict) -> None:
    _set_schedule(job, meta.get("schedule"), meta.get("clipping"), meta.get("schedule_state"))
    job.schedule_error = meta.get("schedule_error", "")
    job.last_grad_norm = meta.get("last_grad_norm")
    if meta.get("pinned_args"):
        job.pinned_args = tuple(meta["pinned_args"])


class _StepRun:
    """One attempt at a step: its micro-batches, what each worker computes for one, and
    what happens to each first result (pushed to the shards, loss and metrics summed in
    micro-batch order)."""

    def __init__(
        self, job: Job, step_id: int, batch: dict[str, np.ndarray], params: ParamSet, shards: list
    ):
        self.job = job
        self.step_id = step_id
        self.batch = batch
        self.params = params
        self.shards = shards
        self.size = next(iter(batch.values())).shape[0]
        self.ranges = micro_batches(self.size, job.micro_batch_size)
        self.scales = loss_scales(self.size, job.micro_batch_size)
        self.n = len(self.ranges)
        self.losses = TreeSum(self.n)
        self.metrics = {name: TreeSum(self.n) for name in job.metric_names}
        self.buffer_updates: list = [None] * self.n  # per micro-batch: its new buffers
        self.updated = [o.buffer for o in job.graph.outputs if o.buffer]
        self.push_seconds = 0.0
        self.worker_seconds = 0.0
        self.lock = threading.Lock()
        self.version = job.version
        self.by_shard = _used_shards(job)
        # A fresh attempt id per run: the shards drop gradients a failed attempt of this
        # step left behind instead of mixing them with this one's (the retry may carry
        # another batch).
        self.attempt = secrets.randbits(64)
        self.residuals = job.residuals.stage() if job.residuals is not None else None

    def compute(self, worker: WorkerHandle, m: int) -> Reply:
        job = self.job
        start, stop = self.ranges[m]
        data = {name: a[start:stop] for name, a in self.batch.items()}
        return worker.compute(
            job.graph,
            job.graph_id,
            self.params,
            data,
            self.scales[m],
            micro_batch_seed(job.job_id, self.step_id, m),
            job.metric_names,
        )

    def accept(self, m: int, r: Reply) -> None:
        job = self.job
        missing = [nm for nm in job.param_names if nm not in r.gradients]
        if missing:
            raise ServiceError(
                grpc.StatusCode.INTERNAL, f"a worker returned no gradient for {missing[:5]}"
            )
        missing = [nm for nm in self.updated if nm not in r.buffers]
        if missing:
            raise ServiceError(
                grpc.StatusCode.INTERNAL, f"a worker returned no new value of buffer {missing[:5]}"
            )
        t = time.perf_counter()
        gradients = r.gradients
        if self.residuals is not None:
            # Unused parameters stay zeros (the shards skip them as torch's optimizers do).
            used = [nm for nm in job.param_names if nm not in r.unused]
            gradients = {**gradients, **self.residuals.apply(m, {nm: gradients[nm] for nm in used})}
        for i in self.by_shard:
            grads = _parts_on(job, i, gradients, job.param_names)
            unused = [nm for nm in r.unused if nm in grads]
            extra = self._compressed_for(i, grads, unused)
            if extra:
                grads = {nm: g for nm, g in grads.items() if nm in unused}
            try:
                self.shards[i].push(
                    job.job_id,
                    self.step_id,
                    m,
                    self.n,
                    self.version,
                    grads,
                    self.attempt,
                    unused,
                    **extra,
                )
            except (ServiceError, GradmeshError) as e:
                job.fault = (
                    f"step {self.step_id}: pushing gradients to shard {i} "
                    f"({self.shards[i].name}) failed: {_text(e)}"
                )
                raise
        with self.lock:
            self.push_seconds += time.perf_counter() - t
            self.worker_seconds += r.compute_seconds
            self.losses.add(m, np.asarray(r.loss, dtype=np.float64))
            # A copy: the reply's bytes may be a view of a message or a reused buffer.
            self.buffer_updates[m] = {nm: np.array(r.buffers[nm]) for nm in self.updated}
            for name in job.metric_names:
                value = r.outputs.get(name)
                if value is not None and np.size(value) == 1:
                    w = (self.ranges[m][1] - self.ranges[m][0]) / self.size
                    self.metrics[name].add(m, float(np.asarray(value).reshape(())) * w)

    def _compressed_for(self, i: int, grads: dict, unused: list) -> dict:
        """For a remote shard of a compressed job, the compressed gradients in their wire
        encoding (decoded there to the same values: embedded shards get them dense)."""
        if self.residuals is None or isinstance(self.shards[i], EmbeddedShard):
            return {}
        kind = self.residuals.owner.spec["kind"]
        blobs = {
            nm: wire_compression.encode(kind, g) for nm, g in grads.items() if nm not in unused
        }
        return {"compressed": (kind, blobs)} if blobs else {}

    def new_buffers(self) -> dict[str, np.ndarray]:
        """The step's new buffers: every micro-batch's update, combined in micro-batch
        order (the job's buffers as they are when the graph updates none)."""
        if not self.updated:
            return self.job.buffers
        return {**self.job.buffers, **combine_buffers(self.buffer_updates, self.scales)}


def _text(e: Exception) -> str:
    return getattr(e, "message", None) or str(e)


def _dtype_of(a: np.ndarray):
    try:
        return dtypes.from_numpy(a.dtype.newbyteorder("="))
    except TypeError:
        return None


# -- placement by bytes (aggregate.place_rows) -----------------------------------------------
def _placement(names: list[str], params: dict, shards: int, clipping) -> tuple[dict, dict]:
    """``(placement, pieces)`` of a new job: every parameter's (first) shard, and the row
    slices of the ones cut over several shards. clip_grad_norm needs each parameter's norm
    over the whole tensor with torch's own summation, which norms of slices cannot give
    bit for bit: a job clipping by norm keeps its parameters whole."""
    rows = {n: int(params[n].shape[0]) if params[n].ndim else 0 for n in names}
    sizes = {n: (int(params[n].nbytes), rows[n]) for n in names}
    split = clipping is None or clipping["kind"] == "value"
    parts = place_rows(sizes, shards, split=split)
    placement = {n: ps[0][0] for n, ps in parts.items()}
    return placement, {n: ps for n, ps in parts.items() if len(ps) > 1}


def _used_shards(job: Job) -> list[int]:
    used = set(job.placement.values())
    for parts in job.pieces.values():
        used.update(shard for shard, _, _ in parts)
    return sorted(used)


def _names_on(job: Job, i: int, names) -> list[str]:
    """The names among ``names`` of which shard ``i`` holds the whole or a slice."""
    return [
        n
        for n in names
        if (any(p[0] == i for p in job.pieces[n]) if n in job.pieces else job.placement.get(n) == i)
    ]


def _parts_on(job: Job, i: int, arrays: dict, names) -> dict:
    """What shard ``i`` holds of ``arrays`` (whole tensors of ``names``): whole ones, and
    its row slice (a view) of a cut one, under the parameter's name."""
    out = {}
    for n in _names_on(job, i, names):
        rows = [(start, stop) for shard, start, stop in job.pieces.get(n, ()) if shard == i]
        out[n] = arrays[n][rows[0][0] : rows[0][1]] if rows else arrays[n]
    return out


def _assemble(job: Job, parts: list[dict]) -> dict:
    """Whole tensors from what each used shard returned (``parts`` in ``_used_shards``
    order): a cut parameter's slices joined in row order."""
    by_shard = dict(zip(_used_shards(job), parts))
    arrays: dict = {}
    for part in parts:
        arrays.update(part)
    for n, pieces in job.pieces.items():
        if n in arrays:
            arrays[n] = np.concatenate([by_shard[shard][n] for shard, _, _ in pieces])
    return arrays
