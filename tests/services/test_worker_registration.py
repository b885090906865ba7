"""``gradmesh worker --coordinator``: workers that join a coordinator by themselves (the
Kubernetes Deployment path), whichever of the two starts first."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
from conftest import free_port

import gradmesh.core as gm
import gradmesh.core.nn.functional as F
from gradmesh.client import CoordinatorClient
from gradmesh.client.cluster import ServerProcess


def _start(role, args, tmp_path, env=None):
    log = os.path.join(tmp_path, f"{role}-{len(os.listdir(tmp_path))}.log")
    proc = ServerProcess(role, args, log)
    proc.start(dict(os.environ) if env is None else env)
    return proc


def _wait_ready_workers(client, n, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready = [w for w in client.list_workers() if w.state == "ready"]
        if len(ready) >= n:
            return ready
        time.sleep(0.2)
    raise AssertionError(f"fewer than {n} ready workers after {timeout} s: {client.list_workers()}")


@pytest.mark.parametrize("coordinator_first", [True, False])
def test_a_worker_registers_itself_and_trains(tmp_path, coordinator_first):
    port = free_port()
    procs = []
    try:
        coordinator_args = ["--port", str(port)]
        worker_args = ["--coordinator", f"127.0.0.1:{port}"]
        order = [("coordinator", coordinator_args), ("worker", worker_args)]
        for role, args in order if coordinator_first else order[::-1]:
            procs.append(_start(role, args, str(tmp_path)))
            procs[-1].wait_address(60)
        with CoordinatorClient(f"127.0.0.1:{port}") as client:
            [registered] = _wait_ready_workers(client, 1)
            assert registered.source == "registered"
            assert registered.address == procs[-1 if coordinator_first else 0].address
            gm.manual_seed(0)
            model = gm.nn.Sequential(gm.nn.Linear(4, 3))
            x, y = gm.randn(8, 4), gm.randint(0, 3, (8,))
            job = client.create_job(
                model,
                lambda m, x, y: F.cross_entropy(m(x), y),
                gm.optim.SGD(model.parameters(), lr=0.1),
                micro_batch_size=4,
                example_batch=(x, y),
            )
            loss = job.step(x, y).loss
            assert np.isfinite(loss)
            assert job.status().version == 1
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            if not p.wait_exit(15):
                p.kill()
