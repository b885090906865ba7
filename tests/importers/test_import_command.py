"""``gradmesh import``: a model file becomes a graph file and a safetensors file that a
client without the SDK registers and runs on a worker with raw gRPC."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import safetensors.numpy
import torch
from onnx import TensorProto, helper
from test_from_onnx import data, export, gm_gradients, mlp

import gradmesh
from gradmesh.cli import main
from gradmesh.v1 import graph_pb2, tensor_pb2, worker_pb2, worker_pb2_grpc

DTYPES = {np.dtype(np.float32): tensor_pb2.FLOAT32, np.dtype(np.int64): tensor_pb2.INT64}


def named(name: str, array: np.ndarray) -> tensor_pb2.NamedTensor:
    # Little-endian C-order bytes: what a client in any language sends.
    array = np.ascontiguousarray(array)
    return tensor_pb2.NamedTensor(
        name=name,
        tensor=tensor_pb2.Tensor(
            dtype=DTYPES[array.dtype],
            shape=array.shape,
            data=array.astype(array.dtype.newbyteorder("<")).tobytes(),
        ),
    )


def array_of(t: tensor_pb2.Tensor) -> np.ndarray:
    assert t.dtype == tensor_pb2.FLOAT32
    return np.frombuffer(t.data, "<f4").reshape(tuple(t.shape))


def test_the_files_run_on_a_worker_through_raw_grpc(tmp_path, capsys, worker):
    x, y = data((7, 6), seed=3)
    model_file = tmp_path / "net.onnx"
    model_file.write_bytes(export(mlp(), torch.from_numpy(x[:2])))
    assert main(["import", str(model_file), "-o", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert "input x: float32 [-1, 6]" in printed and "input target: int64 [-1]" in printed
    assert printed[-2:] == ["output loss", "output logits"]

    graph = graph_pb2.Graph.FromString((tmp_path / "out" / "net.gmgraph").read_bytes())
    params = safetensors.numpy.load_file(str(tmp_path / "out" / "net.safetensors"))
    assert set(params) == {i.name for i in graph.inputs if i.role == graph_pb2.Input.PARAM}
    with grpc.insecure_channel(worker.address) as channel:
        stub = worker_pb2_grpc.WorkerStub(channel)
        graph_id = stub.RegisterGraph(worker_pb2.RegisterGraphRequest(graph=graph)).graph_id
        assert f"graph id: {graph_id}" in printed
        reply = stub.ComputeGradients(
            worker_pb2.ComputeGradientsRequest(
                graph_id=graph_id,
                parameters=[named(n, a) for n, a in params.items()],
                data=[named("x", x), named("target", y)],
            )
        )
    loss, grads = gm_gradients(gradmesh.from_onnx(model_file), x, y)
    assert array_of(reply.loss) == np.float32(loss)
    assert {g.name for g in reply.gradients} == set(grads)
    for g in reply.gradients:
        assert np.array_equal(array_of(g.tensor), grads[g.name]), g.name


def test_bad_arguments_exit_2_and_unsupported_models_exit_1(tmp_path, capsys):
    assert main(["import", str(tmp_path / "missing.onnx")]) == 2
    assert "missing.onnx does not exist" in capsys.readouterr().err
    (tmp_path / "model.h5").write_bytes(b"")
    assert main(["import", str(tmp_path / "model.h5")]) == 2
    assert "expected .onnx or .pt2" in capsys.readouterr().err

    graph = helper.make_graph(
        [
            helper.make_node("Det", ["x"], ["y"], name="det"),
            helper.make_node("Round", ["y"], ["z"]),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 2, 2])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["batch"])],
    )
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()
    )
    assert main(["import", str(bad), "-o", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "2 unsupported op(s)" in err and "Det at det" in err and "Round at z" in err
    assert not (tmp_path / "bad.gmgraph").exists()


def test_a_torch_export_program_imports_through_from_torch(tmp_path, capsys):
    pytest.importorskip("gradmesh.client.importers.torch")
    theirs = mlp()
    x = torch.randn(5, 6)
    program = torch.export.export(theirs, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, str(tmp_path / "net.pt2"))
    assert main(["import", str(tmp_path / "net.pt2"), "-o", str(tmp_path), "--loss", "mse"]) == 0
    assert "input target: float32 [-1, 4]" in capsys.readouterr().out
    params = safetensors.numpy.load_file(str(tmp_path / "net.safetensors"))
    for name, p in theirs.named_parameters():
        assert np.array_equal(params[name], p.detach().numpy()), name


def test_a_symbolic_dimension_other_than_the_batch_needs_input_shape(tmp_path, capsys):
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "features"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "features"])],
    )
    path = tmp_path / "relu.onnx"
    path.write_bytes(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()
    )
    args = ["import", str(path), "-o", str(tmp_path), "--loss", "sum"]
    assert main(args) == 2
    assert "--input-shape x=D0,D1,..." in capsys.readouterr().err
    assert main(args + ["--input-shape", "x=3"]) == 2  # a rank the graph does not have
    assert "the model declares ['?', '?'], got [3]" in capsys.readouterr().err
    assert main(args + ["--input-shape", "x=-1,5"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "input x: float32 [-1, 5]" in out and out[-2:] == ["output loss", "output y"]
