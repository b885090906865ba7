"""End-to-end training against PyTorch: same architecture, same initial weights, same data.

The torch model is built first; its weights are copied into ours by ``state_dict`` key.
Both then train in float64 with the same optimizer, and every step's loss and the final
weights must agree. This exercises nn modules, losses, autograd and optimizers together.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import gradmesh.core as gm


def _mlp(lib):
    nn = lib.nn
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))


def _cnn(lib):
    nn = lib.nn
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 3),
    )


def _data(kind: str):
    """Small learnable problems: the class is the argmax of a fixed projection of the input."""
    rng = np.random.default_rng(7)
    shape = (48, 6) if kind == "mlp" else (48, 1, 8, 8)
    x = rng.standard_normal(shape)
    proj = rng.standard_normal((int(np.prod(shape[1:])), 3))
    y = np.argmax(x.reshape(len(x), -1) @ proj, axis=1)
    return x, y


CASES = [
    ("mlp", "cross_entropy", "Adam", dict(lr=0.01, amsgrad=True)),
    ("mlp", "mse_loss", "SGD", dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3)),
    ("cnn", "cross_entropy", "SGD", dict(lr=0.05, momentum=0.9)),
    ("cnn", "cross_entropy", "AdamW", dict(lr=0.01)),
]


def _loss(lib, name, out, target):
    F = lib.nn.functional
    if name == "mse_loss":  # regress the one-hot code
        onehot = lib.tensor(np.eye(3)[np.asarray(target)], dtype=out.dtype)
        return F.mse_loss(out, onehot)
    return F.cross_entropy(out, target)


@pytest.mark.parametrize(
    "arch,loss_name,opt_name,kwargs", CASES, ids=[f"{a}-{loss}-{o}" for a, loss, o, _ in CASES]
)
def test_training_matches_torch(arch, loss_name, opt_name, kwargs):
    torch.manual_seed(0)
    theirs = (_mlp if arch == "mlp" else _cnn)(torch).double()
    ours = (_mlp if arch == "mlp" else _cnn)(gm).double()
    ours.load_state_dict({k: v.detach().numpy() for k, v in theirs.state_dict().items()})
    opt = getattr(gm.optim, opt_name)(ours.parameters(), **kwargs)
    ref = getattr(torch.optim, opt_name)(theirs.parameters(), foreach=False, **kwargs)

    x, y = _data(arch)
    batch, epochs = 12, 8  # 4 batches an epoch: 32 steps
    our_losses, their_losses = [], []
    for epoch in range(epochs):
        order = np.random.default_rng(epoch).permutation(len(x))
        for i in range(0, len(x), batch):
            idx = order[i : i + batch]
            opt.zero_grad()
            loss = _loss(gm, loss_name, ours(gm.tensor(x[idx])), gm.tensor(y[idx]))
            loss.backward()
            opt.step()
            our_losses.append(loss.item())

            ref.zero_grad()
            tloss = _loss(torch, loss_name, theirs(torch.tensor(x[idx])), torch.tensor(y[idx]))
            tloss.backward()
            ref.step()
            their_losses.append(tloss.item())

    np.testing.assert_allclose(our_losses, their_losses, rtol=1e-9)
    assert np.mean(our_losses[-4:]) < 0.7 * np.mean(our_losses[:4])  # it learned
    theirs_final = theirs.state_dict()
    for name, value in ours.state_dict().items():
        np.testing.assert_allclose(
            value.numpy(), theirs_final[name].numpy(), rtol=1e-8, atol=1e-12, err_msg=name
        )
