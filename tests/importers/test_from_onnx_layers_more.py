"""``gradmesh.from_onnx`` of the padding, pixel-shuffle, 1-d pooling and instance-norm
layers as torch.onnx.export writes them (Pad, DepthToSpace, 1-d MaxPool/AveragePool,
InstanceNormalization, Mod in a shape computation): outputs and gradients equal torch's."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
import torch.nn as tnn
from onnx import helper
from test_from_onnx import export
from test_from_torch_layers_more import _assert_same_step, _with_a_weight

import gradmesh
import gradmesh.core as gm

LAYERS = {
    "unflatten": (lambda: tnn.Sequential(tnn.Flatten(), tnn.Unflatten(1, (2, -1))), (3, 4)),
    "zero_pad2d": (lambda: tnn.ZeroPad2d((1, 2, 0, 1)), (2, 3, 5)),
    "constant_pad1d": (lambda: tnn.ConstantPad1d(2, 1.5), (3, 5)),
    "reflection_pad1d": (lambda: tnn.ReflectionPad1d((2, 1)), (3, 5)),
    "reflection_pad2d": (lambda: tnn.ReflectionPad2d(1), (2, 3, 5)),
    "replication_pad2d": (lambda: tnn.ReplicationPad2d((1, 0, 2, 1)), (2, 3, 5)),
    "pixel_shuffle": (lambda: tnn.PixelShuffle(2), (8, 3, 5)),
    "pixel_unshuffle": (lambda: tnn.PixelUnshuffle(2), (2, 4, 6)),
    "max_pool1d": (lambda: tnn.MaxPool1d(3, 2, 1), (3, 9)),
    "avg_pool1d": (lambda: tnn.AvgPool1d(3, 2, 1, count_include_pad=False), (3, 9)),
    "adaptive_avg_pool1d": (lambda: tnn.AdaptiveAvgPool1d(4), (3, 12)),
    "adaptive_max_pool1d": (lambda: tnn.AdaptiveMaxPool1d(4), (3, 12)),
    "adaptive_max_pool2d": (lambda: tnn.AdaptiveMaxPool2d((3, 4)), (3, 6, 8)),
    "instance_norm2d_affine": (lambda: tnn.InstanceNorm2d(3, affine=True), (3, 5, 6)),
}


@pytest.mark.parametrize("name", list(LAYERS))
def test_layer_imports_from_onnx_with_torchs_outputs_and_gradients(name):
    factory, shape = LAYERS[name]
    torch.manual_seed(0)
    torch_model = _with_a_weight(factory(), shape).eval()
    rng = np.random.default_rng(0)
    model = gradmesh.from_onnx(export(torch_model, torch.randn(4, *shape)))
    for batch in (4, 6):  # any batch size
        torch_model.zero_grad(), model.zero_grad()
        _assert_same_step(torch_model, model, rng.standard_normal((batch, *shape)).astype("f4"))


def test_depth_to_space_in_dcr_mode_is_onnxs():
    graph = helper.make_graph(
        [helper.make_node("DepthToSpace", ["x"], ["y"], blocksize=2, mode="DCR")],
        "d2s",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", 8, 2, 3])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", 2, 4, 6])],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = np.arange(2 * 8 * 2 * 3, dtype=np.float32).reshape(2, 8, 2, 3)
    # ONNX's definition of DCR: depth split as (blocksize, blocksize, C / blocksize²).
    want = x.reshape(2, 2, 2, 2, 2, 3).transpose(0, 3, 4, 1, 5, 2).reshape(2, 2, 4, 6)
    got = gradmesh.from_onnx(proto.SerializeToString())(gm.tensor(x))
    np.testing.assert_array_equal(got.numpy(), want)
