"""One attempt at a coordinator step (:class:`StepRun`): the micro-batches, what a worker
computes for one, and what happens to each first result (its gradients pushed at once to
the shards that own them, compressed first in a compressed job; loss, metrics and buffer
updates kept in micro-batch order)."""

from __future__ import annotations

import secrets
import threading
import time

import grpc
import numpy as np

from gradmesh.core.graph import is_random
from gradmesh.core.registry import REGISTRY
from gradmesh.server.aggregate import (
    TreeSum,
    combine_buffers,
    loss_scales,
    micro_batch_seed,
    micro_batches,
)
from gradmesh.server.job import Job
from gradmesh.server.placement import parts_on, used_shards
from gradmesh.server.runtime import ServiceError
from gradmesh.server.shard_store import EmbeddedShard
from gradmesh.server.workers import ParamSet, WorkerHandle
from gradmesh.wire import compression as wire_compression
from gradmesh.wire.errors import GradmeshError
from gradmesh.wire.worker import Reply


class StepRun:
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
        self.by_shard = used_shards(job)
        # A fresh attempt id per run: the shards drop gradients a failed attempt of this
        # step left behind instead of mixing them with this one's (the retry may carry
        # another batch).
        self.attempt = secrets.randbits(64)
        self.residuals = job.residuals.stage() if job.residuals is not None else None
        self.random = has_random_ops(job.graph_id, job.graph)

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
            # A graph without random ops never reads the seed: 0 leaves the request the
            # same from step to step, which the worker then checks and decodes once.
            micro_batch_seed(job.job_id, self.step_id, m) if self.random else 0,
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
            grads = parts_on(job, i, gradients, job.param_names)
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
                    f"({self.shards[i].name}) failed: {error_text(e)}"
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


_random_graphs: dict[str, bool] = {}  # graph id -> whether it has random ops


def has_random_ops(graph_id: str, graph) -> bool:
    """Whether the graph has a random op (dropout), which draws from the call's seed."""
    found = _random_graphs.get(graph_id)
    if found is None:
        found = any(is_random(REGISTRY[node.op]) for node in graph.nodes if node.op in REGISTRY)
        if len(_random_graphs) >= 1024:
            _random_graphs.clear()
        _random_graphs[graph_id] = found
    return found


def error_text(e: Exception) -> str:
    return getattr(e, "message", None) or str(e)
