"""The coordinator's logic: training jobs and their steps, as plain Python.

:class:`Coordinator` holds jobs, workers (:mod:`.workers`) and shards; every public method
is one RPC's logic (:mod:`.coordinator` puts them behind the service; tests drive them
directly). One step (DESIGN §6): the batch is cut into micro-batches (:mod:`.aggregate`);
:func:`~gradmesh.server.dispatch.dispatch` runs them over the workers with the
micro-batch's loss scale and seed; each result's gradients are pushed to the shards that
own them as soon as it arrives (so pushing overlaps the other micro-batches' compute).
When every micro-batch is pushed, the shards apply the step; their fixed summation tree
makes the result bit for bit independent of which worker did what.

The pieces: a job's state and content checks (:mod:`.job`), one step attempt
(:mod:`.step_run`), where parameters live (:mod:`.placement`), checkpoints and step logs
(:mod:`.job_files`), the opt-in bounded-staleness mode's steps (:mod:`.stale`).
"""

from __future__ import annotations

import base64
import contextlib
import contextvars
import logging
import os
import threading
import time
from concurrent import futures
from typing import Any, Callable, Sequence

import grpc
import numpy as np

from gradmesh.core import serialize
from gradmesh.core.nn import utils as nn_utils
from gradmesh.server import job_files, stale
from gradmesh.server.dispatch import dispatch
from gradmesh.server.job import (
    FAILED,
    HISTORY,
    INVALID,
    Job,
    JobContent,
    advance_schedule,
    buffer_arrays,
    check_initial_parameters,
    compression_spec,
    dtype_of,
    graph_buffers,
    graph_signature,
    job_dtype,
    mode_fields,
    schedule_and_clipping,
    schedule_messages,
    set_compression,
    set_schedule,
    split_buffers,
    tensors_digest,
)
from gradmesh.server.placement import assemble, names_on, parts_on, place, used_shards
from gradmesh.server.runtime import ServiceError
from gradmesh.server.shard_store import EmbeddedShard, ShardStore, check_job_id
from gradmesh.server.step_run import StepRun, error_text
from gradmesh.server.workers import ParamSet, WorkerPool
from gradmesh.v1 import coordinator_pb2
from gradmesh.wire.errors import GradmeshError
from gradmesh.wire.schedule import (
    clipping_to_proto,
    schedule_to_proto,
)
from gradmesh.wire.shard import optimizer_from_proto, optimizer_to_proto

log = logging.getLogger("gradmesh.coordinator")

# How long a synchronous job's next step waits for the step before it to arrive, when it
# came first (the SDK sends the two from two threads, a moment apart).
QUEUE_GRACE = 2.0

__all__ = ["Coordinator", "Job"]


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
        self.files = job_files.JobFiles(state_dir) if state_dir else None
        if self.files is not None:
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
        schedule_and_clipping(optimizer_from_proto(header.optimizer), *schedule_messages(header))
        compress = compression_spec(header.compression if header.HasField("compression") else None)
        schedule_msg, clipping_msg = schedule_messages(header)
        stale.check_staleness(
            header.staleness,
            compress=compress,
            clipping=clipping_msg,
            schedule=schedule_msg,
            buffers=graph_buffers(header.graph),
        )
        _, _, specs, _, _ = graph_signature(header.graph)
        specs = {**specs, **graph_buffers(header.graph)}
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
        staleness: int = 0,
    ):
        """Create a job (idempotent for identical content); returns the Job.
        ``schedule_msg``/``clipping_msg``: an LRSchedule and a GradientClipping, or None."""
        if job_id:
            check_job_id(job_id)
        if micro_batch_size < 1:
            raise ServiceError(INVALID, "micro_batch_size must be >= 1", "micro_batch_size")
        optimizer = optimizer_from_proto(optimizer_msg)
        schedule, clipping = schedule_and_clipping(optimizer, schedule_msg, clipping_msg)
        compress = compression_spec(compression_msg)
        vg, names, specs, data, extra = graph_signature(graph)
        graph, gid = vg.graph, vg.id  # the canonical form: the workers' id too
        buffer_specs = graph_buffers(graph)
        params, buffers = split_buffers(buffer_specs, params)
        bound = stale.check_staleness(
            staleness, compress=compress, clipping=clipping, schedule=schedule, buffers=buffers
        )
        check_initial_parameters(names, specs, params)
        # Buffers count as initial state (a graph without them digests as before).
        digest = tensors_digest({**{n: params[n] for n in names}, **buffers})
        content = JobContent(
            gid, digest, optimizer, micro_batch_size, schedule, clipping, compress, bound
        )
        job_id = job_id or content.default_job_id()
        with self._lock:
            existing = self.jobs.get(job_id)
            if existing is not None:
                differ = content.differences(JobContent.of(existing))
                if differ:
                    raise ServiceError(
                        grpc.StatusCode.ALREADY_EXISTS,
                        f"job {job_id!r} exists with another " + "; another ".join(differ),
                        "job_id",
                    )
                return existing
            placement, pieces = place(names, params, len(self.shards), clipping)
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
            set_schedule(job, schedule, clipping)
            set_compression(job, compress)
            stale.set_staleness(job, bound)
            self.jobs[job_id] = job
        try:
            with job.lock:
                self._on_shards(
                    job,
                    lambda s, i: s.load(job_id, parts_on(job, i, params, names), optimizer),
                )
                if self.files is not None:
                    self.files.open_log(job)
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
        used = used_shards(job)
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
        if job.stale is not None:  # bounded staleness: steps run side by side
            return stale.step(self, job, step_id, batch)
        with self._turn(job, step_id) as wait_for_turn:
            # A batch's checks and digest depend on the graph alone: done before waiting,
            # so that they overlap the step before.
            batch = self._check_batch(job, batch)
            digest = tensors_digest(batch)
            wait_for_turn()
            return self._step_in_turn(job, step_id, batch, digest)

    @contextlib.contextmanager
    def _turn(self, job: Job, step_id: int):
        """A synchronous job's Step call, which may wait (``wait_for_turn()``) until the
        step before it has been answered, when it came in while that one was still
        running (the SDK keeps two steps in flight: the next batch travels and is checked
        while the current step runs). Only one step ahead is held; one whose predecessor
        has not arrived waits at most ``QUEUE_GRACE`` seconds, then is out of sequence as
        before, as it is at once when the predecessor's call ended without applying it."""
        with job.turn:
            job.arriving.add(step_id)
            if job.last_failed == step_id:
                job.last_failed = 0  # sent again

        def wait_for_turn() -> None:
            give_up = time.monotonic() + QUEUE_GRACE
            with job.turn:
                while step_id == job.last_step_id + 2 and job.last_failed != step_id - 1:
                    if step_id - 1 in job.arriving:
                        job.turn.wait()
                        continue
                    left = give_up - time.monotonic()
                    if left <= 0:
                        break
                    job.turn.wait(left)

        try:
            yield wait_for_turn
        finally:
            with job.turn:
                job.arriving.discard(step_id)
                if step_id > job.last_step_id:
                    job.last_failed = step_id
                job.turn.notify_all()

    def _step_in_turn(self, job: Job, step_id: int, batch: dict[str, np.ndarray], digest: str):
        with job.lock:
            replayed = self._earlier_result(job, step_id, digest)
            if replayed is not None:
                return replayed
            if job.error:
                raise ServiceError(FAILED, job.error, "job_id")
            if job.pinned is not None and job.pinned[0] == step_id and job.pinned[1] != digest:
                raise ServiceError(
                    FAILED,
                    f"step_id {step_id} of job {job.job_id!r}: an earlier "
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
            advance_schedule(job, resp.loss)
            self._record(job, step_id, resp, digest)
        self._prefetch(job)
        return resp

    def _earlier_result(self, job: Job, step_id: int, digest: str):
        """The recorded response of a step id seen before (refused if its batch, by
        ``digest``, differs), None for the next step id; an older or a later id is out of
        sequence."""
        done = job.history.get(step_id)
        if done is not None:
            kept = job.digests.get(step_id)
            if kept and kept != digest:
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
        job_files.trim_history(job)
        job_files.append(
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

    def _shard_states(self, job: Job) -> dict[int, Any]:
        states = {}
        for i in used_shards(job):
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
        # A stale-mode job's updates are the shards' steps (step id = version).
        here = (job.version, job.version if job.stale else job.last_step_id)
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
                dtype_of(a) is not want
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
            names = names_on(job, i, job.param_names)
            return shard.pull(job.job_id, job.version, names)[1]

        arrays = assemble(job, self._on_shards(job, pull))
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
                log.info("prefetch failed", extra={"job_id": job.job_id, "error": error_text(e)})

    def _run_step(self, job: Job, step_id: int, batch: dict[str, np.ndarray], digest: str):
        if job.schedule_error:
            raise ServiceError(FAILED, job.schedule_error, "step_id")
        t0 = time.perf_counter()
        try:
            params, pull_seconds = self._params_for_workers(job)
        except (ServiceError, GradmeshError) as e:
            job.fault = f"cannot pull the parameters from the shards: {error_text(e)}"
            raise
        run = StepRun(job, step_id, batch, params, self.shards)
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
        job_files.append(job, intent, arrays=buffer_arrays(new_buffers))
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
            job.fault = f"step {step_id} failed in a shard's Apply: {error_text(e)}"
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

    def _step_args(self, job: Job, run: "StepRun", digest: str) -> tuple[dict, float | None]:
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

    def _total_norm(self, job: Job, run: "StepRun", norm_type: float):
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
            job.fault = f"step {run.step_id} failed in a shard's GradientNorms: {error_text(e)}"
            raise
        for part in parts:
            norms.update(part)
        arrays = [np.asarray(norms[n], dtype=job_dtype(job, n)) for n in job.param_names]
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
                mine = names_on(job, i, wanted)
                return shard.pull(job.job_id, job.version, mine, copy=True)[1] if mine else {}

            arrays: dict = {n: job.buffers[n].copy() for n in wanted if n in job.buffer_specs}
            arrays.update(assemble(job, self._on_shards(job, pull)))
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
            **mode_fields(job),
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
    def _save(self, job: Job) -> None:
        """Checkpoint one job (the caller holds ``job.lock``): the embedded shards' state
        of it, then the coordinator's."""
        if self.files is None:
            return
        for s in self.shards:
            if isinstance(s, EmbeddedShard):
                s.store.checkpoint(job.job_id)
        self.files.save(job, len(self.shards))

    def checkpoint(self) -> None:
        """Checkpoint every job (on shutdown)."""
        for job in list(self.jobs.values()):
            with job.lock:
                self._save(job)

    def _restore(self) -> None:
        assert self.files is not None  # called with a state directory only
        for job, shards in self.files.restore():
            if shards != len(self.shards):
                job.error = (
                    f"job {job.job_id!r} was placed over {shards} shards, "
                    f"this coordinator has {len(self.shards)}"
                )
            else:
                self._reconcile(job)
            self.jobs[job.job_id] = job
            log.info(
                "restored job",
                extra={"job_id": job.job_id, "version": job.version, "error": job.error},
            )

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
            if job.stale is not None:  # which logged updates the shards applied
                stale.settle_logged(job, version)
            if version > job.version + (1 if job.pinned else 0):
                # Shards applied steps the coordinator has no record of (a coordinator
                # without a step log): the parameters are kept, those results are lost.
                # The schedule catches up on the last known loss (exact unless it is
                # ReduceLROnPlateau, whose metric those steps' losses were).
                for _ in range(version - job.version):
                    advance_schedule(job, job.last_loss)
                job.version, job.pinned = version, None
                if job.stale is None:
                    job.last_step_id = last
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
