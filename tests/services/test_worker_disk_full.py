"""A worker on a full disk (docs/training.md, "Faults"): it keeps no state and writes no
file; the one thing it writes is its log, to stderr. Here stderr is /dev/full (every
write fails with ENOSPC, as on a full disk the supervisor logs to): the worker still
answers with the same bits, refuses bad requests cleanly, and stops with status 0."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import grpc
import numpy as np
import pytest
from models import classification_batch, cross_entropy, mlp
from test_worker_errors import assert_still_serving, call_error

import gradmesh.core as gm
from gradmesh.client import WorkerClient
from gradmesh.v1 import worker_pb2, worker_pb2_grpc

pytestmark = pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full")


def _local_gradients(model, x, y) -> dict[str, np.ndarray]:
    model.zero_grad()
    cross_entropy(model, gm.from_numpy(x), gm.from_numpy(y)).backward()
    return {n: p.grad.numpy().copy() for n, p in model.named_parameters()}


def test_a_worker_whose_log_cannot_be_written_serves_and_stops_cleanly():
    args = [sys.executable, "-m", "gradmesh.cli", "worker", "--port", "0"]
    args += ["--log-level", "DEBUG", "--log-format", "text"]  # a log line per call
    with open("/dev/full", "w") as full:
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=full, text=True)
    try:
        line = proc.stdout.readline()
        assert "listening on 127.0.0.1:" in line, line
        model = mlp(20, 32, 10, seed=3)
        x, y = classification_batch(16, 20, 10, 0)
        want = _local_gradients(model, x, y)
        address = line.split()[-1]
        with WorkerClient(address) as client:
            for _ in range(3):
                r = client.compute_gradients(cross_entropy, model, x, y)
                assert all(np.array_equal(r.gradients[n], g) for n, g in want.items())
            r = client.compute_gradients(cross_entropy, model, x, y)
            assert all(np.array_equal(r.gradients[n], g) for n, g in want.items())
        with grpc.insecure_channel(address) as channel:  # an error is logged (tried) too
            stub = worker_pb2_grpc.WorkerStub(channel)
            code, field, _ = call_error(stub.ComputeGradients, worker_pb2.ComputeGradientsRequest())
            assert code == grpc.StatusCode.INVALID_ARGUMENT and field
            assert_still_serving(stub)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
