"""``gradmesh.from_onnx`` of models that compute the distance functions and losses that
torch.onnx.export can write out (normalize, cosine similarity, pairwise distance, KL
divergence, multilabel soft margin): outputs and gradients equal torch's. The other losses
of tests/engine/test_losses.py have no ONNX export in torch (``aten::l1_loss`` ... "is not
supported"); they import with ``gradmesh.from_torch`` (test_from_torch_losses.py)."""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
import torch
import torch.nn as tnn
import torch.nn.functional as TF

import gradmesh
import gradmesh.core as gm

torch.set_num_threads(1)


class _Head(tnn.Module):
    """A Linear layer, then ``fn(z, x)`` on its output ``z`` and the input ``x``."""

    def __init__(self, fn):
        super().__init__()
        self.lin = tnn.Linear(5, 5)
        self.fn = fn

    def forward(self, x):
        return self.fn(self.lin(x), x)


CASES = {
    "normalize": lambda z, x: TF.normalize(z, dim=1),
    # rows of zeros where x[:, 0] <= 0: the norm's gradient there is 0, not nan
    "normalize-zero-rows": lambda z, x: TF.normalize(z * (x[:, :1] > 0), dim=1),
    "cosine_similarity": lambda z, x: TF.cosine_similarity(z, x),
    "pairwise_distance": lambda z, x: TF.pairwise_distance(z, x, keepdim=True),
    "kl_div": lambda z, x: TF.kl_div(TF.log_softmax(z, 1), TF.softmax(x, 1), reduction="none"),
    "multilabel_soft_margin_loss": lambda z, x: TF.multilabel_soft_margin_loss(
        z, torch.sigmoid(x), reduction="none"
    ),
}


def _export(model: tnn.Module, x: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (x,),
            buf,
            dynamo=False,
            opset_version=17,
            input_names=["x"],
            output_names=["out"],
            dynamic_axes={"x": {0: "batch"}, "out": {0: "batch"}},
        )
    return buf.getvalue()


@pytest.mark.parametrize("name", list(CASES))
def test_outputs_and_gradients_equal_torchs(name):
    torch.manual_seed(0)
    theirs = _Head(CASES[name])
    rng = np.random.default_rng(1)
    model = gradmesh.from_onnx(
        _export(theirs, torch.from_numpy(rng.standard_normal((3, 5)).astype(np.float32)))
    )
    x = rng.standard_normal((6, 5)).astype(np.float32)
    ref = theirs(torch.from_numpy(x))
    out = model(gm.tensor(x))
    np.testing.assert_allclose(out.detach().numpy(), ref.detach().numpy(), rtol=1e-5, atol=1e-6)
    w = rng.standard_normal(tuple(ref.shape)).astype(np.float32)
    (ref * torch.from_numpy(w)).sum().backward()
    (out * gm.tensor(w)).sum().backward()
    got = {n: p.grad.numpy() for n, p in model.named_parameters()}
    for n, p in theirs.named_parameters():
        np.testing.assert_allclose(got[n], p.grad.numpy(), rtol=1e-4, atol=1e-5, err_msg=n)
