"""WorkerClient caches traced graphs per function and shapes, and per model and mode: a
second model of the same shapes, or the same model in another mode, gets its own graph."""

import numpy as np
import pytest

import gradmesh.core as gm
import gradmesh.core.nn as nn
import gradmesh.core.nn.functional as F
from gradmesh.client import WorkerClient


def loss_fn(model, x, y):
    return F.mse_loss(model(x), y)


def local_grads(model, x, y):
    model.zero_grad()
    loss_fn(model, gm.tensor(x), gm.tensor(y)).backward()
    return {n: p.grad.numpy().copy() for n, p in model.named_parameters()}


@pytest.fixture(scope="module")
def client(worker):
    with WorkerClient(worker.address) as c:
        yield c


def test_models_of_the_same_shapes_get_their_own_graphs(client):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 4)).astype(np.float32)
    y = rng.standard_normal((8, 2)).astype(np.float32)
    gm.manual_seed(0)
    relu = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    tanh = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    tanh.load_state_dict(relu.state_dict())
    for model in (relu, tanh, relu):
        got = client.compute_gradients(loss_fn, model, x, y).gradients
        want = local_grads(model, x, y)
        for name, g in want.items():
            assert np.array_equal(got[name], g), name
    assert client.trace(loss_fn, relu, x, y)[1] != client.trace(loss_fn, tanh, x, y)[1]


def test_a_mode_switch_gets_the_other_graph(client):
    x = np.ones((8, 4), np.float32)
    y = np.zeros((8, 2), np.float32)
    gm.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Dropout(0.5), nn.Linear(3, 2))
    train_id = client.trace(loss_fn, model, x, y)[1]
    model.eval()
    eval_id = client.trace(loss_fn, model, x, y)[1]
    assert eval_id != train_id
    got = client.compute_gradients(loss_fn, model, x, y).gradients
    for name, g in local_grads(model, x, y).items():
        assert np.array_equal(got[name], g), name
    model.train()
    assert client.trace(loss_fn, model, x, y)[1] == train_id
