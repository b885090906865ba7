"""A whole gradmesh cluster on this machine, each server its own process.

>>> from gradmesh.client import LocalCluster
>>> with LocalCluster(workers=2, shards=2) as cluster:          # doctest: +SKIP
...     job = cluster.client().create_job(model, loss_fn, opt, 32, (x[:64], y[:64]))
...     job.step(x[:256], y[:256])

Every server is started with ``python -m gradmesh.cli <role> --port 0`` on
127.0.0.1; the port it got is read from the line it prints ("... listening on
127.0.0.1:PORT"), so there is no race for free ports. The cluster is ready when every
server answers the gRPC health check with SERVING. On exit the coordinator is stopped
first (it checkpoints), then shards and workers: SIGTERM, then SIGKILL after a grace
period. Server logs go to ``log_dir`` (a temporary directory by default) and their tails
are quoted in startup errors.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gradmesh.client.coordinator import CoordinatorClient
from gradmesh.wire.errors import GradmeshError

__all__ = ["LocalCluster", "ServerProcess", "ClusterError"]

THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
_LISTENING = re.compile(r'listening on ([^\s"]+)')  # a text line or a JSON one


class ClusterError(RuntimeError):
    """A server of the local cluster failed to start; the message quotes its log."""


@dataclass
class ServerProcess:
    """One server process: its role, address (once known) and log file."""

    role: str
    args: list[str]
    log_path: str
    process: subprocess.Popen | None = None
    address: str | None = None
    _ready: threading.Event = field(default_factory=threading.Event)

    def start(self, env: dict[str, str]) -> None:
        cmd = [
            sys.executable,
            "-m",
            "gradmesh.cli",
            self.role,
            "--port",
            "0",
            "--host",
            "127.0.0.1",
            "--log-format",
            "text",
            *self.args,
        ]
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=log, env=env, start_new_session=True
        )
        log.close()
        threading.Thread(
            target=self._read_stdout, daemon=True, name=f"gradmesh-{self.role}-stdout"
        ).start()

    def _read_stdout(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        with open(self.log_path, "ab") as log:
            for line in self.process.stdout:
                log.write(line)
                log.flush()
                m = _LISTENING.search(line.decode(errors="replace"))
                if m and self.address is None:
                    self.address = m.group(1)
                    self._ready.set()
        self._ready.set()  # the process exited: wake up whoever waits

    def wait_address(self, timeout: float) -> str:
        self._ready.wait(timeout)
        if self.address is None:
            raise ClusterError(
                f"{self.role} did not start within {timeout:.0f} s "
                f"(exit code {self.process.poll() if self.process else None})"
                f":\n{self.log_tail()}"
            )
        return self.address

    @property
    def target(self) -> str:
        """The address, asked for only once the server has started."""
        if self.address is None:
            raise ClusterError(f"{self.role} has no address: it has not started")
        return self.address

    def log_tail(self, lines: int = 20) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return "(no log)"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def terminate(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL now (tests use it to simulate a crash)."""
        if self.process is not None:
            if self.process.poll() is None:
                self.process.kill()
            self.process.wait()

    def wait_exit(self, timeout: float) -> bool:
        if self.process is None:
            return True
        try:
            self.process.wait(timeout)
            return True
        except subprocess.TimeoutExpired:
            return False


def _cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def waiting_policy(workers: int, threads: int, cores: int) -> dict[str, str]:
    """How idle BLAS/OpenMP threads of ``workers`` workers of ``threads`` threads each wait
    on a host of ``cores`` cores: by default they spin a while after each call, which
    holds a core; when the threads outnumber the cores that core is one another worker's
    thread waits for, so they sleep at once instead (OpenBLAS: ``OPENBLAS_THREAD_TIMEOUT``
    4, its shortest; OpenMP: ``OMP_WAIT_POLICY`` passive). How threads wait does not
    change how a product is split among them: the results are the same to the bit."""
    if workers * threads <= cores:
        return {}
    return {"OPENBLAS_THREAD_TIMEOUT": "4", "OMP_WAIT_POLICY": "PASSIVE"}


def _port(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


def _without(args: Sequence[str], flag: str) -> list[str]:
    """``args`` without ``flag VALUE`` pairs."""
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
        elif a == flag:
            skip = True
        else:
            out.append(a)
    return out


def wait_serving(address: str, timeout: float) -> None:
    """Block until the gRPC health service at ``address`` says SERVING (ClusterError after
    ``timeout`` seconds)."""
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                r = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2.0)
                if r.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise ClusterError(f"{address} is not SERVING after {timeout:.0f} s")
            time.sleep(0.05)


class LocalCluster:
    """Coordinator, shards and workers as separate processes on 127.0.0.1.

    ``workers``: number of worker processes. ``shards``: number of shard server processes;
    0 keeps the shards inside the coordinator (embedded). ``state_dir``: checkpoints
    (the coordinator and each shard get a subdirectory), so a restarted cluster resumes.
    ``threads_per_worker``: BLAS/OpenMP threads of each worker (default: NumPy's own
    choice); workers of one cluster always get the same count, as determinism requires.
    When the workers' threads outnumber the host's cores, idle ones sleep at once instead
    of spinning (:func:`waiting_policy`; the environment's own setting wins).
    ``coordinator_args``: extra flags for ``gradmesh coordinator``. ``add_worker()``
    starts one more worker later, registering with this coordinator or another one.
    ``max_message_bytes``: every server's unary message limit (default the servers' own);
    the coordinator sends a worker call unary when it fits in half of it, else streams it.
    """

    def __init__(
        self,
        workers: int = 2,
        shards: int = 0,
        *,
        state_dir: str | None = None,
        threads_per_worker: int | None = None,
        checkpoint_every: int = 10,
        coordinator_args: Sequence[str] = (),
        log_dir: str | None = None,
        max_message_bytes: int | None = None,
        startup_timeout: float = 60.0,
        grace: float = 10.0,
    ):
        if workers < 0 or shards < 0:
            raise ValueError("workers and shards must be >= 0")
        self.n_workers = workers
        self.n_shards = shards
        self.state_dir = state_dir
        self.threads_per_worker = threads_per_worker
        self.checkpoint_every = checkpoint_every
        self.coordinator_args = list(coordinator_args)
        self.startup_timeout = startup_timeout
        self.max_message_bytes = max_message_bytes
        self.grace = grace
        self._tmp = None
        if not log_dir:
            self._tmp = tempfile.TemporaryDirectory(prefix="gradmesh-cluster-")
            log_dir = self._tmp.name
        self.log_dir = log_dir
        os.makedirs(self.log_dir, exist_ok=True)
        self.workers: list[ServerProcess] = []
        self.shards: list[ServerProcess] = []
        self.coordinator: ServerProcess | None = None
        self._clients: list = []
        self._added: set[int] = set()  # ids of add_worker's processes: they register

    # -- lifecycle ------------------------------------------------------------------------
    def _env(self, threads: int | None) -> dict[str, str]:
        env = dict(os.environ)
        if threads:
            for var in THREAD_VARS:
                env[var] = str(threads)
        # Tracebacks of a crashing server land in its log.
        env.setdefault("PYTHONFAULTHANDLER", "1")
        return env

    def _worker_env(self) -> dict[str, str]:
        """A worker's environment: its BLAS threads, and how idle ones wait (what the
        environment already says is kept)."""
        env = self._env(self.threads_per_worker)
        threads = self.threads_per_worker or _cores()
        workers = max(self.n_workers, len(self.workers))  # add_worker's too
        for var, value in waiting_policy(workers, threads, _cores()).items():
            env.setdefault(var, value)
        return env

    def _server(self, role: str, args: list[str], index: int | None = None) -> ServerProcess:
        name = role if index is None else f"{role}-{index}"
        if self.max_message_bytes:
            args = ["--max-message-bytes", str(self.max_message_bytes), *args]
        return ServerProcess(role, args, os.path.join(self.log_dir, f"{name}.log"))

    def start(self) -> "LocalCluster":
        """Start every server and wait until all are SERVING."""
        try:
            self.workers = [self._server("worker", [], i) for i in range(self.n_workers)]
            for w in self.workers:
                w.start(self._worker_env())
            self.shards = []
            for i in range(self.n_shards):
                args = []
                if self.state_dir:
                    args += ["--state-dir", os.path.join(self.state_dir, f"shard-{i}")]
                self.shards.append(self._server("shard", args, i))
            for s in self.shards:
                s.start(self._env(None))
            for p in self.workers + self.shards:
                p.wait_address(self.startup_timeout)
            self.start_coordinator()
            for p in self.workers + self.shards:
                wait_serving(p.target, self.startup_timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def coordinator_command_args(self) -> list[str]:
        args = ["--checkpoint-every", str(self.checkpoint_every)]
        static = [w for w in self.workers if id(w) not in self._added]
        if static:
            args += ["--workers", ",".join(w.target for w in static)]
        if self.shards:
            args += ["--shards", ",".join(s.target for s in self.shards)]
        if self.state_dir:
            args += ["--state-dir", os.path.join(self.state_dir, "coordinator")]
        return args + self.coordinator_args

    def start_coordinator(self) -> ServerProcess:
        """(Re)start the coordinator process (after ``stop_coordinator`` or a kill)."""
        self.coordinator = self._server("coordinator", self.coordinator_command_args())
        self.coordinator.start(self._env(None))
        wait_serving(self.coordinator.wait_address(self.startup_timeout), self.startup_timeout)
        return self.coordinator

    def stop_coordinator(self, kill: bool = False) -> None:
        """Stop the coordinator: gracefully (it checkpoints) or with SIGKILL (a crash)."""
        if self.coordinator is None:
            return
        if kill:
            self.coordinator.kill()
        else:
            self._stop_all([self.coordinator])

    def restart_coordinator(self, kill: bool = True) -> ServerProcess:
        """Stop the coordinator (SIGKILL, or SIGTERM with ``kill=False``) and start it again
        on the same address, so clients and registered workers find it."""
        old = self.coordinator
        self.stop_coordinator(kill=kill)
        port = _port(old.address) if old is not None and old.address else 0
        self.coordinator = self._server(
            "coordinator", self.coordinator_command_args() + ["--port", str(port)]
        )
        self.coordinator.start(self._env(None))
        wait_serving(self.coordinator.wait_address(self.startup_timeout), self.startup_timeout)
        return self.coordinator

    def restart_shard(self, index: int, kill: bool = True) -> ServerProcess:
        """Stop shard ``index`` (SIGKILL by default) and start it again on the same address
        from its state directory (its checkpoint and step log)."""
        old = self.shards[index]
        self._stop_one(old, kill)
        args = _without(old.args, "--port") + ["--port", str(_port(old.target))]
        self.shards[index] = new = ServerProcess("shard", args, old.log_path)
        new.start(self._env(None))
        wait_serving(new.wait_address(self.startup_timeout), self.startup_timeout)
        return new

    def restart_worker(
        self, index: int, kill: bool = True, same_address: bool = True
    ) -> ServerProcess:
        """Stop worker ``index`` and start another: on the same address (the coordinator's
        ``--workers`` list names it), or on a new one that registers with the coordinator
        (``--coordinator``) and takes its place in ``workers``."""
        old = self.workers[index]
        self._stop_one(old, kill)
        args = _without(_without(old.args, "--port"), "--coordinator")
        if same_address:
            args += ["--port", str(_port(old.target))]
        else:
            args += ["--coordinator", self.coordinator_target]
        self.workers[index] = new = ServerProcess("worker", args, old.log_path)
        new.start(self._worker_env())
        wait_serving(new.wait_address(self.startup_timeout), self.startup_timeout)
        return new

    def add_worker(
        self, coordinator: str | None = None, *, wait_registered: bool = True
    ) -> ServerProcess:
        """Start one more worker process that registers with ``coordinator`` ("host:port";
        default this cluster's) and sends it heartbeats (``gradmesh worker
        --coordinator``). It joins ``workers`` and stops with the cluster (it is not in
        the coordinator's ``--workers`` list when that restarts). With
        ``wait_registered`` this returns once that coordinator lists it as ready
        (ClusterError after ``startup_timeout``)."""
        target = coordinator or self.coordinator_target
        proc = self._server("worker", ["--coordinator", target], len(self.workers))
        self.workers.append(proc)
        self._added.add(id(proc))
        proc.start(self._worker_env())
        wait_serving(proc.wait_address(self.startup_timeout), self.startup_timeout)
        if wait_registered:
            self._wait_registered(target, proc)
        return proc

    def _wait_registered(self, coordinator: str, proc: ServerProcess) -> None:
        deadline = time.monotonic() + self.startup_timeout
        with CoordinatorClient(coordinator, timeout=5.0, retry_seconds=0.0) as client:
            while True:
                try:
                    if any(
                        w.address == proc.target and w.state == "ready"
                        for w in client.list_workers()
                    ):
                        return
                except GradmeshError:
                    pass  # the coordinator is not up (yet): its worker keeps trying too
                if time.monotonic() > deadline:
                    raise ClusterError(
                        f"the worker at {proc.target} did not register with the coordinator "
                        f"at {coordinator} within {self.startup_timeout:.0f} s:\n"
                        f"{proc.log_tail()}"
                    )
                time.sleep(0.05)

    def _stop_one(self, proc: ServerProcess, kill: bool) -> None:
        if kill:
            proc.kill()
        else:
            self._stop_all([proc])

    def _stop_all(self, procs: list[ServerProcess]) -> None:
        for p in procs:
            p.terminate()
        deadline = time.monotonic() + self.grace
        for p in procs:
            if not p.wait_exit(max(0.0, deadline - time.monotonic())):
                p.kill()
            elif p.process is not None:
                p.process.wait()

    def stop(self) -> None:
        """Stop everything: coordinator first (it checkpoints), then shards and workers."""
        for c in self._clients:
            c.close()
        self._clients = []
        if self.coordinator is not None:
            self._stop_all([self.coordinator])
        self._stop_all(self.shards + self.workers)

    def __enter__(self) -> "LocalCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()

    # -- use ------------------------------------------------------------------------------
    @property
    def coordinator_target(self) -> str:
        if self.coordinator is None or self.coordinator.address is None:
            raise ClusterError("the cluster is not started")
        return self.coordinator.address

    def client(self, **kwargs):
        """A :class:`~gradmesh.client.coordinator.CoordinatorClient` for this cluster."""
        c = CoordinatorClient(self.coordinator_target, **kwargs)
        self._clients.append(c)
        return c

    def logs(self) -> dict[str, str]:
        """The tail of every server's log, by process name (for failing tests)."""
        procs = self.workers + self.shards + ([self.coordinator] if self.coordinator else [])
        return {os.path.basename(p.log_path)[:-4]: p.log_tail() for p in procs}
