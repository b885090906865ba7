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
from gradmesh.server import compression
from gradmesh.server.aggregate import (
    TreeSum,
    combine_buffers,
    loss_scales,
    micro_batch_seed,
    micro_batches,
)
from gradmesh.server.job import Job, compression_of, job_dtype
from gradmesh.server.placement import names_on, parts_on, used_shards
from gradmesh.server.runtime import ServiceError
from gradmesh.server.shard_store import EmbeddedShard
from gradmesh.server.workers import ParamSet, WorkerHandle
from gradmesh.v1 import worker_pb2
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
        # The workers compress (and keep the residuals): docs/training.md, "Compressed
        # gradients".
        self.at_worker = compression.at_worker(compression_of(job))

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
            **({"compression": self._worker_compression(m)} if self.at_worker else {}),
        )

    def _worker_compression(self, m: int) -> worker_pb2.WorkerCompression:
        """Micro-batch ``m``'s compression for its worker: residuals under (job, m), this
        step as the round (a retried attempt starts from the same residual)."""
        assert self.residuals is not None  # compression on the workers
        spec = self.residuals.owner.spec
        return worker_pb2.WorkerCompression(
            kind=spec["kind"],
            ratio=spec.get("ratio", 0.0),
            residual_set=self.job.job_id,
            residual_index=m,
            residual_round=self.step_id,
        )

    def accept(self, m: int, r: Reply) -> None:
        job = self.job
        if self.at_worker:
            self._accept_compressed(m, r)
            return
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
        pushes = []
        for i in self.by_shard:
            grads = parts_on(job, i, gradients, job.param_names)
            unused = [nm for nm in r.unused if nm in grads]
            extra = self._compressed_for(i, grads, unused)
            if extra:
                grads = {nm: g for nm, g in grads.items() if nm in unused}
            pushes.append((i, grads, unused, extra))
        self._push_and_keep(m, r, pushes, t)

    def _push_and_keep(self, m: int, r: Reply, pushes: list, t: float) -> None:
        """Push micro-batch ``m``'s gradients, ``(shard, dense, unused, compressed)`` per
        shard, then keep its loss, metrics and buffer updates."""
        job = self.job
        for i, grads, unused, extra in pushes:
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

    def _accept_compressed(self, m: int, r: Reply) -> None:
        """A reply its worker compressed: checked and counted, each blob forwarded to a
        remote shard as it came (decoded for the embedded shard, and re-encoded by slice
        for a parameter cut over shards). A dense gradient of a used parameter (a worker
        that predates compression) goes on as it is: exact."""
        job = self.job
        assert self.residuals is not None  # compression on the workers
        kind = self.residuals.owner.spec["kind"]
        blobs = self._checked_blobs(r, kind)
        t = time.perf_counter()
        sizes = {}
        for nm in job.param_names:
            full = int(np.prod(job.param_specs[nm][1])) * job_dtype(job, nm).itemsize
            if nm in blobs:
                sizes[nm] = (full, blobs[nm].nbytes)
            elif nm not in r.unused:
                sizes[nm] = (full, full)
        self.residuals.received(m, sizes)
        pushes = []
        for i in self.by_shard:
            embedded = isinstance(self.shards[i], EmbeddedShard)
            dense, sent = {}, {}
            for nm in names_on(job, i, job.param_names):
                if nm not in blobs:
                    dense.update(parts_on(job, i, {nm: r.gradients[nm]}, [nm]))
                elif not embedded and nm not in job.pieces:
                    sent[nm] = blobs[nm]
                else:
                    part = parts_on(job, i, {nm: self._decoded(nm, kind, blobs[nm])}, [nm])[nm]
                    if embedded:
                        dense[nm] = part
                    else:
                        sent[nm] = wire_compression.encode(kind, part)
            unused = [nm for nm in r.unused if nm in dense]
            pushes.append((i, dense, unused, {"compressed": (kind, sent)} if sent else {}))
        self._push_and_keep(m, r, pushes, t)

    def _checked_blobs(self, r: Reply, kind: str) -> dict[str, np.ndarray]:
        """The reply's compressed gradients, after checking that every parameter and
        buffer is there (INTERNAL naming what a worker left out)."""
        job = self.job
        blobs = r.compressed
        if blobs and r.compression != kind:
            raise ServiceError(
                grpc.StatusCode.INTERNAL,
                f"a worker compressed with {r.compression!r}, the job with {kind!r}",
            )
        missing = [nm for nm in job.param_names if nm not in r.gradients and nm not in blobs]
        missing += [nm for nm in self.updated if nm not in r.buffers]
        if missing:
            raise ServiceError(
                grpc.StatusCode.INTERNAL, f"a worker returned no value for {missing[:5]}"
            )
        for nm, words in blobs.items():
            if words.dtype != np.int32 or words.ndim != 1:
                raise ServiceError(
                    grpc.StatusCode.INTERNAL,
                    f"a worker's compressed gradient of {nm!r} is not 1-D int32 words",
                )
        return blobs

    def _decoded(self, name: str, kind: str, words: np.ndarray) -> np.ndarray:
        job = self.job
        try:
            return wire_compression.decode(
                kind, words, job_dtype(job, name), tuple(job.param_specs[name][1])
            )
        except ValueError as e:
            raise ServiceError(
                grpc.StatusCode.INTERNAL, f"a worker's compressed gradient of {name!r}: {e}"
            ) from None

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
