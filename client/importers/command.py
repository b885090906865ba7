"""``gradmesh import``: an ``.onnx`` or ``.pt2`` model as a graph file and a weights file.

``gradmesh import model.onnx -o out/`` writes ``out/model.gmgraph``, the serialized
``gradmesh.v1.Graph`` message (binary protobuf) of the model followed by a standard loss,
and ``out/model.safetensors``, the initial parameters named as the graph's PARAM inputs.
A client in any language registers the graph's bytes with a worker (``RegisterGraph``)
and sends the parameters and a batch (``ComputeGradients``) without Python; the command
prints the graph id and the names, dtypes and shapes of the inputs and outputs.

The graph: DATA inputs are the model's inputs (their names in the model) and, unless
``--loss sum``, ``target``; outputs are ``loss`` first (``cross_entropy`` of the first
model output against class indices, ``mse`` against a target of the output's shape, or
``sum`` of the first output) and then every model output under its name. A dimension the
model leaves symbolic in first place is the batch (-1 in the graph: any batch size);
other symbolic dimensions need ``--input-shape NAME=D0,D1,...``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np

import gradmesh.core as gm
from gradmesh.core import graph as core_graph
from gradmesh.core.graph.ident import LOSS
from gradmesh.v1 import graph_pb2

from .errors import UnsupportedModelError

__all__ = ["ConfigError", "LOSSES", "add_arguments", "run", "import_model"]

LOSSES = ("cross_entropy", "mse", "sum")
SUFFIXES = (".onnx", ".pt2")
TARGET = "target"


class ConfigError(ValueError):
    """A bad argument (the ``gradmesh`` command exits with 2)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="an .onnx file, or a .pt2 file written by torch.export.save")
    parser.add_argument(
        "-o", "--output-dir", default=".", help="where to write NAME.gmgraph and NAME.safetensors"
    )
    parser.add_argument(
        "--loss",
        choices=LOSSES,
        default="cross_entropy",
        help="the loss the graph ends in, on the first model output (default cross_entropy)",
    )
    parser.add_argument(
        "--batch",
        type=int,
        default=5,
        help="batch size to trace at (default 5; above 1, best one that divides no other "
        "dimension of the model; the graph then takes any batch size)",
    )
    parser.add_argument(
        "--input-shape",
        action="append",
        default=[],
        metavar="NAME=D0,D1,...",
        help="the shape of an input whose dimensions the model leaves symbolic (-1 first: "
        "the batch)",
    )


def run(args: argparse.Namespace) -> int:
    try:
        written = import_model(
            args.model, args.output_dir, loss=args.loss, batch=args.batch, shapes=args.input_shape
        )
    except (UnsupportedModelError, core_graph.TraceError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for line in written:
        print(line)
    return 0


def import_model(
    model_path: str | os.PathLike,
    output_dir: str | os.PathLike = ".",
    *,
    loss: str = "cross_entropy",
    batch: int = 5,
    shapes: Sequence[str] = (),
) -> list[str]:
    """Write the graph and parameter files of ``model_path``; returns the report lines."""
    path = Path(model_path)
    if path.suffix not in SUFFIXES:
        raise ConfigError(
            f"model: {path} has the extension {path.suffix or '(none)'!r}; expected .onnx "
            f"or .pt2 (a program saved with torch.export.save)"
        )
    if not path.is_file():
        raise ConfigError(f"model: {path} does not exist")
    if loss not in LOSSES:
        raise ConfigError(f"--loss: expected one of {', '.join(LOSSES)}, got {loss!r}")
    if batch < 2:
        raise ConfigError(f"--batch: expected 2 or more (to tell the batch from a 1), got {batch}")
    fixed = _parse_shapes(shapes)
    if path.suffix == ".onnx":
        model, specs, outputs = _load_onnx(path)
    else:
        model, specs, outputs = _load_pt2(path, fixed, batch)
    examples, batched = _examples(specs, fixed, batch)
    graph = _trace(model, examples, [s[0] for s in specs], outputs, loss, batched)

    out_dir = Path(output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    graph_file = out_dir / f"{path.stem}.gmgraph"
    weights_file = out_dir / f"{path.stem}.safetensors"
    graph_file.write_bytes(graph.SerializeToString(deterministic=True))
    params = dict(model.named_parameters())
    names = [i.name for i in graph.inputs if i.role == graph_pb2.Input.PARAM]
    gm.save({n: params[n].detach() for n in names}, weights_file)
    return _report(graph, graph_file, weights_file)


def _parse_shapes(items) -> dict[str, list[int]]:
    shapes = {}
    for item in items:
        name, sep, dims = item.partition("=")
        try:
            if not sep or not name:
                raise ValueError
            shapes[name] = [int(d) for d in dims.split(",")]
        except ValueError:
            raise ConfigError(
                f"--input-shape: expected NAME=D0,D1,... (e.g. x=1,3,32,32), got {item!r}"
            ) from None
    return shapes


# Each loader returns the gradmesh module, its inputs as (name, dims, numpy dtype) with
# None for a symbolic dimension, and its output names.


def _load_onnx(path: Path):
    from .onnx import from_onnx

    try:
        import onnx
    except ImportError:
        raise ConfigError(
            f"model: {path}: importing ONNX needs pip install 'gradmesh[onnx]'"
        ) from None
    try:
        model = from_onnx(path)
    except UnsupportedModelError:
        raise
    except ValueError as e:  # not a model, an old opset: say so in one line
        raise ConfigError(f"model: {e}") from None
    proto = onnx.load(str(path), load_external_data=False)
    by_name = {i.name: i for i in proto.graph.input}
    specs = []
    for name in model.input_names:
        t = by_name[name].type.tensor_type
        dims: list | None = None  # None: not even the rank is declared
        if t.HasField("shape"):
            dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
        specs.append((name, dims, onnx.helper.tensor_dtype_to_np_dtype(t.elem_type)))
    return model, specs, list(model.output_names)


def _load_pt2(path: Path, fixed: dict, batch: int):
    try:
        import torch
        from torch.export import load as load_program
    except ImportError:
        raise ConfigError(
            f"model: {path}: importing .pt2 needs pip install 'gradmesh[torch]'"
        ) from None
    try:
        from . import torch as torch_importer
    except ImportError as e:
        raise ConfigError(f"model: {path}: gradmesh.from_torch is not available ({e})") from None
    try:
        program = load_program(str(path))
    except Exception as e:  # a corrupt or foreign archive
        raise ConfigError(f"model: {path}: not a torch.export program ({e})") from None
    module = program.module()
    # from_torch exports the module in training and in eval mode; a saved program holds
    # the graph of one mode, which its module cannot switch: keep that one.
    module.train = lambda mode=True: module  # type: ignore[method-assign]
    placeholders = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    specs = []
    for name in program.graph_signature.user_inputs:
        val = placeholders[name].meta["val"]
        dims = [d if isinstance(d, int) else None for d in val.shape]
        specs.append((name, dims, torch.empty((), dtype=val.dtype).numpy().dtype))
    examples, batched = _examples(specs, fixed, batch)
    model = torch_importer.from_torch(
        module, *(torch.from_numpy(e) for e in examples), dynamic_batch=batched
    )
    outputs = [f"output{i}" for i in range(len(program.graph_signature.user_outputs))]
    return model, specs, outputs if len(outputs) > 1 else ["output"]


def _examples(specs, fixed: dict, batch: int) -> tuple[list[np.ndarray], bool]:
    """Zero inputs of the model's shapes; whether the first dimension is a batch."""
    unknown = set(fixed) - {s[0] for s in specs}
    if unknown:
        raise ConfigError(
            f"--input-shape: no input {sorted(unknown)[0]!r}; the inputs are "
            f"{[s[0] for s in specs]}"
        )
    examples, batched = [], bool(specs)
    for name, dims, dtype in specs:
        if name in fixed:
            dims = _given_shape(name, fixed[name], dims)
        elif dims is None:
            raise ConfigError(
                f"input {name!r} has no declared shape; give it with --input-shape "
                f"{name}=D0,D1,... (-1 first for the batch)"
            )
        if dims and dims[0] is None:
            dims = [batch] + dims[1:]
        else:
            batched = False
        if None in dims:
            raise ConfigError(
                f"input {name!r} has a symbolic dimension other than the batch "
                f"({['?' if d is None else d for d in dims]}); give its shape with "
                f"--input-shape {name}=D0,D1,... (-1 first for the batch)"
            )
        examples.append(np.zeros(dims, dtype))
    return examples, batched


def _given_shape(name: str, given: list[int], declared: list | None) -> list:
    """An --input-shape checked against what the model declares; -1 first is the batch
    (None, as a symbolic dimension)."""
    dims = [None if d == -1 and i == 0 else d for i, d in enumerate(given)]
    if any(d is not None and d < 0 for d in dims):
        raise ConfigError(
            f"--input-shape {name}: dimensions are sizes, and -1 (the batch) only comes "
            f"first; got {given}"
        )
    if declared is not None and (
        len(declared) != len(dims)
        or any(d is not None and g is not None and d != g for d, g in zip(declared, dims))
    ):
        shown = ["?" if d is None else d for d in declared]
        raise ConfigError(f"--input-shape {name}: the model declares {shown}, got {given}")
    return dims


def _trace(model, examples, names, outputs, loss: str, batched: bool) -> graph_pb2.Graph:
    if LOSS in outputs or TARGET in names:
        raise ConfigError(f"the model uses the reserved name 'loss' or {TARGET!r}")
    try:
        with gm.no_grad():
            first = model(*[gm.tensor(e) for e in examples])
    except gm.OpError as e:
        shapes = {n: list(e.shape) for n, e in zip(names, examples)}
        raise ConfigError(
            f"the model does not run on inputs of shapes {shapes} (give them with "
            f"--input-shape NAME=D0,D1,...): {e}"
        ) from None
    first = first[0] if isinstance(first, tuple) else first
    target = _target(loss, tuple(first.shape), first.dtype.np)
    data = examples + ([target] if target is not None else [])
    data_names = names + ([TARGET] if target is not None else [])

    def fn(model, *data):
        inputs, y = (data[:-1], data[-1]) if target is not None else (data, None)
        outs = model(*inputs)
        outs = outs if isinstance(outs, tuple) else (outs,)
        return _loss(loss, outs[0], y), dict(zip(outputs, outs))

    return core_graph.trace(fn, model, *data, data_names=data_names, batch_dim=batched)


def _target(loss: str, shape: tuple, dtype) -> np.ndarray | None:
    if loss == "cross_entropy":
        return np.zeros(shape[:1] + shape[2:], np.int64)  # class indices
    if loss == "mse":
        return np.zeros(shape, dtype)
    return None


def _loss(loss: str, out, target) -> Any:
    if loss == "cross_entropy":
        return gm.nn.functional.cross_entropy(out, target)
    if loss == "mse":
        return gm.nn.functional.mse_loss(out, target)
    return out.sum()


def _report(graph: graph_pb2.Graph, graph_file: Path, weights_file: Path) -> list[str]:
    from gradmesh.v1 import tensor_pb2

    def dtype(code: int) -> str:
        return tensor_pb2.DType.Name(code).lower()

    lines = [
        f"graph id: {core_graph.graph_id(graph)}",
        f"graph: {graph_file}",
        f"parameters: {weights_file}",
    ]
    for i in graph.inputs:
        if i.role == graph_pb2.Input.DATA:
            lines.append(f"input {i.name}: {dtype(i.dtype)} {list(i.shape)}")
    lines.extend(f"output {o.name}" for o in graph.outputs)
    return lines
