"""Imported PyTorch models of the zoo as coordinator jobs: the same bits with one worker or
two, the trajectory of ``torch.optim.SGD`` on the torch module itself, and the trained
state dict back in the torch module."""

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

STEPS, ROWS, MICRO = 3, 12, 4  # 3 micro-batches a step
LR = 0.1


def _loss(model, x, y):
    logits = model(x)
    if logits.ndim == 3:  # the GPT: a prediction per token
        return gm.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
    return gm.nn.functional.cross_entropy(logits, y)


def _torch_loss(logits, y):
    return TF.cross_entropy(logits.flatten(0, -2), y.flatten())


@functools.cache
def _imported(name: str):
    return gradmesh.from_torch(torch_model(name), batch(name, 4)[0])


def _train_on_coordinator(name: str, workers: list[str], training: bool, micro: int):
    """The job's parameters (and buffers) after training, and the model that holds them."""
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
        trained = job.parameters()
        # In eval mode the running statistics are constants of the graph, not job state.
        loaded = model.load_state_dict(trained, strict=False)
        assert not loaded.unexpected_keys
        assert all(k in dict(model.named_buffers()) for k in loaded.missing_keys)
        return {n: t.numpy() for n, t in trained.items()}, model
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
        _torch_loss(model(x), y).backward()
        optimizer.step()
    # A tied weight (the GPT's lm_head.weight) under both names, as Job.parameters() lists it.
    named = model.named_parameters(remove_duplicate=False)
    state = {n: p.detach().numpy() for n, p in named}
    if training:
        state.update((n, b.numpy()) for n, b in model.named_buffers())
    return state


def _assert_close(ours: dict, theirs: dict) -> None:
    assert list(ours) == list(theirs)
    for key, value in theirs.items():
        # micro-batch sums against one full-batch mean: float32 rounding apart
        np.testing.assert_allclose(ours[key], value, rtol=1e-4, atol=1e-6, err_msg=key)


def _assert_torch_module_computes_as(model, name: str) -> None:
    """The trained state dict, loaded strictly into a fresh torch module, gives the
    gradmesh model's outputs (in eval mode: no dropout, running statistics)."""
    net = torch_model(name)
    net.load_state_dict(gradmesh.to_torch_state_dict(model), strict=True)
    net.eval(), model.eval()
    x, _ = batch(name, ROWS, seed=STEPS)
    ours = model(gm.tensor(x.numpy())).detach().numpy()
    np.testing.assert_allclose(ours, net(x).detach().numpy(), rtol=1e-5, atol=1e-6)


# In eval mode the ResNet's BatchNorm layers normalise with their running statistics,
# constants of the graph; in train mode the statistics are job state, updated every step.
# The GPT (tied weights, causal attention, LayerNorm) and the LSTM have no op that couples
# the rows of a batch, so torch's full-batch steps are the job's micro-batched ones.
@pytest.mark.parametrize(
    "name,training",
    [("mlp", False), ("resnet", False), ("resnet", True), ("gpt", True), ("lstm", True)],
)
def test_job_is_bitwise_the_same_on_one_or_two_workers_and_follows_torch(workers, name, training):
    one, model = _train_on_coordinator(name, workers[:1], training, MICRO)
    two, _ = _train_on_coordinator(name, workers, training, MICRO)
    assert list(one) == list(two)
    for key in one:
        assert np.array_equal(one[key], two[key]), key
    if training and name == "resnet":
        # BatchNorm normalises each micro-batch with its own statistics (as DDP without
        # SyncBatchNorm): torch's full-batch steps are the job's with one micro-batch.
        one, model = _train_on_coordinator(name, workers[:1], training, ROWS)
    _assert_close(one, _train_torch(name, training))
    _assert_torch_module_computes_as(model, name)
