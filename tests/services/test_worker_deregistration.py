"""A registered worker that gets SIGTERM leaves the coordinator's pool before it drains
(DeregisterWorker), so the coordinator stops sending it micro-batches at once instead of
keeping it for three missed heartbeats; and the start-up line is one JSON object under
--log-format json."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
from conftest import free_port
from test_worker_registration import _start, _wait_ready_workers

import gradmesh.core as gm
import gradmesh.core.nn.functional as F
from gradmesh.client import CoordinatorClient


def test_sigterm_deregisters_and_steps_go_on(tmp_path):
    port = free_port()
    procs = []
    try:
        procs.append(_start("coordinator", ["--port", str(port)], str(tmp_path)))
        procs[0].wait_address(60)
        for fmt in ("text", "json"):
            args = ["--coordinator", f"127.0.0.1:{port}", "--log-format", fmt]
            procs.append(_start("worker", args, str(tmp_path)))
            procs[-1].wait_address(60)  # the JSON line gives the address too
        leaving, staying = procs[1], procs[2]
        with CoordinatorClient(f"127.0.0.1:{port}") as client:
            _wait_ready_workers(client, 2)
            gm.manual_seed(0)
            model = gm.nn.Sequential(gm.nn.Linear(4, 3))
            x, y = gm.randn(8, 4), gm.randint(0, 3, (8,))
            job = client.create_job(
                model,
                lambda m, x, y: F.cross_entropy(m(x), y),
                gm.optim.SGD(model.parameters(), lr=0.1),
                micro_batch_size=2,
                example_batch=(x, y),
            )
            assert np.isfinite(job.step(x, y).loss)
            leaving.terminate()
            assert leaving.wait_exit(60)
            # Without deregistration it would be listed for up to 15 s (3 heartbeats).
            addresses = [w.address for w in client.list_workers()]
            assert addresses == [staying.address], addresses
            for _ in range(3):
                assert np.isfinite(job.step(x, y).loss)
            assert job.status().version == 4
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            if not p.wait_exit(15):
                p.kill()


def test_json_start_up_line_and_help():
    cmd = [sys.executable, "-m", "gradmesh.cli", "worker", "--port", "0"]
    proc = subprocess.Popen(
        [*cmd, "--log-format", "json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        line = proc.stdout.readline()
        record = json.loads(line)
        assert record["address"].startswith("127.0.0.1:") and record["level"] == "INFO"
        assert record["msg"] == f"gradmesh worker (cpu) listening on {record['address']}"
    finally:
        proc.terminate()
        proc.wait(60)
    usage = subprocess.run([*cmd, "--help"], capture_output=True, text=True, check=True).stdout
    assert "listening on HOST:PORT" in " ".join(usage.split())
    assert os.linesep not in line.rstrip("\n")
