"""Wall-clock jumps (docs/training.md, "Faults": the "clock jump" rows).

Every duration and deadline in gradmesh's servers, wire layer and SDK (micro-batch
deadlines, worker retry times, heartbeats and the registered-worker timeout, client
retries) uses ``time.monotonic()`` (or ``perf_counter``); the wall clock is only read for
log timestamps. The one wall-clock reading left was the worker's: gRPC's
``context.time_remaining()`` is a wall-clock instant minus ``time.time()``, and the worker
asked it between passes, so a clock set forward mid-call abandoned the computation; it now
reads it once at the start and counts down on the monotonic clock
(``test_a_computation_in_progress_survives_a_wall_clock_jump``). The other two tests:

- in-process: the ``time`` module every gradmesh module sees is replaced by one whose
  ``time()``/``time_ns()`` jump by an hour forward and back while a coordinator, a
  registered worker (heartbeats every 0.2 s) and a shard server run steps. gRPC's own
  Python layer keeps the real ``time.time`` (its deadlines are wall-clock instants that
  its C core compares with the real clock, so patching them would break gRPC, not
  gradmesh); the process-level test covers the two together.
- process-level: worker, shard and coordinator run as ``gradmesh`` processes under
  libfaketime (Debian package ``faketime``), the monotonic clock left alone
  (``DONT_FAKE_MONOTONIC=1``), and the wall clock of all three jumps +1 h and -1 h
  (``FAKETIME_TIMESTAMP_FILE``, re-read on every call) between steps. Skipped when
  libfaketime is not installed.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
import types

import grpc
import numpy as np
import pytest

from gradmesh.client import CoordinatorClient
from gradmesh.server import coordinator as coordinator_mod
from gradmesh.server import shard as shard_mod
from gradmesh.server import worker as worker_mod
from gradmesh.server import workers as workers_mod
from gradmesh.server.runtime import ServerConfig, ServiceError
from gradmesh.server.shard_store import ShardStore
from gradmesh.wire.coordinator import WorkerRegistration


def _model_and_loss():
    import gradmesh.core as g

    g.manual_seed(0)
    model = g.nn.Linear(3, 2)

    def loss_fn(m, x, y):
        return g.nn.functional.mse_loss(m(x), y)

    return model, loss_fn, g.optim.SGD(model.parameters(), lr=0.1)


X = np.linspace(0, 1, 12, dtype=np.float32).reshape(4, 3)
Y = np.linspace(1, 0, 8, dtype=np.float32).reshape(4, 2)


class JumpyClock(types.ModuleType):
    """The ``time`` module with a wall clock ``offset`` seconds off; the rest real."""

    def __init__(self):
        super().__init__("time")
        self.offset = 0.0
        self.wall_reads = 0

    def __getattr__(self, name):
        return getattr(time, name)

    def time(self):
        self.wall_reads += 1
        return time.time() + self.offset

    def time_ns(self):
        self.wall_reads += 1
        return time.time_ns() + int(self.offset * 1e9)


@pytest.fixture
def jumpy_clock(monkeypatch):
    clock = JumpyClock()
    for name, module in list(sys.modules.items()):
        if (name == "gradmesh" or name.startswith("gradmesh.")) and getattr(
            module, "time", None
        ) is time:
            monkeypatch.setattr(module, "time", clock)
    return clock


def test_wall_clock_jumps_in_process_change_nothing(jumpy_clock, monkeypatch):
    monkeypatch.setattr(coordinator_mod, "HEARTBEAT_SECONDS", 0.2)
    monkeypatch.setattr(workers_mod, "HEARTBEAT_SECONDS", 0.2)
    worker = worker_mod.start("cpu")
    shard = shard_mod.serve_shard(ServerConfig(port=0), ShardStore())
    running = coordinator_mod.start(shards=[shard.address], deadline=5.0)
    registration = WorkerRegistration(running.address, worker.address).start()
    try:
        assert registration.worker_id and registration.interval == 0.2
        client = CoordinatorClient(running.address)
        model, loss_fn, opt = _model_and_loss()
        job = client.create_job(model, loss_fn, opt, micro_batch_size=2, example_batch=(X, Y))
        losses = []
        for offset in (0.0, 3600.0, -3600.0, 86400.0, 0.0):
            jumpy_clock.offset = offset
            heard = _last_seen(running, worker.address)
            losses.append(job.step(X, Y).loss)
            # Heartbeats go on across the jump: the coordinator hears the worker again.
            _wait_for(lambda: _last_seen(running, worker.address) > heard)
            _assert_kept(client, worker.address, 2 * len(losses), offset)
        assert job.status().last_step_id == 5
        assert all(np.isfinite(losses)) and losses[-1] < losses[0]
        client.close()
    finally:
        registration.stop()
        running.stop(0)
        running.coordinator.close()
        shard.stop(0)
        worker.stop(0)


def _assert_kept(client, address: str, completed: int, jump) -> None:
    """The worker is ready and was never dropped: its handle (and so its count of completed
    micro-batches, two a step) is the one it registered with, not a new one."""
    listed = {w.address: w for w in client.list_workers()}
    assert address in listed, (jump, list(listed))
    w = listed[address]
    assert (w.state, w.completed, w.failures) == ("ready", completed, 0), (jump, w)


def _last_seen(running, address: str) -> float:
    pool = running.coordinator.workers
    with pool._lock:
        w = pool.workers.get(address)
        return w.last_seen if w is not None else -1.0


def _wait_for(predicate, timeout: float = 20.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.05)


# ---------------------------------------------------------------- process level ---------

FAKETIME_LIBS = [
    "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1",
    "/usr/lib/aarch64-linux-gnu/faketime/libfaketimeMT.so.1",
    "/usr/lib/faketime/libfaketimeMT.so.1",
]
LIBFAKETIME = next((p for p in FAKETIME_LIBS if os.path.exists(p)), None)


class Proc:
    def __init__(self, env, *args):
        script = os.path.join(os.path.dirname(sys.executable), "gradmesh")
        self.p = subprocess.Popen(
            [
                script if os.path.exists(script) else "gradmesh",
                *args,
                "--host",
                "127.0.0.1",
                "--port",
                "0",
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        line = self.p.stdout.readline()
        m = re.search(r'listening on ([^\s"]+)', line)  # text or JSON
        assert m, f"{args[0]} did not start: {line!r}"
        self.address = m.group(1)
        threading.Thread(target=self.p.stdout.read, daemon=True).start()

    def stop(self):
        self.p.terminate()
        try:
            self.p.wait(10)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait()


@pytest.mark.skipif(
    LIBFAKETIME is None, reason="libfaketime is not installed (apt-get install faketime)"
)
def test_wall_clock_jumps_of_every_server_process_change_nothing(tmp_path):
    offset_file = tmp_path / "faketime"
    offset_file.write_text("+0\n")
    env = dict(
        os.environ,
        LD_PRELOAD=LIBFAKETIME,
        FAKETIME_TIMESTAMP_FILE=str(offset_file),
        FAKETIME_NO_CACHE="1",
        DONT_FAKE_MONOTONIC="1",
        FAKETIME_DONT_FAKE_MONOTONIC="1",
    )
    procs = []
    try:
        shard = Proc(env, "shard")
        procs.append(shard)
        coordinator = Proc(env, "coordinator", "--shards", shard.address)
        procs.append(coordinator)
        # The worker only registers (heartbeats, dropped after 3 missed intervals).
        worker = Proc(env, "worker", "--coordinator", coordinator.address)
        procs.append(worker)
        # The servers really see the jumps (the child's wall clock, read under faketime).
        probe = [sys.executable, "-c", "import time; print(time.time())"]
        client = CoordinatorClient(coordinator.address)
        _wait_for(
            lambda: any(
                w.address == worker.address and w.state == "ready" for w in client.list_workers()
            ),
            timeout=30,
        )
        model, loss_fn, opt = _model_and_loss()
        job = client.create_job(model, loss_fn, opt, micro_batch_size=2, example_batch=(X, Y))
        steps = 0
        for spec, jump in (("+0", 0), ("+1h", 3600), ("-1h", -3600), ("+0", 0)):
            offset_file.write_text(spec + "\n")
            seen = float(
                subprocess.run(probe, env=env, capture_output=True, text=True, check=True).stdout
            )
            assert abs(seen - time.time() - jump) < 60, (spec, seen - time.time())
            result = job.step(X, Y)
            assert np.isfinite(result.loss)
            steps += 1
            _assert_kept(client, worker.address, 2 * steps, spec)
        assert job.status().last_step_id == 4
        assert all(p.p.poll() is None for p in procs)
        client.close()
    finally:
        for p in reversed(procs):
            p.stop()


# ---------------------------------------------------------------- the worker's deadline --


class WallClockContext:
    """A servicer context as gRPC's Python server has it: the deadline a wall-clock
    instant, ``time_remaining()`` that instant minus ``clock.time()``."""

    def __init__(self, clock: JumpyClock, timeout: float):
        self.clock = clock
        self.deadline = clock.time() + timeout

    def is_active(self) -> bool:
        return True

    def time_remaining(self) -> float:
        return max(self.deadline - self.clock.time(), 0.0)


def test_a_computation_in_progress_survives_a_wall_clock_jump():
    """The worker reads the call's deadline once and counts down on the monotonic clock:
    a wall clock set an hour forward mid-call abandons nothing; the real deadline still
    stops it."""
    from gradmesh.server.worker.service import deadline_check

    clock = JumpyClock()
    check = deadline_check(WallClockContext(clock, timeout=0.3))
    check()
    clock.offset = 3600.0  # gRPC's time_remaining() now says 0
    check()
    clock.offset = -3600.0
    check()
    time.sleep(0.35)
    with pytest.raises(ServiceError) as e:
        check()
    assert e.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
