"""Distributed training throughput: gradmesh against PyTorch's own distributed training.

Two comparisons, each on the same model, weights, global batch, loss and optimizer (plain
SGD, lr 0.01), for the medium (784-512-512-10, batch 128, cross-entropy) and large
(1024-4096-4096-1024, batch 256, MSE) MLPs:

* ``ps``: a parameter server over ``torch.distributed.rpc`` (TensorPipe, 127.0.0.1): one
  PS process owns the parameters, one trainer pulls them by RPC inside a
  ``torch.distributed.autograd`` context, runs forward and ``dist_autograd.backward``
  (the gradients go back to the PS) and steps a ``DistributedOptimizer``; against a
  ``LocalCluster`` with 1 worker (the coordinator's embedded shard owns the parameters).
* ``ddp``: ``DistributedDataParallel`` over gloo (127.0.0.1), the global batch split
  across 2 ranks; against a ``LocalCluster`` with 2 workers, one micro-batch each.

Every process of both sides (PS, trainers, ranks, coordinator, workers) gets the same
number of BLAS/OpenMP threads: cores // (training processes of the comparison), set
through OMP/OPENBLAS/MKL_NUM_THREADS as ``LocalCluster(threads_per_worker=...)`` pins
workers, and ``torch.set_num_threads`` in torch's processes. Step times are measured in
this process for both sides: for gradmesh from one step's result to the next, the next
step sent before waiting as ``fit`` does (``Job.step_async``: the batch goes to the
coordinator every step, travelling while the step before runs), a command over a pipe to
torch's trainers (which keep their batch). The first two losses of the two sides must
agree, or the run fails.

Interleaved (the default): the two systems of a comparison are up together and alternate
per repetition (a, b, a, b, ...); each repetition runs ``--warmup`` untimed steps, then
``--steps`` timed ones. Medians of the per-step times give samples/s and the ratio
gradmesh / torch (above 1: gradmesh is faster). torch's processes are stopped (SIGSTOP)
while gradmesh runs: TensorPipe's same-host transport (shm) busy-polls, and an idle PS
and trainer take most of a core each. ``--alone torch|gradmesh`` runs one side only, in
this process; ``--alone both`` runs each side in a process of its own, one after the
other, and prints the same table: NumPy's OpenBLAS threads and torch's OpenMP threads
spin for a while after a call and slow whichever system runs next when interleaved.

The ``transformer`` model (the character-level GPT of ``gradmesh demo --model
transformer``, written in PyTorch and imported with ``gradmesh.from_torch``; batch 32
windows of 64 characters, AdamW lr 0.001) has no torch.distributed pair: its systems are
PyTorch eager training the module in this process, gradmesh training the imported module
in this process, and ``LocalCluster``s with 1 and 2 workers, all in the same run; the
ratios are gradmesh / PyTorch eager. In-process systems use all cores (torch's threads,
NumPy's BLAS through threadpoolctl); workers get cores // workers threads each.

``python benchmarks/cluster.py`` (interleaved), ``--alone both``, ``--quick`` (smoke run),
``--models medium,transformer``, ``--pairs ps``, ``--steps/--warmup/--repetitions N``,
``--threads N``, ``--in-flight 1`` (gradmesh steps one at a time), ``--tensorpipe-transport
uv`` (TCP instead of shm), ``--json PATH``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass, field
from importlib import metadata

import numpy as np

LR = 0.01
TRANSFORMER_LR = 1e-3  # AdamW
MODELS = {  # sizes, global batch, loss, default timed steps per repetition
    "medium": ((784, 512, 512, 10), 128, "ce", 20),
    "large": ((1024, 4096, 4096, 1024), 256, "mse", 4),
    "transformer": ((), 32, "lm", 5),  # sizes: gradmesh.client.demo_transformer.GPTConfig
}
# The transformer's systems, in table order: (system, side).
TRANSFORMER_SYSTEMS = (
    ("torch_eager", "torch"),
    ("gradmesh_local", "gradmesh"),
    ("gradmesh_1", "gradmesh"),
    ("gradmesh_2", "gradmesh"),
)
PAIRS = {"ps": ("torch_ps", "gradmesh_1"), "ddp": ("torch_ddp", "gradmesh_2")}
SIDES = ("torch", "gradmesh")
LABELS = {
    "torch_ps": "torch RPC PS + 1 trainer",
    "gradmesh_1": "gradmesh 1 worker",
    "torch_ddp": "DDP 2 ranks",
    "gradmesh_2": "gradmesh 2 workers",
    "torch_eager": "PyTorch eager",
    "gradmesh_local": "gradmesh in-process",
}
TRAINING_PROCESSES = {"ps": 1, "ddp": 2}
THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
START_TIMEOUT = 300.0  # seconds for a torch process to start (imports, model, rendezvous)
STEP_TIMEOUT = 600.0  # seconds for one step
STOP_TIMEOUT = 60.0  # seconds for a torch process to shut down before it is killed


class BenchError(RuntimeError):
    """A failure the benchmark reports in one line (and exits 1)."""


@dataclass
class Step:
    seconds: float
    loss: float
    timings: dict = field(default_factory=dict)


# --------------------------------------------------------------------- models and data


def weights(name: str) -> list[np.ndarray]:
    """[w0, b0, w1, b1, ...] drawn as torch.nn.Linear draws them (uniform within
    1/sqrt(fan_in)), from one seed: the same initial weights for every system."""
    sizes = MODELS[name][0]
    rng = np.random.default_rng(0)
    out = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
        bound = 1 / np.sqrt(fan_in)
        out.append(rng.uniform(-bound, bound, (fan_out, fan_in)).astype(np.float32))
        out.append(rng.uniform(-bound, bound, fan_out).astype(np.float32))
    return out


def batch(name: str) -> tuple[np.ndarray, np.ndarray]:
    """The global batch (x, y): class labels for cross-entropy, targets for MSE."""
    sizes, n, loss, _ = MODELS[name]
    rng = np.random.default_rng(1)
    x = rng.standard_normal((n, sizes[0])).astype(np.float32)
    if loss == "ce":
        return x, rng.integers(0, sizes[-1], n).astype(np.int64)
    return x, rng.standard_normal((n, sizes[-1])).astype(np.float32)


def transformer_parts():
    """The GPT of the transformer demo (seed 0), its gradmesh import, and the global
    batch: 32 windows of the help text and their next characters."""
    from gradmesh.client import demo_transformer as demo

    corpus = demo.load_corpus()
    cfg = demo.GPTConfig(vocab=len(corpus.chars))
    net, model = demo.make_model(cfg, seed=0)
    rng = np.random.default_rng(1)
    x, y = demo.sample_batch(corpus.train, MODELS["transformer"][1], cfg.context, rng)
    return net, model, demo.loss_fn, x, y


# --------------------------------------------------------------------- processes


def loopback_interface() -> str:
    import socket

    names = [n for _, n in socket.if_nameindex() if n.startswith("lo")]
    if not names:
        raise BenchError("no loopback interface found for gloo/TensorPipe")
    return names[0]


@contextlib.contextmanager
def pinned_env(threads: int):
    """Processes started inside get ``threads`` BLAS/OpenMP threads, and torch.distributed
    (gloo, TensorPipe) binds the loopback interface only."""
    lo = loopback_interface()
    values = {v: str(threads) for v in THREAD_VARS} | {
        "TP_SOCKET_IFNAME": lo,
        "GLOO_SOCKET_IFNAME": lo,
    }
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def threads_for(pair: str, override: int | None) -> int:
    return override or max(1, cores() // TRAINING_PROCESSES[pair])


# --------------------------------------------------------------------- gradmesh side


class GradmeshSystem:
    """A LocalCluster (coordinator with its embedded shard, ``workers`` worker processes),
    the global batch cut into one micro-batch per worker."""

    def __init__(
        self, name: str, workers: int, threads: int, stack: contextlib.ExitStack, in_flight: int
    ):
        import gradmesh.core as gm
        from gradmesh.client import LocalCluster

        with pinned_env(threads):
            cluster = stack.enter_context(
                LocalCluster(workers=workers, checkpoint_every=0, threads_per_worker=threads)
            )
        if name == "transformer":
            _, model, loss_fn, self.x, self.y = transformer_parts()
            optimizer = gm.optim.AdamW(model.parameters(), lr=TRANSFORMER_LR)
        else:
            model, loss_fn = self._model(name), self._loss_fn(MODELS[name][2])
            self.x, self.y = batch(name)
            optimizer = gm.optim.SGD(model.parameters(), lr=LR)
        self.in_flight = in_flight
        self._next = None  # the step sent ahead
        self.job = cluster.client().create_job(
            model,
            loss_fn,
            optimizer,
            micro_batch_size=len(self.x) // workers,
            example_batch=(self.x[:4], self.y[:4]),
            data_names=["x", "y"],
        )

    @staticmethod
    def _model(name: str):
        import gradmesh.core.nn as nn

        sizes, layers = MODELS[name][0], []
        for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
            layers += [nn.Linear(fan_in, fan_out), nn.ReLU()]
        model = nn.Sequential(*layers[:-1])
        model.load_state_dict(dict(zip(model.state_dict(), weights(name))))
        return model

    @staticmethod
    def _loss_fn(kind: str):
        import gradmesh.core.nn.functional as F

        def loss_fn(model, x, y):
            out = model(x)
            return F.cross_entropy(out, y) if kind == "ce" else F.mse_loss(out, y)

        return loss_fn

    def step(self) -> Step:
        """One step's result, with the next step sent before waiting for it, as ``fit``
        does (``Job.step_async``, two in flight): the time from the last result to this
        one."""
        t = time.perf_counter()
        if self.in_flight == 1:
            r = self.job.step(self.x, self.y)
            return Step(time.perf_counter() - t, r.loss, r.timings)
        if self._next is None:
            self._next = self.job.step_async(self.x, self.y)
        current, self._next = self._next, self.job.step_async(self.x, self.y)
        r = current.result()
        return Step(time.perf_counter() - t, r.loss, r.timings)

    def pause(self) -> None:
        """Finish the step sent ahead; then nothing runs: idle gradmesh servers wait in
        epoll (and a stopped gRPC server would miss keepalive pings)."""
        if self._next is not None:
            self._next.result()
            self._next = None

    def resume(self) -> None:
        pass


class InProcessSystem:
    """The transformer trained in this process, one optimizer step per global batch: by
    PyTorch eager (``torch`` True) or by gradmesh on the imported module."""

    def __init__(self, torch: bool, threads: int):
        from threadpoolctl import threadpool_limits

        import gradmesh.core as gm

        net, model, loss_fn, x, y = transformer_parts()
        if torch:
            self._step = self._torch_step(net, x, y, threads)
        else:
            # This process's BLAS, as a worker's (gradmesh worker pins it the same way).
            threadpool_limits(threads, user_api="blas")
            opt = gm.optim.AdamW(model.parameters(), lr=TRANSFORMER_LR)
            xt, yt = gm.tensor(x), gm.tensor(y)

            def step() -> float:
                opt.zero_grad()
                loss = loss_fn(model, xt, yt)
                loss.backward()
                opt.step()
                return loss.item()

            self._step = step

    @staticmethod
    def _torch_step(net, x, y, threads: int):
        import torch

        torch.set_num_threads(threads)
        opt = torch.optim.AdamW(net.parameters(), lr=TRANSFORMER_LR)
        xt, yt = torch.from_numpy(x), torch.from_numpy(y).reshape(-1)

        def step() -> float:
            opt.zero_grad()
            logits = net(xt)
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), yt)
            loss.backward()
            opt.step()
            return loss.item()

        return step

    def step(self) -> Step:
        t = time.perf_counter()
        loss = self._step()
        return Step(time.perf_counter() - t, loss)

    def pause(self) -> None:
        """Nothing runs between steps."""

    resume = pause


# --------------------------------------------------------------------- torch side


class TorchSystem:
    """torch.distributed processes (``kind`` "ps" or "ddp", 2 processes each), started with
    ``spawn`` and driven over pipes: "step" runs one training step, "stop" shuts down."""

    def __init__(
        self, kind: str, name: str, threads: int, stack: contextlib.ExitStack, transport: str
    ):
        self.label = LABELS[f"torch_{kind}"]
        store = stack.enter_context(tempfile.TemporaryDirectory(prefix="gradmesh-bench-"))
        ctx = multiprocessing.get_context("spawn")
        self.procs, self.conns = [], []
        stack.callback(self.close)
        with pinned_env(threads):
            for rank in range(2):
                parent, child = ctx.Pipe()
                args = (kind, rank, name, threads, os.path.join(store, "store"), transport, child)
                proc = ctx.Process(target=torch_process, args=args, daemon=True)
                proc.start()
                child.close()
                self.procs.append(proc)
                self.conns.append(parent)
        for rank in range(2):
            self._answer(rank, START_TIMEOUT)
        self.trainers = [1] if kind == "ps" else [0, 1]  # rank 0 of "ps" is the server

    def _answer(self, rank: int, timeout: float):
        conn = self.conns[rank]
        try:
            if not conn.poll(timeout):
                raise BenchError(f"{self.label}: rank {rank} gave no answer in {timeout:.0f} s")
            status, value = conn.recv()
        except (EOFError, OSError):
            raise self._exited(rank) from None
        if status == "error":
            raise BenchError(f"{self.label}: rank {rank} failed:\n{value}")
        return value

    def _exited(self, rank: int) -> BenchError:
        self.procs[rank].join(5)
        return BenchError(f"{self.label}: rank {rank} exited (code {self.procs[rank].exitcode})")

    def step(self) -> Step:
        t = time.perf_counter()
        for rank in self.trainers:
            try:
                self.conns[rank].send("step")
            except OSError:
                raise self._exited(rank) from None
        losses = [self._answer(rank, STEP_TIMEOUT) for rank in self.trainers]
        return Step(time.perf_counter() - t, float(np.mean(losses)))

    def pause(self) -> None:
        """Stop the processes (SIGSTOP) while another system runs: TensorPipe's shm
        transport busy-polls even when no RPC is in flight."""
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal(signal.SIGCONT)

    def _signal(self, sig: int) -> None:
        for proc in self.procs:
            if proc.is_alive():
                os.kill(proc.pid, sig)

    def close(self) -> None:
        """Ask every process to shut down (RPC, process group) if all are alive (a graceful
        shutdown needs every rank); kill what does not exit."""
        self.resume()
        if all(proc.is_alive() for proc in self.procs):
            for conn in self.conns:
                with contextlib.suppress(OSError):
                    conn.send("stop")
            deadline = time.monotonic() + STOP_TIMEOUT
            for proc in self.procs:
                proc.join(max(0.1, deadline - time.monotonic()))
        for proc in self.procs:
            if proc.is_alive():
                proc.kill()
                proc.join(5)
        for conn in self.conns:
            conn.close()


def torch_process(
    kind: str, rank: int, name: str, threads: int, store: str, transport: str, conn
) -> None:
    """A torch process: set up ``kind`` as ``rank``, then answer the driver's commands."""
    try:
        import torch

        die_with_parent()
        torch.set_num_threads(threads)
        quiet_torch_warnings()
        if kind == "ps":
            session = torch_ps_session(rank, name, f"file://{store}", transport)
        else:
            session = torch_ddp_session(rank, name, f"file://{store}")
        with session as step:
            conn.send(("ok", None))
            serve(conn, step)
    except BaseException:
        with contextlib.suppress(OSError):
            conn.send(("error", traceback.format_exc()))


def serve(conn, step) -> None:
    """Answer "step" until "stop" or the driver is gone. A failed step is reported at once:
    the session's teardown waits for the other rank, which the driver then stops."""
    while _command(conn) == "step":
        try:
            answer = ("ok", step())
        except Exception:
            answer = ("error", traceback.format_exc())
        conn.send(answer)
        if answer[0] == "error":
            return


def die_with_parent() -> None:
    """SIGKILL this process when the driver dies, even while it is stopped (Linux)."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def quiet_torch_warnings() -> None:
    """Drop torch.distributed's deprecation notices (DistributedOptimizer's TorchScript SGD
    warns under a forced "always" filter) and its internal ProcessGroup warning."""
    show = warnings.showwarning

    def showwarning(message, category, *args, **kwargs):
        if not issubclass(category, DeprecationWarning) and "as a ProcessGroup" not in str(message):
            show(message, category, *args, **kwargs)

    warnings.showwarning = showwarning


def _command(conn) -> str:
    try:
        return conn.recv()
    except EOFError:  # the driver is gone
        return "stop"


def torch_forward(params, x):
    """The MLP over [w0, b0, w1, b1, ...]: torch's one definition of the model."""
    import torch.nn.functional as F

    layers = len(params) // 2
    for i in range(layers):
        x = F.linear(x, params[2 * i], params[2 * i + 1])
        if i < layers - 1:
            x = F.relu(x)
    return x


def torch_loss(name: str, out, y):
    import torch.nn.functional as F

    return F.cross_entropy(out, y) if MODELS[name][2] == "ce" else F.mse_loss(out, y)


def torch_batch(name: str, part: int = 0, parts: int = 1):
    import torch

    x, y = batch(name)
    rows = slice(part * len(x) // parts, (part + 1) * len(x) // parts)
    return torch.from_numpy(x[rows]), torch.from_numpy(y[rows])


_PS_PARAMETERS: list = []  # the parameter server's parameters (in its own process)


def _ps_parameters():
    return _PS_PARAMETERS


def _ps_parameter_rrefs():
    from torch.distributed import rpc

    return [rpc.RRef(p) for p in _PS_PARAMETERS]


@contextlib.contextmanager
def torch_ps_session(rank: int, name: str, init_method: str, transport: str):
    """Rank 0 is the parameter server ("ps"), rank 1 the trainer, whose step pulls the
    parameters by RPC, runs forward and distributed backward (gradients go back to the
    PS) and steps a DistributedOptimizer (SGD, run on the PS)."""
    import torch
    import torch.distributed.autograd as dist_autograd
    from torch.distributed import rpc
    from torch.distributed.optim import DistributedOptimizer

    if rank == 0:
        _PS_PARAMETERS[:] = [torch.from_numpy(w).requires_grad_() for w in weights(name)]
    options = rpc.TensorPipeRpcBackendOptions(
        init_method=init_method,
        rpc_timeout=STEP_TIMEOUT,
        _transports=None if transport == "default" else [transport],
    )
    rpc.init_rpc(
        "ps" if rank == 0 else "trainer", rank=rank, world_size=2, rpc_backend_options=options
    )
    step = None
    if rank == 1:
        x, y = torch_batch(name)
        opt = DistributedOptimizer(torch.optim.SGD, rpc.rpc_sync("ps", _ps_parameter_rrefs), lr=LR)

        def step() -> float:
            with dist_autograd.context() as context:
                params = rpc.rpc_sync("ps", _ps_parameters)
                loss = torch_loss(name, torch_forward(params, x), y)
                dist_autograd.backward(context, [loss])
                opt.step(context)
            return loss.item()

    try:
        yield step
    finally:
        rpc.shutdown(graceful=True, timeout=STOP_TIMEOUT)


@contextlib.contextmanager
def torch_ddp_session(rank: int, name: str, init_method: str):
    """DistributedDataParallel over gloo, 2 ranks, each with half the global batch; the
    step returns the rank's loss (the driver averages the two)."""
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    class MLP(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.params = torch.nn.ParameterList(torch.from_numpy(w) for w in weights(name))

        def forward(self, x):
            return torch_forward(list(self.params), x)

    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=2)
    try:
        model = DistributedDataParallel(MLP())
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        x, y = torch_batch(name, rank, 2)

        def step() -> float:
            opt.zero_grad()
            loss = torch_loss(name, model(x), y)
            loss.backward()
            opt.step()
            return loss.item()

        yield step
    finally:
        dist.destroy_process_group()


# --------------------------------------------------------------------- measurement


def transformer_threads(system: str, override: int | None) -> int:
    """In-process systems use every core; a cluster's workers share them."""
    if override or system in ("torch_eager", "gradmesh_local"):
        return override or cores()
    return max(1, cores() // int(system.removeprefix("gradmesh_")))


def start(system: str, name: str, threads: int, stack: contextlib.ExitStack, args):
    if name == "transformer":
        threads = transformer_threads(system, args.threads)
    if system in ("torch_eager", "gradmesh_local"):
        return InProcessSystem(system == "torch_eager", threads)
    if system.startswith("torch_"):
        kind = system.removeprefix("torch_")
        return TorchSystem(kind, name, threads, stack, args.tensorpipe_transport)
    return GradmeshSystem(
        name, int(system.removeprefix("gradmesh_")), threads, stack, args.in_flight
    )


def measure(name: str, systems: list[str], threads: int, args) -> dict:
    """Start ``systems`` together, run them in turn per repetition (warm-up, then timed
    steps; the others paused), stop them; per system: the timed steps' seconds, the first
    two losses and gradmesh's StepTimings."""
    runs = {s: {"threads": threads, "seconds": [], "losses": [], "timings": []} for s in systems}
    if name == "transformer":
        for s in systems:
            runs[s]["threads"] = transformer_threads(s, args.threads)
    with contextlib.ExitStack() as stack:
        started = {s: start(s, name, threads, stack, args) for s in systems}
        for system in started.values():
            system.pause()
        for _ in range(args.repetitions):
            for s, system in started.items():
                system.resume()
                for i in range(args.warmup + args.steps_of[name]):
                    step = system.step()
                    if len(runs[s]["losses"]) < 2:
                        runs[s]["losses"].append(step.loss)
                    if i >= args.warmup:
                        runs[s]["seconds"].append(step.seconds)
                        runs[s]["timings"].append(step.timings)
                system.pause()
    for run in runs.values():
        summarize(run, MODELS[name][1])
    return runs


def summarize(run: dict, global_batch: int) -> None:
    median = statistics.median(run["seconds"])
    run["step_seconds"] = median
    run["samples_per_second"] = global_batch / median
    timings = run.pop("timings")
    if timings and timings[0]:
        keys = ("pull", "compute", "worker_compute", "push", "apply", "total")
        run["breakdown_seconds"] = {k: statistics.median(t[k] for t in timings) for k in keys}


def comparisons(name: str) -> list[tuple[str, str]]:
    """(torch system, gradmesh system) pairs of a model's table."""
    if name == "transformer":
        return [("torch_eager", s) for s, side in TRANSFORMER_SYSTEMS if side == "gradmesh"]
    return list(PAIRS.values())


def check_losses(name: str, results: dict) -> None:
    """Both sides of a comparison must start from the same loss and take the same step."""
    for torch_side, gm_side in comparisons(name):
        if torch_side in results and gm_side in results:
            a, b = results[torch_side]["losses"], results[gm_side]["losses"]
            if not np.allclose(a, b, rtol=1e-3, atol=0):
                raise BenchError(
                    f"{name}: {LABELS[gm_side]} and {LABELS[torch_side]} disagree on the "
                    f"first losses ({b} vs {a}): not the same model, batch or update"
                )


def add_ratios(name: str, results: dict) -> None:
    for torch_side, gm_side in comparisons(name):
        if torch_side in results and gm_side in results:
            gm, pt = results[gm_side], results[torch_side]
            gm["vs_torch"] = gm["samples_per_second"] / pt["samples_per_second"]


def run_models(args, sides: tuple[str, ...]) -> dict:
    """Every model and comparison, measuring the systems of ``sides``."""
    out = {}
    for name in args.models:
        out[name] = {}
        if name == "transformer":
            systems = [s for s, side in TRANSFORMER_SYSTEMS if side in sides]
            threads = args.threads or cores()  # per system: transformer_threads
            print(f"{name}: {', '.join(LABELS[s] for s in systems)}", file=sys.stderr)
            out[name].update(measure(name, systems, threads, args))
            continue
        for pair in args.pairs:
            systems = [s for s, side in zip(PAIRS[pair], SIDES) if side in sides]
            threads = threads_for(pair, args.threads)
            names = ", ".join(LABELS[s] for s in systems)
            print(f"{name}, {pair}: {names}, {threads} thread(s) per process", file=sys.stderr)
            out[name].update(measure(name, systems, threads, args))
    return out


def run_alone_both(args, argv: list[str]) -> dict:
    """Each side in a process of its own (``--alone torch``, then ``--alone gradmesh``)."""
    out: dict = {name: {} for name in args.models}
    base = _strip_options(argv, ("--alone", "--json"))
    with tempfile.TemporaryDirectory(prefix="gradmesh-bench-") as tmp:
        for side in SIDES:
            path = os.path.join(tmp, f"{side}.json")
            cmd = [
                sys.executable,
                os.path.abspath(__file__),
                *base,
                "--alone",
                side,
                "--json",
                path,
            ]
            if subprocess.run(cmd, stdout=subprocess.DEVNULL).returncode != 0:
                raise BenchError(f"--alone {side} failed (its message is above)")
            with open(path) as f:
                for name, systems in json.load(f)["models"].items():
                    out[name].update(systems)
    return out


def _strip_options(argv: list[str], options: tuple[str, ...]) -> list[str]:
    """``argv`` without ``options`` and their values (``--opt v`` or ``--opt=v``)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in options:
            skip = True
        elif not a.startswith(tuple(o + "=" for o in options)):
            out.append(a)
    return out


# --------------------------------------------------------------------- output


def machine() -> dict:
    def version(dist: str) -> str | None:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    return {
        "cpus": cores(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch": version("torch"),
        "grpcio": version("grpcio"),
        "platform": platform.platform(),
        "load_average_start": os.getloadavg(),
    }


def table(results: dict) -> str:
    """The Markdown table: samples/s of each system and gradmesh / torch."""
    head = ["model"]
    for torch_side, gm_side in PAIRS.values():
        head += [LABELS[torch_side], LABELS[gm_side], "ratio"]
    lines = ["| " + " | ".join(head) + " |", "| --- |" + " ---: |" * (len(head) - 1)]
    for name, runs in results.items():
        if name == "transformer":
            continue
        sizes, n = MODELS[name][:2]
        row = [f"{name} {'-'.join(map(str, sizes))}, batch {n}"]
        for torch_side, gm_side in PAIRS.values():
            row += [_cell(runs, torch_side, "samples_per_second", "{:.0f}")]
            row += [_cell(runs, gm_side, "samples_per_second", "{:.0f}")]
            row += [_cell(runs, gm_side, "vs_torch", "**{:.2f}**")]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def transformer_table(runs: dict) -> str:
    """samples/s of PyTorch eager and of gradmesh in-process, 1 and 2 workers, with the
    ratio gradmesh / PyTorch eager."""
    head, row = ["model"], [f"transformer (GPT, batch {MODELS['transformer'][1]} x 64 chars)"]
    for system, side in TRANSFORMER_SYSTEMS:
        head.append(LABELS[system])
        row.append(_cell(runs, system, "samples_per_second", "{:.0f}"))
        if side == "gradmesh":
            head.append("ratio")
            row.append(_cell(runs, system, "vs_torch", "**{:.2f}**"))
    lines = ["| " + " | ".join(head) + " |", "| --- |" + " ---: |" * (len(head) - 1)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |"])


def _cell(runs: dict, system: str, key: str, fmt: str) -> str:
    value = runs.get(system, {}).get(key)
    return "—" if value is None else fmt.format(value)


def breakdowns(results: dict) -> str:
    lines = []
    for name, runs in results.items():
        for system, run in runs.items():
            if "breakdown_seconds" in run:
                parts = ", ".join(f"{k} {v * 1e3:.1f}" for k, v in run["breakdown_seconds"].items())
                lines.append(f"{name}, {LABELS[system]}: median ms {parts}")
    return "\n".join(lines)


# --------------------------------------------------------------------- main


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--models",
        default="medium,large,transformer",
        help="comma-separated: medium,large,transformer",
    )
    p.add_argument(
        "--in-flight",
        type=int,
        choices=(1, 2),
        default=2,
        help="gradmesh steps in flight: 2 (as fit sends them, the default) or 1 (one at a time)",
    )
    p.add_argument(
        "--pairs",
        default="ps,ddp",
        help="comma-separated: ps (RPC parameter server "
        "vs 1 worker), ddp (DDP 2 ranks vs 2 workers)",
    )
    p.add_argument(
        "--steps",
        type=int,
        help="timed steps per system per repetition (default: medium 20, large 4, transformer 5)",
    )
    p.add_argument(
        "--warmup",
        type=int,
        default=1,
        help="untimed steps at the start of each repetition (default 1)",
    )
    p.add_argument("--repetitions", type=int, default=5, help="repetitions (default 5)")
    p.add_argument(
        "--threads",
        type=int,
        help="BLAS/OpenMP threads per process (default: "
        "cores // training processes: ps cores, ddp cores // 2)",
    )
    p.add_argument(
        "--alone",
        choices=("torch", "gradmesh", "both"),
        help="run one side only (both: each side in its own process, one after the other)",
    )
    p.add_argument(
        "--tensorpipe-transport",
        choices=("default", "uv"),
        default="default",
        help="default: TensorPipe's choice (shm on one host); uv: TCP on 127.0.0.1",
    )
    p.add_argument(
        "--quick", action="store_true", help="smoke run: medium, 2 repetitions of 2 steps"
    )
    p.add_argument("--json", metavar="PATH", help="write the results here")
    args = p.parse_args(argv)
    if args.quick:
        args.models, args.repetitions, args.steps = "medium", 2, 2
    args.models = _choices(p, "--models", args.models, MODELS)
    args.pairs = _choices(p, "--pairs", args.pairs, PAIRS)
    positive = [args.repetitions] + [n for n in (args.steps, args.threads) if n is not None]
    if min(positive) < 1 or args.warmup < 0:
        p.error("--repetitions, --steps and --threads must be >= 1, --warmup >= 0")
    args.steps_of = {name: args.steps or MODELS[name][3] for name in args.models}
    return args


def _choices(p: argparse.ArgumentParser, option: str, value: str, known: dict) -> list[str]:
    names = [n.strip() for n in value.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        p.error(f"{option}: expected some of {','.join(known)}, got {value!r}")
    return names


def run(args, argv: list[str]) -> dict:
    if args.alone != "gradmesh":
        try:
            import torch.distributed.rpc  # noqa: F401
        except ImportError as e:
            raise BenchError(
                f"needs torch with torch.distributed ({e}); pip install -e '.[test]'"
            ) from None
    info = {"machine": machine(), "command": " ".join(["benchmarks/cluster.py", *argv])}
    if args.alone == "both":
        results = run_alone_both(args, argv)
    else:
        results = run_models(args, (args.alone,) if args.alone else SIDES)
    for name, runs in results.items():
        check_losses(name, runs)
        add_ratios(name, runs)
    info["machine"]["load_average_end"] = os.getloadavg()
    return {**info, "models": results}


def report(out: dict) -> str:
    m = out["machine"]
    head = (
        f"{m['cpus']} cores, load average {m['load_average_start'][0]:.2f} -> "
        f"{m['load_average_end'][0]:.2f}; python {m['python']}, numpy {m['numpy']}, "
        f"torch {m['torch']}; {out['command']}"
    )
    models = out["models"]
    tables = [
        table(models) if set(models) - {"transformer"} else "",
        transformer_table(models["transformer"]) if "transformer" in models else "",
    ]
    return "\n\n".join(filter(None, [head, *tables, breakdowns(models)]))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop what was started
    try:
        out = run(args, argv)
    except BenchError as e:
        print(f"cluster.py: error: {e}", file=sys.stderr)
        return 1
    except Exception as e:
        from gradmesh.client import GradmeshError
        from gradmesh.client.cluster import ClusterError

        if not isinstance(e, (ClusterError, GradmeshError)):
            raise
        print(f"cluster.py: error: gradmesh: {e}", file=sys.stderr)
        return 1
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    print("\n" + report(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
