"""gradmesh.from_onnx: models exported by torch.onnx.export import with torch's gradients,
run on a worker bitwise as locally, and refuse what the registry cannot express."""

from __future__ import annotations

import copy
import io
import re
import warnings

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

import gradmesh
import gradmesh.core as gm
from gradmesh.client import WorkerClient
from gradmesh.client.importers import UnsupportedModelError
from gradmesh.core.graph import execute, trace

F = gm.nn.functional


def export(model: torch.nn.Module, x: torch.Tensor, opset: int = 17) -> bytes:
    """The model as ONNX bytes, batch dimension dynamic (the TorchScript exporter: the
    dynamo one gives the same ops for these models but takes seconds per export)."""
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (x,),
            buf,
            dynamo=False,
            opset_version=opset,
            do_constant_folding=False,  # keeps BatchNormalization a node of its own
            input_names=["x"],
            output_names=["logits"],
            dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}},
        )
    return buf.getvalue()


def mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 16), torch.nn.GELU(),
        torch.nn.Linear(16, 8), torch.nn.GELU(approximate="tanh"), torch.nn.Linear(8, 4),
    )  # fmt: skip


def cnn() -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
        torch.nn.MaxPool2d(2), torch.nn.Conv2d(4, 6, 3), torch.nn.Sigmoid(),
        torch.nn.AvgPool2d(2), torch.nn.Flatten(), torch.nn.Linear(6, 4),
    )  # fmt: skip
    with torch.no_grad():  # running statistics that are not the identity
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 2.0)
    return model.eval()


CASES = {"mlp": (mlp, (7, 6)), "cnn": (cnn, (7, 1, 8, 8))}


def data(shape, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal(shape).astype(np.float32), rng.integers(0, 4, shape[0])


def loss_fn(model, x, y):
    return F.cross_entropy(model(x), y)


def gm_gradients(model, x, y):
    model.zero_grad()
    loss = loss_fn(model, gm.tensor(x), gm.tensor(y))
    loss.backward()
    return loss.item(), {n: p.grad.numpy().copy() for n, p in model.named_parameters()}


@pytest.mark.parametrize("case", sorted(CASES))
def test_loss_and_every_gradient_equal_torch_backward(case):
    make, shape = CASES[case]
    theirs = make()
    x, y = data(shape)
    exported = export(theirs, torch.from_numpy(x))
    if case == "mlp":  # at opset 17 the GELU is written out with Erf; it imports as gelu
        assert "Erf" in {n.op_type for n in onnx.load_from_string(exported).graph.node}
    model = gradmesh.from_onnx(exported)
    assert set(model.state_dict()) == set(theirs.state_dict()) - {"1.num_batches_tracked"}
    buffers = {"cnn": {"1.running_mean", "1.running_var"}, "mlp": set()}[case]
    assert {n for n, _ in model.named_buffers()} == buffers

    loss, grads = gm_gradients(model, x, y)
    torch_loss = torch.nn.functional.cross_entropy(theirs(torch.from_numpy(x)), torch.from_numpy(y))
    torch_loss.backward()
    np.testing.assert_allclose(loss, torch_loss.item(), rtol=1e-5)
    want = {n: p.grad.numpy() for n, p in theirs.named_parameters()}
    assert set(grads) == set(want)
    for name, g in grads.items():
        scale = np.abs(want[name]).max()
        np.testing.assert_allclose(g, want[name], rtol=1e-5, atol=1e-6 * scale, err_msg=name)


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_worker_computes_the_local_gradients_bitwise(case, worker):
    make, shape = CASES[case]
    x, y = data(shape, seed=1)
    model = gradmesh.from_onnx(export(make(), torch.from_numpy(x[:3])))
    loss, grads = gm_gradients(model, x, y)
    with WorkerClient(worker.address) as client:
        result = client.compute_gradients(loss_fn, model, x, y)
    assert np.array_equal(result.loss, np.float32(loss))
    assert set(result.gradients) == set(grads)
    for name, g in grads.items():
        assert np.array_equal(result.gradients[name], g), name


def test_trained_weights_map_back_to_the_onnx_initializers():
    x, y = data((8, 3))
    w = np.random.default_rng(2).standard_normal((3, 4)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "dense/kernel:0"], ["h"], name="matmul"),
            helper.make_node("Add", ["h", "0.bias"], ["logits"], name="add"),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 4])],
        [numpy_helper.from_array(w, "dense/kernel:0"), numpy_helper.from_array(w[0], "0.bias")],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model = gradmesh.from_onnx(proto.SerializeToString())
    assert model.onnx_names == {"dense_kernel_0": "dense/kernel:0", "0.bias": "0.bias"}
    twin = copy.deepcopy(model)  # as training loops and jobs copy models
    assert np.array_equal(twin(x).detach().numpy(), model(x).detach().numpy())

    opt = gm.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(3):
        opt.zero_grad()
        loss_fn(model, gm.tensor(x), gm.tensor(y)).backward()
        opt.step()
    trained = {model.onnx_names[k]: v.numpy() for k, v in model.state_dict().items()}
    for init in proto.graph.initializer:
        init.CopyFrom(numpy_helper.from_array(trained[init.name], init.name))
    want = ReferenceEvaluator(proto).run(None, {"x": x})[0]
    got = model(gm.tensor(x)).detach().numpy()
    assert not np.allclose(trained["dense/kernel:0"], w)  # training moved the weights
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_every_unsupported_op_is_listed_once_with_its_node():
    graph = helper.make_graph(
        [
            helper.make_node("Relu", ["x"], ["a"], name="fine"),
            helper.make_node("Det", ["a"], ["b"], name="the_det"),
            helper.make_node("Frobnicate", ["b"], ["c"], name="custom", domain="com.example"),
            helper.make_node("MaxPool", ["c"], ["y", "where"], name="pool", kernel_shape=[2] * 3),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [])],
    )
    proto = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)]
    )
    with pytest.raises(UnsupportedModelError) as info:
        gradmesh.from_onnx(proto.SerializeToString())
    found = [(u.op, u.where) for u in info.value.unsupported]
    assert found == [("Det", "the_det"), ("com.example.Frobnicate", "custom"), ("MaxPool", "pool")]
    text = str(info.value)
    assert "3 unsupported op(s)" in text and "Det at the_det" in text
    assert "MaxPool at pool: a 3-D kernel" in text
    assert "com.example.Frobnicate at custom" in text and "docs/import.md" in text


def test_an_opset_before_17_is_refused_with_the_fix():
    x = torch.randn(2, 6)
    with pytest.raises(ValueError, match=r"opset 13; gradmesh imports ONNX opset 17 or later"):
        gradmesh.from_onnx(export(mlp(), x, opset=13))


def test_an_unreadable_file_says_what_is_wrong(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.onnx"):
        gradmesh.from_onnx(tmp_path / "missing.onnx")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x00\x01not a model")
    with pytest.raises(ValueError, match="bad.onnx: not an ONNX model"):
        gradmesh.from_onnx(bad)


def test_the_docs_table_is_the_code_table_and_names_registry_ops():
    from pathlib import Path

    from gradmesh.client.importers.onnx import OP_TABLE
    from gradmesh.core.registry import REGISTRY

    page = (Path(__file__).parents[2] / "docs" / "import.md").read_text()
    section = page.split("### The ONNX ops and what they become", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `(\w+)` \| ([^|]+) \|$", section, re.M)
    assert dict((op, ops.strip()) for op, ops in rows) == {
        op: ops for op, (_, ops) in OP_TABLE.items()
    }
    for op, (_, ops) in OP_TABLE.items():
        named = re.sub(r"\([^)]*\)", "", ops).replace(",", " ").split()
        assert all(n in REGISTRY for n in named), (op, ops)


def _shape_subgraph_model() -> onnx.ModelProto:
    """x [batch, 6] -> reshape to [shape(x)[0], 2, 3] computed by Shape -> Gather ->
    Unsqueeze -> Concat, as exporters write x.view(x.size(0), 2, 3); then softmax(x @ w)."""
    i64 = lambda name, v: numpy_helper.from_array(np.array(v, np.int64), name)  # noqa: E731
    w = np.random.default_rng(4).standard_normal((3, 3)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Shape", ["x"], ["shape"]),
            helper.make_node("Gather", ["shape", "zero"], ["batch"], axis=0),
            helper.make_node("Unsqueeze", ["batch", "axes0"], ["batch1"]),
            helper.make_node("Concat", ["batch1", "rest"], ["target"], axis=0),
            helper.make_node("Reshape", ["x", "target"], ["r"]),
            helper.make_node("MatMul", ["r", "w"], ["h"]),
            helper.make_node("Softmax", ["h"], ["y"], axis=-1),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 2, 3])],
        [i64("zero", 0), i64("axes0", [0]), i64("rest", [2, 3]), numpy_helper.from_array(w, "w")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_shapes_computed_from_shapes_keep_the_batch_free():
    proto = _shape_subgraph_model()
    model = gradmesh.from_onnx(proto.SerializeToString())
    x2, x5 = (np.random.default_rng(5).standard_normal((b, 6)).astype(np.float32) for b in (2, 5))
    graph = trace(lambda m, x: m(x).sum(), model, gm.tensor(x2))
    assert [n.op for n in graph.nodes][:3] == ["reshape", "matmul", "softmax"]
    assert list(graph.inputs[-1].shape) == [-1, 6]
    want = ReferenceEvaluator(proto).run(None, {"x": x5})[0]
    np.testing.assert_allclose(model(x5).detach().numpy(), want, rtol=1e-6, atol=1e-7)
    run = execute(graph, dict(model.named_parameters()), {"x0": x5})
    np.testing.assert_allclose(run["loss"].item(), want.sum(), rtol=1e-6)


@pytest.mark.slow
def test_a_transformer_block_from_the_dynamo_exporter_runs_at_any_batch_size():
    torch.manual_seed(0)
    block = torch.nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True).eval()
    x = torch.randn(4, 3, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            block, (x,), dynamo=True, dynamic_shapes=({0: torch.export.Dim("batch")},)
        )
    proto = program.model_proto
    ops = {n.op_type for n in proto.graph.node}
    assert {"Shape", "Slice", "Concat", "Reshape", "LayerNormalization", "Softmax"} <= ops
    model = gradmesh.from_onnx(proto.SerializeToString())
    graph = trace(lambda m, x: (m(x) ** 2).mean(), model, gm.tensor(x.numpy()))
    for batch in (2, 7):
        xb = torch.randn(batch, 3, 8)
        want = block(xb)
        got = model(xb.numpy())
        np.testing.assert_allclose(got.detach().numpy(), want.detach().numpy(), atol=2e-5)
        run = execute(graph, dict(model.named_parameters()), {"x0": xb.numpy()})
        np.testing.assert_allclose(run["loss"].item(), (want**2).mean().item(), rtol=1e-5)


def test_an_imported_model_trains_as_a_coordinator_job_like_locally(worker):
    from gradmesh.client.coordinator import CoordinatorClient
    from gradmesh.server import coordinator as coordinator_mod

    x, y = data((8, 1, 8, 8), seed=6)
    exported = export(cnn(), torch.from_numpy(x[:2]))
    local, remote = gradmesh.from_onnx(exported), gradmesh.from_onnx(exported)
    opt = gm.optim.SGD(local.parameters(), lr=0.1)
    server = coordinator_mod.start(workers=[worker.address])
    try:
        with CoordinatorClient(server.address, retry_seconds=0.0) as client:
            sgd = {"name": "sgd", "lr": 0.1}
            job = client.create_job(remote, loss_fn, sgd, 8, (x, y), data_names=["x", "y"])
            for _ in range(2):  # one micro-batch of the whole batch: exactly a local step
                job.step(x, y)
                opt.zero_grad()
                loss_fn(local, gm.tensor(x), gm.tensor(y)).backward()
                opt.step()
            trained = {n: t.numpy() for n, t in job.parameters().items()}
    finally:
        server.stop(0)
        server.coordinator.close()
    assert set(trained) == {n for n, _ in local.named_parameters()}
    for name, p in local.named_parameters():
        assert np.array_equal(trained[name], p.detach().numpy()), name


def _i64(*v):
    return np.array(v, np.int64)


_R = np.random.default_rng(7)
_X = _R.standard_normal((2, 3, 5, 5)).astype(np.float32)
_V = _R.standard_normal((2, 3, 4)).astype(np.float32)
_W = _R.standard_normal((4, 3, 3, 3)).astype(np.float32)
# (op, data inputs, constant inputs (initializers, "" for an absent optional), attributes)
NODE_CASES = [
    ("Conv", [_X], [_R.standard_normal((4, 3, 3, 2)).astype(np.float32)], {"pads": [0, 1, 1, 0]}),
    (
        "Conv",
        [_X],
        [_R.standard_normal((2, 3, 2, 2)).astype(np.float32)],
        {"auto_pad": "SAME_UPPER", "strides": [2, 2]},
    ),
    ("MaxPool", [_X], [], {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]}),
    (
        "AveragePool",
        [_X],
        [],
        {"kernel_shape": [2, 2], "pads": [1, 1, 1, 1], "count_include_pad": 0},
    ),
    ("GlobalAveragePool", [_X], [], {}),
    ("Clip", [_V], [np.float32(-0.5), np.float32(0.5)], {}),  # bounds that are parameters
    ("Slice", [_V], [_i64(0, 3), _i64(-5, -1), _i64(2, 1), _i64(-1, 2)], {}),
    ("Where", [_V > 0, _V], [np.float32(0.0)], {}),
    ("Expand", [_V[:, :1]], [_i64(2, 5, 4)], {}),
    ("Slice", [_V], [_i64(1, -1), _i64(2**62, 0), _i64(1, 2), _i64(1, -1)], {}),
    ("Transpose", [_V], [], {"perm": [2, 0, 1]}),
    ("Flatten", [_X], [], {"axis": 2}),
    ("ReduceSum", [_V], [_i64(-1)], {"keepdims": 0}),
    ("ReduceMean", [_V], [_i64(1)], {}),
    ("LogSoftmax", [_V], [], {"axis": 1}),
    ("Pow", [np.abs(_V)], [np.float32(1.5)], {}),
    ("Gather", [_V], [_i64(2, 0)], {"axis": 2}),
    ("LayerNormalization", [_V], [np.ones(4, np.float32) * 2, np.full(4, 0.5, np.float32)], {}),
    ("Gemm", [_V[0]], [_R.standard_normal((4, 2)).astype(np.float32)], {"alpha": 0.5}),
    ("LeakyRelu", [_V], [], {"alpha": 0.2}),
    ("Squeeze", [_V[:, :1]], [_i64(1)], {}),
    ("Unsqueeze", [_V], [_i64(0, -1)], {}),
]


@pytest.mark.parametrize("op, data_in, const_in, attrs", NODE_CASES, ids=[c[0] for c in NODE_CASES])
def test_single_nodes_compute_what_the_onnx_reference_computes(op, data_in, const_in, attrs):
    names = [f"d{i}" for i in range(len(data_in))] + [f"c{i}" for i in range(len(const_in))]
    dtypes = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(bool): TensorProto.BOOL}
    graph = helper.make_graph(
        [helper.make_node(op, names, ["y"], **attrs)],
        "g",
        [
            helper.make_tensor_value_info(n, dtypes[a.dtype], a.shape)
            for n, a in zip(names, data_in)
        ],
        [helper.make_empty_tensor_value_info("y")],
        [
            numpy_helper.from_array(np.asarray(a), n)
            for n, a in zip(names[len(data_in) :], const_in)
        ],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    want = ReferenceEvaluator(proto).run(None, dict(zip(names, data_in)))[0]
    got = gradmesh.from_onnx(proto.SerializeToString())(*data_in).detach().numpy()
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


class _Bag(torch.nn.Module):
    """Token ids -> embedding (ONNX Gather by computed indices) -> mean -> linear."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(10, 4)
        self.head = torch.nn.Linear(4, 3)

    def forward(self, ids):
        return self.head(self.embed(ids).mean(1))


def test_token_ids_through_an_embedding_give_torch_gradients():
    torch.manual_seed(0)
    theirs = _Bag()
    ids = np.random.default_rng(8).integers(0, 10, (6, 5))
    y = np.arange(6) % 3
    proto = onnx.load_from_string(export(theirs, torch.from_numpy(ids)))
    assert {"Gather", "ReduceMean"} <= {n.op_type for n in proto.graph.node}
    model = gradmesh.from_onnx(proto.SerializeToString())
    loss, grads = gm_gradients(model, ids, y)
    torch.nn.functional.cross_entropy(theirs(torch.from_numpy(ids)), torch.from_numpy(y)).backward()
    for name, p in theirs.named_parameters():
        np.testing.assert_allclose(grads[name], p.grad.numpy(), rtol=1e-5, atol=1e-7, err_msg=name)


@pytest.mark.gpu
def test_an_imported_model_moved_to_cuda_computes_the_cpu_gradients():
    if not gm.cuda_available():
        pytest.skip("needs CuPy and a CUDA device")
    x, y = data((7, 1, 8, 8), seed=9)
    exported = export(cnn(), torch.from_numpy(x))
    cpu, cuda = gradmesh.from_onnx(exported), gradmesh.from_onnx(exported).to("cuda")
    loss, grads = gm_gradients(cpu, x, y)
    cuda_loss = loss_fn(cuda, gm.tensor(x, device="cuda"), gm.tensor(y, device="cuda"))
    cuda_loss.backward()
    np.testing.assert_allclose(cuda_loss.item(), loss, rtol=1e-5)
    for name, p in cuda.named_parameters():
        scale = np.abs(grads[name]).max()
        np.testing.assert_allclose(p.grad.cpu().numpy(), grads[name], rtol=1e-4, atol=1e-5 * scale)
    buf = io.BytesIO()  # gm.save of CUDA tensors, loaded back onto the GPU
    gm.save(cuda.state_dict(), buf)
    loaded = gm.load(io.BytesIO(buf.getvalue()), map_location="cuda")
    for name, t in cuda.state_dict().items():
        assert str(loaded[name].device).startswith("cuda") and np.array_equal(
            loaded[name].cpu().numpy(), t.detach().cpu().numpy()
        )


def test_reshaping_a_parameter_is_not_mistaken_for_the_batch():
    """A weight reshaped to [2, 4, 6] (2 is the trace's batch size, too) keeps its shape."""
    w = np.random.default_rng(10).standard_normal((8, 6)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Reshape", ["w", "shape"], ["r"]),
            helper.make_node("ReduceSum", ["r", "axes"], ["s"], keepdims=0),
            helper.make_node("MatMul", ["x", "s"], ["y"]),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 6])],
        [
            numpy_helper.from_array(w, "w"),
            numpy_helper.from_array(np.array([2, 4, 6], np.int64), "shape"),
            numpy_helper.from_array(np.array([0], np.int64), "axes"),
        ],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model = gradmesh.from_onnx(proto.SerializeToString())
    x2, x5 = (np.random.default_rng(11).standard_normal((b, 4)).astype(np.float32) for b in (2, 5))
    traced = trace(lambda m, x: m(x).sum(), model, gm.tensor(x2))
    want = ReferenceEvaluator(proto).run(None, {"x": x5})[0]
    run = execute(traced, dict(model.named_parameters()), {"x0": x5})
    np.testing.assert_allclose(run["loss"].item(), want.sum(), rtol=1e-5)


# ---- activations: elu family, hardsigmoid, prelu, softsign, shrink, erf, split ----

ACTIVATION_CASES = [
    ("Elu", [_V], [], {"alpha": 0.5}),
    ("Celu", [_V], [], {"alpha": 2.0}),
    ("Selu", [_V], [], {}),
    ("Selu", [_V], [], {"alpha": 1.5, "gamma": 0.9}),
    ("HardSigmoid", [_V * 4], [], {"alpha": 0.3, "beta": 0.4}),
    ("HardSigmoid", [_V * 4], [], {}),
    ("PRelu", [_V], [_R.standard_normal(4).astype(np.float32)], {}),  # one slope per column
    ("PRelu", [_V], [np.float32([0.2])], {}),
    ("Softsign", [_V], [], {}),
    ("Shrink", [_V], [], {"lambd": 0.4, "bias": 0.3}),
    ("Shrink", [_V], [], {}),
    ("ThresholdedRelu", [_V], [], {"alpha": 0.3}),
    ("Erf", [_V], [], {}),
    ("Split", [_V], [_i64(1, 3)], {"axis": -1}),  # the first piece: y
]


@pytest.mark.parametrize(
    "op, data_in, const_in, attrs", ACTIVATION_CASES, ids=[c[0] for c in ACTIVATION_CASES]
)
def test_activation_nodes_compute_what_the_onnx_reference_computes(op, data_in, const_in, attrs):
    test_single_nodes_compute_what_the_onnx_reference_computes(op, data_in, const_in, attrs)


def test_split_gives_every_piece():
    for split in ([_i64(1, 3)], []):
        inputs = ["x", "sizes"] if split else ["x"]
        node = helper.make_node("Split", inputs, ["a", "b"], axis=2)
        graph = helper.make_graph(
            [node],
            "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, _V.shape)],
            [helper.make_empty_tensor_value_info(n) for n in ("a", "b")],
            [numpy_helper.from_array(s, "sizes") for s in split],
        )
        proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        want = ReferenceEvaluator(proto).run(None, {"x": _V})
        got = gradmesh.from_onnx(proto.SerializeToString())(_V)
        assert len(got) == 2
        for g, w in zip(got, want):
            np.testing.assert_array_equal(g.detach().numpy(), w)


class _Activations(torch.nn.Module):
    """Every activation module that torch.onnx exports (Threshold it refuses), side by side."""

    def __init__(self):
        super().__init__()
        self.lin, self.head = torch.nn.Linear(6, 8), torch.nn.Linear(4, 4)
        self.prelu, self.prelu_c = torch.nn.PReLU(), torch.nn.PReLU(8, 0.1)
        # Softplus keeps its default threshold: ONNX's has none, and torch's exporter drops it.
        self.acts = torch.nn.ModuleList([
            torch.nn.ELU(0.7), torch.nn.SELU(), torch.nn.CELU(1.5), torch.nn.Hardtanh(-0.5, 0.8),
            torch.nn.ReLU6(), torch.nn.Hardsigmoid(), torch.nn.LogSigmoid(), torch.nn.Softsign(),
            torch.nn.Tanhshrink(), torch.nn.Hardshrink(0.3), torch.nn.Softshrink(0.2),
            torch.nn.Softmin(1), torch.nn.Softplus(2.0),
        ])  # fmt: skip
        self.glu = torch.nn.GLU()

    def forward(self, x):
        h = self.prelu_c(self.prelu(self.lin(x) * 3))
        return self.head(self.glu(sum(act(h) for act in self.acts) + torch.erf(h)))


def activations() -> torch.nn.Module:
    torch.manual_seed(0)
    return _Activations()


def test_activation_modules_export_and_import_with_torchs_gradients():
    theirs = activations()
    x, y = data((7, 6))
    exported = export(theirs, torch.from_numpy(x))
    ops = {n.op_type for n in onnx.load_from_string(exported).graph.node}
    assert {"Elu", "Selu", "Celu", "HardSigmoid", "PRelu", "Split"} <= ops
    model = gradmesh.from_onnx(exported)
    loss, grads = gm_gradients(model, x, y)
    torch_loss = torch.nn.functional.cross_entropy(theirs(torch.from_numpy(x)), torch.from_numpy(y))
    torch_loss.backward()
    np.testing.assert_allclose(loss, torch_loss.item(), rtol=1e-5)
    want = {n: p.grad.numpy() for n, p in theirs.named_parameters()}
    assert set(grads) == set(want)
    for name, g in grads.items():
        scale = np.abs(want[name]).max()
        np.testing.assert_allclose(g, want[name], rtol=1e-5, atol=1e-6 * scale, err_msg=name)
