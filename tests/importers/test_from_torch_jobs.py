"""Imported PyTorch models as coordinator jobs: the same bits with one worker or two, and
the trajectory of ``torch.optim.SGD`` on the torch module itself."""

from __future__ import annotations

import copy
import functools

import numpy as np
import pytest
import torch
import torch.nn.functional as TF
from torch_zoo import batch, torch_model

import gradmesh
import gradmesh.core as gm
from gradmesh.client.coordinator import CoordinatorClient
from gradmesh.server import coordinator as coordinator_mod
from gradmesh.server import worker as worker_mod

STEPS, ROWS, MICRO = 3, 12, 4  # 3 micro-batches a step
LR = 0.1


@pytest.fixture(scope="module")
def workers():
    started = [worker_mod.start("cpu") for _ in range(2)]
    yield [w.address for w in started]
    for w in started:
        w.stop(0)


def _loss(model, x, y):
    return gm.nn.functional.cross_entropy(model(x), y)


@functools.cache
def _imported(name: str):
    return gradmesh.from_torch(torch_model(name), batch(name, 4)[0])


def _train_on_coordinator(name: str, workers: list[str], training: bool, micro: int) -> dict:
    model = copy.deepcopy(_imported(name)).train(training)  # an export takes a second
    server = coordinator_mod.start(workers=workers)
    client = CoordinatorClient(server.address, retry_seconds=0.0)
    try:
        x, y = batch(name, ROWS)
        job = client.create_job(
            model, _loss, {"name": "sgd", "lr": LR}, micro, (x.numpy(), y.numpy())
        )
        for step in range(STEPS):
            x, y = batch(name, ROWS, seed=step)
            job.step(x.numpy(), y.numpy())
        return {n: t.numpy() for n, t in job.parameters().items()}
    finally:
        client.close()
        server.stop(0)
        server.coordinator.close()


def _train_torch(name: str, training: bool) -> dict:
    """Parameters, then the buffers a job changes (those of train mode), as GetParameters."""
    model = torch_model(name).train(training)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    for step in range(STEPS):
        x, y = batch(name, ROWS, seed=step)
        optimizer.zero_grad()
        TF.cross_entropy(model(x), y).backward()
        optimizer.step()
    state = {n: p.detach().numpy() for n, p in model.named_parameters()}
    if training:
        state.update((n, b.numpy()) for n, b in model.named_buffers())
    return state


def _assert_close(ours: dict, theirs: dict) -> None:
    assert list(ours) == list(theirs)
    for key, value in theirs.items():
        # micro-batch sums against one full-batch mean: float32 rounding apart
        np.testing.assert_allclose(ours[key], value, rtol=1e-4, atol=1e-6, err_msg=key)


# In eval mode the ResNet's BatchNorm layers normalise with their running statistics,
# constants of the graph; in train mode the statistics are job state, updated every step.
@pytest.mark.parametrize("name,training", [("mlp", False), ("resnet", False), ("resnet", True)])
def test_job_is_bitwise_the_same_on_one_or_two_workers_and_follows_torch(workers, name, training):
    one = _train_on_coordinator(name, workers[:1], training, MICRO)
    two = _train_on_coordinator(name, workers, training, MICRO)
    assert list(one) == list(two)
    for key in one:
        assert np.array_equal(one[key], two[key]), key
    if training:
        # BatchNorm normalises each micro-batch with its own statistics (as DDP without
        # SyncBatchNorm): torch's full-batch steps are the job's with one micro-batch.
        one = _train_on_coordinator(name, workers[:1], training, ROWS)
    _assert_close(one, _train_torch(name, training))
