"""``gradmesh.from_torch`` of the padding, pixel-shuffle, 1-d and adaptive max pooling and
instance-norm layers (aten.pad, pixel_(un)shuffle, max/avg_pool1d, adaptive_avg_pool1d,
adaptive_max_pool1d/2d, instance_norm): outputs and gradients equal torch's, and tracked
instance-norm statistics move as torch's."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as tnn

import gradmesh
import gradmesh.core as gm

LAYERS = {
    "unflatten": (lambda: tnn.Sequential(tnn.Flatten(), tnn.Unflatten(1, (2, -1))), (3, 4)),
    "zero_pad1d": (lambda: tnn.ZeroPad1d((1, 2)), (3, 5)),
    "zero_pad2d": (lambda: tnn.ZeroPad2d((1, 2, 0, 1)), (2, 3, 5)),
    "constant_pad1d": (lambda: tnn.ConstantPad1d(2, 1.5), (3, 5)),
    "constant_pad2d": (lambda: tnn.ConstantPad2d(1, -0.5), (2, 3, 5)),
    "reflection_pad1d": (lambda: tnn.ReflectionPad1d((2, 1)), (3, 5)),
    "reflection_pad2d": (lambda: tnn.ReflectionPad2d(1), (2, 3, 5)),
    "replication_pad1d": (lambda: tnn.ReplicationPad1d(2), (3, 5)),
    "replication_pad2d": (lambda: tnn.ReplicationPad2d((1, 0, 2, 1)), (2, 3, 5)),
    "pixel_shuffle": (lambda: tnn.PixelShuffle(2), (8, 3, 5)),
    "pixel_unshuffle": (lambda: tnn.PixelUnshuffle(2), (2, 4, 6)),
    "max_pool1d": (lambda: tnn.MaxPool1d(3, 2, 1), (3, 9)),
    "avg_pool1d": (lambda: tnn.AvgPool1d(3, 2, 1, ceil_mode=True, count_include_pad=False), (3, 9)),
    "adaptive_avg_pool1d": (lambda: tnn.AdaptiveAvgPool1d(4), (3, 10)),
    "adaptive_max_pool1d": (lambda: tnn.AdaptiveMaxPool1d(4), (3, 10)),
    "adaptive_max_pool2d": (lambda: tnn.AdaptiveMaxPool2d((3, None)), (3, 7, 10)),
    "instance_norm1d": (lambda: tnn.InstanceNorm1d(3), (3, 9)),
    "instance_norm2d_affine": (lambda: tnn.InstanceNorm2d(3, affine=True), (3, 5, 6)),
}


def _with_a_weight(layer: tnn.Module, shape) -> tnn.Module:
    """The layer after a per-channel scale, so that there is a parameter gradient."""

    class Scaled(tnn.Module):
        def __init__(self):
            super().__init__()
            self.scale = tnn.Parameter(torch.linspace(0.5, 1.5, shape[0]).reshape(-1, 1))
            self.layer = layer

        def forward(self, x):
            return self.layer(x * self.scale.reshape((-1,) + (1,) * (len(shape) - 1)))

    return Scaled()


def _assert_same_step(torch_model, model, x: np.ndarray) -> None:
    xt, xg = torch.tensor(x, requires_grad=True), gm.tensor(x, requires_grad=True)
    out_t, out_g = torch_model(xt), model(xg)
    np.testing.assert_allclose(out_g.detach().numpy(), out_t.detach().numpy(), rtol=1e-5, atol=1e-6)
    w = np.random.default_rng(3).standard_normal(tuple(out_t.shape)).astype(np.float32)
    (out_t * torch.tensor(w)).sum().backward()
    (out_g * gm.tensor(w)).sum().backward()
    np.testing.assert_allclose(xg.grad.numpy(), xt.grad.numpy(), rtol=1e-5, atol=1e-5)
    grads = {n: p.grad for n, p in torch_model.named_parameters()}
    for name, p in model.named_parameters():
        np.testing.assert_allclose(
            p.grad.numpy(), grads[name].numpy(), rtol=1e-5, atol=1e-5, err_msg=name
        )


@pytest.mark.parametrize("name", list(LAYERS))
def test_layer_imports_with_torchs_outputs_and_gradients(name):
    factory, shape = LAYERS[name]
    torch.manual_seed(0)
    torch_model = _with_a_weight(factory(), shape)
    rng = np.random.default_rng(0)
    model = gradmesh.from_torch(torch_model, torch.randn(4, *shape))
    assert [n for n, _ in model.named_parameters()] == [
        n for n, _ in torch_model.named_parameters()
    ]
    for batch in (4, 6):  # any batch size
        torch_model.zero_grad(), model.zero_grad()
        _assert_same_step(torch_model, model, rng.standard_normal((batch, *shape)).astype("f4"))


def test_max_pool_ties_import_with_torchs_gradients():
    layers = tnn.Sequential(tnn.AdaptiveMaxPool2d((2, 3)), tnn.Flatten(2), tnn.MaxPool1d(2))
    torch_model = _with_a_weight(layers, (2, 5, 7))
    model = gradmesh.from_torch(torch_model, torch.randn(3, 2, 5, 7))
    x = np.random.default_rng(0).integers(0, 3, (3, 2, 5, 7)).astype(np.float32)
    _assert_same_step(torch_model, model, x)


class _Tracked(tnn.Module):
    def __init__(self):
        super().__init__()
        self.conv = tnn.Conv1d(2, 3, 3)
        self.norm = tnn.InstanceNorm1d(3, affine=True, track_running_stats=True)

    def forward(self, x):
        return self.norm(self.conv(x))


def test_tracked_instance_norm_imports_in_train_and_eval_mode():
    torch.manual_seed(0)
    torch_model = _Tracked()
    model = gradmesh.from_torch(torch_model, torch.randn(4, 2, 8))
    x = np.random.default_rng(0).standard_normal((5, 2, 8)).astype(np.float32)
    _assert_same_step(torch_model, model, x)
    for key, value in torch_model.state_dict().items():
        np.testing.assert_allclose(
            model.state_dict()[key].numpy(), value.numpy(), rtol=1e-5, atol=1e-7, err_msg=key
        )
    torch_model.eval(), model.eval()
    torch_model.zero_grad(), model.zero_grad()
    _assert_same_step(torch_model, model, x + 1)
