"""``gradmesh.from_torch`` of models whose forward computes one of the losses and distance
functions of tests/engine/test_losses.py (as a function or as its torch.nn module): the
import's loss and gradients equal torch's, at another batch size than the export's.

``gaussian_nll_loss`` is not here: torch.export refuses it (its ``torch.any(var < 0)``
check depends on the data)."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
import torch.nn as tnn
import torch.nn.functional as TF

import gradmesh
import gradmesh.core as gm

torch.set_num_threads(1)


class _LossModel(tnn.Module):
    """A Linear layer, then ``loss(self, z, *targets)`` on its output ``z``; ``self.crit``
    holds a torch.nn loss module where the case uses one, ``self.w`` a class weight."""

    def __init__(self, loss, crit=None):
        super().__init__()
        self.lin = tnn.Linear(5, 5)
        self.register_buffer("w", torch.linspace(0.5, 2.0, 5))
        self.crit = crit
        self.loss = loss

    def forward(self, x, target):
        return self.loss(self, self.lin(x), target)


class _PairLossModel(_LossModel):
    """For losses of two targets (torch.export takes no ``*args``)."""

    def forward(self, x, target, other):
        return self.loss(self, self.lin(x), target, other)


def _real(n, seed):
    return torch.from_numpy(np.random.default_rng(seed).standard_normal((n, 5))).float()


def _signs(n, seed, cols=5):
    return torch.from_numpy(np.random.default_rng(seed).choice([-1.0, 1.0], (n, cols))).float()


def _labels(n, seed):
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 5, n))


def _sign_col(n, seed):
    return _signs(n, seed, 1)[:, 0]


# name: (loss(m, z, *targets), torch.nn criterion or None, target makers (n, seed) -> tensor)
CASES = {
    "l1_loss": (lambda m, z, y: TF.l1_loss(z, y), None, [_real]),
    "L1Loss-broadcast": (lambda m, z, y: m.crit(z, y[:, :1]), tnn.L1Loss(reduction="sum"), [_real]),
    "smooth_l1_loss": (lambda m, z, y: TF.smooth_l1_loss(z, y, beta=0.5), None, [_real]),
    "SmoothL1Loss": (lambda m, z, y: m.crit(z, y), tnn.SmoothL1Loss(reduction="sum"), [_real]),
    "HuberLoss": (lambda m, z, y: m.crit(z, y).sum(), tnn.HuberLoss("none", 0.5), [_real]),
    "BCELoss": (
        lambda m, z, y: m.crit(torch.sigmoid(z), torch.sigmoid(y)),
        tnn.BCELoss(torch.linspace(0.5, 2.0, 5)),
        [_real],
    ),
    "binary_cross_entropy": (
        lambda m, z, y: TF.binary_cross_entropy(
            torch.sigmoid(z), torch.sigmoid(y), m.w, reduction="sum"
        ),
        None,
        [_real],
    ),
    "KLDivLoss-batchmean": (
        lambda m, z, y: m.crit(TF.log_softmax(z, 1), TF.softmax(y, 1)),
        tnn.KLDivLoss(reduction="batchmean"),
        [_real],
    ),
    "kl_div-log_target": (
        lambda m, z, y: TF.kl_div(z, y, reduction="sum", log_target=True),
        None,
        [_real],
    ),
    "normalize": (lambda m, z, y: (TF.normalize(z, dim=1) * y).sum(), None, [_real]),
    "CosineSimilarity": (lambda m, z, y: m.crit(z, y).sum(), tnn.CosineSimilarity(), [_real]),
    "cosine_similarity": (lambda m, z, y: TF.cosine_similarity(z, y, 1, 0.1).sum(), None, [_real]),
    "PairwiseDistance": (
        lambda m, z, y: m.crit(z, y).sum(),
        tnn.PairwiseDistance(3.0, keepdim=True),
        [_real],
    ),
    "pairwise_distance": (lambda m, z, y: TF.pairwise_distance(z, y).sum(), None, [_real]),
    "one_hot": (lambda m, z, t: (TF.one_hot(t, 5) * z).sum(), None, [_labels]),
    "MarginRankingLoss": (
        lambda m, z, s: m.crit(z[:, 0], z[:, 1], s),
        tnn.MarginRankingLoss(0.1),
        [_sign_col],
    ),
    "HingeEmbeddingLoss": (lambda m, z, s: m.crit(z, s), tnn.HingeEmbeddingLoss(0.5), [_signs]),
    "SoftMarginLoss": (lambda m, z, s: m.crit(z, s), tnn.SoftMarginLoss(), [_signs]),
    "CosineEmbeddingLoss": (
        lambda m, z, y, s: m.crit(z, y, s),
        tnn.CosineEmbeddingLoss(0.2),
        [_real, _sign_col],
    ),
    "TripletMarginLoss": (
        lambda m, z, y: m.crit(z, y, z.flip(1)),
        tnn.TripletMarginLoss(0.5, swap=True),
        [_real],
    ),
    "triplet_margin_loss-p1": (
        lambda m, z, y: TF.triplet_margin_loss(z, y, y * 2, p=1, reduction="sum"),
        None,
        [_real],
    ),
    "PoissonNLLLoss": (lambda m, z, y: m.crit(z, y.abs()), tnn.PoissonNLLLoss(full=True), [_real]),
    "poisson_nll_loss": (
        lambda m, z, y: TF.poisson_nll_loss(z.exp(), y.abs(), log_input=False, reduction="sum"),
        None,
        [_real],
    ),
    "MultiLabelSoftMarginLoss": (
        lambda m, z, y: m.crit(z, (y > 0).float()),
        tnn.MultiLabelSoftMarginLoss(torch.linspace(0.5, 2.0, 5)),
        [_real],
    ),
    "MultiMarginLoss": (
        lambda m, z, t: m.crit(z, t),
        tnn.MultiMarginLoss(2, 0.5, torch.linspace(0.5, 2.0, 5)),
        [_labels],
    ),
    "multi_margin_loss": (lambda m, z, t: TF.multi_margin_loss(z, t), None, [_labels]),
}


def _grads(model):
    return {n: p.grad.detach().numpy().copy() for n, p in model.named_parameters()}


@pytest.mark.filterwarnings("ignore:Using a target size")  # torch's own forward, broadcasting
@pytest.mark.parametrize("name", list(CASES))
def test_imported_loss_and_gradients_equal_torchs(name):
    loss, crit, makers = CASES[name]
    torch.manual_seed(0)
    torch_model = (_LossModel if len(makers) == 1 else _PairLossModel)(loss, crit)
    example = [_real(4, 1)] + [make(4, 2 + i) for i, make in enumerate(makers)]
    with pytest.warns(UserWarning) if name.endswith("broadcast") else contextlib.nullcontext():
        model = gradmesh.from_torch(torch_model, *example)
    inputs = [_real(6, 11)] + [make(6, 12 + i) for i, make in enumerate(makers)]
    expected = torch_model(*inputs)
    expected.backward()
    ours = model(*[gm.tensor(t.numpy()) for t in inputs])
    ours.backward()
    np.testing.assert_allclose(ours.item(), expected.item(), rtol=1e-5, atol=1e-6)
    want = _grads(torch_model)
    got = _grads(model)
    assert list(got) == list(want)
    for key, value in want.items():
        np.testing.assert_allclose(got[key], value, rtol=1e-4, atol=1e-6, err_msg=key)
