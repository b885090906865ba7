"""Where one training step's milliseconds go, client to workers and back.

The medium MLP of ``benchmarks/cluster.py`` (784-512-512-10, batch 128, cross-entropy,
SGD) trained by a coordinator started in this process (its embedded shard) and worker
processes started as ``LocalCluster`` starts them, one micro-batch per worker. Per step,
medians over ``--steps``:

* wall time of the functions on the path (wrapped with ``time.perf_counter``): the
  client's Step call, the coordinator's step, dispatch, the call to a worker, apply, ...,
  and the worker's own decode / forward / backward (its reply's timings);
* the round trip of an empty gRPC call to a worker (``Capabilities``), for scale;
* CPU time and context switches per step of each process (this one: client and
  coordinator; each worker), from ``/proc`` (``schedstat``, ``status``).

``python benchmarks/step_breakdown.py [--workers N] [--steps N] [--threads N]``
(Linux; about 10 s on a quiet 2-core machine).
"""

from __future__ import annotations

import argparse
import collections
import functools
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import cluster as bench  # noqa: E402  (this folder's benchmark: models, batch)

import gradmesh.core as gm  # noqa: E402
from gradmesh.client import CoordinatorClient, LocalCluster  # noqa: E402
from gradmesh.server import coordinator, jobs, shard_store, step_run  # noqa: E402
from gradmesh.server import workers as server_workers  # noqa: E402
from gradmesh.v1 import worker_pb2  # noqa: E402
from gradmesh.wire import coordinator as wire_coordinator  # noqa: E402
from gradmesh.wire import worker as wire_worker  # noqa: E402

TIMED = [  # (owner, function, label), outermost first
    (wire_coordinator.CoordinatorConnection, "step", "client: Step call (round trip)"),
    (coordinator, "_decode_named", "coordinator: decode the batch"),
    (jobs.Coordinator, "step", "coordinator: step"),
    (jobs, "tensors_digest", "coordinator: batch digest"),
    (jobs.Coordinator, "_run_step", "coordinator: run the step"),
    (jobs, "dispatch", "coordinator: dispatch"),
    (server_workers.WorkerHandle, "compute", "coordinator: one worker call"),
    (wire_worker.WorkerTransport, "_send_shared", "coordinator: its gRPC call"),
    (step_run.StepRun, "accept", "coordinator: push to the shard"),
    (shard_store.EmbeddedShard, "apply", "coordinator: apply (SGD)"),
    (jobs.Coordinator, "_record", "coordinator: record the step"),
]
WORKER_TIMINGS = ("decode_seconds", "forward_seconds", "backward_seconds")


def timed(samples: dict, owner, name: str, label: str) -> None:
    f = getattr(owner, name)

    @functools.wraps(f)
    def wrapper(*args, **kw):
        t = time.perf_counter()
        try:
            return f(*args, **kw)
        finally:
            samples[label].append(time.perf_counter() - t)

    setattr(owner, name, wrapper)


def record_worker_timings(samples: dict) -> None:
    accept = step_run.StepRun.accept

    def wrapper(self, m, reply):
        for k in WORKER_TIMINGS:
            samples[f"worker: {k.removesuffix('_seconds')}"].append(reply.timings.get(k, 0.0))
        return accept(self, m, reply)

    step_run.StepRun.accept = wrapper


def proc_counters(pid: int) -> tuple[float, int]:
    """(CPU seconds, context switches) of every thread of ``pid`` so far."""
    cpu, switches = 0.0, 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                cpu += int(f.read().split()[0]) / 1e9
            with open(f"/proc/{pid}/task/{task}/status") as f:
                switches += sum(int(line.split()[1]) for line in f if "ctxt_switches" in line)
        except FileNotFoundError:
            pass  # a thread that ended
    return cpu, switches


def run(args) -> None:
    samples: dict[str, list[float]] = collections.defaultdict(list)
    for owner, name, label in TIMED:
        timed(samples, owner, name, label)
    record_worker_timings(samples)
    x, y = bench.batch("medium")
    cluster = LocalCluster(args.workers, checkpoint_every=0, threads_per_worker=args.threads)
    with cluster as lc:
        server = coordinator.start(workers=[w.target for w in lc.workers], checkpoint_every=0)
        try:
            model = bench.GradmeshSystem._model("medium")
            loss_fn = bench.GradmeshSystem._loss_fn("ce")
            job = CoordinatorClient(server.address).create_job(
                model,
                loss_fn,
                gm.optim.SGD(model.parameters(), lr=bench.LR),
                micro_batch_size=len(x) // args.workers,
                example_batch=(x[:4], y[:4]),
                data_names=["x", "y"],
            )
            for _ in range(args.warmup):
                job.step(x, y)
            samples.clear()
            pids = {"client + coordinator": os.getpid()}
            pids.update({f"worker {i}": w.pid for i, w in enumerate(lc.workers)})
            before = {n: proc_counters(p) for n, p in pids.items()}
            for _ in range(args.steps):
                job.step(x, y)
            after = {n: proc_counters(p) for n, p in pids.items()}
            handle = next(iter(server.coordinator.workers.workers.values()))
            for _ in range(args.steps):
                t = time.perf_counter()
                handle.stub.Capabilities(worker_pb2.CapabilitiesRequest(), timeout=10)
                samples["an empty gRPC call to a worker"].append(time.perf_counter() - t)
        finally:
            server.stop(0)
            server.coordinator.close()
    print(
        f"medium MLP, {args.workers} worker(s), {args.threads} BLAS thread(s) each, "
        f"{args.steps} steps"
    )
    print(f"load average {os.getloadavg()[0]:.2f}; medians, ms per step:")
    for label, values in samples.items():
        print(f"  {label:<40} {1e3 * statistics.median(values):8.3f}")
    for name in pids:
        cpu = (after[name][0] - before[name][0]) / args.steps
        switches = (after[name][1] - before[name][1]) / args.steps
        print(f"  {name:<22} CPU {1e3 * cpu:6.2f} ms, {switches:5.1f} context switches")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--threads", type=int, default=1, help="BLAS threads per worker")
    args = p.parse_args()
    if min(args.workers, args.steps, args.warmup, args.threads) < 1:
        p.error("--workers, --steps, --warmup and --threads must be >= 1")
    run(args)


if __name__ == "__main__":
    main()
