"""The coordinator's per-step path (docs/scaling.md, "Where a medium step's time goes"):
the client sends the batch pre-encoded, a worker on the coordinator's host gets its rows in
shared memory, a graph without random ops gets seed 0 (so the request repeats from step to
step and the worker checks it once), and a single worker's lane runs in the step's own
thread. None of it changes a bit: training through it equals training over bytes."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from models import classification_batch, cross_entropy, mlp

import gradmesh.core as gm
from gradmesh.client import CoordinatorClient
from gradmesh.client.cluster import LocalCluster, waiting_policy
from gradmesh.core.serialize import to_proto
from gradmesh.server import coordinator as coordinator_mod
from gradmesh.server import dispatch as dispatch_mod
from gradmesh.server.aggregate import micro_batch_seed
from gradmesh.server.workers import WorkerHandle
from gradmesh.v1 import coordinator_pb2, worker_pb2
from gradmesh.wire.coordinator import CoordinatorConnection

STEPS = 3


def _train(address: str, shared_memory: bool, dropout: float | None, sent: list):
    """Train STEPS steps of 2 micro-batches; ``sent`` gets the shared-memory requests."""
    server = coordinator_mod.start(workers=[address], shared_memory=shared_memory)
    try:
        with CoordinatorClient(server.address) as client:
            model = mlp(10, 16, 4, seed=1, dropout=dropout)
            first = classification_batch(8, 10, 4, 0)
            job = client.create_job(
                model,
                cross_entropy,
                gm.optim.SGD(model.parameters(), lr=0.1),
                4,
                first,
                data_names=["x", "y"],
            )
            losses = [job.step(*classification_batch(8, 10, 4, s)).loss for s in range(STEPS)]
            return job.job_id, {n: t.numpy() for n, t in job.parameters().items()}, losses
    finally:
        server.stop(0)
        server.coordinator.close()


@pytest.fixture
def sent(monkeypatch):
    """The requests the coordinator's worker handles send through shared memory."""
    messages: list[worker_pb2.ComputeGradientsRequest] = []
    send = WorkerHandle._send_shared

    def capture(self, message, *args, **kw):
        messages.append(worker_pb2.ComputeGradientsRequest.FromString(message))
        return send(self, message, *args, **kw)

    monkeypatch.setattr(WorkerHandle, "_send_shared", capture)
    return messages


def test_rows_travel_in_shared_memory_and_the_request_repeats_bitwise_as_over_bytes(worker, sent):
    _, shared, shared_losses = _train(worker.address, True, None, sent)
    _, over_bytes, losses = _train(worker.address, False, None, [])
    assert len(sent) == 2 * STEPS
    for req in sent:
        assert req.seed == 0  # no random op reads it
        assert [d.name for d in req.data] == ["x", "y"]
        assert all(d.tensor.data == b"" for d in req.data)  # the rows are in the segment
        assert set(req.shared_memory.data_offsets) == {"x", "y"}
        assert req.shared_memory.parameter_segment  # the parameters in their own segment
    assert shared_losses == losses
    assert shared.keys() == over_bytes.keys()
    for name in shared:
        assert np.array_equal(shared[name], over_bytes[name]), name
    assert not np.array_equal(shared["0.weight"], mlp(10, 16, 4, seed=1)[0].weight.detach().numpy())


def test_a_graph_with_dropout_gets_the_seed_of_its_step_and_micro_batch(worker, sent):
    job_id, shared, shared_losses = _train(worker.address, True, 0.25, sent)
    seeds = [req.seed for req in sent]
    # Each step's two micro-batches, in whichever order the lane ran them.
    expected = [micro_batch_seed(job_id, s, m) for s in range(1, STEPS + 1) for m in range(2)]
    assert sorted(seeds) == sorted(expected) and len(set(seeds)) == 2 * STEPS
    _, over_bytes, losses = _train(worker.address, False, 0.25, [])
    assert shared_losses == losses
    for name in shared:
        assert np.array_equal(shared[name], over_bytes[name]), name


class _Handle:
    def __init__(self, address: str):
        self.address, self.state, self.completed = address, "ready", 0


class _Pool:
    def __init__(self, n: int):
        self.handles = [_Handle(f"127.0.0.1:{i + 1}") for i in range(n)]

    def usable(self):
        return self.handles


@pytest.mark.parametrize("workers", [1, 2])
def test_one_workers_lane_runs_in_the_steps_thread_several_get_threads(workers):
    ran_in: dict[int, threading.Thread] = {}
    accepted: list[int] = []

    def compute(w, m):
        ran_in[m] = threading.current_thread()
        return m

    reassigned = dispatch_mod.dispatch(
        _Pool(workers), 4, compute, lambda m, r: accepted.append(r), 5.0
    )
    assert reassigned == 0 and sorted(accepted) == [0, 1, 2, 3]
    in_this_thread = {m for m, t in ran_in.items() if t is threading.current_thread()}
    assert in_this_thread == (set(range(4)) if workers == 1 else set())


def test_the_pre_encoded_step_request_is_protobufs_own_encoding(monkeypatch):
    batch = {
        "x": np.arange(12, dtype=np.float32).reshape(3, 4),
        "y": gm.tensor(np.arange(3)),
        "z": np.arange(6, dtype=">f8").reshape(2, 3).T,  # big-endian, not C-contiguous
    }
    conn = CoordinatorConnection("127.0.0.1:1")
    got = []
    monkeypatch.setattr(conn, "_step", lambda request, **kw: got.append(request) or "answer")
    assert conn.step("job", 7, batch) == "answer"
    conn.close()
    expected = coordinator_pb2.StepRequest(job_id="job", step_id=7)
    for name, value in batch.items():
        expected.batch.add(name=name).tensor.CopyFrom(to_proto(value))
    assert got == [expected.SerializeToString()]


def test_workers_threads_sleep_at_once_only_when_they_outnumber_the_cores(monkeypatch):
    assert waiting_policy(2, 1, 2) == {} and waiting_policy(1, 4, 4) == {}
    sleep = {"OPENBLAS_THREAD_TIMEOUT": "4", "OMP_WAIT_POLICY": "PASSIVE"}
    assert waiting_policy(3, 1, 2) == sleep and waiting_policy(2, 2, 2) == sleep
    monkeypatch.setattr("gradmesh.client.cluster._cores", lambda: 2)
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.setenv("OPENBLAS_THREAD_TIMEOUT", "10")  # the environment's choice wins
    env = LocalCluster(workers=4, threads_per_worker=1)._worker_env()
    assert env["OPENBLAS_NUM_THREADS"] == "1" and env["OMP_WAIT_POLICY"] == "PASSIVE"
    assert env["OPENBLAS_THREAD_TIMEOUT"] == "10"
    assert "OMP_WAIT_POLICY" not in LocalCluster(workers=2, threads_per_worker=1)._worker_env()
