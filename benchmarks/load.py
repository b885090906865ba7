"""Load test of the three services (not run in CI).

Each role runs as a real server process on 127.0.0.1 (``gradmesh worker|shard|coordinator
--port 0``; the address is read from its "listening on" line). Against each, ``--clients``
threads send requests back to back for ``--seconds`` while ``--idle-streams`` streaming
calls are opened and never finished (no frame sent), and the report gives requests per
second, p50/p99 latency, errors by status code and the server's RSS (``VmRSS`` from
``/proc/<pid>/status``) before and after, as a Markdown table.

- worker: ``ComputeGradients`` of a tiny registered graph (``loss = sum(x @ w)``, w
  [3, 2], a batch of 4); idle streams are ``ComputeGradientsStream`` calls.
- shard: ``Pull`` (streamed) and ``Status``, alternately, of one loaded job; idle streams
  are ``PushGradients`` calls.
- coordinator (with one worker of its own and embedded shards): each client creates its
  own job and runs ``Step`` after ``Step`` on it (step ids in sequence); idle streams are
  ``CreateJob`` calls.

    python benchmarks/load.py --quick
    python benchmarks/load.py --clients 8 --idle-streams 64 --seconds 20
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import subprocess
import sys
import threading
import time
from collections import Counter

import grpc
import numpy as np

from gradmesh.v1 import (
    coordinator_pb2,
    coordinator_pb2_grpc,
    graph_pb2,
    shard_pb2,
    shard_pb2_grpc,
    tensor_pb2,
    worker_pb2,
    worker_pb2_grpc,
)

F32 = tensor_pb2.FLOAT32
W = np.linspace(-1, 1, 6, dtype=np.float32).reshape(3, 2)
X = np.linspace(0, 1, 12, dtype=np.float32).reshape(4, 3)
TIMEOUT = 30.0


def graph() -> graph_pb2.Graph:
    return graph_pb2.Graph(
        version=1,
        inputs=[
            graph_pb2.Input(name="w", role=graph_pb2.Input.PARAM, dtype=F32, shape=[3, 2]),
            graph_pb2.Input(name="x", role=graph_pb2.Input.DATA, dtype=F32, shape=[-1, 3]),
        ],
        nodes=[graph_pb2.Node(op="mm", inputs=[1, 0]), graph_pb2.Node(op="sum", inputs=[2])],
        outputs=[graph_pb2.Output(name="loss", value=3)],
    )


def named(name: str, a: np.ndarray, data: bool = True) -> tensor_pb2.NamedTensor:
    return tensor_pb2.NamedTensor(
        name=name,
        tensor=tensor_pb2.Tensor(dtype=F32, shape=list(a.shape), data=a.tobytes() if data else b""),
    )


def with_chunks(frame_cls, kind: str, header, arrays) -> list:
    frames = [frame_cls(**{kind: header})]
    for i, a in enumerate(arrays):
        frames.append(frame_cls(chunk=tensor_pb2.Chunk(tensor_index=i, offset=0, data=a.tobytes())))
    return frames


# ---------------------------------------------------------------- servers ----------------


class Server:
    """``gradmesh ROLE --port 0 ...`` as a child process; ``.address`` from its banner."""

    def __init__(self, role: str, *args: str):
        script = os.path.join(os.path.dirname(sys.executable), "gradmesh")
        cmd = [
            script if os.path.exists(script) else "gradmesh",
            role,
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            *args,
        ]
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        m = re.search(r'listening on ([^\s"]+)', line)  # text or JSON
        if not m:
            self.proc.kill()
            raise RuntimeError(f"{role} did not start: {line!r}")
        self.address = m.group(1)
        # Keep reading stdout so the child never blocks on a full pipe.
        threading.Thread(target=self.proc.stdout.read, daemon=True).start()

    def rss_kib(self) -> int:
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        return 0

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# ---------------------------------------------------------------- roles ------------------


def worker_role(address: str):
    stub = worker_pb2_grpc.WorkerStub(grpc.insecure_channel(address))
    graph_id = stub.RegisterGraph(
        worker_pb2.RegisterGraphRequest(graph=graph()), timeout=TIMEOUT
    ).graph_id
    req = worker_pb2.ComputeGradientsRequest(
        graph_id=graph_id, parameters=[named("w", W)], data=[named("x", X)]
    )

    def client(i: int):
        s = worker_pb2_grpc.WorkerStub(grpc.insecure_channel(address))
        while True:
            yield lambda: s.ComputeGradients(req, timeout=TIMEOUT)

    def idle(requests):
        return stub.ComputeGradientsStream(requests)

    return client, idle


def shard_role(address: str):
    stub = shard_pb2_grpc.ParameterShardStub(grpc.insecure_channel(address))
    header = shard_pb2.LoadRequest(
        job_id="load",
        parameters=[named("w", W, data=False)],
        optimizer=shard_pb2.Optimizer(name="sgd", lr=0.1),
    )
    stub.Load(iter(with_chunks(shard_pb2.ShardFrame, "load", header, [W])), timeout=TIMEOUT)

    def client(i: int):
        s = shard_pb2_grpc.ParameterShardStub(grpc.insecure_channel(address))
        pull, status = shard_pb2.PullRequest(job_id="load"), shard_pb2.ShardStatusRequest()
        while True:
            yield lambda: list(s.Pull(pull, timeout=TIMEOUT))
            yield lambda: s.Status(status, timeout=TIMEOUT)

    def idle(requests):
        return stub.PushGradients.future(requests)

    return client, idle


def coordinator_role(address: str):
    stub = coordinator_pb2_grpc.CoordinatorStub(grpc.insecure_channel(address))

    def client(i: int):
        s = coordinator_pb2_grpc.CoordinatorStub(grpc.insecure_channel(address))
        job = f"load-{i}"
        header = coordinator_pb2.CreateJobRequest(
            job_id=job,
            graph=graph(),
            micro_batch_size=4,
            parameters=[named("w", W, data=False)],
            optimizer=shard_pb2.Optimizer(name="sgd", lr=0.01),
        )
        s.CreateJob(
            iter(with_chunks(coordinator_pb2.CoordinatorFrame, "create_job", header, [W])),
            timeout=TIMEOUT,
        )
        step = 0
        while True:
            step += 1
            yield lambda n=step: s.Step(
                coordinator_pb2.StepRequest(job_id=job, step_id=n, batch=[named("x", X)]),
                timeout=TIMEOUT,
            )

    def idle(requests):
        return stub.CreateJob.future(requests)

    return client, idle


# ---------------------------------------------------------------- driver -----------------


def never_finished(stop: threading.Event):
    """A request iterator that sends nothing until ``stop``, then ends."""
    stop.wait()
    return
    yield  # pragma: no cover


def run_role(
    name: str, server: Server, make, clients: int, idle_streams: int, seconds: float
) -> dict:
    client, idle = make(server.address)
    rss_before = server.rss_kib()
    stop_idle = threading.Event()
    calls = [idle(never_finished(stop_idle)) for _ in range(idle_streams)]
    lat: list[float] = []
    errors: Counter = Counter()
    details: dict[str, str] = {}
    lock = threading.Lock()
    end = time.monotonic() + seconds

    def loop(i: int):
        mine, bad = [], Counter()
        try:
            for call in client(i):
                if time.monotonic() >= end:
                    break
                t = time.perf_counter()
                try:
                    call()
                    mine.append(time.perf_counter() - t)
                except grpc.RpcError as e:
                    bad[e.code().name] += 1
                    details.setdefault(e.code().name, e.details() or "")
        except grpc.RpcError as e:  # a client's setup call (CreateJob)
            bad[f"setup {e.code().name}"] += 1
            details.setdefault(f"setup {e.code().name}", e.details() or "")
        with lock:
            lat.extend(mine)
            errors.update(bad)

    threads = [threading.Thread(target=loop, args=(i,)) for i in range(clients)]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - start
    rss_loaded = server.rss_kib()
    # The idle streams are still open here; now finish them (an empty stream: the server
    # answers with an error, which is expected and not counted) and cancel what is left.
    stop_idle.set()
    for c in calls:
        c.cancel()
    time.sleep(0.5)
    rss_after = server.rss_kib()
    ms = np.array(lat) * 1e3
    return {
        "role": name,
        "ok": len(lat),
        "rps": len(lat) / elapsed,
        "p50": float(np.percentile(ms, 50)) if len(ms) else float("nan"),
        "p99": float(np.percentile(ms, 99)) if len(ms) else float("nan"),
        "errors": dict(errors),
        "details": details,
        "rss": (rss_before, rss_loaded, rss_after),
        "alive": server.proc.poll() is None,
    }


def table(rows: list[dict], args) -> str:
    out = [
        f"clients {args.clients}, idle streams {args.idle_streams}, {args.seconds:g} s per role",
        "",
        "| role | requests | req/s | p50 ms | p99 ms | errors | RSS MiB before / loaded "
        "/ after | server alive |",
        "| --- | ---: | ---: | ---: | ---: | --- | --- | --- |",
    ]
    for r in rows:
        errs = ", ".join(f"{k} {v}" for k, v in sorted(r["errors"].items())) or "none"
        rss = " / ".join(f"{k / 1024:.0f}" for k in r["rss"])
        out.append(
            f"| {r['role']} | {r['ok']} | {r['rps']:.0f} | {r['p50']:.2f} | "
            f"{r['p99']:.2f} | {errs} | {rss} | {'yes' if r['alive'] else 'NO'} |"
        )
    for r in rows:
        for code, text in sorted(r["details"].items()):
            out.append(f"\n{r['role']}, {code}: {text}")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=8, help="concurrent clients per role")
    p.add_argument(
        "--idle-streams",
        type=int,
        default=32,
        help="streaming calls opened first and never finished, per role",
    )
    p.add_argument("--seconds", type=float, default=10.0, help="load time per role")
    p.add_argument(
        "--roles", default="worker,shard,coordinator", help="comma-separated roles to load"
    )
    p.add_argument(
        "--quick", action="store_true", help="smoke run: 2 clients, 4 idle streams, 2 s per role"
    )
    args = p.parse_args(argv)
    if args.quick:
        args.clients, args.idle_streams, args.seconds = 2, 4, 2.0
    load = os.getloadavg()
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    print(
        f"# {platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, load average "
        f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, {when}",
        file=sys.stderr,
    )
    rows = []
    for role in args.roles.split(","):
        extra: list[Server] = []
        if role == "worker":
            server, make = Server("worker"), worker_role
        elif role == "shard":
            server, make = Server("shard"), shard_role
        elif role == "coordinator":
            w = Server("worker")
            extra.append(w)
            server, make = Server("coordinator", "--workers", w.address), coordinator_role
        else:
            p.error(f"unknown role {role!r}")
        try:
            rows.append(run_role(role, server, make, args.clients, args.idle_streams, args.seconds))
        finally:
            server.stop()
            for s in extra:
                s.stop()
    print(table(rows, args))
    return 0 if all(r["alive"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
