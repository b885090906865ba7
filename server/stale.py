"""Bounded-staleness asynchronous steps: the opt-in mode of a job created with
``staleness=s`` (docs/training.md, "Bounded staleness").

Each micro-batch is an update of its own. A worker computes its gradient (the mean over
its rows, loss scale 1) on the newest parameters the coordinator has; when the result
arrives the shards apply it at once with the learning rate times ``rows / batch``, one
update at a time under the job's lock, and the job's version counts these updates. A
gradient's staleness is the number of updates between the parameters it was computed on
and its own; one staler than ``s`` is computed again on fresh parameters, never dropped,
so every row of every step counts exactly once. A Step is accepted while at most ``s``
earlier steps still run: a client that pipelines its steps (``Job.step_async``, ``fit``)
keeps every worker busy, and no step waits for the previous one's slowest micro-batch.

A step's progress (the micro-batches applied so far, their losses) is kept across its
attempts: a retry of a failed step, with the same id and batch, computes only the rest.
The shards see each update as a one-micro-batch step (step id = the version it makes),
so their logs and checkpoints keep every applied update as they keep synchronous steps.

Across a coordinator restart too: each update is logged (step, micro-batch, the version
it makes, its loss) before the shards apply it, a finished step's result as it finishes
(in completion order), and the checkpoint keeps the unfinished steps' progress. A
restarted coordinator takes the logged updates the shards' version covers as applied
(:func:`settle_logged`), so a re-sent step id computes only the rest and reports the
loss of all its micro-batches.
"""

from __future__ import annotations

import base64
import collections
import contextvars
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import grpc
import numpy as np

from gradmesh.server.aggregate import TreeSum, micro_batch_seed, micro_batches
from gradmesh.server.dispatch import RETRYABLE
from gradmesh.server.job import tensors_digest
from gradmesh.server.placement import assemble, names_on, parts_on
from gradmesh.server.runtime import ServiceError
from gradmesh.server.step_run import error_text
from gradmesh.server.workers import ParamSet, WorkerHandle
from gradmesh.v1 import coordinator_pb2
from gradmesh.wire.errors import GradmeshError
from gradmesh.wire.worker import Reply

if TYPE_CHECKING:
    from gradmesh.server.job import Job
    from gradmesh.server.jobs import Coordinator

INVALID = grpc.StatusCode.INVALID_ARGUMENT
FAILED = grpc.StatusCode.FAILED_PRECONDITION
# Steps that finish out of order wait in the job's history (HISTORY results) until the
# earlier ones finish: the bound stays well under it.
MAX_STALENESS = 256


def check_staleness(
    staleness: int, *, compress: Any, clipping: Any, schedule: Any, buffers: dict
) -> int | None:
    """CreateJob's ``staleness`` (0: unset, the synchronous mode) validated: 1 to
    MAX_STALENESS, and not with what needs a whole step's gradient or a step's order
    (INVALID_ARGUMENT naming ``staleness``)."""
    if not staleness:
        return None
    if not 1 <= staleness <= MAX_STALENESS:
        raise ServiceError(
            INVALID,
            f"staleness must be between 1 and {MAX_STALENESS}, got {staleness}",
            "staleness",
        )
    conflicts = (
        ("compression", compress is not None),
        ("gradient clipping (it needs a whole step's gradient)", clipping is not None),
        ("a learning-rate schedule", schedule is not None),
        ("BUFFER inputs (BatchNorm running statistics are combined per step)", bool(buffers)),
    )
    for what, given in conflicts:
        if given:
            raise ServiceError(INVALID, f"staleness cannot be combined with {what}", "staleness")
    return int(staleness)


@dataclass
class StepState:
    """One step id's progress, kept across its attempts until it is recorded."""

    digest: str
    size: int
    ranges: list
    losses: TreeSum
    metrics: dict[str, TreeSum]
    applied: set[int] = field(default_factory=set)
    staleness: int = 0  # the largest of its applied gradients
    running: bool = False
    finished: threading.Event = field(default_factory=threading.Event)
    parts: dict[int, dict] = field(default_factory=dict)  # what each applied one added

    def note(self, m: int, part: dict) -> None:
        """Count micro-batch ``m`` as applied with ``part`` (its weighted loss and metrics,
        its staleness), as :meth:`_Attempt._update` made it or a log or checkpoint kept it."""
        self.applied.add(m)
        self.parts[m] = part
        self.losses.add(m, np.float64(part["loss"]))
        for name, value in part["metrics"].items():
            self.metrics[name].add(m, value)
        self.staleness = max(self.staleness, part["staleness"])


class StaleState:
    """A stale-mode job's bound, what it has seen, its unfinished steps and the
    parameters workers get (guarded by the job's lock)."""

    def __init__(self, bound: int):
        self.bound = bound
        self.max_seen = 0
        self.recomputed = 0
        self.steps: dict[int, StepState] = {}  # admitted and not recorded yet
        # After a restart: the logged updates by version, until the shards' version says
        # which of them were applied (settle_logged).
        self.logged: dict[int, dict] = {}
        self.params: ParamSet | None = None
        self.users: dict[ParamSet, int] = {}  # sets a worker call still reads
        self.lanes = Lanes()

    def acquire(self, job: "Job", pull: Callable[[], dict]) -> ParamSet:
        """The newest parameters (pulled when the shards moved on since the last pull),
        held until :meth:`release`: their shared-memory segment is not reused before."""
        with job.lock:
            ps = self.params
            if ps is None or ps.version != job.version:
                ps = ParamSet(job.version, pull(), job.job_id, gradients=job.param_names)
                old, self.params = self.params, ps
                if old is not None and old not in self.users:
                    old.release()
            self.users[ps] = self.users.get(ps, 0) + 1
            return ps

    def release(self, job: "Job", ps: ParamSet) -> None:
        with job.lock:
            self.users[ps] -= 1
            if not self.users[ps]:
                del self.users[ps]
                if ps is not self.params:
                    ps.release()


class Lanes:
    """The job's workers, one thread (lane) each, taking micro-batches from one queue
    for every running step: a fast worker goes on with the next step's micro-batches
    while a slow one finishes. An idle lane also takes a micro-batch that runs on one
    other worker only, once it has run twice as long as the lane's own last call (the first
    result is applied, the other dropped), so no step waits for a straggler; a failed call
    goes back to the queue, as in the synchronous mode."""

    IDLE_SECONDS = 5.0  # a lane with nothing to do this long ends (the next step starts it)

    def __init__(self):
        self.cond = threading.Condition()
        self.queue: collections.deque = collections.deque()  # (attempt, m)
        self.running: dict[tuple, list] = {}  # (attempt, m) -> [(worker, start time)]
        self.threads: dict[str, threading.Thread] = {}

    def run(self, c: "Coordinator", attempt: "_Attempt") -> None:
        """Queue the attempt's micro-batches and wait until every one is applied (or the
        attempt failed: its error is raised)."""
        workers = c.workers.usable()
        if not workers:
            raise ServiceError(
                grpc.StatusCode.UNAVAILABLE,
                "no worker is available (none configured, registered or reachable); start "
                "workers and retry" + c.workers.unusable_reasons(),
            )
        with self.cond:
            self.queue.extend((attempt, m) for m in attempt.todo)
            for w in workers:
                t = self.threads.get(w.address)
                if t is None or not t.is_alive():
                    t = threading.Thread(
                        target=contextvars.copy_context().run,
                        args=(self._lane, c, w),
                        daemon=True,
                        name=f"gradmesh-stale-{w.address}",
                    )
                    self.threads[w.address] = t
                    t.start()
            self.cond.notify_all()
        attempt.finished.wait()
        if attempt.error is not None:
            raise attempt.error

    def _take(self, w: WorkerHandle, avoid: tuple | None, patience: float) -> tuple | None:
        """The next micro-batch for ``w`` (not ``avoid`` while others wait): a queued one,
        else one running on one other worker only for over ``patience`` seconds; None
        after IDLE_SECONDS without."""
        deadline = time.monotonic() + self.IDLE_SECONDS
        with self.cond:
            while True:
                now = time.monotonic()
                wait = min(deadline - now, 1.0)
                for item in self.queue:
                    if item != avoid or len(self.queue) == 1:
                        self.queue.remove(item)
                        break
                else:
                    item, until = self._straggler(w, now, patience)
                    wait = min(wait, until)
                    if item is not None:
                        item[0].reassigned += 1
                if item is not None:
                    if item[0].settled():
                        continue
                    self.running.setdefault(item, []).append((w, now))
                    return item
                if now >= deadline:
                    self._leave(w)  # now, under cond: a new step then starts a lane
                    return None
                self.cond.wait(timeout=max(wait, 0.001))

    def _straggler(self, w: WorkerHandle, now: float, patience: float) -> tuple:
        """``(item, 0)``: a micro-batch running on one other worker for over ``patience``;
        else ``(None, seconds until one may be)``."""
        until = float("inf")
        for item, runs in self.running.items():
            if len(runs) != 1 or runs[0][0] is w or item[0].settled():
                continue
            late = runs[0][1] + patience - now
            if late < 0:
                return item, 0.0
            until = min(until, late)
        return None, until

    def _lane(self, c: "Coordinator", w: WorkerHandle) -> None:
        avoid, patience = None, 0.0
        try:
            while (item := self._take(w, avoid, patience)) is not None:
                attempt, m = item
                avoid, start = None, time.monotonic()
                try:
                    fresh = attempt.compute(w, m)
                    patience = 2 * (time.monotonic() - start)
                    if not fresh:
                        avoid = item  # too stale: another worker should take it
                        self._requeue(w, item, front=False)
                        continue
                except GradmeshError as e:
                    c.workers.failed(w, e)
                    if not self._failed(w, item, e):
                        return
                    continue
                except Exception as e:  # noqa: BLE001  (a shard failed, a bad reply)
                    self._settle(w, item, e)
                    continue
                self._settle(w, item, None)
        finally:
            with self.cond:
                self._leave(w)
                if not self.threads:
                    self._no_workers_left()
                self.cond.notify_all()

    def _leave(self, w: WorkerHandle) -> None:
        if self.threads.get(w.address) is threading.current_thread():
            del self.threads[w.address]

    def _requeue(self, w: WorkerHandle, item: tuple, front: bool) -> None:
        with self.cond:
            self._done_running(w, item)
            if not item[0].settled() and item not in self.running and item not in self.queue:
                self.queue.appendleft(item) if front else self.queue.append(item)
            self.cond.notify_all()

    def _failed(self, w: WorkerHandle, item: tuple, e: GradmeshError) -> bool:
        """Queue ``item`` again after ``w`` failed it, or fail its attempt when it cannot
        succeed; whether ``w`` takes more work."""
        attempt, m = item
        attempt.attempts[m] += 1
        if e.code in RETRYABLE and attempt.attempts[m] < 3 + 2 * len(self.threads):
            self._requeue(w, item, front=True)
        else:
            code = e.code if e.code not in RETRYABLE else grpc.StatusCode.UNAVAILABLE
            field = None if e.code in RETRYABLE else _batch_field(e.field)
            message = f"micro-batch {m} failed on worker {w.address}: {e.message}"
            error = ServiceError(code, message, field)
            self._settle(w, item, error)
        return w.state == "ready" and e.code in RETRYABLE

    def _settle(self, w: WorkerHandle, item: tuple, error: BaseException | None) -> None:
        attempt = item[0]
        with self.cond:
            self._done_running(w, item)
            if error is not None and attempt.error is None and not attempt.settled():
                attempt.error = error
            if attempt.settled():
                attempt.finished.set()
            self.cond.notify_all()

    def _done_running(self, w: WorkerHandle, item: tuple) -> None:
        runs = [(x, t) for x, t in self.running.get(item, []) if x is not w]
        if runs:
            self.running[item] = runs
        else:
            self.running.pop(item, None)

    def _no_workers_left(self) -> None:
        """Every lane ended (the caller holds ``cond``): the queued attempts fail."""
        for attempt, m in list(self.queue):
            if attempt.error is None and not attempt.settled():
                attempt.error = ServiceError(
                    grpc.StatusCode.UNAVAILABLE,
                    f"every worker failed or left; micro-batch {m} was not computed",
                )
                attempt.finished.set()
        self.queue.clear()


def _batch_field(worker_field: str | None) -> str:
    """A worker's ``data[x]`` is the step's ``batch[x]`` (as dispatch says it)."""
    if worker_field and worker_field.startswith("data"):
        return "batch" + worker_field[len("data") :]
    return "batch"


def set_staleness(job: "Job", bound: int | None) -> None:
    job.stale = StaleState(bound) if bound else None


def staleness_of(job: "Job") -> int | None:
    return job.stale.bound if job.stale is not None else None


# -- Step -----------------------------------------------------------------------------------
def step(c: "Coordinator", job: "Job", step_id: int, batch: dict[str, np.ndarray]):
    """Run (or replay, or wait for) one step of a stale-mode job; returns a StepResponse.
    Only admission and recording hold the job's lock: steps run side by side."""
    state = job.stale
    while True:
        with job.lock:
            if step_id in job.history:
                return c._earlier_result(job, step_id, tensors_digest(batch))
            if job.error:
                raise ServiceError(FAILED, job.error, "job_id")
            batch = c._check_batch(job, batch)
            digest = tensors_digest(batch)
            st = state.steps.get(step_id)
            if st is not None and st.digest != digest and st.applied:
                raise ServiceError(
                    FAILED,
                    f"step_id {step_id} of job {job.job_id!r}: micro-batches of it were "
                    f"applied with another batch; retry it with the same batch",
                    "step_id",
                )
            if st is None or not st.running:
                if state.logged:  # restarted while a shard was down: ask the shards again
                    c._reconcile(job)
                if st is None:
                    _admit(job, step_id)
                if job.fault:
                    c._resync(job)
                if st is None or st.digest != digest:
                    st = _new_step(job, digest, batch)
                    state.steps[step_id] = st
                st.running, st.finished = True, threading.Event()
                break
            waiting = st.finished  # the same step, running: its result, when recorded
        waiting.wait()
    try:
        resp = _run(c, job, step_id, batch, st)
    finally:
        with job.lock:
            st.running = False
        st.finished.set()
    return resp


def _admit(job: "Job", step_id: int) -> None:
    """A new step id: at most ``bound`` earlier steps may be unfinished
    (FAILED_PRECONDITION otherwise). Pipelined calls may arrive out of order, so a step
    id may come before an earlier one, within the bound."""
    state = job.stale
    if step_id <= job.last_step_id:
        raise ServiceError(
            FAILED,
            f"step {step_id} of job {job.job_id!r} was applied but its result is no longer kept",
            "step_id",
        )
    if step_id - job.last_step_id - 1 > state.bound:
        raise ServiceError(
            FAILED,
            f"step {step_id} of job {job.job_id!r} would run with more than "
            f"{state.bound} (the staleness bound) earlier steps unfinished; wait for "
            f"step {job.last_step_id + 1}",
            "step_id",
        )


def _new_step(job: "Job", digest: str, batch: dict[str, np.ndarray]) -> StepState:
    return _empty_step(job, digest, next(iter(batch.values())).shape[0])


def _empty_step(job: "Job", digest: str, size: int) -> StepState:
    ranges = micro_batches(size, job.micro_batch_size)
    n = len(ranges)
    metrics = {name: TreeSum(n) for name in job.metric_names}
    return StepState(digest, size, ranges, TreeSum(n), metrics)


def _run(c: "Coordinator", job: "Job", step_id: int, batch: dict, st: StepState):
    t0 = time.perf_counter()
    run = _Attempt(c, job, step_id, batch, st)
    if run.todo:
        job.stale.lanes.run(c, run)
    t1 = time.perf_counter()
    with job.lock:
        resp = coordinator_pb2.StepResponse(
            step_id=step_id,
            loss=float(st.losses.result()),
            lr=job.optimizer["lr"],
            version=job.version,
            batch_size=st.size,
            micro_batches=len(st.ranges),
            metrics={k: float(t.result()) for k, t in st.metrics.items() if t.complete},
            staleness=st.staleness,
            timings=coordinator_pb2.StepTimings(
                pull_seconds=run.pull_seconds,
                compute_seconds=t1 - t0,
                push_seconds=run.update_seconds,
                total_seconds=time.perf_counter() - t0,
                reassigned=run.reassigned,
                worker_compute_seconds=run.worker_seconds,
            ),
        )
        _record(c, job, step_id, resp, st)
    return resp


def _record(c: "Coordinator", job: "Job", step_id: int, resp, st: StepState) -> None:
    """Keep a finished step's result and log it now, in completion order (a step that
    finished before an earlier one keeps its result across a restart); the job's last
    step id moves over the steps that are now finished in order."""
    del job.stale.steps[step_id]
    job.history[step_id] = resp.SerializeToString()
    job.digests[step_id] = st.digest
    job.samples += st.size
    job.last_loss = resp.loss
    # must=False: its updates are logged already; a crash before this record is written
    # loses only the result, which the re-sent step id rebuilds from them.
    _log(
        job,
        {
            "kind": "finished",
            "step_id": step_id,
            "digest": st.digest,
            "samples": job.samples,
            "loss": job.last_loss,
            "recomputed": job.stale.recomputed,
            "response": base64.b64encode(job.history[step_id]).decode(),
        },
        must=False,
    )
    before = job.last_step_id
    _advance(job)
    _job_files().trim_history(job)
    every = c.checkpoint_every
    if every and job.last_step_id // every > before // every:
        try:
            c._save(job)
        except OSError:  # the logs keep the steps until a checkpoint succeeds
            pass


def _advance(job: "Job") -> None:
    while job.last_step_id + 1 in job.history:
        job.last_step_id += 1


def _job_files():
    from gradmesh.server import job_files  # it restores a job's mode: imports this module

    return job_files


def _log(job: "Job", record: dict, must: bool = True) -> None:
    _job_files().append(job, record, must=must)


# -- restart --------------------------------------------------------------------------------
def checkpoint_meta(job: "Job") -> dict:
    """What a checkpoint keeps of a stale-mode job: its bound, counters and the progress
    of its unfinished steps (the micro-batches applied, what each added)."""
    state = job.stale
    if state is None:
        return {}
    steps = {
        str(sid): {
            "digest": st.digest,
            "size": st.size,
            "parts": {str(m): part for m, part in st.parts.items()},
        }
        for sid, st in state.steps.items()
        if st.parts
    }
    counters = {"recomputed": state.recomputed, "max_staleness": state.max_seen}
    return {"staleness": state.bound, "stale": {**counters, "steps": steps}}


def restore_meta(job: "Job", meta: dict | None) -> None:
    """The inverse of :func:`checkpoint_meta` (after ``set_staleness``)."""
    if job.stale is None or not meta:
        return
    job.stale.recomputed = meta["recomputed"]
    job.stale.max_seen = meta["max_staleness"]
    for sid, kept in meta["steps"].items():
        st = _empty_step(job, kept["digest"], kept["size"])
        for m, part in kept["parts"].items():
            st.note(int(m), part)
        job.stale.steps[int(sid)] = st


def replay_log(job: "Job", records) -> None:
    """Re-read a stale-mode job's step log written since its checkpoint: finished steps'
    results (in completion order), the recompute count, and the updates sent to the
    shards, kept in ``logged`` until the shards say which were applied."""
    state = job.stale
    for rec, _ in records:
        state.recomputed = max(state.recomputed, rec.get("recomputed", 0))
        if rec["kind"] == "update":
            # A later record of the same version: the earlier one's Apply failed.
            state.logged[rec["version"]] = rec
        elif rec["kind"] in ("finished", "done"):  # "done": written in step order before
            sid = rec["step_id"]
            job.history[sid] = base64.b64decode(rec["response"])
            job.digests[sid] = rec["digest"]
            job.samples, job.last_loss = rec["samples"], rec["loss"]
            state.steps.pop(sid, None)
            _advance(job)


def settle_logged(job: "Job", version: int) -> None:
    """The shards agree on ``version``: each logged update up to it was applied (updates
    are applied one at a time, in version order), the later ones were not. Count the
    applied ones in their unfinished steps, so a re-sent step id computes only the rest."""
    state = job.stale
    for v in sorted(state.logged):
        rec = state.logged[v]
        sid = rec["step_id"]
        if v > version or sid in job.history or sid <= job.last_step_id:
            continue
        st = state.steps.get(sid)
        if st is None or st.digest != rec["digest"]:
            st = state.steps[sid] = _empty_step(job, rec["digest"], rec["size"])
        st.note(rec["micro_batch"], _part_of(rec))
        state.max_seen = max(state.max_seen, rec["staleness"])
    state.logged.clear()


def _part_of(rec: dict) -> dict:
    return {"loss": rec["loss"], "metrics": rec["metrics"], "staleness": rec["staleness"]}


class _Attempt:
    """One attempt at a stale-mode step: its micro-batches not applied yet, each
    computed on the newest parameters and applied as it arrives (or computed again)."""

    def __init__(self, c: "Coordinator", job: "Job", step_id: int, batch: dict, st: StepState):
        self.c = c
        self.job = job
        self.step_id = step_id
        self.batch = batch
        self.st = st
        self.todo = [m for m in range(len(st.ranges)) if m not in st.applied]
        self.reassigned = 0
        self.attempts = dict.fromkeys(self.todo, 0)  # failed calls per micro-batch
        self.error: BaseException | None = None
        self.finished = threading.Event()
        self.pull_seconds = 0.0
        self.update_seconds = 0.0
        self.worker_seconds = 0.0

    def settled(self) -> bool:
        return self.error is not None or len(self.st.applied) == len(self.st.ranges)

    def _pull(self) -> dict:
        job, t = self.job, time.perf_counter()

        def pull(shard, i):
            names = names_on(job, i, job.param_names)
            # Copies: the shards update their arrays while workers read these.
            return shard.pull(job.job_id, job.version, names, copy=True)[1]

        try:
            arrays = assemble(job, self.c._on_shards(job, pull))
        except (ServiceError, GradmeshError) as e:  # the shards' fault, not the worker's
            job.fault = f"cannot pull the parameters from the shards: {error_text(e)}"
            raise ServiceError(grpc.StatusCode.UNAVAILABLE, job.fault, "job_id") from None
        self.pull_seconds += time.perf_counter() - t
        return {n: arrays[n] for n in job.param_names}

    def compute(self, worker: WorkerHandle, m: int) -> bool:
        """Compute micro-batch ``m`` on ``worker`` with the newest parameters and apply
        it; False when it came back staler than the bound (nothing applied: compute it
        again). Raises GradmeshError when the worker fails."""
        job, st = self.job, self.st
        start, stop = st.ranges[m]
        data = {name: a[start:stop] for name, a in self.batch.items()}
        seed = micro_batch_seed(job.job_id, self.step_id, m)
        params = job.stale.acquire(job, self._pull)
        try:
            reply = worker.compute(
                job.graph, job.graph_id, params, data, 1.0, seed, job.metric_names
            )
        finally:
            job.stale.release(job, params)
        with job.lock:
            if m in st.applied:  # a duplicate: an idle worker also took it
                return True
            if job.error:
                raise ServiceError(FAILED, job.error, "job_id")
            if job.fault:  # the shards may disagree: the next step checks them first
                raise ServiceError(grpc.StatusCode.UNAVAILABLE, job.fault, "job_id")
            lag = job.version - params.version
            if lag > job.stale.bound:
                job.stale.recomputed += 1
                # Logged so the count survives a restart; must=False: it applies nothing.
                count = job.stale.recomputed
                record = {"kind": "recomputed", "step_id": self.step_id, "recomputed": count}
                _log(job, record, must=False)
                return False
            self._update(m, reply, lag)
            return True

    def _update(self, m: int, r: Reply, lag: int) -> None:
        """Apply micro-batch ``m``'s gradient on every shard as one update (the caller
        holds the job's lock)."""
        job, st = self.job, self.st
        missing = [nm for nm in job.param_names if nm not in r.gradients]
        if missing:
            raise ServiceError(
                grpc.StatusCode.INTERNAL, f"a worker returned no gradient for {missing[:5]}"
            )
        t = time.perf_counter()
        weight = (st.ranges[m][1] - st.ranges[m][0]) / st.size
        version = job.version
        update = version + 1  # the shards' step id: the version it makes
        args = {"lr": job.optimizer["lr"] * weight}
        part = {
            "loss": float(np.float64(np.asarray(r.loss, dtype=np.float64)) * weight),
            "metrics": self._metrics(r, weight),
            "staleness": lag,
        }
        # Durable before any shard applies it (a failed write applies nothing): after a
        # crash the shards' version says whether it was applied (settle_logged).
        record = {"kind": "update", "step_id": self.step_id, "micro_batch": m}
        record.update(version=update, digest=st.digest, size=st.size, **part)
        _log(job, {**record, "recomputed": job.stale.recomputed})

        def apply(shard, i):
            grads = parts_on(job, i, r.gradients, job.param_names)
            unused = [nm for nm in r.unused if nm in grads]
            shard.push(job.job_id, update, 0, 1, version, grads, 0, unused)
            shard.apply(job.job_id, update, 1, version, False, 0, step_args=args)

        try:
            self.c._on_shards(job, apply)
        except (ServiceError, GradmeshError) as e:
            # Some shards may have applied it: the next step checks that they agree.
            job.fault = (
                f"step {self.step_id}: update {update} (micro-batch {m}) failed on a "
                f"shard: {error_text(e)}"
            )
            raise ServiceError(grpc.StatusCode.UNAVAILABLE, job.fault, "job_id") from None
        job.version = update
        st.note(m, part)
        job.stale.max_seen = max(job.stale.max_seen, lag)
        self.update_seconds += time.perf_counter() - t
        self.worker_seconds += r.compute_seconds

    def _metrics(self, r: Reply, weight: float) -> dict[str, float]:
        out = {}
        for name in self.job.metric_names:
            value = r.outputs.get(name)
            if value is not None and np.size(value) == 1:
                out[name] = float(np.asarray(value).reshape(())) * weight
        return out
