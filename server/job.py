"""A coordinator's training job: its state (:class:`Job`) and the checks and settings of
its content (graph, initial parameters and buffers, optimizer, schedule, clipping,
compression) as CreateJob gives them.

Buffers (BUFFER inputs: BatchNorm running statistics) are job state kept by the
coordinator, at the job's version: every micro-batch of a step gets the step's starting
buffers with the parameters, and the step's new buffers are the micro-batches' updates
combined in micro-batch order (:func:`~gradmesh.server.aggregate.combine_buffers`). They
are logged with the step's Apply intent and checkpointed with the job, so they survive
the restarts the parameters survive (docs/training.md, "Buffers").
"""

from __future__ import annotations

import collections
import hashlib
import json
import threading
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np

from gradmesh.core import dtypes, lr_scheduler, serialize
from gradmesh.core import graph as core_graph
from gradmesh.server import checkpoint, compression
from gradmesh.server.runtime import ServiceError, status_code
from gradmesh.server.workers import ParamSet
from gradmesh.v1 import coordinator_pb2, graph_pb2
from gradmesh.wire.schedule import (
    clipping_from_proto,
    schedule_from_proto,
)

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
    # Step ids whose Step calls are being handled now, the last step id whose call ended
    # without applying it, and the condition they change under: a synchronous job's next
    # step, sent while the one before runs, waits for it (``Coordinator._turn``).
    arriving: set = field(default_factory=set)
    last_failed: int = 0
    turn: threading.Condition = field(default_factory=threading.Condition)
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
    # Opt-in bounded-staleness mode (None: synchronous): a stale.StaleState with the
    # bound, its unfinished steps and what it has seen (docs/training.md, "Bounded staleness").
    stale: Any = None


def tensors_digest(arrays: dict[str, np.ndarray]) -> str:
    """SHA-256 over names, dtypes, shapes and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(json.dumps([name, a.dtype.str, list(a.shape)]).encode())
        h.update(serialize.byte_view(a))
    return h.hexdigest()


def check_initial_parameters(names: list[str], specs: dict, params: dict[str, np.ndarray]) -> None:
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
        wire = serialize.DTYPE_TO_PROTO.get(dtype_of(a))
        if wire != spec[0] or tuple(a.shape) != spec[1]:
            raise ServiceError(
                INVALID,
                f"parameter {name!r} has dtype {a.dtype} and shape "
                f"{list(a.shape)}; the graph declares "
                f"{serialize.dtype_name(spec[0])} {list(spec[1])}",
                f"parameters[{name}]",
            )


def graph_buffers(graph) -> dict[str, tuple]:
    """The graph's BUFFER inputs: name -> (wire dtype, shape), in graph order."""
    return {
        i.name: (i.dtype, tuple(i.shape)) for i in graph.inputs if i.role == graph_pb2.Input.BUFFER
    }


def split_buffers(
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
        if serialize.DTYPE_TO_PROTO.get(dtype_of(a)) != wire or tuple(a.shape) != shape:
            raise ServiceError(
                INVALID,
                f"buffer {name!r} has dtype {a.dtype} and shape {list(a.shape)}; the graph "
                f"declares {serialize.dtype_name(wire)} {list(shape)}",
                f"parameters[{name}]",
            )
        buffers[name] = np.array(a)  # the job's own copy, replaced step by step
    return params, buffers


def buffer_arrays(buffers: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Buffers as a checkpoint's or step log record's arrays (prefixed: never the graph)."""
    return {f"buffer:{n}": a for n, a in buffers.items()}


def buffers_of(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {n[len("buffer:") :]: a for n, a in arrays.items() if n.startswith("buffer:")}


@dataclass(frozen=True)
class JobContent:
    """What a job is made of, for its default id and for comparing a re-create with it."""

    graph_id: str
    params_digest: str
    optimizer: dict
    micro_batch_size: int
    schedule: dict | None = None
    clipping: dict | None = None
    compress: dict | None = None
    staleness: int | None = None

    @classmethod
    def of(cls, job: Job) -> JobContent:
        return cls(
            job.graph_id,
            job.params_digest,
            job.optimizer,
            job.micro_batch_size,
            job.schedule,
            job.clipping,
            compression_of(job),
            staleness_of(job),
        )

    def default_job_id(self) -> str:
        """The id of a job created without one: a digest of its content (graph, initial
        parameters, optimizer, micro-batch size, schedule and clipping when given), so
        that dropout seeds, which derive from the job id, are the same in two identical
        runs. Modes left unset add nothing: ids of jobs created before they existed hold."""
        content: list = [self.graph_id, self.params_digest, self.optimizer, self.micro_batch_size]
        if self.schedule is not None or self.clipping is not None:
            content += [self.schedule, self.clipping]
        if self.compress is not None:
            content += [{"compression": self.compress}]
        if self.staleness is not None:
            content += [{"staleness": self.staleness}]
        key = json.dumps(content, sort_keys=True)
        return "job-" + hashlib.sha256(key.encode()).hexdigest()[:32]

    def differences(self, existing: JobContent) -> list[str]:
        """What this content asks differently from an existing job's (empty: the same
        content, an idempotent re-create). A job restored without its initial parameters'
        digest accepts any."""

        def compare(key: str, label: str) -> tuple[str, bool]:
            old, new = getattr(existing, key), getattr(self, key)
            return f"{label} (existing {old}, new {new})", old == new

        checks = [
            (
                f"graph (existing {existing.graph_id[:12]}, new {self.graph_id[:12]})",
                existing.graph_id == self.graph_id,
            ),
            compare("optimizer", "optimizer"),
            compare("micro_batch_size", "micro_batch_size"),
            (
                "initial parameters (another digest)",
                not existing.params_digest or existing.params_digest == self.params_digest,
            ),
            compare("schedule", "schedule"),
            compare("clipping", "clipping"),
            compare("compress", "compression"),
            compare("staleness", "staleness"),
        ]
        return [what for what, same in checks if not same]


def graph_signature(graph) -> tuple[Any, list, dict, list, list]:
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


def schedule_messages(header) -> tuple:
    """A CreateJobRequest's LRSchedule and GradientClipping, None where unset."""
    return (
        header.schedule if header.HasField("schedule") else None,
        header.clipping if header.HasField("clipping") else None,
    )


def schedule_and_clipping(optimizer: dict, schedule_msg, clipping_msg) -> tuple:
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


def set_schedule(job: Job, schedule, clipping, state: dict | None = None) -> None:
    job.schedule, job.clipping = schedule, clipping
    if schedule is not None:
        job.runner = lr_scheduler.ScheduleRunner(job.optimizer, schedule, state)


def advance_schedule(job: Job, loss: float) -> None:
    """Step the job's schedule after a step applied (its loss: ReduceLROnPlateau's metric).
    A schedule that cannot go on (OneCycleLR past its total steps, where torch's
    scheduler raises) stops the job's next steps with that reason."""
    if job.runner is None or job.schedule_error:
        return
    try:
        job.runner.advance(loss)
    except ValueError as e:
        job.schedule_error = f"the job's learning-rate schedule ended: {e}"


def compression_of(job: Job) -> dict | None:
    return job.residuals.spec if job.residuals is not None else None


def staleness_of(job: Job) -> int | None:
    return job.stale.bound if job.stale is not None else None


def compression_spec(msg) -> dict | None:
    """A CreateJobRequest's GradientCompression as a validated description (None:
    unset, the synchronous mode); INVALID_ARGUMENT naming the field when bad."""
    if msg is None:
        return None
    try:
        return compression.validate({"kind": msg.kind, "ratio": msg.ratio, "where": msg.where})
    except ValueError as e:
        raise ServiceError(INVALID, str(e), str(e).split()[0]) from None  # names the field


def set_compression(job: Job, spec: dict | None) -> None:
    job.residuals = compression.Residuals(spec) if spec is not None else None


def mode_fields(job: Job) -> dict:
    """JobStatus's mode fields: what the job trades for speed, if anything."""
    s = job.stale
    if s is not None:
        return {
            "mode": "stale",
            "deterministic": False,
            "staleness": s.bound,
            "max_staleness": s.max_seen,
            "recomputed": s.recomputed,
        }
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


def job_dtype(job: Job, name: str) -> np.dtype:
    return np.dtype(serialize.PROTO_TO_DTYPE[job.param_specs[name][0]].name)


def schedule_meta(job: Job) -> dict:
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


def restore_schedule(job: Job, meta: dict) -> None:
    set_schedule(job, meta.get("schedule"), meta.get("clipping"), meta.get("schedule_state"))
    job.schedule_error = meta.get("schedule_error", "")
    job.last_grad_norm = meta.get("last_grad_norm")
    if meta.get("pinned_args"):
        job.pinned_args = tuple(meta["pinned_args"])


def dtype_of(a: np.ndarray):
    try:
        return dtypes.from_numpy(a.dtype.newbyteorder("="))
    except TypeError:
        return None
