"""Property-based fuzzing of the gRPC surface (DESIGN §10).

Real servers on 127.0.0.1 (one worker, one shard server, one coordinator with its own
worker, started once for the module) are driven with the generated stubs only (no SDK),
with hypothesis strategies that produce:

(a) structurally valid but semantically random ``Graph`` messages for RegisterGraph and
    inline ComputeGradients (ops in and outside the registry, forward and out-of-range
    value ids, attributes of every kind including wrong kinds, huge ints and NaN, shapes
    with negative and huge dims, unknown dtype/role enum values, CONST values of the wrong
    byte length), with parameters and data that mostly fit them, so that accepted graphs
    run;
(b) random tensors (dtype enum values, shapes, data lengths, out-of-range index values)
    for two registered graphs;
(c) garbled ComputeGradientsStream frame sequences (chunks before the header, wrong
    tensor_index, out-of-order or overlapping offsets, too many or missing bytes, frames
    of the wrong kind, undecodable bytes);
(d) random ParameterShard requests (Load, Pull, PushGradients, Apply, DropJob) and
    Coordinator requests (CreateJob, Step, GetParameters, JobStatus).

Properties, for every call: it ends within its deadline with a status in the set allowed
for that RPC (never INTERNAL or UNKNOWN), INVALID_ARGUMENT names the offending field in
its google.rpc.BadRequest details, and after each example the server answers a health
check and a known-good request exactly as it did before the example (nothing lost or
corrupted). Examples are derandomized so CI runs the same cases every time.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import struct

import grpc
import numpy as np
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from gradmesh.core import graph as core_graph
from gradmesh.core.registry import REGISTRY
from gradmesh.server import coordinator as coordinator_mod
from gradmesh.server import worker as worker_mod
from gradmesh.server.runtime import ServerConfig
from gradmesh.server.shard import serve_shard
from gradmesh.server.shard_store import ShardStore
from gradmesh.v1 import (
    coordinator_pb2,
    coordinator_pb2_grpc,
    graph_pb2,
    shard_pb2,
    shard_pb2_grpc,
    tensor_pb2,
    worker_pb2,
    worker_pb2_grpc,
)

C = grpc.StatusCode
OK, INVALID, EXHAUSTED = C.OK, C.INVALID_ARGUMENT, C.RESOURCE_EXHAUSTED
NOT_FOUND, FAILED, EXISTS = C.NOT_FOUND, C.FAILED_PRECONDITION, C.ALREADY_EXISTS
DEADLINE = 10.0  # every call has one: a hang fails as DEADLINE_EXCEEDED

# Allowed status codes per RPC (anything else, INTERNAL and UNKNOWN above all, fails):
# - RegisterGraph: OK; INVALID_ARGUMENT for a malformed graph; RESOURCE_EXHAUSTED for a
#   graph over the worker's limits (nodes, elements, CONST bytes, attribute lengths).
#   FAILED_PRECONDITION for a well-formed graph this worker cannot run: ``to_device`` to a
#   device it lacks (``cuda`` on a CPU worker; docs/worker.md, "Errors").
GRAPH_CODES = {OK, INVALID, EXHAUSTED, FAILED}
# - ComputeGradients / ComputeGradientsStream: the same, plus NOT_FOUND for a graph_id
#   the worker does not know (worker.proto). The fuzzer sends no parameter_set and no
#   shared memory, the other FAILED_PRECONDITION cases.
COMPUTE_CODES = {OK, INVALID, EXHAUSTED, NOT_FOUND, FAILED}
# - ParameterShard (shard.proto): NOT_FOUND for a job not loaded, FAILED_PRECONDITION for
#   version/step mismatches and Apply before every micro-batch was pushed, ALREADY_EXISTS
#   for a Load that differs from the loaded job, RESOURCE_EXHAUSTED for stream limits.
SHARD_CODES = {OK, INVALID, EXHAUSTED, NOT_FOUND, FAILED, EXISTS}
# - Coordinator (coordinator.proto): the shard's set; FAILED_PRECONDITION is a step id out
#   of sequence. UNAVAILABLE (no worker) cannot happen here: the coordinator has a worker.
#   OUT_OF_RANGE is not used by any gradmesh service, so it is not allowed either.
COORDINATOR_CODES = {OK, INVALID, EXHAUSTED, NOT_FOUND, FAILED, EXISTS}

# CI runs a fixed, derandomized set of examples. GRADMESH_FUZZ_SCALE=N runs N times as
# many examples from a random seed (to hunt for new bugs; hypothesis prints how to
# reproduce a failure).
SCALE = float(os.environ.get("GRADMESH_FUZZ_SCALE", "1"))
FUZZ = settings(
    derandomize=SCALE <= 1,
    database=None,
    deadline=None,
    print_blob=SCALE > 1,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.filter_too_much,
        HealthCheck.function_scoped_fixture,
    ],
)

# Random values overflow and divide by zero on purpose; NumPy's warnings are expected.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

F32, F64, I64, I32, BOOL, F16 = (
    tensor_pb2.FLOAT32,
    tensor_pb2.FLOAT64,
    tensor_pb2.INT64,
    tensor_pb2.INT32,
    tensor_pb2.BOOL,
    tensor_pb2.FLOAT16,
)
NP_OF = {F32: "<f4", F64: "<f8", I64: "<i8", I32: "<i4", BOOL: "u1", F16: "<f2"}
PARAM, DATA, CONST = graph_pb2.Input.PARAM, graph_pb2.Input.DATA, graph_pb2.Input.CONST
BUFFER = graph_pb2.Input.BUFFER


# ====================================================================== calling ==========


def bad_request_field(error: grpc.RpcError) -> str | None:
    status = rpc_status.from_call(error)
    if status is None:
        return None
    for detail in status.details:
        bad = error_details_pb2.BadRequest()
        if detail.Unpack(bad) and bad.field_violations:
            return bad.field_violations[0].field
    return None


def rpc(method, request, allowed, *, stream_response=False):
    """Call ``method`` with a deadline; assert the status is allowed. Returns (code, reply,
    BadRequest field)."""
    try:
        reply = method(request, timeout=DEADLINE)
        if stream_response:
            reply = list(reply)
    except grpc.RpcError as e:
        code, field = e.code(), bad_request_field(e)
        assert code in allowed, f"{code.name}: {e.details()} (field {field})"
        if code == INVALID:
            assert field, f"INVALID_ARGUMENT without a BadRequest field: {e.details()}"
        return code, None, field
    return OK, reply, None


def healthy(channel) -> None:
    resp = health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(), timeout=DEADLINE
    )
    assert resp.status == health_pb2.HealthCheckResponse.SERVING


# ====================================================================== tensors ==========


def tensor_bytes(dtype: int, n: int, seed: int, flavor: int) -> bytes:
    """Valid element bytes for ``n`` elements: small values, wide values or non-finite."""
    rng = np.random.default_rng(seed)
    if dtype in (F32, F64, F16):
        a = rng.standard_normal(n) * (1e30 if flavor == 2 else 1.0)
        if flavor == 3 and n:
            a[rng.integers(0, n)] = rng.choice([np.nan, np.inf, -np.inf])
    elif dtype == BOOL:
        a = rng.integers(0, 2, n)
    else:
        a = rng.integers(0, 4, n) if flavor < 2 else rng.integers(-(2**31), 2**31 - 1, n)
    with np.errstate(over="ignore", invalid="ignore"):
        return a.astype(NP_OF[dtype]).tobytes()


def make_tensor(dtype: int, shape, data: bytes = b"") -> tensor_pb2.Tensor:
    return tensor_pb2.Tensor(dtype=dtype, shape=list(shape), data=data)


def small_count(shape, limit: int = 256) -> int | None:
    """Elements of ``shape`` when it is a real and small shape, else None."""
    if any(d < 0 for d in shape):
        return None
    n = math.prod(shape)
    return n if n <= limit else None


def mostly(common, rare, odds: int = 9):
    """``common`` about ``odds`` times as often as ``rare``, so that most examples get past
    the first check and reach the deeper ones."""
    return st.sampled_from([False] * odds + [True]).flatmap(lambda r: rare if r else common)


def rarely(draw, odds: int = 9) -> bool:
    return draw(st.sampled_from([False] * odds + [True]))


WEIRD_DIMS = [-1, -2, 2**31, 2**40, 2**62, 2**63 - 1, -(2**63)]
dims = mostly(st.integers(1, 3), st.sampled_from([0] + WEIRD_DIMS), 12)
shapes = st.lists(dims, max_size=3)
dtype_enums = mostly(
    st.sampled_from([F32, F32, F32, F64, I64, I32, BOOL, F16]),
    st.sampled_from([0, 7, 99, -1, 2**31 - 1]),
)
seeds = st.integers(0, 2**32 - 1)


@st.composite
def data_for(draw, dtype: int, shape) -> bytes:
    """Bytes for a tensor: usually exactly right, sometimes the wrong length or bool
    elements that are not 0/1."""
    n = small_count(shape)
    kind = draw(mostly(st.just("right"), st.sampled_from(["short", "long", "garbage"])))
    if n is None or dtype not in NP_OF:
        return draw(st.binary(max_size=16))
    good = tensor_bytes(dtype, n, draw(seeds), draw(st.integers(0, 3)))
    if kind == "short":
        return good[:-1] if good else b"\0"
    if kind == "long":
        return good + b"\0" * draw(st.integers(1, 8))
    if kind == "garbage" and good:
        return draw(st.binary(min_size=len(good), max_size=len(good)))
    return good


# ====================================================================== graphs ===========

OPS = sorted(REGISTRY)
# Ops that accept most inputs (so that chains of them pass), and ops whose result depends
# on the values of their inputs (indices, labels, masks): half of the nodes use these.
EASY_OPS = [
    "relu",
    "neg",
    "exp",
    "tanh",
    "sigmoid",
    "abs",
    "sqrt",
    "log",
    "add",
    "mul",
    "sub",
    "div",
    "pow",
    "maximum",
    "sum",
    "amax",
    "prod",
    "mm",
    "matmul",
    "cast",
    "softmax",
    "log_softmax",
    "cumsum",
    "reshape",
    "permute",
    "flip",
    "expand",
    "where",
    "clamp",
    "eq",
    "logical_not",
    "argmax",
    "argsort",
    "tril",
    "embedding",
    "gather",
    "index",
    "index_put",
    "scatter_add",
    "nll_loss",
    "nonzero",
    "dropout_mask",
    "slice",
    "cat",
    "stack",
]
assert set(EASY_OPS) <= set(OPS)
op_names = mostly(
    st.one_of(st.sampled_from(OPS), st.sampled_from(EASY_OPS)),
    st.sampled_from(["", "os_system", "__import__", "MM", "mm ", "eval"]),
    15,
)
HUGE_INTS = [2**31, 2**62, 2**63 - 1, -(2**63), -(2**31) - 1]
ints = mostly(st.integers(-2, 4), st.sampled_from(HUGE_INTS), 5)
floats = mostly(
    st.floats(-3, 3), st.sampled_from([math.nan, math.inf, -math.inf, 1e308, -0.0, 5e-324]), 5
)
ATTR_VALUES = {
    "i": ints,
    "f": floats,
    "b": st.booleans(),
    "s": st.one_of(
        st.sampled_from(["mean", "sum", "none", "tanh", "cpu", "cuda", ""]), st.text(max_size=4)
    ),
    "ints": mostly(
        st.lists(ints, max_size=4), st.lists(st.integers(-2, 3), min_size=65, max_size=70), 12
    ),
    "floats": st.lists(floats, max_size=4),
    "dtype": st.sampled_from(
        ["float32", "float64", "int64", "int32", "bool", "float16", "complex64", "", "object"]
    ),
    "none": st.just(True),
}
KIND_FIELD = {
    "int": "i",
    "float": "f",
    "bool": "b",
    "str": "s",
    "ints": "ints",
    "floats": "floats",
    "dtype": "dtype",
}


def set_attr(a: graph_pb2.Attribute, which: str, value) -> None:
    if which in ("ints", "floats"):
        getattr(a, which).values.extend(value)
    else:
        setattr(a, which, value)


@st.composite
def attributes(draw, op):
    """Attributes for ``op``: declared names with values of the declared kind, mostly."""
    out = []
    declared = sorted(op.attrs) if op is not None else []
    names = draw(st.lists(st.sampled_from(declared), unique=True)) if declared else []
    if rarely(draw):
        names.append(draw(st.sampled_from(["bogus", ""] + declared)))  # unknown or twice
    for name in names:
        kind = op.attrs[name][0] if op is not None and name in op.attrs else "int"
        which = KIND_FIELD[kind.rstrip("?")]
        if kind.endswith("?") and rarely(draw, 3):
            which = "none"
        if rarely(draw):
            which = draw(st.sampled_from(sorted(ATTR_VALUES)))  # the wrong kind
        a = graph_pb2.Attribute(name=name)
        set_attr(a, which, draw(ATTR_VALUES[which]))
        out.append(a)
    return out


@st.composite
def graphs(draw) -> graph_pb2.Graph:
    g = graph_pb2.Graph(version=draw(mostly(st.just(1), st.sampled_from([0, 2, 2**32 - 1]), 15)))
    for i in range(draw(st.integers(0, 4))):
        role = draw(
            mostly(
                st.sampled_from([PARAM, DATA, DATA, CONST, BUFFER]), st.sampled_from([0, 9, -3]), 15
            )
        )
        dtype = draw(dtype_enums)
        shape = draw(shapes)
        if role == PARAM and not rarely(draw):
            dtype = draw(st.sampled_from([F32, F32, F64, F16]))
        if role == DATA and draw(st.booleans()):
            shape = [-1] + shape[1:]
        name = draw(mostly(st.just(f"in{i}"), st.sampled_from(["", "in0"]), 15))
        inp = g.inputs.add(name=name, role=role, dtype=dtype, shape=shape)
        if role == CONST or rarely(draw, 15):
            vdtype, vshape = dtype, shape
            if rarely(draw):
                vdtype, vshape = draw(dtype_enums), draw(shapes)
            inp.value.CopyFrom(make_tensor(vdtype, vshape, draw(data_for(vdtype, vshape))))
    n_in = len(g.inputs)
    for k in range(draw(st.integers(0, 5))):
        name = draw(op_names)
        op = REGISTRY.get(name)
        arity = op.arity if op is not None and op.arity is not None else draw(st.integers(1, 3))
        if rarely(draw, 15):
            arity = draw(st.integers(0, 4))
        values = n_in + k
        # Mostly the newest values (a chain), sometimes any, rarely undefined ones.
        recent = st.integers(max(values - 2, 0), values - 1) if values else st.just(0)
        anywhere = st.integers(0, values - 1) if values else st.just(0)
        value_ids = mostly(
            st.one_of(recent, recent, anywhere),
            st.sampled_from([values, values + 3, 2**32 - 1]),
            20,
        )
        g.nodes.add(
            op=name, inputs=[draw(value_ids) for _ in range(arity)], attrs=draw(attributes(op))
        )
    values = n_in + len(g.nodes)
    if values and not rarely(draw, 5):
        # Make a floating scalar loss of the last value, so that many graphs pass.
        g.nodes.add(
            op="cast",
            inputs=[values - 1],
            attrs=[graph_pb2.Attribute(name="dtype", dtype="float32")],
        )
        g.nodes.add(op="sum", inputs=[values])
        values += 2
    last = max(values - 1, 0)
    if not rarely(draw, 15):
        g.outputs.add(name="loss", value=last)
    for j in range(draw(st.integers(0, 2))):
        out = g.outputs.add(
            name=draw(mostly(st.just(f"out{j}"), st.sampled_from(["loss", ""]))),
            value=draw(mostly(st.integers(0, last), st.sampled_from([values, 2**32 - 1]))),
        )
        if draw(st.booleans()):  # a buffer update: of an input of any role, or of none
            out.buffer = draw(st.sampled_from([f"in{k}" for k in range(len(g.inputs))] + ["x"]))
    return g


@st.composite
def requests_for(draw, g: graph_pb2.Graph, **ref) -> worker_pb2.ComputeGradientsRequest:
    """A ComputeGradientsRequest whose tensors mostly fit the inputs of graph ``g``."""
    req = worker_pb2.ComputeGradientsRequest(**ref)
    batch = draw(st.sampled_from([1, 2, 3, 0]))
    for inp in g.inputs:
        if inp.role not in (PARAM, DATA, BUFFER) or rarely(draw, 20):
            continue  # CONST, or a missing input
        shape = [
            batch if (j == 0 and d == -1 and inp.role == DATA) else d
            for j, d in enumerate(inp.shape)
        ]
        dtype = draw(dtype_enums) if rarely(draw, 15) else inp.dtype
        field = req.data if inp.role == DATA else req.parameters  # buffers travel with them
        field.add(name=inp.name, tensor=make_tensor(dtype, shape, draw(data_for(dtype, shape))))
    if rarely(draw, 15):
        extra = req.parameters if draw(st.booleans()) else req.data
        dtype, shape = draw(dtype_enums), draw(shapes)
        extra.add(
            name=draw(st.sampled_from(["zz", "", "in0"])),
            tensor=make_tensor(dtype, shape, draw(data_for(dtype, shape))),
        )
    params = [i.name for i in g.inputs if i.role == PARAM]
    names = params + ["nope"] if rarely(draw) else params
    if names and draw(st.booleans()):
        req.gradients.extend(draw(st.lists(st.sampled_from(names), max_size=3)))
    outs = [o.name for o in g.outputs[1:]] + (["nope"] if rarely(draw, 3) else [])
    if outs and draw(st.booleans()):
        req.outputs.extend(draw(st.lists(st.sampled_from(outs), max_size=2)))
    req.loss_scale = draw(
        mostly(st.sampled_from([0.0, 0.5, -2.0]), st.sampled_from([math.nan, math.inf, 1e300]))
    )
    req.seed = draw(st.integers(0, 2**64 - 1))
    return req


@st.composite
def graph_cases(draw):
    graph = draw(graphs())
    return graph, draw(requests_for(graph, graph=graph))


# ====================================================================== the worker =======

W = [1.0, -2.0, 3.0, 0.5, -1.0, 2.0]  # [3, 2]
X = [1.0, 2.0, 3.0, -4.0, 5.0, 6.0]  # [2, 3]
W_BYTES, X_BYTES = struct.pack("<6f", *W), struct.pack("<6f", *X)


def hand_graph() -> graph_pb2.Graph:
    """loss = sum(x @ w): w PARAM float32 [3, 2], x DATA float32 [-1, 3]."""
    return graph_pb2.Graph(
        version=1,
        inputs=[
            graph_pb2.Input(name="w", role=PARAM, dtype=F32, shape=[3, 2]),
            graph_pb2.Input(name="x", role=DATA, dtype=F32, shape=[-1, 3]),
        ],
        nodes=[graph_pb2.Node(op="mm", inputs=[1, 0]), graph_pb2.Node(op="sum", inputs=[2])],
        outputs=[graph_pb2.Output(name="loss", value=3), graph_pb2.Output(name="logits", value=2)],
    )


def index_graph() -> graph_pb2.Graph:
    """Data-dependent ops: loss = nll_loss(log_softmax((x + emb[idx]) @ w), y)."""
    return graph_pb2.Graph(
        version=1,
        inputs=[
            graph_pb2.Input(name="w", role=PARAM, dtype=F32, shape=[3, 2]),  # 0
            graph_pb2.Input(name="emb", role=PARAM, dtype=F32, shape=[4, 3]),  # 1
            graph_pb2.Input(name="x", role=DATA, dtype=F32, shape=[-1, 3]),  # 2
            graph_pb2.Input(name="idx", role=DATA, dtype=I64, shape=[-1]),  # 3
            graph_pb2.Input(name="y", role=DATA, dtype=I64, shape=[-1]),
        ],  # 4
        nodes=[
            graph_pb2.Node(op="embedding", inputs=[3, 1]),  # 5
            graph_pb2.Node(op="add", inputs=[2, 5]),  # 6
            graph_pb2.Node(op="mm", inputs=[6, 0]),  # 7
            graph_pb2.Node(op="log_softmax", inputs=[7]),  # 8
            graph_pb2.Node(op="nll_loss", inputs=[8, 4]),
        ],  # 9
        outputs=[graph_pb2.Output(name="loss", value=9), graph_pb2.Output(name="logits", value=7)],
    )


def good_request(**ref) -> worker_pb2.ComputeGradientsRequest:
    ref = ref or {"graph": hand_graph()}
    return worker_pb2.ComputeGradientsRequest(
        parameters=[tensor_pb2.NamedTensor(name="w", tensor=make_tensor(F32, [3, 2], W_BYTES))],
        data=[tensor_pb2.NamedTensor(name="x", tensor=make_tensor(F32, [2, 3], X_BYTES))],
        outputs=["logits"],
        **ref,
    )


def answer(resp: worker_pb2.ComputeGradientsResponse) -> tuple:
    """What must not change between calls: everything but the timings."""
    return (
        resp.graph_id,
        resp.loss.SerializeToString(),
        [o.SerializeToString() for o in resp.outputs],
        [g.SerializeToString() for g in resp.gradients],
    )


# Small limits: every graph that passes is cheap to run, and the limits are exercised.
FUZZ_LIMITS = worker_mod.WorkerLimits(
    max_graph_nodes=32,
    max_graph_inputs=16,
    max_tensor_elements=1 << 16,
    max_const_bytes=1 << 14,
    max_attr_values=64,
    max_stream_bytes=1 << 20,
)


class Served:
    """A running server, a channel to it and what its known-good request answered."""

    def __init__(self, running, stub_cls):
        self.running = running
        self.channel = grpc.insecure_channel(running.address)
        self.stub = stub_cls(self.channel)
        self.baseline = None

    def close(self):
        self.channel.close()
        self.running.stop(0)


@pytest.fixture(scope="module")
def fuzz_worker():
    served = Served(worker_mod.start("cpu", limits=FUZZ_LIMITS), worker_pb2_grpc.WorkerStub)
    stub = served.stub
    served.hand_id = stub.RegisterGraph(
        worker_pb2.RegisterGraphRequest(graph=hand_graph()), timeout=DEADLINE
    ).graph_id
    served.index_id = stub.RegisterGraph(
        worker_pb2.RegisterGraphRequest(graph=index_graph()), timeout=DEADLINE
    ).graph_id
    served.baseline = answer(stub.ComputeGradients(good_request(), timeout=DEADLINE))
    yield served
    served.close()


def check_worker(served) -> None:
    """The worker answers a health check and the known-good request bit for bit as before,
    inline and by the id registered at the start (so its graph cache lost nothing)."""
    healthy(served.channel)
    assert answer(served.stub.ComputeGradients(good_request(), timeout=DEADLINE)) == served.baseline
    by_id = served.stub.ComputeGradients(good_request(graph_id=served.hand_id), timeout=DEADLINE)
    assert answer(by_id) == served.baseline


def check_reply(req, graph, resp) -> None:
    """An OK reply holds what was asked for: a floating scalar loss, one gradient per
    requested parameter with the parameter's dtype and shape, the requested outputs."""
    assert list(resp.loss.shape) == [] and resp.loss.dtype in (F32, F64, F16)
    params = {i.name: i for i in graph.inputs if i.role == PARAM}
    want = list(req.gradients) or list(params)
    assert [g.name for g in resp.gradients] == want
    for g in resp.gradients:
        assert g.tensor.dtype == params[g.name].dtype
        assert list(g.tensor.shape) == list(params[g.name].shape)
    assert [o.name for o in resp.outputs] == list(req.outputs)


@settings(FUZZ, max_examples=int(400 * SCALE))
@given(case=graph_cases())
def test_fuzz_random_graphs(fuzz_worker, case):
    graph, req = case
    stub = fuzz_worker.stub
    code, resp, field = rpc(
        stub.RegisterGraph, worker_pb2.RegisterGraphRequest(graph=graph), GRAPH_CODES
    )
    if code == OK:
        # The id is that of the canonical form: attributes sorted, defaults left out.
        canonical = graph_pb2.Graph()
        canonical.CopyFrom(graph)
        for node in canonical.nodes:
            op = REGISTRY[node.op]
            attrs = core_graph.encode_attrs(op, core_graph.decode_attrs(op, node.attrs))
            del node.attrs[:]
            node.attrs.extend(attrs)
        assert (
            resp.graph_id
            == hashlib.sha256(canonical.SerializeToString(deterministic=True)).hexdigest()
        )
    else:
        assert field.startswith("graph")
    code2, resp2, field2 = rpc(stub.ComputeGradients, req, COMPUTE_CODES)
    event(f"register {code.name}, compute {code2.name}")
    if code != OK:
        # An inline graph is validated as RegisterGraph validates it.
        assert (code2, field2) == (code, field)
    if code2 == OK:
        check_reply(req, graph, resp2)
        # The same request streamed, gradients sent as backward finishes them (the plan
        # runs on a thread of its own): the same bits, whatever the order.
        streamed = stream_call(fuzz_worker.channel, req, early=True)
        assert streamed == unary_tensors(resp2)
    check_worker(fuzz_worker)


def stream_call(channel, req: worker_pb2.ComputeGradientsRequest, early: bool) -> dict:
    """``req`` sent over ComputeGradientsStream (header, then one chunk per tensor); the
    reply's tensors as {("loss" | "outputs" | "gradients", name): (dtype, shape, bytes)}."""
    header = worker_pb2.ComputeGradientsRequest()
    header.CopyFrom(req)
    header.stream_gradients_early = early
    frames = [None]
    for i, nt in enumerate(list(header.parameters) + list(header.data)):
        if nt.tensor.data:
            frames.append(
                worker_pb2.StreamFrame(chunk=tensor_pb2.Chunk(tensor_index=i, data=nt.tensor.data))
            )
        nt.tensor.data = b""
    frames[0] = worker_pb2.StreamFrame(request=header)
    stub = worker_pb2_grpc.WorkerStub(channel)
    replies = list(stub.ComputeGradientsStream(iter(frames), timeout=DEADLINE))
    head = replies[0].response
    slots = (
        [("loss", "", head.loss)]
        + [("outputs", o.name, o.tensor) for o in head.outputs]
        + [("gradients", g.name, g.tensor) for g in head.gradients]
        + [("buffers", b.name, b.tensor) for b in head.buffers]
    )
    data = [b""] * len(slots)
    for r in replies[1:]:
        if r.WhichOneof("kind") == "chunk":
            assert r.chunk.offset == len(data[r.chunk.tensor_index])
            data[r.chunk.tensor_index] += r.chunk.data
    return {(kind, name): (t.dtype, list(t.shape), d) for (kind, name, t), d in zip(slots, data)}


def unary_tensors(resp: worker_pb2.ComputeGradientsResponse) -> dict:
    out = {("loss", ""): (resp.loss.dtype, list(resp.loss.shape), resp.loss.data)}
    for kind in ("outputs", "gradients", "buffers"):
        for nt in getattr(resp, kind):
            out[(kind, nt.name)] = (nt.tensor.dtype, list(nt.tensor.shape), nt.tensor.data)
    return out


# -------------------------------------------------------------- (b) random tensors ------


@st.composite
def named_tensor_lists(draw, names):
    out = []
    for _ in range(draw(st.integers(0, 4))):
        dtype, shape = draw(dtype_enums), draw(shapes)
        out.append(
            tensor_pb2.NamedTensor(
                name=draw(st.sampled_from(names)),
                tensor=make_tensor(dtype, shape, draw(data_for(dtype, shape))),
            )
        )
    return out


@st.composite
def tensor_cases(draw, hand_id: str, index_id: str):
    which = draw(st.sampled_from(["hand", "index", "index", "random"]))
    graph = index_graph() if which == "index" else hand_graph()
    ref = draw(
        st.sampled_from(
            [
                {"graph_id": hand_id if which != "index" else index_id},
                {"graph_id": hand_id if which != "index" else index_id},
                {"graph": graph},
                {"graph_id": "0" * 64},
                {"graph_id": ""},
                {},
            ]
        )
    )
    if which == "random":
        # Free-form tensors: names, dtypes, shapes and lengths all random.
        names = ["w", "x", "emb", "idx", "y", "", "zz"]
        req = worker_pb2.ComputeGradientsRequest(
            **ref, parameters=draw(named_tensor_lists(names)), data=draw(named_tensor_lists(names))
        )
        return graph, req
    # Tensors that fit the graph, then a few single-field mutations.
    req = draw(requests_for(graph, **ref))
    for _ in range(draw(st.integers(0, 3))):
        items = list(req.parameters) + list(req.data)
        if not items:
            break
        t = draw(st.sampled_from(items)).tensor
        what = draw(st.sampled_from(["dtype", "dim", "rank", "data", "values"]))
        if what == "dtype":
            t.dtype = draw(dtype_enums)
        elif what == "dim" and t.shape:
            t.shape[draw(st.integers(0, len(t.shape) - 1))] = draw(dims)
        elif what == "rank":
            t.shape.append(draw(dims)) if draw(st.booleans()) or not t.shape else t.shape.pop()
        elif what == "data":
            t.data = draw(st.binary(max_size=64))
        elif what == "values" and t.dtype in NP_OF and small_count(t.shape) is not None:
            # Right length, any value: out-of-range indices and labels, NaN, bool 7.
            n = small_count(t.shape)
            t.data = draw(
                st.binary(
                    min_size=n * np.dtype(NP_OF[t.dtype]).itemsize,
                    max_size=n * np.dtype(NP_OF[t.dtype]).itemsize,
                )
            )
    return graph, req


@settings(FUZZ, max_examples=int(300 * SCALE))
@given(data=st.data())
def test_fuzz_random_tensors(fuzz_worker, data):
    graph, req = data.draw(tensor_cases(fuzz_worker.hand_id, fuzz_worker.index_id))
    code, resp, field = rpc(fuzz_worker.stub.ComputeGradients, req, COMPUTE_CODES)
    event(f"{code.name} {field}")
    if code == OK:
        check_reply(req, graph, resp)
    check_worker(fuzz_worker)


# -------------------------------------------------------------- (c) stream frames -------


def stream_header(graph_ref: dict) -> worker_pb2.ComputeGradientsRequest:
    req = good_request(**graph_ref)
    for nt in list(req.parameters) + list(req.data):
        nt.tensor.data = b""
    return req


@st.composite
def cuts(draw, data: bytes) -> list[tuple[int, bytes]]:
    """``data`` cut into contiguous (offset, piece) chunks."""
    points = sorted(set(draw(st.lists(st.integers(1, len(data) - 1), max_size=3))))
    bounds = [0] + points + [len(data)]
    return [(a, data[a:b]) for a, b in zip(bounds, bounds[1:])]


def reference_assembly(
    chunks: list[tuple[int, int, bytes]], sizes: list[int]
) -> list[bytes] | None:
    """The tensors' bytes if a chunk sequence is a valid stream (tensor.proto's Chunk
    rules: each tensor's bytes in order, contiguous from 0, non-empty chunks, nothing past
    the end, nothing missing), else None."""
    current, data_of = 0, [b""] * len(sizes)
    for index, offset, data in chunks:
        if (
            index != current
            or offset != len(data_of[index])
            or not data
            or offset + len(data) > sizes[index]
        ):
            return None
        data_of[index] += data
        while current < len(sizes) and len(data_of[current]) == sizes[current]:
            current += 1
    return data_of if current == len(sizes) else None


MUTATIONS = ["drop", "duplicate", "swap", "index", "offset", "extra", "empty", "truncate"]


@st.composite
def stream_cases(draw, hand_id: str):
    """(frames, valid): the frames of a ComputeGradientsStream call, and whether they
    form a valid request (None when the header itself is fuzzed); valid is "known" when
    the tensors' bytes are the known-good request's."""
    header = stream_header(draw(st.sampled_from([{"graph_id": hand_id}, {"graph": hand_graph()}])))
    header.stream_gradients_early = draw(st.booleans())
    valid: bool | None = True
    if draw(st.integers(0, 5)) == 0:
        # Fuzz the header too: a field of one tensor changed, or data left in it.
        t = draw(st.sampled_from([header.parameters[0].tensor, header.data[0].tensor]))
        what = draw(st.sampled_from(["dtype", "dim", "data"]))
        if what == "dtype":
            t.dtype = draw(dtype_enums)
        elif what == "dim":
            t.shape[draw(st.integers(0, 1))] = draw(dims)
        else:
            t.data = b"\0" * 4
        valid = None
    chunks = [(0, o, d) for o, d in draw(cuts(W_BYTES))] + [
        (1, o, d) for o, d in draw(cuts(X_BYTES))
    ]
    for _ in range(draw(st.integers(0, 3))):
        what = draw(st.sampled_from(MUTATIONS))
        k = draw(st.integers(0, len(chunks) - 1)) if chunks else 0
        if not chunks:
            break
        i, o, d = chunks[k]
        if what == "drop":
            del chunks[k]
        elif what == "duplicate":
            chunks.insert(k, chunks[k])  # overlapping bytes
        elif what == "swap" and k + 1 < len(chunks):
            chunks[k], chunks[k + 1] = chunks[k + 1], chunks[k]
        elif what == "index":
            chunks[k] = (draw(st.sampled_from([0, 1, 2, 2**32 - 1])), o, d)
        elif what == "offset":
            chunks[k] = (
                i,
                draw(st.sampled_from([0, min(o + 1, 2**64 - 1), max(o - 1, 0), 24, 2**64 - 1])),
                d,
            )
        elif what == "extra":
            chunks[k] = (i, o, d + b"\0" * draw(st.integers(1, 30)))  # too many bytes
        elif what == "empty":
            chunks[k] = (i, o, b"")
        elif what == "truncate":
            chunks[k] = (i, o, d[:-1])
    if valid is not None:
        assembled = reference_assembly(chunks, [len(W_BYTES), len(X_BYTES)])
        valid = assembled is not None and ("known" if assembled == [W_BYTES, X_BYTES] else True)
    frames = [
        worker_pb2.StreamFrame(
            chunk=tensor_pb2.Chunk(tensor_index=i, offset=o, data=d)
        ).SerializeToString()
        for i, o, d in chunks
    ]
    frames.insert(0, worker_pb2.StreamFrame(request=header).SerializeToString())
    # Frames of the wrong kind or order, and bytes that are no StreamFrame at all.
    wrong = draw(
        st.sampled_from(
            [None] * 6
            + ["chunk_first", "second_header", "response", "empty_frame", "garbage", "no_header"]
        )
    )
    if wrong is not None:
        valid = False
        at = draw(st.integers(0, len(frames)))
        if wrong == "chunk_first":
            frames.insert(0, frames.pop()) if len(frames) > 1 else frames.clear()
        elif wrong == "second_header":
            frames.insert(max(at, 1), frames[0])
        elif wrong == "response":
            frames.insert(
                at,
                worker_pb2.StreamFrame(
                    response=worker_pb2.ComputeGradientsResponse()
                ).SerializeToString(),
            )
        elif wrong == "empty_frame":
            frames.insert(at, b"")  # a StreamFrame with no kind set
        elif wrong == "garbage":
            frames.insert(
                at,
                draw(
                    st.sampled_from(
                        [b"\xff\xff\xff", b"\x1a\x05\x08", b"\x0a\x7f", b"\x1a\x02\x1a\x09"]
                    )
                ),
            )
        elif wrong == "no_header":
            frames.pop(0)
    return frames, valid


@settings(FUZZ, max_examples=int(300 * SCALE))
@given(data=st.data())
def test_fuzz_stream_frames(fuzz_worker, data):
    frames, valid = data.draw(stream_cases(fuzz_worker.hand_id))
    # Raw bytes on the wire (identity serializer): a client in any language can send these.
    call = fuzz_worker.channel.stream_stream(
        "/gradmesh.v1.Worker/ComputeGradientsStream",
        request_serializer=lambda b: b,
        response_deserializer=worker_pb2.StreamFrame.FromString,
    )
    code, replies, _ = rpc(
        lambda it, timeout: call(it, timeout=timeout),
        iter(frames),
        COMPUTE_CODES,
        stream_response=True,
    )
    event(f"{code.name}, valid: {valid}")
    if valid is not None:
        assert (code == OK) == bool(valid), f"{code} for a {'valid' if valid else 'bad'} stream"
    if valid == "known":
        # The reply's loss is the known-good request's (the bytes are W and X).
        losses = [r.response.loss for r in replies if r.response.HasField("loss")]
        assert losses and list(losses[0].shape) == []
        chunk = next(r.chunk for r in replies if r.WhichOneof("kind") == "chunk")
        assert chunk.tensor_index == 0
        assert chunk.data == tensor_pb2.Tensor.FromString(fuzz_worker.baseline[1]).data
    check_worker(fuzz_worker)


# ====================================================================== the shard ========

SENTINEL = {
    "w": np.arange(12, dtype=np.float32).reshape(3, 4) / 7,
    "b": np.array([1.5, -2.0, 0.25, 8.0], np.float32),
}
FZ = {"w": np.ones((3, 4), np.float32), "b": np.zeros(4, np.float32)}
SHARD_JOB_IDS = ["fz", "fz", "fz", "nope", "", "a/b", ".", "..", "x" * 129, "ü", "fz\n", "x" * 128]


def named_headers(arrays: dict) -> list[tensor_pb2.NamedTensor]:
    wire = {
        np.dtype(np.float32): F32,
        np.dtype(np.float64): F64,
        np.dtype(np.float16): F16,
        np.dtype(np.int64): I64,
    }
    return [
        tensor_pb2.NamedTensor(name=n, tensor=make_tensor(wire[a.dtype], a.shape))
        for n, a in arrays.items()
    ]


def tensor_frames(frame_cls, kind, header, buffers, chunk=16):
    frames = [frame_cls(**{kind: header})]
    for i, buf in enumerate(buffers):
        for off in range(0, len(buf), chunk):
            frames.append(
                frame_cls(
                    chunk=tensor_pb2.Chunk(tensor_index=i, offset=off, data=buf[off : off + chunk])
                )
            )
    return frames


def load_frames(job_id, arrays, optimizer):
    header = shard_pb2.LoadRequest(
        job_id=job_id, parameters=named_headers(arrays), optimizer=optimizer
    )
    return tensor_frames(
        shard_pb2.ShardFrame, "load", header, [a.tobytes() for a in arrays.values()]
    )


# Optimizers: mostly valid ones (so that jobs get created and steps applied), sometimes
# bad names, fields the optimizer does not take, negative, NaN or infinite values.
GOOD_OPTIMIZERS = [
    shard_pb2.Optimizer(name="sgd", lr=0.5),
    shard_pb2.Optimizer(name="sgd", lr=0.1, momentum=0.9, nesterov=True),
    shard_pb2.Optimizer(name="adam", lr=0.01, beta1=0.5),
    shard_pb2.Optimizer(name="adamw", amsgrad=True, weight_decay=0.0),
]
optimizers = mostly(
    st.sampled_from(GOOD_OPTIMIZERS),
    st.builds(
        lambda name, lr, momentum, beta1, nesterov: shard_pb2.Optimizer(
            name=name,
            **{
                k: v
                for k, v in (
                    ("lr", lr),
                    ("momentum", momentum),
                    ("beta1", beta1),
                    ("nesterov", nesterov),
                )
                if v is not None
            },
        ),
        st.sampled_from(["sgd", "sgd", "adam", "adamw", "", "rmsprop", "SGD"]),
        st.one_of(st.none(), st.sampled_from([0.1, 0.0, -1.0, math.nan, math.inf, 1e308])),
        st.one_of(st.none(), st.sampled_from([0.9, -0.5, math.nan])),
        st.one_of(st.none(), st.sampled_from([0.5, 1.0, -0.1, math.nan])),
        st.one_of(st.none(), st.booleans()),
    ),
    3,
)


@st.composite
def tensor_sets(draw, like: dict) -> tuple[list, list[bytes]]:
    """NamedTensor headers and their bytes: ``like``'s names, dtypes and shapes mostly,
    with random changes (names, dtypes, shapes, byte counts)."""
    headers, buffers = [], []
    if not rarely(draw, 2):
        for name, a in like.items():
            headers.append(tensor_pb2.NamedTensor(name=name, tensor=make_tensor(F32, a.shape)))
            buffers.append(tensor_bytes(F32, a.size, draw(seeds), draw(st.integers(0, 3))))
        return headers, buffers
    names = (
        list(like)
        if draw(st.integers(0, 3))
        else draw(st.lists(st.sampled_from(["w", "b", "", "v"]), max_size=3))
    )
    for name in names:
        a = like.get(name, next(iter(like.values())))
        dtype = (
            {np.dtype(np.float32): F32}[a.dtype] if draw(st.integers(0, 5)) else draw(dtype_enums)
        )
        shape = list(a.shape) if draw(st.integers(0, 5)) else draw(shapes)
        n = small_count(shape)
        if n is None or dtype not in NP_OF:
            buf = draw(st.binary(max_size=8))
        else:
            buf = tensor_bytes(dtype, n, draw(seeds), draw(st.integers(0, 3)))
            if draw(st.integers(0, 7)) == 0:
                buf = buf[:-1] if draw(st.booleans()) else buf + b"\0"
        headers.append(tensor_pb2.NamedTensor(name=name, tensor=make_tensor(dtype, shape)))
        buffers.append(buf)
    return headers, buffers


COUNTS = mostly(st.sampled_from([1, 1, 2]), st.sampled_from([0, 3, 2**31, 2**32 - 1]), 5)
INDICES = mostly(st.sampled_from([0, 0, 1]), st.sampled_from([2, 2**32 - 1]), 5)
U64 = [0, 1, 2, 3, 2**63, 2**64 - 1]
# Versions and step ids relative to the job's state when the call is made (resolved by
# ``resolve``), so that valid pushes and applies happen, or absolute and random.
versions = mostly(st.sampled_from(["current", "current", "previous"]), st.sampled_from(U64), 4)
step_ids = mostly(st.sampled_from(["next", "next", "last"]), st.sampled_from(U64), 4)
shard_job_ids = mostly(st.just("fz"), st.sampled_from(SHARD_JOB_IDS), 3)


def resolve(value, state: tuple[int, int], kind: str) -> int:
    """A symbolic version or step id for a job at (version, last step id)."""
    version, last = state
    return (
        {"current": version, "previous": max(version - 1, 0), "next": last + 1, "last": last}.get(
            value, value
        )
        if isinstance(value, str)
        else value
    )


@st.composite
def shard_calls(draw):
    """A list of functions ``(state of the job named) -> (method name, request or frames)``
    for the shard."""
    calls = []
    for _ in range(draw(st.integers(1, 5))):
        kind = draw(
            st.sampled_from(
                ["load", "pull", "push", "push", "push", "apply", "apply", "drop", "status"]
            )
        )
        job = draw(shard_job_ids)
        if kind == "load":
            headers, buffers = (
                draw(tensor_sets(FZ))
                if rarely(draw, 3)
                else (named_headers(FZ), [a.tobytes() for a in FZ.values()])
            )
            header = shard_pb2.LoadRequest(
                job_id=job, parameters=headers, optimizer=draw(optimizers)
            )
            frames = tensor_frames(shard_pb2.ShardFrame, "load", header, buffers)
            calls.append((job, lambda st_, f=frames: ("Load", f)))
        elif kind == "pull":
            v = draw(versions)
            names = draw(
                st.lists(
                    mostly(st.sampled_from(["w", "b"]), st.sampled_from(["v", ""])), max_size=3
                )
            )
            calls.append(
                (
                    job,
                    lambda st_, job=job, v=v, n=names: (
                        "Pull",
                        shard_pb2.PullRequest(job_id=job, version=resolve(v, st_, "v"), names=n),
                    ),
                )
            )
        elif kind == "push":
            headers, buffers = draw(tensor_sets(FZ))
            step, m, mb, v = draw(step_ids), draw(INDICES), draw(COUNTS), draw(versions)

            def push(st_, job=job, step=step, m=m, mb=mb, v=v, h=headers, b=buffers):
                header = shard_pb2.PushGradientsRequest(
                    job_id=job,
                    step_id=resolve(step, st_, "s"),
                    micro_batch=m,
                    micro_batches=mb,
                    version=resolve(v, st_, "v"),
                    gradients=h,
                )
                return "PushGradients", tensor_frames(shard_pb2.ShardFrame, "push", header, b)

            calls.append((job, push))
        elif kind == "apply":
            step, mb, v, ckpt = draw(step_ids), draw(COUNTS), draw(versions), draw(st.booleans())
            calls.append(
                (
                    job,
                    lambda st_, job=job, step=step, mb=mb, v=v, c=ckpt: (
                        "Apply",
                        shard_pb2.ApplyRequest(
                            job_id=job,
                            step_id=resolve(step, st_, "s"),
                            micro_batches=mb,
                            version=resolve(v, st_, "v"),
                            checkpoint=c,
                        ),
                    ),
                )
            )
        elif kind == "drop" and rarely(draw, 2):
            calls.append(
                (job, lambda st_, job=job: ("DropJob", shard_pb2.DropJobRequest(job_id=job)))
            )
        else:
            calls.append((job, lambda st_: ("Status", shard_pb2.ShardStatusRequest())))
    return calls


def pulled(stub, job_id: str) -> tuple[int, dict]:
    frames = list(stub.Pull(shard_pb2.PullRequest(job_id=job_id), timeout=DEADLINE))
    header = frames[0].pulled
    data = b"".join(f.chunk.data for f in frames[1:])
    out, pos = {}, 0
    for nt in header.parameters:
        n = math.prod(nt.tensor.shape) * np.dtype(NP_OF[nt.tensor.dtype]).itemsize
        out[nt.name] = (nt.tensor.dtype, list(nt.tensor.shape), data[pos : pos + n])
        pos += n
    return header.version, out


@pytest.fixture(scope="module")
def fuzz_shard():
    store = ShardStore()
    served = Served(serve_shard(ServerConfig(port=0), store), shard_pb2_grpc.ParameterShardStub)
    sgd = shard_pb2.Optimizer(name="sgd", lr=0.5)
    for job, arrays in (("sentinel", SENTINEL), ("fz", FZ)):
        assert served.stub.Load(iter(load_frames(job, arrays, sgd)), timeout=DEADLINE).version == 0
    served.baseline = pulled(served.stub, "sentinel")
    yield served
    served.close()


@settings(FUZZ, max_examples=int(200 * SCALE))
@given(calls=shard_calls())
def test_fuzz_shard(fuzz_shard, calls):
    stub = fuzz_shard.stub
    before = {
        j.job_id: j.version
        for j in stub.Status(shard_pb2.ShardStatusRequest(), timeout=DEADLINE).jobs
    }
    applied, dropped, log = 0, set(), []
    for job, make in calls:
        jobs = {
            j.job_id: (j.version, j.last_step_id)
            for j in stub.Status(shard_pb2.ShardStatusRequest(), timeout=DEADLINE).jobs
        }
        method, request = make(jobs.get(job, (0, 0)))
        streaming_in = isinstance(request, list)
        code, reply, _ = rpc(
            getattr(stub, method),
            iter(request) if streaming_in else request,
            SHARD_CODES,
            stream_response=(method == "Pull"),
        )
        if method == "Apply" and code == OK and not reply.already_applied:
            applied += 1
        if method == "DropJob" and code == OK and reply.dropped:
            dropped.add(job)
        log.append((method, job, code.name))
        event(f"{method} {code.name}")
    healthy(fuzz_shard.channel)
    # The sentinel job (never named by the fuzzer) is exactly as loaded.
    assert pulled(stub, "sentinel") == fuzz_shard.baseline
    # Versions only move by applied steps; every job listed can be pulled whole.
    status = stub.Status(shard_pb2.ShardStatusRequest(), timeout=DEADLINE)
    after = {j.job_id: j.version for j in status.jobs}
    for job_id, version in after.items():
        # Job ids name checkpoint files: nothing else may have been accepted.
        assert re.fullmatch(r"[A-Za-z0-9._-]{1,128}", job_id) and job_id not in (".", "..")
        if job_id in before and job_id not in dropped:
            assert before[job_id] <= version <= before[job_id] + applied, (job_id, log)
        v, arrays = pulled(stub, job_id)
        assert v == version and sorted(arrays) == sorted(
            next(j.parameters for j in status.jobs if j.job_id == job_id)
        )


# ====================================================================== the coordinator ==


@pytest.fixture(scope="module")
def fuzz_coordinator():
    worker = worker_mod.start("cpu")
    running = coordinator_mod.start(workers=[worker.address])
    served = Served(running, coordinator_pb2_grpc.CoordinatorStub)
    served.worker = worker
    stub = served.stub
    for job in ("sentinel", "fz"):
        stub.CreateJob(iter(create_frames(job)), timeout=DEADLINE)
    served.first_step = stub.Step(good_step("sentinel", 1), timeout=DEADLINE)
    served.baseline = coordinator_state(stub)
    yield served
    served.close()
    running.coordinator.close()
    worker.stop(0)


def create_frames(job_id, *, graph=None, params=None, optimizer=None, micro=2):
    header = coordinator_pb2.CreateJobRequest(
        job_id=job_id,
        graph=graph or hand_graph(),
        micro_batch_size=micro,
        optimizer=optimizer or shard_pb2.Optimizer(name="sgd", lr=0.1),
    )
    if params is None:
        params = ([tensor_pb2.NamedTensor(name="w", tensor=make_tensor(F32, [3, 2]))], [W_BYTES])
    header.parameters.extend(params[0])
    return tensor_frames(coordinator_pb2.CoordinatorFrame, "create_job", header, params[1])


def good_step(job_id, step_id):
    return coordinator_pb2.StepRequest(
        job_id=job_id,
        step_id=step_id,
        batch=[tensor_pb2.NamedTensor(name="x", tensor=make_tensor(F32, [2, 3], X_BYTES))],
    )


def coordinator_state(stub) -> tuple:
    """The sentinel job's status, parameters and the replay of its step 1."""
    status = stub.JobStatus(coordinator_pb2.JobStatusRequest(job_id="sentinel"), timeout=DEADLINE)
    params = [
        f.SerializeToString()
        for f in stub.GetParameters(
            coordinator_pb2.GetParametersRequest(job_id="sentinel"), timeout=DEADLINE
        )
    ]
    replay = stub.Step(good_step("sentinel", 1), timeout=DEADLINE)
    assert replay.replayed
    return (
        status.SerializeToString(deterministic=True),
        params,
        (replay.step_id, replay.loss, replay.version, replay.batch_size),
    )


COORD_JOB_IDS = ["fz", "new", "nope", "", "a/b", "..", "x" * 129, "fz\n"]
coord_job_ids = mostly(st.sampled_from(["fz", "fz", "ix"]), st.sampled_from(COORD_JOB_IDS), 3)
EMB = np.linspace(-1, 1, 12, dtype=np.float32).reshape(4, 3)


def index_batch(draw) -> list[tensor_pb2.NamedTensor]:
    """A batch for ``index_graph``: indices and labels mostly in range, sometimes not."""
    rows = draw(st.sampled_from([1, 2, 3]))
    out = [
        tensor_pb2.NamedTensor(
            name="x",
            tensor=make_tensor(F32, [rows, 3], tensor_bytes(F32, rows * 3, draw(seeds), 0)),
        )
    ]
    for name, top in (("idx", 4), ("y", 2)):
        values = draw(
            st.lists(
                mostly(st.integers(0, top - 1), st.sampled_from([-1, top, -100, 2**62])),
                min_size=rows,
                max_size=rows,
            )
        )
        out.append(
            tensor_pb2.NamedTensor(
                name=name, tensor=make_tensor(I64, [rows], np.array(values, "<i8").tobytes())
            )
        )
    return out


@st.composite
def coordinator_calls(draw):
    """A list of (job id, function (last step id of the job) -> (method, request))."""
    calls = []
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["create", "step", "step", "step", "get", "status"]))
        job = draw(coord_job_ids)
        if kind == "create":
            graph = (
                "index"
                if job == "ix"
                else draw(mostly(st.just("hand"), st.sampled_from(["index", "random"]), 2))
            )
            graph = (
                hand_graph()
                if graph == "hand"
                else (index_graph() if graph == "index" else draw(graphs()))
            )
            w = {"w": np.frombuffer(W_BYTES, np.float32).reshape(3, 2)}
            if job == "ix":
                w["emb"] = EMB
            params = (
                draw(tensor_sets(w))
                if rarely(draw, 2)
                else (
                    [
                        tensor_pb2.NamedTensor(name=n, tensor=make_tensor(F32, a.shape))
                        for n, a in w.items()
                    ],
                    [a.tobytes() for a in w.values()],
                )
            )
            micro = draw(mostly(st.sampled_from([1, 2, 3]), st.sampled_from([0, 2**32 - 1])))
            frames = create_frames(
                job, graph=graph, params=params, optimizer=draw(optimizers), micro=micro
            )
            calls.append((job, lambda last, f=frames: ("CreateJob", f)))
        elif kind == "step":
            step = draw(
                mostly(st.sampled_from(["next", "next", "last"]), st.sampled_from(U64 + [1, 2]), 4)
            )
            batch = []
            if job == "ix" and not rarely(draw, 3):
                batch = index_batch(draw)
            elif not rarely(draw, 3):
                rows = draw(mostly(st.sampled_from([1, 2, 3, 5]), st.just(0), 8))
                t = make_tensor(
                    F32,
                    [rows, 3],
                    tensor_bytes(F32, rows * 3, draw(seeds), draw(st.integers(0, 3))),
                )
                if rarely(draw, 4):
                    t = make_tensor(draw(dtype_enums), draw(shapes))
                    t.data = draw(data_for(t.dtype, list(t.shape)))
                batch.append(tensor_pb2.NamedTensor(name="x", tensor=t))
                if rarely(draw, 6):
                    batch.append(
                        tensor_pb2.NamedTensor(name=draw(st.sampled_from(["x", "y", ""])), tensor=t)
                    )
            else:
                batch.extend(draw(named_tensor_lists(["x", "y", "", "w"])))

            def step_call(last, job=job, step=step, batch=batch):
                step_id = {"next": last + 1, "last": last}.get(step, step)
                return "Step", coordinator_pb2.StepRequest(job_id=job, step_id=step_id, batch=batch)

            calls.append((job, step_call))
        elif kind == "get":
            names = draw(st.lists(st.sampled_from(["w", "x", ""]), max_size=2))
            calls.append(
                (
                    job,
                    lambda last, job=job, n=names: (
                        "GetParameters",
                        coordinator_pb2.GetParametersRequest(job_id=job, names=n),
                    ),
                )
            )
        else:
            calls.append(
                (
                    job,
                    lambda last, job=job: (
                        "JobStatus",
                        coordinator_pb2.JobStatusRequest(job_id=job),
                    ),
                )
            )
    return calls


@settings(FUZZ, max_examples=int(200 * SCALE))
@given(calls=coordinator_calls())
def test_fuzz_coordinator(fuzz_coordinator, calls):
    stub = fuzz_coordinator.stub
    for job, make in calls:
        try:
            last = stub.JobStatus(
                coordinator_pb2.JobStatusRequest(job_id=job), timeout=DEADLINE
            ).last_step_id
        except grpc.RpcError:
            last = 0
        method, request = make(last)
        streaming_in = isinstance(request, list)
        code, reply, _ = rpc(
            getattr(stub, method),
            iter(request) if streaming_in else request,
            COORDINATOR_CODES,
            stream_response=(method == "GetParameters"),
        )
        event(f"{method} {code.name}")
        if method == "Step" and code == OK:
            status = stub.JobStatus(coordinator_pb2.JobStatusRequest(job_id=job), timeout=DEADLINE)
            # Applied once: a new step moves the version by one, a replay by nothing.
            assert status.last_step_id >= reply.step_id and reply.version >= 1
            assert reply.replayed == (request.step_id <= last)
        if method == "CreateJob" and code == OK:
            assert re.fullmatch(r"[A-Za-z0-9._-]{1,128}", reply.job_id)
    healthy(fuzz_coordinator.channel)
    assert coordinator_state(stub) == fuzz_coordinator.baseline


# ====================================================================== explicit edges ===
# Cases the strategies above reach only by chance, run every time against all three
# services: zero-size and enormous dimensions, device placement on a CPU worker, and
# requests whose shapes are small but imply huge intermediates. Never INTERNAL or UNKNOWN.

EDGE_SHAPES = [
    [0, 2**62],
    [2**62, 0],
    [2**31, 2**31],
    [0],
    [0, 0],
    [0, 3],
    [-1, 3],
    [-3, 2],
    [3, -(2**63)],
    [2**63 - 1],
    [2**32, 2**32, 0],
    [1] * 64,
]
EDGE_IDS = ["x".join(str(d) for d in s) if len(s) < 8 else f"rank{len(s)}" for s in EDGE_SHAPES]
DEVICES = ["cuda", "cuda:0", "cuda:7", "mps", "tpu", "", "cpu"]
BIG = 2**16  # [BIG, 1] * [1, BIG]: inputs of 2**16 elements, a 2**32-element product


def edge_bytes(shape) -> bytes:
    """Zeros of ``shape`` when it is a real, small one, else nothing."""
    n = small_count(shape)
    return bytes(4 * n) if n is not None else b""


def edge_graph(w_shape=(3, 2), device=None) -> graph_pb2.Graph:
    """``hand_graph`` with w of ``w_shape``, x optionally through ``to_device(device)``."""
    g = hand_graph()
    del g.inputs[0].shape[:]
    g.inputs[0].shape.extend(w_shape)
    if device is not None:
        del g.nodes[:]
        g.nodes.extend(
            [
                graph_pb2.Node(
                    op="to_device", inputs=[1], attrs=[graph_pb2.Attribute(name="device", s=device)]
                ),  # 2
                graph_pb2.Node(op="mm", inputs=[2, 0]),
                graph_pb2.Node(op="sum", inputs=[3]),
            ]
        )
        g.outputs[0].value, g.outputs[1].value = 4, 3
    return g


def huge_product_graph(op: str) -> graph_pb2.Graph:
    """loss = sum(a OP b), a PARAM [BIG, 1], b DATA [1, BIG]: mul broadcasts and mm
    multiplies to [BIG, BIG] (2**32 elements, 16 GiB of float32)."""
    return graph_pb2.Graph(
        version=1,
        inputs=[
            graph_pb2.Input(name="w", role=PARAM, dtype=F32, shape=[BIG, 1]),
            graph_pb2.Input(name="x", role=DATA, dtype=F32, shape=[1, BIG]),
        ],
        nodes=[graph_pb2.Node(op=op, inputs=[0, 1]), graph_pb2.Node(op="sum", inputs=[2])],
        outputs=[graph_pb2.Output(name="loss", value=3)],
    )


def huge_product_request(op: str) -> worker_pb2.ComputeGradientsRequest:
    return worker_pb2.ComputeGradientsRequest(
        graph=huge_product_graph(op),
        parameters=[
            tensor_pb2.NamedTensor(name="w", tensor=make_tensor(F32, [BIG, 1], bytes(4 * BIG)))
        ],
        data=[tensor_pb2.NamedTensor(name="x", tensor=make_tensor(F32, [1, BIG], bytes(4 * BIG)))],
    )


def compute_both_ways(served, req) -> grpc.StatusCode:
    """``req`` unary and streamed; both statuses allowed, and the same."""
    code, _, _ = rpc(served.stub.ComputeGradients, req, COMPUTE_CODES)
    try:
        stream_call(served.channel, req, early=False)
        streamed = OK
    except grpc.RpcError as e:
        streamed = e.code()
        assert streamed in COMPUTE_CODES, f"{streamed.name}: {e.details()}"
    assert {code, streamed} <= COMPUTE_CODES
    return code


@pytest.mark.parametrize("shape", EDGE_SHAPES, ids=EDGE_IDS)
def test_edge_shapes_worker(fuzz_worker, shape):
    stub = fuzz_worker.stub
    # A parameter declared (and sent) with the shape.
    g = edge_graph(shape)
    rpc(stub.RegisterGraph, worker_pb2.RegisterGraphRequest(graph=g), GRAPH_CODES)
    req = good_request(graph=g)
    req.parameters[0].tensor.CopyFrom(make_tensor(F32, shape, edge_bytes(shape)))
    compute_both_ways(fuzz_worker, req)
    # A batch of the shape for a registered graph, and one inline.
    for ref in ({"graph_id": fuzz_worker.hand_id}, {"graph": hand_graph()}):
        req = good_request(**ref)
        req.data[0].tensor.CopyFrom(make_tensor(F32, shape, edge_bytes(shape)))
        compute_both_ways(fuzz_worker, req)
    check_worker(fuzz_worker)


@pytest.mark.parametrize("device", DEVICES)
def test_edge_device_placement_worker(fuzz_worker, device):
    g = edge_graph(device=device)
    code, _, _ = rpc(
        fuzz_worker.stub.RegisterGraph, worker_pb2.RegisterGraphRequest(graph=g), GRAPH_CODES
    )
    assert code == compute_both_ways(fuzz_worker, good_request(graph=g))
    if device == "cpu":
        assert code == OK
    elif device == "cuda":
        assert code == FAILED  # documented; "cuda:0" is not a device name: INVALID
    check_worker(fuzz_worker)


@pytest.mark.parametrize("op", ["mul", "mm"])
def test_edge_huge_intermediates_worker(fuzz_worker, op):
    code = compute_both_ways(fuzz_worker, huge_product_request(op))
    assert code in (EXHAUSTED, INVALID), code  # refused before anything is allocated
    check_worker(fuzz_worker)


@pytest.mark.parametrize("shape", EDGE_SHAPES, ids=EDGE_IDS)
def test_edge_shapes_shard(fuzz_shard, shape):
    stub = fuzz_shard.stub
    data = edge_bytes(shape)
    header = shard_pb2.LoadRequest(
        job_id="edge",
        optimizer=shard_pb2.Optimizer(name="sgd"),
        parameters=[tensor_pb2.NamedTensor(name="w", tensor=make_tensor(F32, shape))],
    )
    code, _, _ = rpc(
        stub.Load, iter(tensor_frames(shard_pb2.ShardFrame, "load", header, [data])), SHARD_CODES
    )
    # Gradients of the shape pushed to a loaded job (its w is [3, 4]).
    push = shard_pb2.PushGradientsRequest(
        job_id="fz",
        step_id=1,
        micro_batch=0,
        micro_batches=1,
        version=0,
        gradients=[tensor_pb2.NamedTensor(name="w", tensor=make_tensor(F32, shape))],
    )
    rpc(
        stub.PushGradients,
        iter(tensor_frames(shard_pb2.ShardFrame, "push", push, [data])),
        SHARD_CODES,
    )
    rpc(stub.Pull, shard_pb2.PullRequest(job_id="edge"), SHARD_CODES, stream_response=True)
    rpc(stub.Status, shard_pb2.ShardStatusRequest(), SHARD_CODES)
    if code == OK:
        rpc(stub.DropJob, shard_pb2.DropJobRequest(job_id="edge"), SHARD_CODES)
    healthy(fuzz_shard.channel)
    assert pulled(stub, "sentinel") == fuzz_shard.baseline


def check_coordinator(served) -> None:
    healthy(served.channel)
    assert coordinator_state(served.stub) == served.baseline


def next_step(stub, job_id: str) -> int:
    try:
        return (
            stub.JobStatus(
                coordinator_pb2.JobStatusRequest(job_id=job_id), timeout=DEADLINE
            ).last_step_id
            + 1
        )
    except grpc.RpcError:
        return 1


@pytest.mark.parametrize("shape", EDGE_SHAPES, ids=EDGE_IDS)
def test_edge_shapes_coordinator(fuzz_coordinator, shape):
    stub = fuzz_coordinator.stub
    data = edge_bytes(shape)
    params = ([tensor_pb2.NamedTensor(name="w", tensor=make_tensor(F32, shape))], [data])
    job = f"edge-{abs(hash(tuple(shape))) % 10**8}"
    code, _, _ = rpc(
        stub.CreateJob,
        iter(create_frames(job, graph=edge_graph(shape), params=params)),
        COORDINATOR_CODES,
    )
    if code == OK:
        rpc(stub.Step, good_step(job, 1), COORDINATOR_CODES)
    step = coordinator_pb2.StepRequest(
        job_id="fz",
        step_id=next_step(stub, "fz"),
        batch=[tensor_pb2.NamedTensor(name="x", tensor=make_tensor(F32, shape, data))],
    )
    rpc(stub.Step, step, COORDINATOR_CODES)
    check_coordinator(fuzz_coordinator)


@pytest.mark.parametrize("device", ["cuda", "cuda:7", "tpu"])
def test_edge_device_placement_coordinator(fuzz_coordinator, device):
    stub = fuzz_coordinator.stub
    job = f"dev-{device.replace(':', '-')}"
    code, _, _ = rpc(
        stub.CreateJob, iter(create_frames(job, graph=edge_graph(device=device))), COORDINATOR_CODES
    )
    if code == OK:
        rpc(stub.Step, good_step(job, next_step(stub, job)), COORDINATOR_CODES)
    check_coordinator(fuzz_coordinator)


@pytest.mark.parametrize("op", ["mul", "mm"])
def test_edge_huge_intermediates_coordinator(fuzz_coordinator, op):
    stub = fuzz_coordinator.stub
    job = f"huge-{op}"
    req = huge_product_request(op)
    params = (
        [tensor_pb2.NamedTensor(name="w", tensor=make_tensor(F32, [BIG, 1]))],
        [req.parameters[0].tensor.data],
    )
    code, _, _ = rpc(
        stub.CreateJob,
        iter(create_frames(job, graph=req.graph, params=params, micro=1)),
        COORDINATOR_CODES,
    )
    if code == OK:
        step = coordinator_pb2.StepRequest(
            job_id=job, step_id=next_step(stub, job), batch=list(req.data)
        )
        code, _, _ = rpc(stub.Step, step, COORDINATOR_CODES)
        assert code in (EXHAUSTED, INVALID), code
    check_coordinator(fuzz_coordinator)
