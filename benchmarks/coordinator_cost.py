"""The coordinator's own cost per step, measured with stub workers that compute nothing.

A child process serves N stub workers: one gRPC server bound to one port per stub on
127.0.0.1. Each answers ``Capabilities`` as a real CPU worker of this build would (the
same fingerprint, limits and parameter cache), except that it takes no shared memory, as
a worker on another host (so every tensor travels as bytes), and ``ComputeGradients`` with
a reply made once (loss 1.0 and zero gradients of the right shapes) as soon as all N
calls of the step have arrived, so that every worker gets one micro-batch. A real
coordinator (``gradmesh.server.coordinator.start``, its embedded shard, plain SGD) runs in
this process with the N stubs as its static workers (a fresh stub process per point), and
a job whose global batch holds one micro-batch of ``--micro-batch`` rows per stub.
``Coordinator.step`` is called directly (no Step RPC, whose batch decoding is one per step
whatever the workers), and timed: wall time, and this process's CPU time (the
coordinator's alone: the stubs are in the child, whose CPU time is reported apart). Since
the stubs compute nothing, the step is the coordinator's work: sending the parameters and
the micro-batch to every worker, receiving and decoding every reply, summing the
gradients on the shard, the SGD update. Both processes keep a steady heap, as the
``gradmesh`` command gives its servers.

``--profile N``: the step at N stubs under cProfile, every thread of this process (the
coordinator's per-step dispatch lanes too), timed by each thread's CPU clock; prints the
top functions by own time.

``--step-log 1,10,100``: the shard's part of a step alone (``ShardStore`` push of one
micro-batch's gradient, then ``apply``, plain SGD) at those MiB of float32 parameters,
three ways: no state directory (in memory), a step log written without fsync
(``gradmesh shard --step-log-sync off``) and with it (the default); ``--steps`` timed
steps each after ``--warmup``, in a state directory under ``--state-dir`` (default: a
temporary one beside this file, so on the disk a shard would use, not a tmpfs).

``python benchmarks/coordinator_cost.py`` (8/64/256 stubs x tiny/small/medium), ``--quick``
(8/64 stubs, tiny/small, 3 steps), ``--stubs 8,64``, ``--models tiny,medium``,
``--steps N``, ``--profile 64 --models medium``, ``--step-log 1,10,100``, ``--json PATH``.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import json
import os
import pstats
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent import futures

import numpy as np

MODELS = {  # layer sizes of a ReLU MLP with a cross-entropy loss
    "tiny": (64, 128, 10),
    "small": (784, 128, 10),
    "medium": (784, 512, 512, 10),
}
STUBS = (8, 64, 256)
BARRIER_SECONDS = 120.0  # a stub waits this long for the step's other calls, then fails
READY = "stubs listening on "


# --------------------------------------------------------------------- the stubs


def capabilities_reply() -> bytes:
    """What a real CPU worker of this build answers, without shared memory."""
    from gradmesh.server.worker import GradientWorker
    from gradmesh.server.worker.replies import capabilities_message

    message = capabilities_message(GradientWorker("cpu", shared_memory=False).capabilities())
    return message.SerializeToString()


def gradients_reply(request: bytes) -> bytes:
    """Loss 1.0 and zero gradients for every PARAM input of the request's graph."""
    from gradmesh.core import graph as core_graph
    from gradmesh.core import serialize
    from gradmesh.v1 import graph_pb2, worker_pb2

    req = worker_pb2.ComputeGradientsRequest.FromString(request)
    if not req.HasField("graph"):
        raise LookupError("the first call to the stubs must carry the graph")
    resp = worker_pb2.ComputeGradientsResponse(graph_id=core_graph.graph_id(req.graph))
    resp.loss.CopyFrom(serialize.to_proto(np.float32(1.0)))
    for inp in req.graph.inputs:
        if inp.role == graph_pb2.Input.PARAM:
            zeros = np.zeros(tuple(inp.shape), serialize.PROTO_TO_DTYPE[inp.dtype].np)
            resp.gradients.add(name=inp.name).tensor.CopyFrom(serialize.to_proto(zeros))
    return resp.SerializeToString()


def serve_stubs(n: int) -> int:
    """The child: ``n`` stub workers on one server, until stdin closes. Each call is
    answered once all ``n`` calls of the step have arrived: one micro-batch per worker, as
    workers that compute get them. (Answered at once, the first lanes took several
    micro-batches each while later lanes were still starting: at 256 stubs, 134 got none
    in 6 steps, and the parameters went out far fewer times than to 256 workers.)"""
    import grpc

    from gradmesh.wire.worker import SERVICE_NAME

    caps = capabilities_reply()
    reply: list[bytes] = []  # made from the first request: every call gets the same
    lock = threading.Lock()
    step = threading.Barrier(n, timeout=BARRIER_SECONDS)

    def compute(request: bytes, context) -> bytes:
        if not reply:
            with lock:
                if not reply:
                    try:
                        reply.append(gradients_reply(request))
                    except LookupError as e:
                        context.abort(grpc.StatusCode.NOT_FOUND, str(e))
        try:
            step.wait()
        except threading.BrokenBarrierError:
            step.reset()
            context.abort(grpc.StatusCode.UNAVAILABLE, f"the step's {n} calls did not all come")
        return reply[0]

    def unary(fn):  # raw bytes in and out: the stub parses nothing
        return grpc.unary_unary_rpc_method_handler(fn)

    handlers = {
        "Capabilities": unary(lambda request, context: caps),
        "ComputeGradients": unary(compute),
    }
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=n + 4),  # every call waits for the others
        options=[("grpc.max_receive_message_length", 256 << 20)],
    )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    ports = [server.add_insecure_port("127.0.0.1:0") for _ in range(n)]
    server.start()
    print(READY + ",".join(f"127.0.0.1:{p}" for p in ports), flush=True)
    sys.stdin.read()  # the parent closes it (or dies)
    server.stop(0)
    return 0


@contextlib.contextmanager
def stub_process(n: int):
    """The child process serving ``n`` stubs: ``(pid, [address, ...])``."""
    proc = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), "--serve-stubs", str(n)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        if not line.startswith(READY):
            raise RuntimeError(f"the stub process did not start (exit code {proc.poll()})")
        yield proc.pid, line[len(READY) :].strip().split(",")
    finally:
        proc.stdin.close()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------- the coordinator


def model_and_batch(name: str, rows: int):
    import gradmesh.core.nn as nn

    sizes, layers = MODELS[name], []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(fan_in, fan_out), nn.ReLU()]
    model = nn.Sequential(*layers[:-1])
    rng = np.random.default_rng(0)
    x = rng.standard_normal((rows, sizes[0])).astype(np.float32)
    y = rng.integers(0, sizes[-1], rows).astype(np.int64)
    return model, x, y


def loss_fn(model, x, y):
    import gradmesh.core.nn.functional as F

    return F.cross_entropy(model(x), y)


@contextlib.contextmanager
def coordinator_job(name: str, addresses: list[str], micro_batch: int):
    """A coordinator in this process with ``addresses`` as its workers, and a job with one
    micro-batch per worker: ``(coordinator, job_id, batch)``."""
    import gradmesh.core as gm
    from gradmesh.client import CoordinatorClient
    from gradmesh.server.coordinator import start

    running = start(workers=addresses, host="127.0.0.1", port=0, checkpoint_every=0)
    client = CoordinatorClient(running.address)
    try:
        model, x, y = model_and_batch(name, micro_batch * len(addresses))
        job = client.create_job(
            model,
            loss_fn,
            gm.optim.SGD(model.parameters(), lr=0.01),
            micro_batch,
            (x[:2], y[:2]),
            data_names=["x", "y"],
        )
        yield running.coordinator, job.job_id, {"x": x, "y": y}
    finally:
        client.close()
        running.stop(0)
        running.coordinator.close()


def measure(name: str, addresses: list[str], stub_pid: int, args) -> dict:
    """Warm-up steps (the graph goes to every stub once), then ``args.steps`` timed ones."""
    with coordinator_job(name, addresses, args.micro_batch) as (coordinator, job_id, batch):
        step_id = 0
        for _ in range(args.warmup):
            step_id += 1
            coordinator.step(job_id, step_id, batch)
        walls, cpus, timings = [], [], []
        stub_cpu = cpu_seconds(stub_pid)
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(args.steps):
            step_id += 1
            wall, cpu = time.perf_counter(), time.process_time()
            r = coordinator.step(job_id, step_id, batch)
            cpus.append(time.process_time() - cpu)
            walls.append(time.perf_counter() - wall)
            timings.append(r.timings)
        stub_cpu = cpu_seconds(stub_pid) - stub_cpu
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
        param_bytes = coordinator.jobs[job_id].params.nbytes
    return {
        "model": name,
        "stubs": len(addresses),
        "parameter_bytes": param_bytes,
        "batch_bytes": sum(a.nbytes for a in batch.values()),
        "step_ms": 1e3 * statistics.median(walls),
        "cpu_ms": 1e3 * statistics.median(cpus),
        "stub_cpu_ms": 1e3 * stub_cpu / args.steps,
        # Pages the coordinator's process touched afresh per step.
        "minor_faults": faults / args.steps,
        "compute_ms": 1e3 * statistics.median(t.compute_seconds for t in timings),
        "apply_ms": 1e3 * statistics.median(t.apply_seconds for t in timings),
        "pull_ms": 1e3 * statistics.median(t.pull_seconds for t in timings),
        "push_ms_sum": 1e3 * statistics.median(t.push_seconds for t in timings),
    }


# --------------------------------------------------------------------- profiling


@contextlib.contextmanager
def profiled_threads(profiles: list):
    """Every thread started inside runs under a cProfile of its own (timed by its CPU
    clock); ``profiles`` gets them as the threads end."""
    original = threading.Thread.run

    def run(self):
        prof = cProfile.Profile(time.thread_time)
        prof.enable()
        try:
            original(self)
        finally:
            prof.disable()
            profiles.append(prof)

    threading.Thread.run = run
    try:
        yield
    finally:
        threading.Thread.run = original


def profile(name: str, addresses: list[str], args) -> str:
    """The top functions by own CPU time over ``args.steps`` steps, all threads merged."""
    with coordinator_job(name, addresses, args.micro_batch) as (coordinator, job_id, batch):
        for step_id in range(1, args.warmup + 1):
            coordinator.step(job_id, step_id, batch)
        profiles: list = []
        main = cProfile.Profile(time.thread_time)
        cpu = time.process_time()
        with profiled_threads(profiles):
            main.enable()
            for step_id in range(args.warmup + 1, args.warmup + 1 + args.steps):
                coordinator.step(job_id, step_id, batch)
            main.disable()
            time.sleep(0.5)  # the last lanes end
        cpu = time.process_time() - cpu
    out = io.StringIO()
    stats = pstats.Stats(main, stream=out)
    for prof in profiles:
        stats.add(prof)
    head = (
        f"{name}, {len(addresses)} stubs, {args.steps} steps: process CPU "
        f"{1e3 * cpu / args.steps:.1f} ms per step (profiled), {len(profiles)} threads"
    )
    stats.sort_stats("tottime").print_stats(args.top)
    return head + "\n" + out.getvalue()


# --------------------------------------------------------------------- output and main


def table(rows: list[dict]) -> str:
    head = (
        "| model (parameters) | stubs | step ms | coordinator CPU ms | CPU us per stub "
        "| compute ms | apply ms | stub process CPU ms | parameter bytes out per step "
        "| page faults per step |"
    )
    lines = [head, "| --- |" + " ---: |" * 9]
    for r in rows:
        mb = r["parameter_bytes"] / 1e6
        lines.append(
            f"| {r['model']} {'-'.join(map(str, MODELS[r['model']]))} ({mb:.2f} MB) "
            f"| {r['stubs']} | {r['step_ms']:.1f} | {r['cpu_ms']:.1f} "
            f"| {1e3 * r['cpu_ms'] / r['stubs']:.0f} | {r['compute_ms']:.1f} "
            f"| {r['apply_ms']:.2f} | {r['stub_cpu_ms']:.1f} "
            f"| {r['stubs'] * r['parameter_bytes'] / 1e6:.1f} MB | {r['minor_faults']:.0f} |"
        )
    return "\n".join(lines)


FIT_TERMS = ("a", "b", "g", "h")  # ms, ms per MB, ms per worker, ms per worker and MB


def per_micro_batch_ms(fit: dict, mb: float, workers: int) -> float:
    """The coordinator's CPU per micro-batch, ``a + b P + (g + h P) N``: a fixed part, one
    per parameter byte, and a part that grows with the calls in flight (``N``)."""
    return fit["a"] + fit["b"] * mb + (fit["g"] + fit["h"] * mb) * workers


def fit(rows: list[dict]) -> dict:
    """Least squares of the coordinator's CPU per micro-batch (each stub gets one) over
    the rows, as ``per_micro_batch_ms``'s terms."""
    mb = np.array([r["parameter_bytes"] / 1e6 for r in rows])
    n = np.array([float(r["stubs"]) for r in rows])
    per_stub = np.array([r["cpu_ms"] / r["stubs"] for r in rows])
    terms = np.stack([np.ones_like(mb), mb, n, n * mb], 1)
    values, *_ = np.linalg.lstsq(terms, per_stub, rcond=None)
    return dict(zip(FIT_TERMS, map(float, values)))


def fit_table(rows: list[dict]) -> str:
    f = fit(rows)
    lines = [
        f"coordinator CPU per micro-batch ~ {f['a']:.3f} ms + {f['b']:.3f} ms/MB x P + "
        f"({f['g'] * 1e3:.2f} us + {f['h'] * 1e3:.2f} us/MB x P) x N",
        "",
        "| model | stubs | predicted CPU ms | measured CPU ms | measured / predicted |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        n = r["stubs"]
        predicted = n * per_micro_batch_ms(f, r["parameter_bytes"] / 1e6, n)
        lines.append(
            f"| {r['model']} | {n} | {predicted:.1f} | {r['cpu_ms']:.1f} "
            f"| {r['cpu_ms'] / predicted:.2f} |"
        )
    return "\n".join(lines)


STEP_LOG_MODES = (("memory", None), ("log, no fsync", False), ("log, fsync", True))


def step_log_point(mib: int, sync: bool | None, args) -> dict:
    """Push and apply of one job of ``mib`` MiB on a ShardStore: in memory (``sync`` None)
    or with its step log, fsynced or not."""
    from gradmesh.server.shard_store import ShardStore

    params = {"w": np.zeros(mib << 18, np.float32)}  # 4-byte elements: mib MiB
    grad = {"w": np.full_like(params["w"], 1e-3)}
    with tempfile.TemporaryDirectory(dir=args.state_dir) as state_dir:
        store = ShardStore(state_dir if sync is not None else None, sync_log=bool(sync))
        store.load("bench", params, {"name": "sgd", "lr": 0.1})
        os.sync()  # the previous point's writes do not land in this one's timing
        times = []
        for step in range(1, args.warmup + args.steps + 1):
            start = time.perf_counter()
            store.push("bench", step, 0, 1, step - 1, grad)
            store.apply("bench", step, 1, step - 1)
            times.append(time.perf_counter() - start)
        store.close()
    timed = sorted(times[args.warmup :])
    return {
        "mib": mib,
        "median_ms": 1e3 * statistics.median(timed),
        "range_ms": [1e3 * timed[0], 1e3 * timed[-1]],
    }


def step_log(args) -> dict:
    rows = []
    for mib in args.step_log:
        for mode, sync in STEP_LOG_MODES:
            rows.append({"mode": mode, **step_log_point(mib, sync, args)})
            r = rows[-1]
            print(f"{mib} MiB, {mode}: {r['median_ms']:.1f} ms", file=sys.stderr)
    lines = ["| parameters | " + " | ".join(m for m, _ in STEP_LOG_MODES) + " |"]
    lines.append("| --- |" + " --- |" * len(STEP_LOG_MODES))
    for mib in args.step_log:
        cells = [
            f"{r['median_ms']:.1f} ms ({r['range_ms'][0]:.1f}-{r['range_ms'][1]:.1f})"
            for r in rows
            if r["mib"] == mib
        ]
        lines.append(f"| {mib} MiB | " + " | ".join(cells) + " |")
    print("push + apply per step, median (range) of", args.steps, "steps")
    print("\n".join(lines))
    return {"rows": rows}


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stubs", default=",".join(map(str, STUBS)), help="stub counts (8,64,256)")
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated: tiny,small,medium")
    p.add_argument("--steps", type=int, default=10, help="timed steps per point (default 10)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    p.add_argument("--micro-batch", type=int, default=4, help="rows per micro-batch (default 4)")
    p.add_argument("--profile", type=int, metavar="N", help="profile the step at N stubs")
    p.add_argument("--top", type=int, default=25, help="functions the profile lists")
    p.add_argument("--quick", action="store_true", help="8 and 64 stubs, tiny and small, 3 steps")
    p.add_argument("--json", metavar="PATH", help="write the results here")
    p.add_argument(
        "--step-log",
        metavar="MIB",
        help="the shard's push + apply with and without its step log at these MiB (1,10,100)",
    )
    p.add_argument(
        "--state-dir",
        default=os.path.dirname(os.path.abspath(__file__)),
        help="where --step-log writes its temporary state directories",
    )
    p.add_argument("--serve-stubs", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.stubs, args.models, args.steps, args.warmup = "8,64", "tiny,small", 3, 1
    try:
        args.stubs = [int(n) for n in args.stubs.split(",") if n.strip()]
    except ValueError:
        p.error(f"--stubs: expected numbers like 8,64,256, got {args.stubs!r}")
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in args.models if m not in MODELS]
    if unknown or not args.models:
        p.error(f"--models: expected some of {','.join(MODELS)}, got {unknown or 'none'}")
    if min(args.stubs + [args.steps, args.micro_batch, args.profile or 1]) < 1 or args.warmup < 1:
        p.error("--stubs, --steps, --warmup, --micro-batch and --profile must be >= 1")
    if args.step_log:
        try:
            args.step_log = [int(n) for n in args.step_log.split(",") if n.strip()]
        except ValueError:
            p.error(f"--step-log: expected MiB like 1,10,100, got {args.step_log!r}")
        if not args.step_log or min(args.step_log) < 1:
            p.error("--step-log: sizes must be >= 1 MiB")
    return args


def main(argv: list[str] | None = None) -> int:
    from gradmesh.server import runtime

    args = parse_args(sys.argv[1:] if argv is None else argv)
    # The heap a `gradmesh coordinator` (or worker) process has: without it glibc maps and
    # faults in fresh pages for the megabyte messages of every call.
    runtime.steady_heap()
    if args.serve_stubs:
        return serve_stubs(args.serve_stubs)
    load_start = os.getloadavg()
    if args.step_log:
        out = step_log(args)
        print(f"load average {load_start[0]:.2f} -> {os.getloadavg()[0]:.2f}")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(out, f, indent=2)
        return 0
    rows = []
    for name in args.models:
        if args.profile:
            with stub_process(args.profile) as (_, addresses):
                print(profile(name, addresses, args))
            continue
        for n in args.stubs:
            # A stub process per point: its one reply fits one graph, its barrier n calls.
            with stub_process(n) as (pid, addresses):
                rows.append(measure(name, addresses, pid, args))
            print(f"{name} x {n}: {rows[-1]['step_ms']:.1f} ms", file=sys.stderr)
    if args.profile:
        return 0
    out = {
        "command": " ".join(["benchmarks/coordinator_cost.py", *(argv or sys.argv[1:])]),
        "cores": os.cpu_count(),
        "load_average": [load_start, os.getloadavg()],
        "rows": rows,
    }
    loads = " -> ".join(f"{load[0]:.2f}" for load in out["load_average"])
    print(f"{out['cores']} cores, load average {loads}; {out['command']}")
    print(table(rows))
    # The fit says something only with more points than terms, over sizes and counts.
    sizes, counts = {r["parameter_bytes"] for r in rows}, {r["stubs"] for r in rows}
    if len(rows) > len(FIT_TERMS) and len(sizes) > 1 and len(counts) > 1:
        out["fit_ms"] = fit(rows)
        print("\n" + fit_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
