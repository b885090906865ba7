"""Tracing, graph ids, validation and the reference executor (gradmesh.core.graph)."""

from __future__ import annotations

import hashlib
import threading

import numpy as np
import pytest

import gradmesh.core as gm
import gradmesh.core.nn.functional as F
from gradmesh.core import nn
from gradmesh.core.graph import (
    GraphError,
    Limits,
    TraceError,
    execute,
    graph_id,
    random_seed,
    trace,
    validate,
)
from gradmesh.core.registry import REGISTRY
from gradmesh.core.serialize import to_proto
from gradmesh.v1 import graph_pb2, tensor_pb2

PARAM, DATA, CONST = graph_pb2.Input.PARAM, graph_pb2.Input.DATA, graph_pb2.Input.CONST


def mlp(seed: int = 0, approximate: str = "none"):
    gm.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.GELU(approximate), nn.Linear(16, 3))


def mlp_loss(model, x, y):
    logits = model(x)
    return F.cross_entropy(logits, y), {"logits": logits}


def batch(n: int, seed: int = 1):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, 3, 4)).astype(np.float32), rng.integers(0, 3, n)


def traced_mlp(**kw):
    model = mlp(**kw)
    x, y = batch(8)
    return model, trace(mlp_loss, model, x, y, data_names=["x", "y"])


# ---------------------------------------------------------------------------------------
# Tracing
# ---------------------------------------------------------------------------------------


def test_trace_mlp_inputs_nodes_and_outputs():
    model, g = traced_mlp()
    assert g.version == 1
    assert [(i.name, i.role) for i in g.inputs] == [
        ("1.weight", PARAM),
        ("1.bias", PARAM),
        ("3.weight", PARAM),
        ("3.bias", PARAM),
        ("x", DATA),
        ("y", DATA),
    ]
    assert list(g.inputs[4].shape) == [-1, 3, 4] and list(g.inputs[5].shape) == [-1]
    assert g.inputs[5].dtype == tensor_pb2.INT64
    assert list(g.inputs[0].shape) == [16, 12]
    assert [o.name for o in g.outputs] == ["loss", "logits"]
    ops = [n.op for n in g.nodes]
    assert ops[0] == "reshape" and "gelu" in ops and ops[-1].startswith("nll_loss")
    # flatten's reshape does not bake in the batch size of 8.
    shape_attr = [a for a in g.nodes[0].attrs if a.name == "shape"][0]
    assert list(shape_attr.ints.values) == [-1, 12]
    # Every value is read by a later node or an output, in topological order.
    n_in = len(g.inputs)
    for k, node in enumerate(g.nodes):
        assert all(v < n_in + k for v in node.inputs)


def test_traced_graph_executes_like_eager_at_any_batch_size():
    model, g = traced_mlp()
    params = {n: p for n, p in model.named_parameters()}
    for n in (1, 5, 33):
        x, y = batch(n, seed=n)
        out = execute(g, params, {"x": x, "y": y})
        loss, extra = mlp_loss(model, gm.tensor(x), gm.tensor(y))
        assert np.array_equal(out["loss"].detach().numpy(), loss.detach().numpy())
        assert np.array_equal(out["logits"].detach().numpy(), extra["logits"].detach().numpy())


def test_execute_with_parameter_tensors_supports_backward():
    model, g = traced_mlp()
    x, y = batch(4)
    out = execute(g, dict(model.named_parameters()), {"x": x, "y": y})
    out["loss"].backward()
    assert all(p.grad is not None for p in model.parameters())


def test_constants_become_const_inputs_with_their_value():
    g = trace(
        lambda p, x: ((x * p["w"]) ** 2).sum(), {"w": gm.ones(3)}, np.ones((2, 3), np.float32)
    )
    consts = [i for i in g.inputs if i.role == CONST]
    assert len(consts) == 1 and consts[0].name == "const0"
    assert list(consts[0].shape) == [] and consts[0].dtype == tensor_pb2.FLOAT32
    assert np.frombuffer(consts[0].value.data, np.float32).tolist() == [2.0]
    assert [n.op for n in g.nodes] == ["mul", "pow", "sum"]


def test_attributes_are_canonical_sorted_and_without_defaults():
    g = trace(
        lambda p, x: (p["w"] * x).sum(dim=1).sum() + (p["w"] * x).sum(dim=0, keepdim=True).sum(),
        {"w": gm.ones(2, 3)},
        np.ones((2, 3), np.float32),
        batch_dim=False,
    )
    sums = [n for n in g.nodes if n.op == "sum"]
    names = [[a.name for a in n.attrs] for n in sums]
    assert ["dim"] in names  # keepdim=False is the default: omitted
    assert ["dim", "keepdim"] in names  # sorted by name
    assert [] in names  # sum() of everything: all defaults
    for n in g.nodes:
        assert [a.name for a in n.attrs] == sorted(a.name for a in n.attrs)


def test_unused_ops_are_dropped_and_params_and_data_kept():
    def fn(p, x, unused):
        (p["a"] * 3.0).sum()  # computed but not returned
        return (p["b"] * x).sum()

    g = trace(
        fn, {"a": gm.ones(2), "b": gm.ones(2)}, np.ones((4, 2), np.float32), np.ones(4, np.float32)
    )
    assert [i.name for i in g.inputs] == ["a", "b", "x0", "x1"]
    assert [n.op for n in g.nodes] == ["mul", "sum"]


def test_trace_leaves_module_grads_and_flags_alone():
    model = mlp()
    model[1].bias.requires_grad_(False)  # a frozen parameter
    x, y = batch(4)
    g = trace(mlp_loss, model, x, y)
    assert all(p.grad is None for p in model.parameters())
    assert model[1].bias.requires_grad is False
    assert model[1].weight.requires_grad is True
    # The frozen parameter still is a PARAM input and its ops are recorded.
    assert "1.bias" in [i.name for i in g.inputs if i.role == PARAM]


def test_dict_params_receive_tensors_that_require_grad():
    seen = {}

    def fn(p, x):
        seen["flag"] = p["w"].requires_grad
        return (p["w"] * x).sum()

    w = gm.ones(3)  # requires_grad=False
    g = trace(fn, {"w": w}, np.ones((2, 3), np.float32))
    assert seen["flag"] is True and w.requires_grad is False
    assert [n.op for n in g.nodes] == ["mul", "sum"]


def test_tracing_is_thread_local():
    barrier = threading.Barrier(2)
    graphs = {}

    def run(name, fn):
        def traced(p, x):
            barrier.wait()  # both traces are active together
            y = fn(p["w"] * x)
            barrier.wait()
            return y.sum()

        graphs[name] = trace(traced, {"w": gm.ones(3)}, np.ones((2, 3), np.float32))

    threads = [
        threading.Thread(target=run, args=("exp", gm.exp)),
        threading.Thread(target=run, args=("tanh", gm.tanh)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [n.op for n in graphs["exp"].nodes] == ["mul", "exp", "sum"]
    assert [n.op for n in graphs["tanh"].nodes] == ["mul", "tanh", "sum"]


def test_trace_rejects_a_non_scalar_loss_and_bad_outputs():
    with pytest.raises(TraceError, match="floating scalar"):
        trace(lambda p, x: p["w"] * x, {"w": gm.ones(3)}, np.ones((2, 3), np.float32))
    with pytest.raises(TraceError, match="reserved"):
        trace(
            lambda p, x: ((p["w"] * x).sum(), {"loss": x}),
            {"w": gm.ones(3)},
            np.ones((2, 3), np.float32),
        )
    with pytest.raises(TraceError, match="disagree on the batch size"):
        trace(
            lambda p, x, y: (p["w"] * x).sum(),
            {"w": gm.ones(3)},
            np.ones((2, 3), np.float32),
            np.ones(5, np.float32),
        )


def test_reshape_with_the_literal_batch_size_is_made_batch_free():
    def fn(p, x):
        h = x.reshape(x.shape[0], -1)  # records [8, -1]: rewritten to [-1, 12]
        return (h @ p["w"]).sum()

    g = trace(fn, {"w": gm.ones(12, 2)}, np.ones((8, 3, 4), np.float32))
    assert list(g.nodes[0].attrs[0].ints.values) == [-1, 12]
    out = execute(g, {"w": gm.ones(12, 2)}, {"x0": np.ones((3, 3, 4), np.float32)})
    assert out["loss"].item() == 72.0


@pytest.mark.parametrize(
    "fn, what",
    [
        (lambda p, x: (x.reshape(8 * 12) * p["w"].reshape(-1).sum()).sum(), "reshape"),
        (lambda p, x: (x.flatten(1) @ p["w"] + gm.zeros(8, 2)).sum(), "add"),
    ],
)
def test_baked_batch_size_is_detected_with_advice(fn, what):
    with pytest.raises(TraceError) as e:
        trace(fn, {"w": gm.ones(12, 2)}, np.ones((8, 3, 4), np.float32))
    msg = str(e.value)
    assert f"({what})" in msg and "batch size 8" in msg and "flatten(1)" in msg


def test_mean_over_the_batch_counts_the_batch_at_run_time():
    def fn(p, x):
        per_sample = (x.flatten(1) @ p["w"]).sum(1)
        return per_sample.mean() + (x * p["s"]).mean() + per_sample.sum() / x.shape[0]

    params = {"w": gm.ones(12, 2), "s": gm.ones(1)}
    g = trace(fn, params, np.ones((8, 3, 4), np.float32))
    assert not [
        i
        for i in g.inputs
        if i.role == CONST
        and not i.shape
        and np.frombuffer(i.value.data, np.float32)[0] in (8.0, 96.0)
    ]
    for n in (1, 5):
        x = np.random.default_rng(n).standard_normal((n, 3, 4)).astype(np.float32)
        got = execute(g, params, {"x0": x})["loss"].numpy()
        assert np.array_equal(got, fn(params, gm.tensor(x)).numpy())


def test_constants_derived_from_the_batch_size_otherwise_are_refused():
    with pytest.raises(TraceError, match="depends on the batch size"):
        trace(
            lambda p, x: (x * p["w"]).sum() * (1.0 / x.shape[0]),
            {"w": gm.ones(3)},
            np.ones((8, 3), np.float32),
        )


def test_slicing_over_the_batch_dimension_runs_at_any_batch_size():
    # x[:, 1:] records the batch size as the stop of dimension 0; the graph must say "to the
    # end" instead, or a call at batch 17 would silently keep the first 8 rows.
    def fn(p, x):
        return (x[:, 1:] * p["w"]).sum()

    w = gm.tensor([2.0, 3.0])
    g = trace(fn, {"w": w}, np.ones((8, 3), np.float32))
    assert list(g.inputs[1].shape) == [-1, 3]
    x17 = np.arange(17 * 3, dtype=np.float32).reshape(17, 3)
    [loss] = execute(g, {"w": w.numpy()}, {g.inputs[1].name: x17}).values()
    assert float(loss) == pytest.approx(float((x17[:, 1:] * [2.0, 3.0]).sum()))
    g = trace(fn, {"w": gm.ones(2)}, np.ones((8, 3), np.float32), batch_dim=False)
    assert list(g.inputs[1].shape) == [8, 3]


def test_the_batch_past_dim_0_stays_free_through_select_and_narrow():
    # An LSTM's h_n is (layers, N, H): h_n[-1] slices every dim (recording N as the stop of
    # dim 1) and reshapes to (N, H); both must follow the batch size at run time.
    lstm = nn.LSTM(4, 5, num_layers=2, batch_first=True)

    def fn(m, x):
        _, (h, c) = m(x)
        return (h[-1] * c.narrow(0, 0, 1)[0]).sum()

    g = trace(fn, lstm, np.ones((3, 6, 4), np.float32))
    params = dict(lstm.named_parameters())
    for n in (1, 7):
        x = np.random.default_rng(n).random((n, 6, 4)).astype(np.float32)
        [loss] = execute(g, params, {"x0": x}).values()
        assert loss.item() == fn(lstm, gm.tensor(x)).item()
    with pytest.raises(TraceError, match=r"node \d+ \(reshape\) bakes in the batch size 3"):
        x = np.ones((3, 6, 4), np.float32)
        trace(lambda m, x: m(x)[1][0].reshape(2 * 3 * 5).sum(), lstm, x)


def test_batch_dim_false_keeps_fixed_shapes():
    g = trace(
        lambda p, x: (x.reshape(8 * 12) * 2.0).sum() * p["w"].sum(),
        {"w": gm.ones(1)},
        np.ones((8, 3, 4), np.float32),
        batch_dim=False,
    )
    assert list(g.inputs[1].shape) == [8, 3, 4]
    validate(g)


def _trace_spec(spec, case):
    """A graph of one opspec case: float inputs as parameters, the others as data."""
    import test_ops

    arrays, diff = test_ops._inputs(spec, case)
    params = {f"p{i}": gm.tensor(arrays[i]) for i in diff}
    data = [a for i, a in enumerate(arrays) if i not in diff]

    def fn(p, *d):
        it = iter(d)
        xs = [p[f"p{i}"] if i in diff else next(it) for i in range(len(arrays))]
        out = spec.gm(gm, *xs)
        return out.to(gm.float64).sum()

    return trace(fn, params, *data, batch_dim=False)


def _trace_spec_gradient(spec, case, order=1):
    """A graph of the spec's first-order gradients (create_graph=True): the vjps' own ops
    (conv2d_input_grad, softmax_grad, ...) are recorded as they run."""
    import test_ops

    arrays, diff = test_ops._inputs(spec, case)
    params = {f"p{i}": gm.tensor(arrays[i]) for i in diff}
    data = [a for i, a in enumerate(arrays) if i not in diff]
    if not diff:
        return None
    probe = spec.gm(gm, *[gm.tensor(a) for a in arrays])
    if not probe.dtype.is_floating_point:
        return None
    # The cotangent is a parameter too, so that second-order terms through it stay live.
    params["w"] = gm.tensor(test_ops._weight(spec, case, probe.shape)).to(probe.dtype)

    def fn(p, *d):
        it = iter(d)
        xs = [p[f"p{i}"] if i in diff else next(it) for i in range(len(arrays))]
        out = spec.gm(gm, *xs)
        total = out.to(gm.float64).sum() * 0.0
        if not out.requires_grad:
            return total
        grads = gm.autograd.grad(
            (out * p["w"]).sum(), [p[f"p{i}"] for i in diff], create_graph=True, allow_unused=True
        )
        for g in grads:
            if g is not None:
                total = total + (g * g).sum()
        if order == 2 and total.requires_grad:
            for g in gm.autograd.grad(
                total, [p[f"p{i}"] for i in diff] + [p["w"]], create_graph=True, allow_unused=True
            ):
                if g is not None:
                    total = total + (g * g).sum()
        return total

    return trace(fn, params, *data, batch_dim=False)


def test_every_registered_op_can_be_traced():
    """Each op spec of tests/opspecs traces; together they cover the whole registry."""
    import test_ops

    seen = set()
    failures = []
    for spec in test_ops.SPECS:
        try:
            g = _trace_spec(spec, 0)
        except Exception as e:  # noqa: BLE001  (collect them all, then report)
            failures.append(f"{spec.name}: {type(e).__name__}: {e}")
            continue
        ops = {n.op for n in g.nodes}
        seen.update(ops)
        for order in (1, 2):
            if set(REGISTRY) - seen:
                grad_graph = _trace_spec_gradient(spec, 0, order)
                if grad_graph is not None:
                    seen.update(n.op for n in grad_graph.nodes)
        try:
            validate(g)
        except GraphError as e:
            # Shapes that depend on the data (nonzero, boolean masks) cannot be planned
            # statically: refusing them is the right answer.
            if "nonzero" not in ops:
                failures.append(f"{spec.name}: {e}")
    assert not failures, "\n".join(failures)
    missing = sorted(set(REGISTRY) - seen)
    assert not missing, f"ops never recorded by a traced spec: {missing}"


# ---------------------------------------------------------------------------------------
# Graph ids
# ---------------------------------------------------------------------------------------


def test_graph_id_is_sha256_of_deterministic_bytes():
    _, g = traced_mlp()
    gid = graph_id(g)
    assert gid == hashlib.sha256(g.SerializeToString(deterministic=True)).hexdigest()
    assert len(gid) == 64 and gid == gid.lower()


def test_same_model_gives_the_same_id():
    _, a = traced_mlp(seed=0)
    _, b = traced_mlp(seed=0)
    assert graph_id(a) == graph_id(b)
    # Retracing the same model at another batch size gives the same graph.
    model = mlp()
    x, y = batch(5)
    assert graph_id(trace(mlp_loss, model, x, y, data_names=["x", "y"])) == graph_id(a)


def test_different_attributes_give_different_ids():
    _, a = traced_mlp(approximate="none")
    _, b = traced_mlp(approximate="tanh")
    assert graph_id(a) != graph_id(b)


def test_a_non_canonical_graph_gets_the_id_of_its_canonical_form():
    """Another language's client may list attributes unsorted or spell out defaults: the
    same model must still get the same id (graph.proto)."""
    g = trace(
        lambda p, x: (p["w"] * x).sum(dim=1, keepdim=True).sum(),
        {"w": gm.ones(2, 3)},
        np.ones((2, 3), np.float32),
        batch_dim=False,
    )
    canonical = graph_id(g)
    messy = graph_pb2.Graph()
    messy.CopyFrom(g)
    node = next(n for n in messy.nodes if [a.name for a in n.attrs] == ["dim", "keepdim"])
    attrs = list(node.attrs)
    del node.attrs[:]
    node.attrs.extend(reversed(attrs))  # unsorted
    empty_sum = next(n for n in messy.nodes if n.op == "sum" and not n.attrs)
    empty_sum.attrs.add(name="keepdim", b=False)  # a default spelled out
    assert graph_id(messy) != canonical
    vg = validate(messy)
    assert vg.id == canonical and graph_id(vg.graph) == canonical
    from gradmesh.server.worker import GradientWorker

    worker = GradientWorker("cpu")
    assert worker.register(messy) == canonical
    assert worker.lookup(canonical) is worker.lookup(graph_id(messy))


# ---------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------


def test_validate_infers_symbolic_batch_shapes():
    _, g = traced_mlp()
    vg = validate(g)
    assert vg.params == ["1.weight", "1.bias", "3.weight", "3.bias"]
    assert vg.data == ["x", "y"]
    assert vg.specs[vg.outputs["logits"]].shape == (-1, 3)
    assert vg.specs[vg.outputs["loss"]].shape == ()
    concrete = vg.specs_at({"x": (7, 3, 4), "y": (7,)})
    assert concrete[vg.outputs["logits"]].shape == (7, 3)


def _simple():
    return trace(
        lambda p, x: (p["w"] * x).sum(dim=1).sum(), {"w": gm.ones(3)}, np.ones((2, 3), np.float32)
    )


def _fails(g, field, code="INVALID_ARGUMENT", limits=None, match=None):
    with pytest.raises(GraphError) as e:
        validate(g, limits)
    assert e.value.field == field, str(e.value)
    assert e.value.code == code
    if match:
        assert match in e.value.message
    return e.value


def test_valid_simple_graph():
    vg = validate(_simple())
    assert [op.name for op in vg.ops] == ["mul", "sum", "sum"]


def test_unknown_op():
    g = _simple()
    g.nodes[1].op = "os.system"
    _fails(g, "nodes[1].op", match="unknown op")


def test_wrong_arity():
    g = _simple()
    g.nodes[0].inputs.append(0)
    _fails(g, "nodes[0].inputs", match="takes 2 inputs")


def test_value_used_before_definition_or_cycle():
    g = _simple()
    g.nodes[0].inputs[1] = 3  # node 0 reading its own output
    _fails(g, "nodes[0].inputs[1]", match="not defined before")
    g = _simple()
    g.nodes[1].inputs[0] = 99
    _fails(g, "nodes[1].inputs[0]")


def test_unknown_attribute_name():
    g = _simple()
    g.nodes[1].attrs.add(name="axis", i=1)
    _fails(g, "nodes[1].attrs.axis", match="no attribute")


def test_attribute_of_the_wrong_kind():
    g = _simple()
    g.nodes[1].attrs[0].ClearField("ints")
    g.nodes[1].attrs[0].s = "1"
    _fails(g, "nodes[1].attrs.dim", match="ints")


def test_attribute_given_twice_and_unset():
    g = _simple()
    g.nodes[1].attrs.add(name="dim").ints.values.append(0)
    _fails(g, "nodes[1].attrs.dim", match="twice")
    g = _simple()
    g.nodes[1].attrs.add(name="keepdim")
    _fails(g, "nodes[1].attrs.keepdim", match="no value")


def test_optional_attribute_accepts_none_and_others_do_not():
    g = _simple()
    g.nodes[1].attrs[0].none = True  # dim is "ints?": None means every dim
    vg = validate(g)
    assert vg.attrs[1]["dim"] is None
    g.nodes[1].attrs.add(name="keepdim", none=True)
    _fails(g, "nodes[1].attrs.keepdim")


def test_bad_dtype_attribute():
    g = trace(
        lambda p, x: (p["w"] * x).to(gm.float64).sum(),
        {"w": gm.ones(3)},
        np.ones((2, 3), np.float32),
    )
    k = [n.op for n in g.nodes].index("cast")
    g.nodes[k].attrs[0].dtype = "complex128"
    _fails(g, f"nodes[{k}].attrs.dtype", match="unknown dtype")


def test_shape_mismatch_names_the_node():
    g = _simple()
    g.inputs[0].ClearField("shape")
    g.inputs[0].shape.extend([4])  # w of 4 elements against x of 3
    e = _fails(g, "nodes[0]")
    assert "mul" in e.message and "broadcast" in e.message


def test_input_names_roles_dtypes_and_shapes():
    g = _simple()
    g.inputs[1].name = "w"
    _fails(g, "inputs[1].name", match="duplicate")
    g = _simple()
    g.inputs[0].name = ""
    _fails(g, "inputs[0].name")
    g = _simple()
    g.inputs[0].role = 0
    _fails(g, "inputs[0].role")
    g = _simple()
    g.inputs[0].dtype = 42
    _fails(g, "inputs[0].dtype")
    g = _simple()
    g.inputs[0].dtype = tensor_pb2.INT64
    _fails(g, "inputs[0].dtype", match="floating point")
    g = _simple()
    g.inputs[1].shape[1] = -1  # -1 only as a DATA input's first dim
    _fails(g, "inputs[1].shape")
    g = _simple()
    g.inputs[0].shape[0] = -1
    _fails(g, "inputs[0].shape")


def test_const_inputs_are_checked():
    g = trace(lambda p, x: (p["w"] * x * 3.0).sum(), {"w": gm.ones(3)}, np.ones((2, 3), np.float32))
    k = [i.role for i in g.inputs].index(CONST)
    bad = graph_pb2.Graph()
    bad.CopyFrom(g)
    bad.inputs[k].ClearField("value")
    _fails(bad, f"inputs[{k}].value", match="no value")
    bad.CopyFrom(g)
    bad.inputs[k].value.data = b"\0\0"
    _fails(bad, f"inputs[{k}].value.data")
    bad.CopyFrom(g)
    bad.inputs[0].value.CopyFrom(to_proto(np.ones(3, np.float32)))
    _fails(bad, "inputs[0].value", match="only CONST")


def test_outputs_are_checked():
    g = _simple()
    g.outputs[0].value = 50
    _fails(g, "outputs[0].value", match="does not exist")
    g = _simple()
    g.outputs.add(name="loss", value=2)
    _fails(g, "outputs[1].name", match="duplicate")
    g = _simple()
    del g.outputs[:]
    _fails(g, "outputs")
    g = _simple()
    g.outputs[0].value = 3  # the (2, 3) product: not a scalar
    _fails(g, "outputs[0].value", match="scalar")


def test_version_is_checked():
    g = _simple()
    g.version = 2
    _fails(g, "version")


def test_limits_are_resource_exhausted():
    g = _simple()
    _fails(g, "nodes", "RESOURCE_EXHAUSTED", Limits(max_graph_nodes=2))
    g = trace(
        lambda p, x: (p["w"] * x * gm.ones(1000)).sum(),
        {"w": gm.ones(1000)},
        np.ones((2, 1000), np.float32),
    )
    k = [i.role for i in g.inputs].index(CONST)
    _fails(g, f"inputs[{k}].value", "RESOURCE_EXHAUSTED", Limits(max_const_bytes=1000))
    _fails(g, "inputs[0].shape", "RESOURCE_EXHAUSTED", Limits(max_tensor_elements=999))
    # Batch-dependent sizes are checked against the concrete batch at compile time.
    vg = validate(g, Limits(max_tensor_elements=100_000))
    with pytest.raises(GraphError) as e:
        vg.specs_at({"x0": (1000, 1000)})
    assert e.value.code == "RESOURCE_EXHAUSTED"


def test_data_shapes_are_checked_against_the_graph():
    _, g = traced_mlp()
    vg = validate(g)
    with pytest.raises(GraphError) as e:
        vg.specs_at({"x": (4, 3, 5), "y": (4,)})
    assert e.value.field == "data[x].shape"
    with pytest.raises(GraphError) as e:
        vg.specs_at({"x": (4, 3, 4), "y": (5,)})
    assert e.value.field == "data[y].shape" and "batch size" in e.value.message
    with pytest.raises(GraphError) as e:
        vg.specs_at({"x": (4, 3, 4)})
    assert e.value.field == "data[y]"


def test_random_seed_is_a_pure_function():
    assert random_seed(5, 3) == random_seed(5, 3)
    assert len({random_seed(5, k) for k in range(100)}) == 100
    assert random_seed(5, 3) != random_seed(6, 3)
    assert 0 <= random_seed(2**64 - 1, 10**6) < 2**63


def _with_ints(g, op: str, name: str, values) -> tuple:
    """``g`` with attribute ``name`` of its first ``op`` node set to ``values``."""
    k = [n.op for n in g.nodes].index(op)
    node = g.nodes[k]
    kept = [a for a in node.attrs if a.name != name]
    del node.attrs[:]
    node.attrs.extend(kept)
    node.attrs.add(name=name).ints.values.extend(values)
    return g, k


@pytest.mark.parametrize(
    "name, values",
    [("stride", [0, 1]), ("stride", [1]), ("padding", [-1, 0]), ("dilation", [0, 1])],
)
def test_a_bad_convolution_attribute_is_named(name, values):
    g = trace(
        lambda p, x: F.conv2d(x, p["w"], padding=1).sum(),
        {"w": gm.ones(2, 3, 3, 3)},
        np.ones((1, 3, 8, 8), np.float32),
    )
    g, k = _with_ints(g, "conv2d", name, values)
    _fails(g, f"nodes[{k}].attrs.{name}", match=f"{name} must be 2 integers")


@pytest.mark.parametrize(
    "name, values, match",
    [
        ("steps", [1, 0], "step must be greater than zero"),
        ("starts", [0, 5], "out of range"),
        ("stops", [2, 0], "out of range"),  # a stop before its start
        ("starts", [0], "one start, stop and step per dimension"),
    ],
)
def test_a_bad_slice_attribute_is_named(name, values, match):
    g = trace(
        lambda p, x: (x[:, 1:3] * p["w"]).sum(), {"w": gm.ones(2)}, np.ones((2, 4), np.float32)
    )
    g, k = _with_ints(g, "slice", name, values)
    _fails(g, f"nodes[{k}].attrs.{name}", match=match)
