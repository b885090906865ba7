"""Running a step's micro-batches over the coordinator's workers.

Each worker has a thread (a lane) that takes the next queued micro-batch; a failed one goes
back to the queue (a worker that is unreachable stops taking work), and when the queue is
empty an idle worker also takes a micro-batch that has run longer than the deadline
elsewhere. ``accept`` runs once per micro-batch, for the first result: the shards ignore a
late duplicate by its (job, step, micro-batch) key anyway, so which result counts does not
change the step's bits (DESIGN §6-7).
"""

from __future__ import annotations

import collections
import contextvars
import threading
import time
from typing import Callable

import grpc

from gradmesh.core.serialize import WireError
from gradmesh.server.runtime import ServiceError
from gradmesh.server.workers import WorkerHandle, WorkerPool
from gradmesh.wire.errors import NO_USABLE_WORKERS, NO_WORKERS, GradmeshError
from gradmesh.wire.worker import Reply

__all__ = ["dispatch", "RETRYABLE"]

UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
# Errors after which the same request may succeed on another worker or later.
RETRYABLE = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.NOT_FOUND,
}


def dispatch(
    pool: WorkerPool,
    n: int,
    compute: Callable[[WorkerHandle, int], Reply],
    accept: Callable[[int, Reply], None],
    deadline: float,
) -> int:
    """Run micro-batches 0..n-1 over the pool's usable workers: ``compute(worker, m)``,
    then ``accept(m, result)`` for the first result of each. Returns how many were
    reassigned; raises ``ServiceError`` (or the ``WireError``/``GradmeshError`` that failed
    the step) when the step cannot complete."""
    workers = pool.usable()
    if not workers:
        raise _no_workers(pool)
    return _Dispatch(pool, workers, n, compute, accept, deadline).run()


def _no_workers(pool: WorkerPool) -> ServiceError:
    if not pool.workers:
        return ServiceError(
            UNAVAILABLE,
            "no workers are registered with this coordinator (and none is configured with "
            "--workers): start workers with `gradmesh worker --coordinator ADDRESS` (this "
            "coordinator's address) and retry",
            reason=NO_WORKERS,
        )
    return ServiceError(
        UNAVAILABLE,
        "no worker is available (none of the known ones is ready); start workers or "
        "wait for these and retry" + pool.unusable_reasons(),
        reason=NO_USABLE_WORKERS,
    )


def _batch_field(worker_field: str | None) -> str:
    """A worker's field as the Step request names it: the worker's ``data[x]`` is the
    step's ``batch[x]``; anything else the worker refused (a value out of range for an
    op, a size over its limits) was caused by the batch too."""
    if worker_field and worker_field.startswith("data"):
        return "batch" + worker_field[len("data") :]
    return "batch"


class _Dispatch:
    """One step's dispatch; every field is guarded by ``cond``."""

    def __init__(
        self,
        pool: WorkerPool,
        workers: list[WorkerHandle],
        n: int,
        compute: Callable,
        accept: Callable,
        deadline: float,
    ):
        self.pool = pool
        self.workers = workers
        self.n = n
        self.compute = compute
        self.accept = accept
        self.deadline = deadline
        self.cond = threading.Condition()
        self.queue = collections.deque(range(n))
        self.running: dict[int, list] = {}  # micro-batch -> [(worker, start time)]
        self.done: set[int] = set()  # micro-batches whose first result is claimed
        self.pushed: set[int] = set()  # ... and accepted (pushed to the shards)
        self.attempts = [0] * n
        self.error: BaseException | None = None
        self.reassigned = 0
        self.active = len(workers)
        self.accepting = 0
        self.max_attempts = 3 + 2 * len(workers)
        # Every run starts after this: until the deadline has passed since, idle lanes
        # skip the scan for late runs (a scan of every running micro-batch, by every idle
        # lane: quadratic in the workers).
        self.started = time.monotonic()

    def run(self) -> int:
        if len(self.workers) == 1:
            # One worker: its lane runs in this thread, which would only wait for it (no
            # other lane can take over a late micro-batch): no thread to start, no hand-off.
            self.lane(self.workers[0])
        else:
            # Each lane runs in a copy of this context: its calls carry the request id.
            threads = [
                threading.Thread(
                    target=contextvars.copy_context().run,
                    args=(self.lane, w),
                    daemon=True,
                    name=f"gradmesh-lane-{w.address}",
                )
                for w in self.workers
            ]
            for t in threads:
                t.start()
        with self.cond:
            while len(self.pushed) < self.n and self.error is None:
                self.cond.wait()
            # A failed step returns only when no push of it is still in flight.
            while self.accepting:
                self.cond.wait()
            error = self.error
        # Lanes still computing a late duplicate finish on their own; their results are
        # dropped (done already holds them).
        if error is not None:
            if isinstance(error, (ServiceError, WireError, GradmeshError)):
                raise error
            raise ServiceError(
                grpc.StatusCode.INTERNAL, f"step failed: {type(error).__name__}: {error}"
            )
        return self.reassigned

    def take(self, w: WorkerHandle) -> int | None:
        """The next micro-batch for ``w``: a queued one, else one running late elsewhere;
        None when the step is complete or failed."""
        with self.cond:
            while True:
                if self.error is not None or len(self.done) == self.n:
                    return None
                if self.queue:
                    m = self.queue.popleft()
                    break
                late = self._late(w, time.monotonic())
                if late:
                    m = late[0]
                    self.reassigned += 1
                    break
                self.cond.wait(timeout=min(self.deadline, 1.0))
            self.attempts[m] += 1
            self.running.setdefault(m, []).append((w, time.monotonic()))
            return m

    def _late(self, w: WorkerHandle, now: float) -> list[int]:
        """Micro-batches running past the deadline on one other worker only."""
        if now - self.started <= self.deadline:
            return []  # every run began after the dispatch did: none is late yet
        return [
            m
            for m, runs in self.running.items()
            if m not in self.done
            and len(runs) < 2
            and all(x is not w for x, _ in runs)
            and now - min(t for _, t in runs) > self.deadline
        ]

    def _finish(self, w: WorkerHandle, m: int) -> None:
        runs = self.running.get(m, [])
        self.running[m] = [(x, t) for x, t in runs if x is not w]
        if not self.running[m]:
            del self.running[m]

    def _fail(self, error: BaseException) -> None:
        with self.cond:
            self.error = error
            self.cond.notify_all()

    def lane(self, w: WorkerHandle) -> None:
        """``w``'s thread: micro-batches until none is left, the step failed or ``w`` did."""
        try:
            while (m := self.take(w)) is not None:
                try:
                    result = self.compute(w, m)
                except GradmeshError as e:
                    if not self._failed(w, m, e):
                        return
                    continue
                except Exception as e:  # noqa: BLE001  (a bad response: fail the step)
                    self._fail(e)
                    return
                if not self._result(w, m, result):
                    return
        finally:
            with self.cond:
                self.active -= 1
                if self.active == 0 and len(self.done) < self.n and self.error is None:
                    self.error = ServiceError(
                        UNAVAILABLE,
                        f"every worker failed; micro-batches "
                        f"{sorted(set(range(self.n)) - self.done)[:20]} were not computed",
                    )
                self.cond.notify_all()

    def _failed(self, w: WorkerHandle, m: int, e: GradmeshError) -> bool:
        """Queue ``m`` again after ``w`` failed it, or fail the step when it cannot
        succeed; whether ``w`` takes more work."""
        self.pool.failed(w, e)
        with self.cond:
            self._finish(w, m)
            if m not in self.done and m not in self.running and m not in self.queue:
                if self.attempts[m] >= self.max_attempts or e.code not in RETRYABLE:
                    # A non-retryable refusal (INVALID_ARGUMENT) names the batch field
                    # that caused it.
                    self.error = ServiceError(
                        e.code if e.code not in RETRYABLE else UNAVAILABLE,
                        f"micro-batch {m} failed on worker {w.address}: {e.message}",
                        None if e.code in RETRYABLE else _batch_field(e.field),
                    )
                else:
                    self.queue.appendleft(m)
                    self.reassigned += 1
            self.cond.notify_all()
        return w.state == "ready" and e.code in RETRYABLE

    def _result(self, w: WorkerHandle, m: int, result: Reply) -> bool:
        """Accept ``m``'s result if it is the first; whether ``w`` takes more work."""
        with self.cond:
            self._finish(w, m)
            # Nothing is pushed once the step has failed: its retry must not race with
            # this attempt's pushes.
            first = m not in self.done and self.error is None
            if first:
                self.done.add(m)
                self.accepting += 1
        if first:
            w.completed += 1
            try:
                self.accept(m, result)
            except Exception as e:  # noqa: BLE001  (shard failure: fail the step)
                with self.cond:
                    self.accepting -= 1
                    self.error = self.error or e
                    self.cond.notify_all()
                return False
            with self.cond:
                self.accepting -= 1
                self.pushed.add(m)
        with self.cond:
            self.cond.notify_all()
        return True
