"""Compression on the worker-to-coordinator hop (``compression={..., "where": "worker"}``;
docs/training.md, "Compressed gradients"): the job's status and byte counts, the same bits
as the coordinator mode where the assignment of micro-batches cannot differ (one worker),
the workers' blobs forwarded to shard servers as they came, and convergence on the demo's
digits task against the synchronous mode."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from digits_jobs import train_digits

from gradmesh.client import demo
from gradmesh.client.coordinator import CoordinatorClient
from gradmesh.server import coordinator as coordinator_mod
from gradmesh.server import worker as worker_mod
from gradmesh.server.runtime import ServerConfig
from gradmesh.server.shard import serve_shard
from gradmesh.server.shard_store import ShardStore
from gradmesh.wire.errors import GradmeshError

TOPK = {"kind": "topk", "ratio": 0.01}
AT_WORKER = {**TOPK, "where": "worker"}


@pytest.fixture(scope="module")
def workers():
    started = [worker_mod.start("cpu") for _ in range(2)]
    yield started
    for w in started:
        w.stop(0)


@pytest.fixture(scope="module")
def digits():
    return demo.load_data(0)


class Coordinator:
    """A coordinator over some workers (bytes: no shared memory) and shards, stopped on
    exit."""

    def __init__(self, workers, shards=()):
        self.server = coordinator_mod.start(
            workers=[w.address for w in workers], shards=list(shards), shared_memory=False
        )
        self.client = CoordinatorClient(self.server.address, retry_seconds=0.0)

    def __enter__(self) -> CoordinatorClient:
        return self.client

    def __exit__(self, *exc) -> None:
        self.client.close()
        self.server.stop(0)
        self.server.coordinator.close()


def _same_bits(a, b) -> None:
    for name, t in a.state_dict().items():
        assert np.array_equal(t.numpy(), b.state_dict()[name].numpy()), name


def test_status_and_bytes_of_the_worker_hop(workers, digits):
    with Coordinator(workers) as client:
        model, _, status = train_digits(client, digits, 1, AT_WORKER, steps=2)
        assert (status.mode, status.deterministic) == ("compressed", False)
        assert (status.compression.kind, status.compression.where) == ("topk", "worker")
        # 2 steps of 4 micro-batches, every parameter dense, against what the workers sent.
        dense = sum(t.numpy().nbytes for t in model.state_dict().values()) * 8
        assert status.gradient_bytes == dense
        assert 0 < status.compressed_bytes < dense / 40  # 1% kept: indices and values
        with pytest.raises(GradmeshError) as e:
            client.create_job(
                model, demo.loss_fn, {"name": "sgd", "lr": 0.1}, 4,
                example_batch=(digits[0][:8], digits[1][:8]),
                compression={**TOPK, "where": "shard"},
            )  # fmt: skip
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "compression.where" in e.value.message


def test_one_worker_gives_the_coordinator_modes_bits_over_shard_servers_too(workers, digits):
    """With one worker every micro-batch index meets the same residual in both modes, so
    the worker's blobs (forwarded to 2 shard servers as they came, or decoded for the
    embedded shard) give the coordinator mode's parameters bit for bit."""
    shards = [serve_shard(ServerConfig(port=0), ShardStore()) for _ in range(2)]
    try:
        coordinator = Coordinator(workers[:1], [s.address for s in shards])
        with coordinator as client:
            over_shards, _, status = train_digits(
                client, digits, 1, AT_WORKER, steps=6, job_id="hop-2"
            )
            # 0.weight cut over both shards (re-encoded by slice), the rest whole (as sent).
            cut = coordinator.server.coordinator.jobs[status.job_id].pieces
        assert status.shards == 2 and list(cut) == ["0.weight"]
    finally:
        for s in shards:
            s.stop(0)
    with Coordinator(workers[:1]) as client:
        at_coordinator = train_digits(client, digits, 1, TOPK, steps=6)[0]
        # Another job id: the worker's residuals of hop-2 are not this job's.
        embedded = train_digits(client, digits, 1, AT_WORKER, steps=6, job_id="hop-1")[0]
    _same_bits(over_shards, at_coordinator)
    _same_bits(embedded, at_coordinator)


EPOCHS = 6  # the synchronous mode's budget (72 steps), as tests/cluster/test_modes.py
EXTRA = 2  # epochs of 12 steps: at most 24 extra steps
TOLERANCE = 0.01  # test accuracy within 1 point of the synchronous mode's


def test_the_worker_hop_mode_converges_to_the_synchronous_accuracy(workers, digits):
    with Coordinator(workers) as client:
        synchronous = train_digits(client, digits, EPOCHS)[1][-1]
        assert synchronous > 0.95
        spec = {"kind": "topk", "ratio": 0.1, "where": "worker"}
        _, accuracies, status = train_digits(
            client, digits, EPOCHS + EXTRA, spec, until=synchronous - TOLERANCE
        )
    assert status.compression.where == "worker"
    assert accuracies[-1] >= synchronous - TOLERANCE, (
        f"synchronous {synchronous:.3f} after {EPOCHS} epochs; worker-compressed by epoch: "
        f"{accuracies}"
    )
