"""Workers on emulated hosts: each worker in a network namespace of its own, joined to the
coordinator by a veth pair whose two ends are rate-limited with ``tc``.

Per worker ``i``: a namespace, a veth pair with the addresses 10.X.i.1 (this side) and
10.X.i.2 (the worker's side) on a /30, and on both ends a token bucket (``tc qdisc
replace ... tbf rate R``, or ``netem delay D rate R`` when ``--delay`` is given and the
kernel has sch_netem), so both directions are limited. The worker (``gradmesh worker``,
started with ``ip netns exec``) binds its veth address only; the coordinator (embedded
shard) stays in this namespace on 127.0.0.1 and dials the workers there, so every tensor
travels as bytes over gRPC, as to another host (shared memory needs a loopback peer).
Nothing listens on any other interface and no packet leaves the machine. The links'
limits change between runs on the same cluster (unlimited veth first: the reference),
interleaved round-robin over ``--repetitions``. A raw TCP transfer through worker 0's link
checks each setting. Namespaces and veths are removed in ``finally``, on Ctrl-C and on
SIGTERM too.

Without root, the ``ip``/``tc`` commands or the right to create a namespace, it prints
one line saying why and exits 0 (skipped).

Compression: ``--compression off,topk`` (the default) runs each model twice, as the
synchronous job and as a job whose workers compress their replies (top-k 1% with error
feedback, ``"where": "worker"``: docs/training.md, "Compressed gradients"); ``sign`` (one
bit per element) is the third choice. The parameters still go to the workers dense: a
compressed job saves the gradients' half of a worker's link, not the parameters' half.

``python benchmarks/netns.py`` (medium and large MLP, 1 and 2 workers, links unlimited,
10gbit, 1gbit, without and with compression; 1 BLAS thread per worker), ``--quick``
(medium, 1 worker, unlimited and 1gbit, 2 steps), ``--models``, ``--workers 1,2``,
``--links unlimited,10gbit,1gbit``, ``--compression off,topk,sign``, ``--steps N``,
``--repetitions N``, ``--threads N``, ``--delay 100us``, ``--json PATH``.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

LINKS = ("unlimited", "10gbit", "1gbit")
# Compression on the workers' replies (the worker-to-coordinator hop), per --compression.
COMPRESSION = {
    "off": None,
    "topk": {"kind": "topk", "ratio": 0.01, "where": "worker"},
    "sign": {"kind": "sign", "where": "worker"},
}
STEPS = {"medium": 10, "large": 2}
# coordinator_cost.py's fit on the development VM: the coordinator's CPU per micro-batch is
# a + b P + (g + h P) N ms, P in MB, N workers; --coordinator-fit sets another machine's.
COORDINATOR_FIT = (0.536, 2.315, 0.00188, 0.00685)
TCP_CHECK_BYTES = 32 << 20
TCP_PORT = 5599
_SINK = (  # a TCP sink in a worker's namespace: counts the bytes, answers b"k"
    "import socket,sys\n"
    "s=socket.socket();s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n"
    "s.bind((sys.argv[1],int(sys.argv[2])));s.listen(1);print('ready',flush=True)\n"
    "c,_=s.accept()\n"
    "while c.recv(1<<20):pass\n"
    "c.sendall(b'k')\n"
)


class NetnsError(RuntimeError):
    """A failure the benchmark reports in one line (and exits 1)."""


@functools.cache
def _bench_cluster():
    """benchmarks/cluster.py: the models, weights, batches and job set-up shared with it."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cluster.py")
    spec = importlib.util.spec_from_file_location("gradmesh_bench_cluster", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------- the hosts


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(args, capture_output=True, text=True)
    if check and r.returncode != 0:
        raise NetnsError(f"`{' '.join(args)}` failed: {r.stderr.strip()}")
    return r


def unavailable() -> str | None:
    """Why namespaces cannot be used here (None: they can)."""
    if not sys.platform.startswith("linux"):
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "creating network namespaces needs root (CAP_NET_ADMIN)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"no `{tool}` command (iproute2)"
    name = f"gmcheck{os.getpid()}"
    r = _ip("ip", "netns", "add", name, check=False)
    if r.returncode != 0:
        return f"cannot create a network namespace: {r.stderr.strip()}"
    try:
        # A veth pair and a token bucket, inside the throwaway namespace.
        for what, cmd in (
            ("veth pairs", ["ip", "-n", name, "link", "add", "name", "gm0", "type", "veth",
                            "peer", "name", "gm1"]),
            ("tc's tbf", ["tc", "-n", name, "qdisc", "add", "dev", "gm0", "root", "tbf", "rate",
                          "1gbit", "burst", "128kb", "latency", "50ms"]),
        ):  # fmt: skip
            r = _ip(*cmd, check=False)
            if r.returncode != 0:
                return f"no {what} here: {r.stderr.strip()}"
    finally:
        _ip("ip", "netns", "del", name, check=False)
    return None


@dataclass
class Host:
    """One emulated host: a namespace and the veth pair joining it to this namespace."""

    namespace: str
    local_if: str  # the end in this namespace
    remote_if: str  # the end in the host's namespace
    local_ip: str
    remote_ip: str


class Hosts:
    """``n`` emulated hosts, created on entry and removed on exit (even after an error)."""

    def __init__(self, n: int, delay: str | None = None):
        tag = os.getpid() % 100000
        net = 200 + tag % 50  # 10.200-249.i.0/30: private, one subnet per host
        self.hosts = [
            Host(f"gm{tag}n{i}", f"gm{tag}h{i}", f"gm{tag}w{i}", *_pair(net, i)) for i in range(n)
        ]
        self.delay = delay
        self.netem = False
        self._made: list[Host] = []

    def __enter__(self) -> "Hosts":
        try:
            for h in self.hosts:
                self._create(h)
            self.netem = bool(self.delay) and self._netem_works()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _create(self, h: Host) -> None:
        _ip("ip", "netns", "add", h.namespace)
        self._made.append(h)
        _ip("ip", "link", "add", h.local_if, "type", "veth", "peer", "name", h.remote_if,
            "netns", h.namespace)  # fmt: skip
        _ip("ip", "addr", "add", f"{h.local_ip}/30", "dev", h.local_if)
        _ip("ip", "link", "set", h.local_if, "up")
        _ip("ip", "-n", h.namespace, "addr", "add", f"{h.remote_ip}/30", "dev", h.remote_if)
        _ip("ip", "-n", h.namespace, "link", "set", h.remote_if, "up")
        _ip("ip", "-n", h.namespace, "link", "set", "lo", "up")

    def _netem_works(self) -> bool:
        h = self.hosts[0]
        r = _ip("tc", "qdisc", "replace", "dev", h.local_if, "root", "netem", "delay", "1us",
                check=False)  # fmt: skip
        _ip("tc", "qdisc", "del", "dev", h.local_if, "root", check=False)
        return r.returncode == 0

    def qdisc(self, link: str) -> list[str]:
        """The root qdisc of both ends for ``link`` ("unlimited", "1gbit", ...)."""
        if self.netem:
            return ["netem", "delay", self.delay, "limit", "100000"] + (
                [] if link == "unlimited" else ["rate", link]
            )
        # A small bucket: 0.5 ms at the rate, at least 128 KiB (two 64 KiB GSO segments).
        # What the bucket holds passes at once after every idle spell (the worker's
        # compute), so a bucket of megabytes would let a medium model's step through at
        # far above the rate.
        burst = max(128 << 10, _bits_per_second(link) // 8 // 2000)
        return ["tbf", "rate", link, "burst", str(burst), "latency", "50ms"]

    def shape(self, link: str) -> None:
        """Limit both ends of every host's veth to ``link``."""
        for h in self.hosts:
            for prefix, dev in (([], h.local_if), (["-n", h.namespace], h.remote_if)):
                if link == "unlimited" and not self.netem:
                    _ip("tc", *prefix, "qdisc", "del", "dev", dev, "root", check=False)
                else:
                    _ip("tc", *prefix, "qdisc", "replace", "dev", dev, "root", *self.qdisc(link))

    def close(self) -> None:
        """Remove every veth (its peer goes with it) and namespace made."""
        while self._made:
            h = self._made.pop()
            _ip("ip", "link", "del", h.local_if, check=False)
            _ip("ip", "netns", "del", h.namespace, check=False)


def _pair(net: int, i: int) -> tuple[str, str]:
    """The two addresses of host ``i``'s /30 (its third byte and a fourth of 1 and 2)."""
    return f"10.{net}.{i}.1", f"10.{net}.{i}.2"


def _bits_per_second(link: str) -> int:
    units = {"kbit": 10**3, "mbit": 10**6, "gbit": 10**9}
    for unit, factor in units.items():
        if link.endswith(unit):
            return int(float(link[: -len(unit)]) * factor)
    raise ValueError(f"link {link!r}: expected unlimited or a rate like 1gbit, 500mbit")


def tcp_check(h: Host) -> float:
    """Gbit/s of one raw TCP transfer from this namespace into ``h`` (the link works as
    shaped)."""
    sink = subprocess.Popen(
        ["ip", "netns", "exec", h.namespace, sys.executable, "-c", _SINK, h.remote_ip,
         str(TCP_PORT)], stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        sink.stdout.readline()
        with socket.create_connection((h.remote_ip, TCP_PORT), timeout=60) as c:
            chunk = bytes(1 << 20)
            t = time.perf_counter()
            for _ in range(TCP_CHECK_BYTES >> 20):
                c.sendall(chunk)
            c.shutdown(socket.SHUT_WR)
            c.recv(1)
            return TCP_CHECK_BYTES * 8 / (time.perf_counter() - t) / 1e9
    finally:
        sink.kill()
        sink.wait()


# --------------------------------------------------------------------- the cluster


def namespaced_cluster(hosts: Hosts, threads: int):
    """A ``LocalCluster`` whose worker ``i`` runs in host ``i``'s namespace, bound to its
    veth address; coordinator (shared memory off) in this namespace on 127.0.0.1."""
    from gradmesh.client.cluster import LocalCluster, ServerProcess

    class NamespacedServer(ServerProcess):
        namespace = ""

        def start(self, env: dict[str, str]) -> None:
            """ServerProcess.start's command, run inside the namespace."""
            cmd = ["ip", "netns", "exec", self.namespace, sys.executable, "-m", "gradmesh.cli",
                   self.role, "--port", "0", "--log-format", "text", *self.args]  # fmt: skip
            with open(self.log_path, "ab") as log:
                self.process = subprocess.Popen(
                    cmd, stdout=subprocess.PIPE, stderr=log, env=env, start_new_session=True
                )
            threading.Thread(target=self._read_stdout, daemon=True).start()

    class NamespacedCluster(LocalCluster):
        def _server(self, role, args, index=None):
            p = super()._server(role, args, index)
            if role != "worker":
                return p
            h = hosts.hosts[index]
            ns = NamespacedServer(role, [*p.args, "--host", h.remote_ip, "--insecure"], p.log_path)
            ns.namespace = h.namespace
            return ns

    return NamespacedCluster(
        workers=len(hosts.hosts),
        checkpoint_every=0,
        threads_per_worker=threads,
        coordinator_args=["--shared-memory", "off"],
    )


def create_job(bench, cluster, name: str, workers: int, compression: str = "off"):
    """benchmarks/cluster.py's job: its model, weights, batch, loss and SGD, one
    micro-batch per worker; compressed by the workers unless ``compression`` is off."""
    import gradmesh.core as gm

    model = bench.GradmeshSystem._model(name)
    x, y = bench.batch(name)
    job = cluster.client().create_job(
        model,
        bench.GradmeshSystem._loss_fn(bench.MODELS[name][2]),
        gm.optim.SGD(model.parameters(), lr=bench.LR),
        micro_batch_size=len(x) // workers,
        example_batch=(x[:4], y[:4]),
        data_names=["x", "y"],
        compression=COMPRESSION[compression],
    )
    return job, x, y


def gradient_bytes_per_worker(job, parameter_bytes: int, workers: int) -> float:
    """The gradient bytes one worker sent per step (one micro-batch each), from JobStatus:
    what the workers encoded in a compressed job, the parameters' bytes otherwise."""
    status = job.status()
    if status.mode != "compressed" or not status.version:
        return float(parameter_bytes)
    return status.compressed_bytes / status.version / workers


def measure(args) -> list[dict]:
    bench = _bench_cluster()
    rows = []
    for workers in args.workers:
        threads = args.threads or max(1, len(os.sched_getaffinity(0)) // workers)
        with Hosts(workers, args.delay) as hosts, namespaced_cluster(hosts, threads) as cluster:
            checks = {}
            for link in args.links:
                hosts.shape(link)
                checks[link] = tcp_check(hosts.hosts[0])
            for name in args.models:
                jobs = {c: create_job(bench, cluster, name, workers, c) for c in args.compression}
                runs = {(c, link): [] for c in args.compression for link in args.links}
                for _ in range(args.repetitions):
                    for link in args.links:
                        hosts.shape(link)
                        for c, (job, x, y) in jobs.items():
                            for i in range(args.warmup + args.steps_of[name]):
                                t = time.perf_counter()
                                r = job.step(x, y)
                                if i >= args.warmup:
                                    runs[c, link].append((time.perf_counter() - t, r))
                parameter_bytes = sum(w.nbytes for w in bench.weights(name))
                for (c, link), steps in runs.items():
                    job, x, y = jobs[c]
                    sizes = {
                        "parameter_bytes": parameter_bytes,
                        "batch_bytes": x.nbytes + y.nbytes,
                        "batch_rows": len(x),
                        "threads_per_worker": threads,
                        "compression": c,
                        "gradient_bytes": gradient_bytes_per_worker(job, parameter_bytes, workers),
                    }
                    rows.append(summarize(name, workers, link, steps, checks[link], sizes, hosts))
                    print(_line(rows[-1]), file=sys.stderr)
    return rows


def summarize(name, workers, link, steps, tcp_gbit, sizes, hosts) -> dict:
    seconds = statistics.median(s for s, _ in steps)
    med = {
        k: statistics.median(r.timings[k] for _, r in steps)
        for k in ("compute", "worker_compute", "apply", "pull")
    }
    return {
        "model": name,
        "workers": workers,
        "link": link,
        "qdisc": "none" if link == "unlimited" and not hosts.netem else " ".join(hosts.qdisc(link)),
        "step_ms": 1e3 * seconds,
        "samples_per_second": sizes["batch_rows"] / seconds,
        # Summed over the workers: with several, the per-worker time is this / workers.
        "worker_compute_ms": 1e3 * med["worker_compute"],
        "coordinator_compute_phase_ms": 1e3 * med["compute"],
        "apply_ms": 1e3 * med["apply"],
        "tcp_check_gbit": tcp_gbit,
        "loss_first": steps[0][1].loss,
        "steps": len(steps),
        **sizes,
    }


def _line(r: dict) -> str:
    return (
        f"{r['model']}, {r['workers']} worker(s), {r['link']}, compression {r['compression']}: "
        f"step {r['step_ms']:.1f} ms, {r['samples_per_second']:.0f} samples/s"
    )


# --------------------------------------------------------------------- output and main


def link_ms(r: dict, gbit: float | None = None) -> float | None:
    """Milliseconds one worker's link needs for the parameters in, the gradients out (as
    sent: compressed or dense) and its share of the batch in, at ``gbit`` or else at the
    row's rate (None: unlimited)."""
    if gbit is None and r["link"] == "unlimited":
        return None
    bits = gbit * 1e9 if gbit else _bits_per_second(r["link"])
    gradients = r.get("gradient_bytes", r["parameter_bytes"])
    size = r["parameter_bytes"] + gradients + r["batch_bytes"] / r["workers"]
    return 1e3 * size * 8 / bits


def coordinator_ms(r: dict, fit: tuple[float, ...]) -> float:
    """The coordinator's CPU for the step's micro-batches (one per worker):
    N (a + b P + (g + h P) N)."""
    a, b, g, h = fit
    n, mb = r["workers"], r["parameter_bytes"] / 1e6
    return n * (a + b * mb + (g + h * mb) * n)


def predicted_ms(r: dict, unlimited: dict, fit: tuple[float, ...]) -> float:
    """docs/scaling.md's model of step minus worker compute on a limited link: the rest of
    the step (``O``) from the unlimited run of the same model and workers, whose transfers
    are CPU work already counted in the coordinator's ``N c(P)`` and in ``O``; plus the
    larger of the coordinator's CPU and the link time (gRPC moves one worker's bytes while
    the coordinator's Python works on the next)."""
    coordinator = coordinator_ms(r, fit)
    rest = unlimited["step_ms"] - unlimited["worker_compute_ms"] / unlimited["workers"]
    return rest - coordinator + max(coordinator, link_ms(r))


def check_table(rows: list[dict], fit: tuple[float, ...]) -> str:
    """Predicted against measured step minus worker compute, for every limited link."""

    def key(r: dict) -> tuple:
        return r["model"], r["workers"], r.get("compression", "off")

    unlimited = {key(r): r for r in rows if r["link"] == "unlimited"}
    lines = [
        "model check (coordinator CPU per micro-batch "
        f"{fit[0]} + {fit[1]} P + ({fit[2]} + {fit[3]} P) N ms):",
        "",
        "| model | workers | link | compression | N c(P) ms | link time ms "
        "| predicted step - C ms | measured ms | measured / predicted |",
        "| --- | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        base = unlimited.get(key(r))
        if r["link"] == "unlimited" or base is None:
            continue
        predicted = predicted_ms(r, base, fit)
        measured = r["step_ms"] - r["worker_compute_ms"] / r["workers"]
        lines.append(
            f"| {r['model']} | {r['workers']} | {r['link']} | {r.get('compression', 'off')} "
            f"| {coordinator_ms(r, fit):.1f} "
            f"| {link_ms(r):.1f} | {predicted:.1f} | {measured:.1f} "
            f"| {measured / predicted:.2f} |"
        )
    return "\n".join(lines) if len(lines) > 4 else ""


def table(rows: list[dict]) -> str:
    from_bench = _bench_cluster().MODELS
    lines = [
        "| model | workers | link (both ends) | compression | raw TCP Gbit/s | step ms "
        "| samples/s | worker fwd+bwd ms (per worker) | step - fwd+bwd ms "
        "| gradient MB sent per worker | link time ms (P+G+D)/B | apply ms |",
        "| --- | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        sizes = "-".join(map(str, from_bench[r["model"]][0]))
        worker = r["worker_compute_ms"] / r["workers"]
        wire = link_ms(r)
        sent = r.get("gradient_bytes", r["parameter_bytes"]) / 1e6
        lines.append(
            f"| {r['model']} {sizes} | {r['workers']} | {r['link']} "
            f"| {r.get('compression', 'off')} | {r['tcp_check_gbit']:.2f} "
            f"| {r['step_ms']:.1f} | {r['samples_per_second']:.0f} | {worker:.1f} "
            f"| {r['step_ms'] - worker:.1f} | {sent:.3f} "
            f"| {'—' if wire is None else f'{wire:.1f}'} | {r['apply_ms']:.1f} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="medium,large", help="comma-separated: medium,large")
    p.add_argument("--workers", default="1,2", help="worker counts (default 1,2)")
    p.add_argument("--links", default=",".join(LINKS), help="unlimited and/or rates like 1gbit")
    p.add_argument("--steps", type=int, help="timed steps per link per repetition "
                   "(default medium 10, large 2)")  # fmt: skip
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="BLAS threads per worker (default 1; 0: cores // workers)",
    )
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per turn (default 1)")
    p.add_argument("--repetitions", type=int, default=2, help="round-robin turns (default 2)")
    p.add_argument("--delay", help="one-way delay per end, e.g. 100us (needs sch_netem)")
    p.add_argument("--compression", default="off,topk",
                   help="comma-separated: off (synchronous), topk (1%%), sign; compressed "
                   "by the workers (default off,topk)")  # fmt: skip
    p.add_argument(
        "--coordinator-fit",
        default=",".join(map(str, COORDINATOR_FIT)),
        help="A,B,G,H: the coordinator's CPU per micro-batch, A + B P + (G + H P) N ms for P "
        "MB of parameters and N workers (coordinator_cost.py prints it; default: the "
        "development VM's)",
    )
    p.add_argument("--quick", action="store_true", help="medium, 1 worker, unlimited and 1gbit")
    p.add_argument("--json", metavar="PATH", help="write the results here")
    args = p.parse_args(argv)
    if args.quick:
        args.models, args.workers, args.links = "medium", "1", "unlimited,1gbit"
        args.steps, args.repetitions = args.steps or 2, 1
    args.models = [m for m in args.models.split(",") if m]
    args.compression = [c for c in args.compression.split(",") if c]
    if not args.compression or any(c not in COMPRESSION for c in args.compression):
        p.error(f"--compression: expected some of {','.join(COMPRESSION)}")
    if not args.models or any(m not in STEPS for m in args.models):
        p.error(f"--models: expected some of {','.join(STEPS)}, got {','.join(args.models)!r}")
    try:
        args.workers = [int(n) for n in args.workers.split(",") if n]
        args.links = [link for link in args.links.split(",") if link]
        for link in args.links:
            if link != "unlimited":
                _bits_per_second(link)
        args.coordinator_fit = tuple(float(v) for v in args.coordinator_fit.split(","))
        if len(args.coordinator_fit) != 4:
            raise ValueError("--coordinator-fit takes four numbers, A,B,G,H")
    except ValueError as e:
        p.error(f"--workers/--links/--coordinator-fit: {e}")
    if not args.workers or min(args.workers) < 1 or max(args.workers) > 200 or not args.links:
        p.error("--workers: 1 to 200 workers; --links: at least one")
    if min(args.repetitions, args.steps or 1) < 1 or args.warmup < 0:
        p.error("--steps and --repetitions must be >= 1, --warmup >= 0")
    args.steps_of = {m: args.steps or STEPS[m] for m in args.models}
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    reason = unavailable()
    if reason:
        print(f"netns.py: skipped: {reason}")
        return 0
    # SIGTERM and SIGINT unwind (even where a shell started this with SIGINT ignored): the
    # namespaces and the cluster are removed.
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    load_start = os.getloadavg()
    try:
        rows = measure(args)
    except NetnsError as e:
        print(f"netns.py: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("netns.py: interrupted (namespaces and servers removed)", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, previous_int)
    out = {
        "command": " ".join(["benchmarks/netns.py", *argv]),
        "cores": os.cpu_count(),
        "load_average": [load_start, os.getloadavg()],
        "rows": rows,
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    loads = " -> ".join(f"{load[0]:.2f}" for load in out["load_average"])
    print(f"{out['cores']} cores, load average {loads}; {out['command']}")
    print(table(rows))
    check = check_table(rows, args.coordinator_fit)
    if check:
        print("\n" + check)
    return 0


if __name__ == "__main__":
    sys.exit(main())
