"""Train on a gradmesh cluster: ``CoordinatorClient`` creates jobs, ``Job`` runs steps.

>>> import gradmesh.core as gm
>>> from gradmesh.client import CoordinatorClient
>>> model = gm.nn.Sequential(gm.nn.Linear(64, 32), gm.nn.ReLU(), gm.nn.Linear(32, 10))
>>> def loss_fn(model, x, y):
...     return gm.nn.functional.cross_entropy(model(x), y)
>>> client = CoordinatorClient("127.0.0.1:50053")                 # doctest: +SKIP
>>> job = client.create_job(model, loss_fn, gm.optim.SGD(model.parameters(), lr=0.1),
...                         micro_batch_size=32, example_batch=(x[:64], y[:64]))  # doctest: +SKIP
>>> result = job.step(x[:256], y[:256])                          # doctest: +SKIP
>>> model.load_state_dict(job.parameters())                       # doctest: +SKIP

Step ids are assigned here (1, 2, 3, ...) and a step that fails with a transient error
(the coordinator restarting, a network blip) is retried with the same id: the coordinator
applies each id once, so a retry never updates twice.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from gradmesh.core import graph as core_graph
from gradmesh.core import lr_scheduler, optim
from gradmesh.core.factories import from_numpy
from gradmesh.core.nn import utils as nn_utils
from gradmesh.core.tensor import Tensor
from gradmesh.v1 import coordinator_pb2, graph_pb2
from gradmesh.wire.coordinator import CoordinatorConnection
from gradmesh.wire.errors import FailedPrecondition
from gradmesh.wire.schedule import clipping_to_proto, schedule_to_proto
from gradmesh.wire.shard import optimizer_to_proto

__all__ = ["CoordinatorClient", "Job", "StepResult"]

# Steps ``fit`` keeps running at once for a bounded-staleness job, at most: a coordinator
# serves 4 calls of one client at a time by default (--max-requests-per-peer), and the
# client's other calls (status, parameters) need a slot too.
MAX_IN_FLIGHT = 3
# A synchronous job's steps in flight: the one running and the next, whose batch travels
# to the coordinator and is checked meanwhile (the medium MLP on 1 worker went from
# 0.90-0.95 to 1.00-1.08 of torch's RPC parameter server, benchmarks/README.md).
SYNC_IN_FLIGHT = 2


@dataclass
class StepResult:
    """What one step returned: the batch's loss, scalar metrics and where time went."""

    step_id: int
    loss: float
    metrics: dict[str, float]
    version: int
    batch_size: int
    micro_batches: int
    replayed: bool
    timings: dict[str, float] = field(default_factory=dict)
    # The learning rate the step applied; the total gradient norm before clipping (a job
    # with clip_grad_norm; None otherwise).
    lr: float = 0.0
    grad_norm: float | None = None
    # A job with staleness: the largest staleness of the step's micro-batch gradients.
    staleness: int = 0


def _numpy(x) -> np.ndarray:
    if isinstance(x, Tensor):
        return x.numpy(force=True) if hasattr(x, "numpy") else np.asarray(x)
    return np.asarray(x)


class CoordinatorClient(CoordinatorConnection):
    """A connection to a coordinator at ``target`` ("host:port").

    ``token``: bearer token; ``tls``: None (plaintext), True (system roots), a
    :class:`~gradmesh.client.TLS` (``TLS(ca=..., cert=..., key=...)`` for mTLS) or
    ``grpc.ChannelCredentials``, as for ``WorkerClient``. ``timeout`` is the deadline of
    each call in seconds (a step on a large model may need more); ``retry_seconds`` how
    long idempotent calls are retried on transient errors (each distinct one logged as a
    warning on the ``gradmesh.client`` logger). ``wait_for_workers`` (default 30 s): how
    long a step waits for a worker to register with a coordinator that has none before it
    raises :class:`~gradmesh.client.Unavailable` with ``reason == "NO_WORKERS"``
    (docs/training.md, "When no worker is there"). The calls themselves are
    :class:`~gradmesh.wire.coordinator.CoordinatorConnection`'s.
    """

    def __enter__(self) -> "CoordinatorClient":
        return self

    # -- jobs -----------------------------------------------------------------------------
    def create_job(
        self,
        model,
        loss_fn: Callable,
        optimizer,
        micro_batch_size: int,
        example_batch: Sequence,
        *,
        job_id: str | None = None,
        data_names: Sequence[str] | None = None,
        scheduler=None,
        clip_grad_norm: float | dict | None = None,
        clip_grad_value: float | None = None,
        compression: dict | None = None,
        staleness: int | None = None,
    ) -> "Job":
        """Trace ``loss_fn(model, *example_batch)`` and create a training job.

        ``model``: a ``gradmesh.core.nn.Module``; its parameters are the initial values.
        ``loss_fn`` returns the loss (a mean over the batch) or ``(loss, {"name": scalar})``
        for metrics. ``optimizer``: a gradmesh optimizer over the model's parameters, or
        its description (``{"name": "sgd", "lr": 0.1, "momentum": 0.9}``).
        ``micro_batch_size``: rows per micro-batch, the unit of work and of determinism.
        Buffers that ``loss_fn`` changes (BatchNorm's running statistics, in train mode)
        are job state, kept and updated by the coordinator (docs/training.md, "Buffers").
        ``example_batch``: a batch (any size above 1) to trace with. ``job_id`` defaults to
        one the coordinator derives from the job's content (graph, initial parameters,
        optimizer, micro-batch size), so two identical runs get the same dropout masks;
        creating a job is idempotent for the same id and content (the same content without
        an id attaches to the existing job).

        ``scheduler``: a learning-rate schedule the coordinator runs as data: a gradmesh
        ``lr_scheduler`` over ``optimizer`` (fresh, not stepped yet) or its description
        (``{"name": "StepLR", "step_size": 30}``); it steps once after every step, as
        ``scheduler.step()`` after ``optimizer.step()`` locally. ``clip_grad_norm``: clip
        each step's summed gradient like ``clip_grad_norm_``: ``max_norm``, or a dict
        ``{"max_norm": 1.0, "norm_type": 2.0, "error_if_nonfinite": False}``;
        ``clip_grad_value``: like ``clip_grad_value_``. ``StepResult.grad_norm`` is the
        total norm before clipping, ``StepResult.lr`` the learning rate the step applied.

        ``compression``: opt-in, trades the bitwise determinism of the default mode for
        fewer gradient bytes: ``{"kind": "topk", "ratio": 0.01}`` (the largest 1% of each
        gradient) or ``{"kind": "sign"}`` (one bit per element and a scale), with error
        feedback (docs/training.md, "Compressed gradients"). ``Job.status().mode`` says
        which mode a job runs in. ``"where": "worker"`` in it has the workers compress
        their replies and keep the residuals (fewer bytes from the workers too; results
        then depend on which worker computed which micro-batch).

        ``staleness``: opt-in bounded-staleness asynchronous training with this bound
        (an int >= 1): each micro-batch gradient is applied as its own update when it
        arrives, if computed on parameters at most ``staleness`` versions old (else it is
        computed again), and up to ``staleness`` earlier steps may still run when a step
        starts (``Job.step_async``; ``fit`` keeps up to 3 steps running). Not deterministic
        (docs/training.md, "Bounded staleness").
        """
        description = _optimizer_description(optimizer, scheduler, model)
        schedule = _schedule_description(scheduler, optimizer)
        clipping = _clipping_description(clip_grad_norm, clip_grad_value)
        if staleness is not None and (
            not isinstance(staleness, int) or isinstance(staleness, bool) or staleness < 1
        ):
            raise ValueError(f"staleness must be an int >= 1, got {staleness!r}")
        if not isinstance(micro_batch_size, int) or micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be a positive int, got {micro_batch_size!r}")
        example = [_numpy(b) for b in example_batch]
        names = list(data_names) if data_names else [f"x{i}" for i in range(len(example))]
        graph = core_graph.trace(lambda m, *b: loss_fn(m, *b), model, *example, data_names=names)
        params = OrderedDict((n, _numpy(p)) for n, p in model.named_parameters())
        # Buffers the graph updates (BatchNorm's running statistics) are job state too.
        owned = dict(model.named_buffers())
        for inp in graph.inputs:
            if inp.role == graph_pb2.Input.BUFFER:
                params[inp.name] = _numpy(owned[inp.name])
        header = coordinator_pb2.CreateJobRequest(
            job_id=job_id or "",
            graph=graph,
            optimizer=optimizer_to_proto(description),
            micro_batch_size=micro_batch_size,
        )
        if schedule is not None:
            header.schedule.CopyFrom(schedule_to_proto(schedule))
        if clipping is not None:
            header.clipping.CopyFrom(clipping_to_proto(clipping))
        if compression is not None:
            header.compression.CopyFrom(_compression_message(compression))
        if staleness is not None:
            header.staleness = staleness
        resp = self.create(header, params)
        return Job(
            self,
            resp.job_id,
            names,
            next_step_id=resp.version + 1 if resp.version == 0 else None,
            tied=_tied_names(model),
            in_flight=_in_flight(staleness),
        )

    def job(self, job_id: str) -> "Job":
        """Attach to an existing job (its next step id is read from the coordinator)."""
        status = self.job_status(job_id)
        in_flight = _in_flight(status.staleness if status.mode == "stale" else None)
        return Job(self, job_id, list(status.data_inputs), status.next_step_id, in_flight=in_flight)


def _in_flight(staleness: int | None) -> int:
    return min(staleness + 1, MAX_IN_FLIGHT) if staleness else SYNC_IN_FLIGHT


def _compression_message(spec) -> coordinator_pb2.GradientCompression:
    """``{"kind": "topk", "ratio": 0.01}`` or ``{"kind": "sign"}`` (and ``"where":
    "worker"``) as the message (the coordinator checks the values; a wrong key is refused
    here)."""
    if not isinstance(spec, dict) or not set(spec) <= {"kind", "ratio", "where"}:
        raise ValueError(
            f"compression must be a dict like {{'kind': 'topk', 'ratio': 0.01}} or "
            f"{{'kind': 'sign'}} (with 'where': 'worker' to compress on the workers), "
            f"got {spec!r}"
        )
    return coordinator_pb2.GradientCompression(
        kind=str(spec.get("kind", "")),
        ratio=float(spec.get("ratio", 0.0)),
        where=str(spec.get("where", "")),
    )


def _optimizer_description(optimizer, scheduler, model) -> dict:
    """The optimizer as a description; with a scheduler, the lr it started from (a
    scheduler changes the lr on construction: LinearLR's start factor). Groups that differ
    in weight decay only name their parameters by the model's names."""
    if isinstance(optimizer, optim.Optimizer):
        names = {p: n for n, p in model.named_parameters()}
        return optim.describe(optimizer, initial=scheduler is not None, names=names)
    if isinstance(optimizer, dict):
        return optim.validate(optimizer)
    raise TypeError(
        f"optimizer must be a gradmesh optimizer or a dict like "
        f"{{'name': 'sgd', 'lr': 0.1}}, got {type(optimizer).__name__}"
    )


def _schedule_description(scheduler, optimizer) -> dict | None:
    if scheduler is None:
        return None
    if isinstance(scheduler, dict):
        return lr_scheduler.validate(scheduler)
    if not isinstance(scheduler, (lr_scheduler.LRScheduler, lr_scheduler.ReduceLROnPlateau)):
        raise TypeError(
            f"scheduler must be a gradmesh lr_scheduler or a dict like "
            f"{{'name': 'StepLR', 'step_size': 30}}, got {type(scheduler).__name__}"
        )
    if isinstance(optimizer, optim.Optimizer) and scheduler.optimizer is not optimizer:
        raise ValueError("scheduler: it schedules another optimizer than the job's")
    return lr_scheduler.describe(scheduler)


def _clipping_description(clip_grad_norm, clip_grad_value) -> dict | None:
    if clip_grad_norm is not None and clip_grad_value is not None:
        raise ValueError("clip by norm (clip_grad_norm) or by value (clip_grad_value), not both")
    if clip_grad_norm is not None:
        given = clip_grad_norm if isinstance(clip_grad_norm, dict) else {"max_norm": clip_grad_norm}
        return nn_utils.validate_clipping({"kind": "norm", **given}, "clip_grad_norm")
    if clip_grad_value is not None:
        return nn_utils.validate_clipping(
            {"kind": "value", "clip_value": clip_grad_value}, "clip_grad_value"
        )
    return None


def _tied_names(model) -> dict[str, str]:
    """Second names of shared parameters (a GPT's ``head.weight`` is ``tok_emb.weight``):
    the job holds each parameter once, under its first name."""
    first: dict[int, str] = {}
    tied = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            tied[name] = first[id(p)]
        else:
            first[id(p)] = name
    return tied


class Job:
    """A training job on a coordinator: ``step(*batch)``, ``parameters()``, ``status()``.

    ``in_flight``: how many steps ``fit`` keeps running at once (``step_async``): 2 (the
    next batch travels while the current step runs; the coordinator runs it after), or
    ``min(staleness + 1, 3)`` for a job in the bounded-staleness mode.
    """

    def __init__(
        self,
        client: CoordinatorClient,
        job_id: str,
        data_names: list[str],
        next_step_id: int | None = None,
        tied: dict[str, str] | None = None,
        in_flight: int = 2,
    ):
        self.client = client
        self.job_id = job_id
        self.data_names = data_names
        self.in_flight = in_flight
        self._lock = threading.Lock()
        self._next = next_step_id
        self._tied = tied or {}
        self._senders: futures.ThreadPoolExecutor | None = None
        self._last_sent: tuple[int, futures.Future] | None = None  # (step id, its future)

    def __repr__(self) -> str:
        return f"Job({self.job_id!r} on {self.client.target})"

    @property
    def next_step_id(self) -> int:
        if self._next is None:
            self._next = self.client.job_status(self.job_id).next_step_id
        return self._next

    def step(self, *batch, step_id: int | None = None) -> StepResult:
        """Train on one batch (the tensors in ``loss_fn``'s order, or by name as keywords
        of a dict passed alone). Steps are numbered here; give ``step_id`` to resend one."""
        named = self._named(batch)
        with self._lock:
            sid = step_id if step_id is not None else self.next_step_id
            r = self.client.step(self.job_id, sid, named)
            if step_id is None or step_id >= self.next_step_id:
                self._next = r.step_id + 1
        return _result(r)

    def step_async(self, *batch, step_id: int | None = None) -> "futures.Future[StepResult]":
        """Send one step without waiting for it: its id is taken now, in call order, and
        the future gives its :class:`StepResult`. A bounded-staleness job runs up to
        ``staleness + 1`` steps at once; a synchronous job runs them one after the other,
        holding a step that arrives while the one before runs, so that its batch travels
        meanwhile (the results are the same bits as sending them one by one). A failed
        step keeps its id: resend it with ``step(..., step_id=...)``; the step after it
        then fails too, saying so."""
        named = self._named(batch)
        with self._lock:
            sid = step_id if step_id is not None else self.next_step_id
            if step_id is None or step_id >= self.next_step_id:
                self._next = sid + 1
            if self._senders is None:
                self._senders = futures.ThreadPoolExecutor(
                    max(self.in_flight, 2), thread_name_prefix="gradmesh-step"
                )
            before = self._last_sent if self._last_sent and self._last_sent[0] == sid - 1 else None
            future = self._senders.submit(self._send_after, sid, named, before)
            self._last_sent = (sid, future)
        return future

    def _send_after(self, sid: int, named: dict, before) -> StepResult:
        """Step ``sid``. Refused as out of sequence while step ``sid - 1``, sent from here
        too, was still being retried (the coordinator holds a step only while the one
        before is in its hands): once that one is through, send it again."""
        try:
            return _result(self.client.step(self.job_id, sid, named))
        except FailedPrecondition:
            if before is None:
                raise
            try:
                before[1].result()
            except Exception as e:
                raise FailedPrecondition(
                    f"step {sid} of job {self.job_id!r} was not run: step {sid - 1}, sent "
                    f"before it, failed ({e}); resend both in order",
                    field="step_id",
                ) from e
            return _result(self.client.step(self.job_id, sid, named))

    def _named(self, batch: tuple) -> dict:
        if len(batch) == 1 and isinstance(batch[0], dict):
            return dict(batch[0])
        if len(batch) != len(self.data_names):
            raise ValueError(
                f"step() takes {len(self.data_names)} batch tensors "
                f"({self.data_names}), got {len(batch)}"
            )
        return dict(zip(self.data_names, batch))

    def parameters(self) -> "OrderedDict[str, Any]":
        """The parameters, then the job's buffers (BatchNorm running statistics), as a
        state dict of gradmesh Tensors (``model.load_state_dict``). A job created here
        also lists a tied parameter under its second name, as ``state_dict()`` does."""
        _, arrays = self.client.get_parameters(self.job_id)
        state = OrderedDict((n, from_numpy(a)) for n, a in arrays.items())
        state.update((alias, state[name]) for alias, name in self._tied.items() if name in state)
        return state

    def status(self):
        """The coordinator's JobStatusResponse (version, last step id, placement, ...)."""
        return self.client.job_status(self.job_id)


def _result(r) -> StepResult:
    t = r.timings
    return StepResult(
        r.step_id,
        r.loss,
        dict(r.metrics),
        r.version,
        r.batch_size,
        r.micro_batches,
        r.replayed,
        {
            "pull": t.pull_seconds,
            "compute": t.compute_seconds,
            "push": t.push_seconds,
            "apply": t.apply_seconds,
            "total": t.total_seconds,
            "reassigned": t.reassigned,
            "worker_compute": t.worker_compute_seconds,
        },
        r.lr,
        r.grad_norm if r.HasField("grad_norm") else None,
        r.staleness,
    )
