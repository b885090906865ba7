"""A coordinator's durable job state under ``STATE_DIR/jobs``: each job's checkpoint
(``JOB.npz``: its metadata, graph and buffers) and its step log (``JOB.steps.log``:
what happened since that checkpoint, fsynced before the client hears of it), and how a
restarted coordinator reads both back (docs/training.md, "Faults")."""

from __future__ import annotations

import base64
import logging
import os
from typing import Iterator

import grpc
import numpy as np

from gradmesh.server import checkpoint
from gradmesh.server.job import (
    HISTORY,
    Job,
    advance_schedule,
    buffer_arrays,
    buffers_of,
    graph_buffers,
    graph_signature,
    restore_schedule,
    schedule_meta,
    set_compression,
)
from gradmesh.server.runtime import ServiceError
from gradmesh.server.stale import checkpoint_meta, replay_log, restore_meta, set_staleness
from gradmesh.v1 import graph_pb2

log = logging.getLogger("gradmesh.coordinator")


class JobFiles:
    """The checkpoints and step logs of a coordinator's jobs in ``state_dir/jobs``."""

    def __init__(self, state_dir: str):
        self.directory = os.path.join(state_dir, "jobs")

    def _job_path(self, job_id: str) -> str:
        return os.path.join(self.directory, f"{job_id}.npz")

    def open_log(self, job: Job) -> None:
        job.log = checkpoint.RecordLog(os.path.join(self.directory, f"{job.job_id}.steps.log"))

    def save(self, job: Job, shards: int) -> None:
        """Checkpoint ``job`` (placed over ``shards`` shards); its step log starts again."""
        meta = {
            "job_id": job.job_id,
            "graph_id": job.graph_id,
            "optimizer": job.optimizer,
            "micro_batch_size": job.micro_batch_size,
            "placement": job.placement,
            "pieces": job.pieces,
            "shards": shards,
            "version": job.version,
            "last_step_id": job.last_step_id,
            "samples": job.samples,
            "last_loss": job.last_loss,
            "params_digest": job.params_digest,
            "digests": {str(k): v for k, v in job.digests.items()},
            "pinned": list(job.pinned) if job.pinned else None,
            "history": [[k, base64.b64encode(v).decode()] for k, v in job.history.items()],
            **schedule_meta(job),
            **({"compression": job.residuals.spec} if job.residuals else {}),
            **checkpoint_meta(job),
        }
        graph = np.frombuffer(job.graph.SerializeToString(deterministic=True), np.uint8)
        arrays = {"graph": graph, **buffer_arrays(job.buffers)}
        checkpoint.save(self._job_path(job.job_id), arrays, meta)
        if job.log is not None:
            job.log.truncate()  # its steps are in the checkpoint now
            job.unlogged.clear()

    def restore(self) -> Iterator[tuple[Job, int]]:
        """Every checkpointed job with its step log replayed, and the number of shards it
        was placed over."""
        if not os.path.isdir(self.directory):
            return
        for entry in sorted(os.listdir(self.directory)):
            if not entry.endswith(".npz") or entry.startswith("."):
                continue
            arrays, meta = checkpoint.load(os.path.join(self.directory, entry))
            job = _job_from_checkpoint(arrays, meta)
            self.open_log(job)
            replay(job)
            yield job, meta["shards"]


def _job_from_checkpoint(arrays: dict, meta: dict) -> Job:
    graph = graph_pb2.Graph.FromString(arrays["graph"].tobytes())
    _, names, specs, data, extra = graph_signature(graph)
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
    job.buffer_specs = graph_buffers(graph)
    job.buffers = buffers_of(arrays)
    restore_schedule(job, meta)
    # The residuals are not checkpointed: they restart from zero (documented).
    set_compression(job, meta.get("compression"))
    set_staleness(job, meta.get("staleness"))
    restore_meta(job, meta.get("stale"))
    return job


def append(job: Job, record: dict, must: bool = True, arrays: dict | None = None) -> None:
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


def replay(job: Job) -> None:
    """Re-read the step log written since the checkpoint: each step's result (``done``,
    fsynced before the client was answered) and the step whose Apply was sent last
    (``intent``: some shards may have applied it). A stale-mode job's log has records
    of its own (:func:`gradmesh.server.stale.replay_log`)."""
    records = job.log.records() if job.log is not None else []
    if job.stale is not None:
        replay_log(job, records)
        trim_history(job)
        return
    intended: dict = {}  # the new buffers of the step whose Apply was sent
    for rec, arrays in records:
        sid = rec["step_id"]
        if rec["kind"] == "intent" and sid == job.last_step_id + 1:
            job.pinned = (sid, rec["digest"])
            intended = buffers_of(arrays)
            job.pinned_args = (rec.get("args", {}), rec.get("grad_norm"))
        elif rec["kind"] == "done" and sid == job.last_step_id + 1:
            if intended:
                job.buffers = {**job.buffers, **intended}
            job.history[sid] = base64.b64decode(rec["response"])
            job.digests[sid] = rec["digest"]
            job.version, job.last_step_id = rec["version"], sid
            job.samples, job.last_loss = rec["samples"], rec["loss"]
            job.pinned = None
            advance_schedule(job, rec["loss"])
            job.last_grad_norm = rec.get("grad_norm")
    trim_history(job)


def trim_history(job: Job) -> None:
    """Keep the last HISTORY step results (and their batch digests)."""
    while len(job.history) > HISTORY:
        old, _ = job.history.popitem(last=False)
        job.digests.pop(old, None)
