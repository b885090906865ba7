"""Every primitive op, checked four ways for each spec in ``tests/opspecs`` and each case:

* forward and gradient against PyTorch, in float64 (the spec's tolerances) and float32,
  and against torch's bfloat16 and float16 CPU kernels (a few half-precision ulps);
* float64 central finite differences of ``sum(out * w)`` at up to 20 random coordinates;
* a random projection: ``<u, vjp(w)>`` against the directional derivative ``<w, J u>``;
* second order, where the spec says so: the gradient of ``<grad, v>`` against PyTorch.

``test_every_op_has_a_spec`` fails when an op is registered without a spec that covers it,
and ``test_spec_runs_what_it_covers`` when a spec claims an op it never runs.
"""

from __future__ import annotations

import importlib
import pkgutil
import zlib

import numpy as np
import opspecs
import pytest
import torch
from opspecs import OpSpec

import gradmesh.core as gm
from gradmesh.core.registry import REGISTRY, OpError, Spec, defop

gm_tensor = importlib.import_module("gradmesh.core.hooks")

torch.set_num_threads(1)  # the suite shares 2 cores; tiny tensors gain nothing from more

EPS = 1e-6  # torch.autograd.gradcheck's defaults
FD_ATOL, FD_RTOL = 1e-5, 1e-3
FD_PROBES = 20  # coordinates probed per input: keeps large shapes fast
F32_ATOL = F32_RTOL = 1e-4


def _collect() -> list[OpSpec]:
    specs = []
    for info in pkgutil.iter_modules(opspecs.__path__):
        specs.extend(importlib.import_module(f"opspecs.{info.name}").SPECS)
    return specs


SPECS = _collect()


def _case_id(spec: OpSpec, i: int) -> str:
    shapes = "x".join("(" + ",".join(map(str, s)) + ")" for s in spec.shapes[i])
    return f"{spec.name}-{shapes or 'noinput'}"


CASES = [
    pytest.param(spec, i, id=_case_id(spec, i)) for spec in SPECS for i in range(len(spec.shapes))
]


# ---------------------------------------------------------------------------------------
# Running one case in both libraries
# ---------------------------------------------------------------------------------------


def _rng(spec: OpSpec, case: int, salt: str = "") -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(f"{spec.name}/{case}/{salt}".encode()))


def _inputs(spec: OpSpec, case: int) -> tuple[list[np.ndarray], list[int]]:
    """The case's inputs as float64/int/bool arrays, and which of them are differentiated."""
    rng = _rng(spec, case)
    arrays, diff = [], []
    for i, shape in enumerate(spec.shapes[case]):
        if i in spec.nondiff:
            arrays.append(np.asarray(spec.nondiff[i](shape, rng)))
            continue
        if callable(spec.domain):
            a = spec.domain(shape, rng)
        else:
            a = rng.uniform(*spec.domain, size=shape)
        arrays.append(np.asarray(a, dtype=np.float64))
        diff.append(i)
    return arrays, diff


def _cast(a: np.ndarray, dtype) -> np.ndarray:
    return a.astype(dtype) if a.dtype.kind == "f" else a


def _gm_inputs(arrays, diff, dtype=np.float64, requires_grad=True):
    return [
        gm.tensor(_cast(a, dtype), requires_grad=requires_grad and i in diff)
        for i, a in enumerate(arrays)
    ]


def _torch_inputs(arrays, diff, dtype=np.float64):
    return [torch.tensor(_cast(a, dtype), requires_grad=i in diff) for i, a in enumerate(arrays)]


def _np(t) -> np.ndarray:
    if isinstance(t, torch.Tensor):
        return t.detach().numpy(force=True)  # force: torch's second order gives ZeroTensors
    return np.asarray(t.detach().numpy())


def _weight(spec: OpSpec, case: int, shape) -> np.ndarray:
    """The fixed random cotangent ``w``: every check differentiates ``sum(out * w)``."""
    return _rng(spec, case, "w").standard_normal(shape)


def _differentiable(out, diff) -> bool:
    return bool(diff) and out.requires_grad


def _assert_close(got, want, atol, rtol, what: str) -> None:
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape, f"{what}: shape {got.shape}, torch has {want.shape}"
    np.testing.assert_allclose(got, want, atol=atol, rtol=rtol, err_msg=what)


def _grads_as_arrays(grads, arrays, diff):
    """Gradients of the differentiable inputs, a missing one counting as zeros."""
    return [np.zeros_like(arrays[i]) if g is None else _np(g) for i, g in zip(diff, grads)]


# ---------------------------------------------------------------------------------------
# The checks
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("spec, case", CASES)
def test_against_torch(spec: OpSpec, case: int, dtype) -> None:
    if dtype is np.float32 and not spec.float32:
        pytest.skip("spec is float64 only")
    atol, rtol = (
        (spec.atol, spec.rtol)
        if dtype is np.float64
        else (max(spec.atol, F32_ATOL), max(spec.rtol, F32_RTOL))
    )
    arrays, diff = _inputs(spec, case)
    xs, ts = _gm_inputs(arrays, diff, dtype), _torch_inputs(arrays, diff, dtype)
    out, ref = spec.gm(gm, *xs), spec.torch(torch, *ts)

    assert out.dtype.name == str(ref.dtype).removeprefix("torch."), (
        f"dtype {out.dtype}, torch gives {ref.dtype}"
    )
    assert out.requires_grad == ref.requires_grad, (
        f"requires_grad is {out.requires_grad}, torch has {ref.requires_grad}"
    )
    if out.dtype.is_floating_point:
        _assert_close(_np(out), _np(ref), atol, rtol, "forward")
    else:
        assert out.shape == tuple(ref.shape)
        np.testing.assert_array_equal(_np(out), _np(ref), err_msg="forward")
    if not _differentiable(out, diff):
        return
    w = _cast(_weight(spec, case, out.shape), dtype)
    (out * gm.tensor(w)).sum().backward()
    (ref * torch.tensor(w)).sum().backward()
    for i in diff:
        want = np.zeros_like(_cast(arrays[i], dtype)) if ts[i].grad is None else _np(ts[i].grad)
        got = np.zeros_like(want) if xs[i].grad is None else _np(xs[i].grad)
        _assert_close(got, want, atol, rtol, f"gradient of input {i}")
        if xs[i].grad is not None:
            assert xs[i].grad.dtype is xs[i].dtype, f"gradient of input {i} has the wrong dtype"


HALF = {"bfloat16": (gm.bfloat16, torch.bfloat16), "float16": (gm.float16, torch.float16)}
HALF_EPS = {"bfloat16": 2.0**-7, "float16": 2.0**-10}  # the gap after 1.0
HALF_ULPS = 4
# Specs whose half gradient is a sum of rounded terms that cancel (a broadcast 0-d base of
# pow, std's centred values): gradmesh's vjp rounds after each of its ops where torch's
# fused backward kernel rounds once, and the tolerance is relative to the result, smaller
# than the terms. Measured worst: 25 ulps (pow, bfloat16), 8 (std-dim).
HALF_LOOSE_ULPS = {"pow": 32, "std-dim": 16}


def _half_inputs(arrays, diff, dtype_name):
    """Both libraries' inputs at the same half values (torch.tensor takes no bfloat16 array)."""
    gdt, tdt = HALF[dtype_name]
    xs, ts = [], []
    for i, a in enumerate(arrays):
        if a.dtype.kind != "f":
            xs.append(gm.tensor(a))
            ts.append(torch.tensor(a))
            continue
        h = a.astype(gdt.np)
        xs.append(gm.tensor(h, requires_grad=i in diff))
        ts.append(torch.tensor(h.astype(np.float64)).to(tdt).requires_grad_(i in diff))
    return xs, ts


def _assert_half_close(got, want, dtype_name, what: str, ulps: float = HALF_ULPS) -> None:
    """Within HALF_ULPS of the half type's epsilon times the result's largest magnitude:
    torch and gradmesh both compute in float32 and round once (docs/engine.md), but may
    sum in another order or round a backward formula in other places."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, f"{what}: shape {got.shape}, torch has {want.shape}"
    finite = np.isfinite(want)
    np.testing.assert_array_equal(np.isfinite(got), finite, err_msg=what)
    scale = np.abs(want[finite]).max(initial=1e-30)
    atol = ulps * HALF_EPS[dtype_name] * scale
    np.testing.assert_allclose(got[finite], want[finite], atol=atol, rtol=0, err_msg=what)


@pytest.mark.parametrize("dtype_name", sorted(HALF))
@pytest.mark.parametrize("spec, case", CASES)
def test_half_precision_against_torch(spec: OpSpec, case: int, dtype_name) -> None:
    """bfloat16 and float16 values and gradients against torch's CPU kernels."""
    if not spec.float32:
        pytest.skip("spec is float64 only")
    arrays, diff = _inputs(spec, case)
    xs, ts = _half_inputs(arrays, diff, dtype_name)
    out, ref = spec.gm(gm, *xs), spec.torch(torch, *ts)
    assert out.dtype.name == str(ref.dtype).removeprefix("torch."), (
        f"dtype {out.dtype}, torch gives {ref.dtype}"
    )
    if not out.dtype.is_floating_point:
        np.testing.assert_array_equal(_np(out), _np(ref), err_msg="forward")
        return
    _assert_half_close(_np(out.float()), _np(ref.float()), dtype_name, "forward")
    if not _differentiable(out, diff):
        return
    w = _weight(spec, case, out.shape).astype(np.float32)
    (out * gm.tensor(w).to(out.dtype)).sum().backward()
    (ref * torch.tensor(w).to(ref.dtype)).sum().backward()
    for i in diff:
        want = ts[i].grad
        got = xs[i].grad
        if want is None or got is None:  # no gradient on one side: zeros on the other
            other = want if got is None else got
            assert other is None or not np.any(_np(other.float())), f"gradient of input {i}"
            continue
        assert got.dtype is xs[i].dtype, f"gradient of input {i} has the wrong dtype"
        ulps = HALF_LOOSE_ULPS.get(spec.name, HALF_ULPS)
        _assert_half_close(
            _np(got.float()), _np(want.float()), dtype_name, f"gradient of input {i}", ulps
        )


def _objective(spec: OpSpec, arrays, diff, w):
    """``f(arrays) = sum(op(arrays) * w)`` in float64, without recording a graph."""

    def f(values) -> float:
        with gm.no_grad():
            out = spec.gm(gm, *_gm_inputs(values, diff, requires_grad=False))
        return float(np.sum(_np(out) * w))

    return f


def _analytic(spec: OpSpec, arrays, diff, w) -> list[np.ndarray]:
    xs = _gm_inputs(arrays, diff)
    out = spec.gm(gm, *xs)
    (out * gm.tensor(w)).sum().backward()
    return _grads_as_arrays([xs[i].grad for i in diff], arrays, diff)


def _fd_case(spec: OpSpec, case: int):
    arrays, diff = _inputs(spec, case)
    out = spec.gm(gm, *_gm_inputs(arrays, diff))
    if not spec.fd:
        pytest.skip("spec opts out of finite differences (a kink or a discontinuity)")
    if not _differentiable(out, diff):
        pytest.skip("no differentiable input or output")
    return arrays, diff, _weight(spec, case, out.shape)


@pytest.mark.parametrize("spec, case", CASES)
def test_finite_differences(spec: OpSpec, case: int) -> None:
    arrays, diff, w = _fd_case(spec, case)
    f = _objective(spec, arrays, diff, w)
    grads = _analytic(spec, arrays, diff, w)
    rng = _rng(spec, case, "fd")
    failures = []
    for i, grad in zip(diff, grads):
        x = arrays[i]
        if x.size == 0:
            continue
        for flat in rng.choice(x.size, size=min(FD_PROBES, x.size), replace=False):
            coord = np.unravel_index(flat, x.shape)
            values = [a.copy() for a in arrays]
            values[i][coord] = x[coord] + EPS
            up = f(values)
            values[i][coord] = x[coord] - EPS
            numeric = (up - f(values)) / (2 * EPS)
            if abs(grad[coord] - numeric) > FD_ATOL + FD_RTOL * abs(numeric):
                failures.append(
                    f"input {i}{list(coord)}: analytic {grad[coord]:.8g}, numeric {numeric:.8g}"
                )
    assert not failures, "gradient differs from finite differences:\n" + "\n".join(failures)


@pytest.mark.parametrize("spec, case", CASES)
def test_random_projection(spec: OpSpec, case: int) -> None:
    """<u, vjp(w)> equals <w, J u>: every element of every gradient at once, where the
    coordinate probes above see at most 20 per input."""
    arrays, diff, w = _fd_case(spec, case)
    f = _objective(spec, arrays, diff, w)
    grads = _analytic(spec, arrays, diff, w)
    rng = _rng(spec, case, "u")
    u = {i: rng.standard_normal(arrays[i].shape) for i in diff}
    up = [a + EPS * u[i] if i in u else a for i, a in enumerate(arrays)]
    down = [a - EPS * u[i] if i in u else a for i, a in enumerate(arrays)]
    directional = (f(up) - f(down)) / (2 * EPS)
    projected = sum(float(np.sum(u[i] * g)) for i, g in zip(diff, grads))
    scale = sum(float(np.sum(np.abs(u[i] * g))) for i, g in zip(diff, grads))
    assert abs(projected - directional) <= FD_ATOL + FD_RTOL * max(abs(directional), scale), (
        f"<u, vjp(w)> = {projected:.10g} but <w, J u> = {directional:.10g}"
    )


def _second_order(lib, spec_fn, inputs, diff, w, v):
    """Gradient w.r.t. the inputs of <grad(sum(out * w)), v> (create_graph)."""
    xs = [inputs[i] for i in diff]
    out = spec_fn(lib, *inputs)
    loss = (out * lib.tensor(w)).sum()
    grads = lib.autograd.grad(loss, xs, create_graph=True, allow_unused=True)
    terms = [
        (g * lib.tensor(v[i])).sum()
        for i, g in zip(diff, grads)
        if g is not None and g.requires_grad
    ]
    if not terms:
        return [None] * len(xs)  # the gradient is constant: the op is linear
    s = terms[0]
    for t in terms[1:]:
        s = s + t
    return lib.autograd.grad(s, xs, allow_unused=True)


@pytest.mark.parametrize("spec, case", CASES)
def test_second_order(spec: OpSpec, case: int) -> None:
    if not spec.second_order:
        pytest.skip("spec has no second order check")
    arrays, diff = _inputs(spec, case)
    out = spec.gm(gm, *_gm_inputs(arrays, diff))
    if not _differentiable(out, diff):
        pytest.skip("no differentiable input or output")
    w = _weight(spec, case, out.shape)
    rng = _rng(spec, case, "v")
    v = {i: rng.standard_normal(arrays[i].shape) for i in diff}
    got = _second_order(gm, spec.gm, _gm_inputs(arrays, diff), diff, w, v)
    want = _second_order(torch, spec.torch, _torch_inputs(arrays, diff), diff, w, v)
    for i, g, t in zip(
        diff, _grads_as_arrays(got, arrays, diff), _grads_as_arrays(want, arrays, diff)
    ):
        _assert_close(g, t, max(spec.atol, 1e-6), max(spec.rtol, 1e-6), f"second order, input {i}")


@pytest.mark.gpu
@pytest.mark.parametrize("spec, case", CASES)
def test_cuda_matches_numpy(spec: OpSpec, case: int) -> None:
    """The CuPy backend computes what the NumPy one does, forward and gradient."""
    if not gm.cuda_available():
        pytest.skip("needs a CUDA device and CuPy")
    if "to_device" in spec.covers:
        pytest.skip("the spec chooses its device itself: see test_cuda_round_trip_gradient")
    arrays, diff = _inputs(spec, case)
    results = []
    for device in ("cpu", "cuda"):
        xs = [gm.tensor(a, device=device, requires_grad=i in diff) for i, a in enumerate(arrays)]
        out = spec.gm(gm, *xs)
        assert out.device == device
        grads = []
        if _differentiable(out, diff):
            w = gm.tensor(_weight(spec, case, out.shape), device=device)
            (out * w).sum().backward()
            grads = _grads_as_arrays([xs[i].grad for i in diff], arrays, diff)
        results.append((_np(out), grads))
    (out_cpu, grads_cpu), (out_gpu, grads_gpu) = results
    # CUDA's math library may differ from NumPy's in the last bit of a float32 result.
    tol = 1e-9 if out_cpu.dtype != np.float32 else 2e-6
    _assert_close(out_gpu, out_cpu, tol, tol, "forward on cuda")
    for i, g, c in zip(diff, grads_gpu, grads_cpu):
        _assert_close(g, c, tol, tol, f"gradient of input {i} on cuda")


@pytest.mark.gpu
def test_cuda_round_trip_gradient() -> None:
    """cpu -> cuda -> cpu: values survive and the gradient flows back to the cpu leaf."""
    if not gm.cuda_available():
        pytest.skip("needs a CUDA device and CuPy")
    x = gm.tensor([[1.0, -2.0], [3.0, 0.5]], dtype=gm.float64, requires_grad=True)
    on_gpu = x.to("cuda")
    assert on_gpu.device == "cuda"
    y = (on_gpu * on_gpu).to("cpu")
    assert y.device == "cpu"
    y.sum().backward()
    assert x.grad.device == "cpu"
    np.testing.assert_array_equal(x.grad.numpy(), 2 * x.detach().numpy())


# ---------------------------------------------------------------------------------------
# Coverage of the registry
# ---------------------------------------------------------------------------------------


def _uncovered(specs) -> list[str]:
    covered = {name for spec in specs for name in spec.covers}
    return sorted(set(REGISTRY) - covered)


def test_every_op_has_a_spec() -> None:
    missing = _uncovered(SPECS)
    assert not missing, (
        f"ops without a test spec: {missing}; add an OpSpec that covers each "
        f"to a module in tests/opspecs/"
    )


def test_op_errors_are_runtime_errors_and_value_errors() -> None:
    """Runtime errors as torch's are; value errors as they were, which servers answer with
    INVALID_ARGUMENT."""
    for cls in (RuntimeError, ValueError):
        with pytest.raises(cls, match="mm: expected 2-D"):
            gm.mm(gm.ones(2), gm.ones(2, 1))


def test_an_op_added_without_a_spec_is_caught() -> None:
    """The check above really looks at the live registry."""
    defop("test_only_identity", infer=lambda a: Spec(tuple(a.shape), a.dtype))(lambda xp, a: a)
    try:
        assert _uncovered(SPECS) == ["test_only_identity"]
    finally:
        del REGISTRY["test_only_identity"]


def test_covers_name_registered_ops() -> None:
    unknown = {
        spec.name: sorted(set(spec.covers) - set(REGISTRY))
        for spec in SPECS
        if set(spec.covers) - set(REGISTRY)
    }
    assert not unknown, f"specs cover ops that are not registered: {unknown}"


def test_spec_names_are_unique() -> None:
    names = [spec.name for spec in SPECS]
    assert len(names) == len(set(names)), sorted({n for n in names if names.count(n) > 1})


class _Recorder:
    """A dispatch tracer that notes the ops that run and checks each one's ``infer``
    (what graph validation relies on) against the shape and dtype it really produced."""

    def __init__(self):
        self.seen: set[str] = set()
        self.mismatches: list[str] = []

    def record(self, op, inputs, attrs, result) -> None:
        self.seen.add(op.name)
        spec = op.infer(*[Spec(tuple(t.shape), t.dtype) for t in inputs], **attrs)
        shape_ok = len(spec.shape) == result.ndim and all(
            s in (-1, r) for s, r in zip(spec.shape, result.shape)
        )  # -1: data-dependent
        if not shape_ok or spec.dtype is not result.dtype:
            self.mismatches.append(
                f"{op.name}{attrs}: infer says {spec}, forward gave "
                f"{tuple(result.shape)} {result.dtype}"
            )


@pytest.mark.parametrize("spec", SPECS, ids=[s.name for s in SPECS])
def test_spec_runs_what_it_covers(spec: OpSpec) -> None:
    """A spec's ``covers`` are ops that its forward, backward or second order really run,
    and every op that runs has an ``infer`` that agrees with its forward."""
    recorder = _Recorder()
    previous, gm_tensor._dispatch.tracer = gm_tensor._dispatch.tracer, recorder
    try:
        for case in range(len(spec.shapes)):
            arrays, diff = _inputs(spec, case)
            xs = _gm_inputs(arrays, diff)
            out = spec.gm(gm, *xs)
            if _differentiable(out, diff):
                w = _weight(spec, case, out.shape)
                v = {i: np.ones_like(arrays[i]) for i in diff}
                if spec.second_order:
                    _second_order(gm, spec.gm, _gm_inputs(arrays, diff), diff, w, v)
                else:
                    (out * gm.tensor(w)).sum().backward()
    finally:
        gm_tensor._dispatch.tracer = previous
    assert set(spec.covers) <= recorder.seen, (
        f"{spec.name} never runs {sorted(set(spec.covers) - recorder.seen)}"
    )
    assert not recorder.mismatches, "\n".join(recorder.mismatches)


# ---------------------------------------------------------------------------------------
# Errors name the op, the shapes and the fix
# ---------------------------------------------------------------------------------------


def _z(*shape):
    return gm.zeros(*shape)


_ix = gm.tensor


def _mask(*shape):
    return gm.ones(*shape, dtype=gm.bool)


ERRORS = [
    (
        "cat-sizes",
        lambda: gm.cat([_z(2, 3), _z(3, 4)], 0),
        OpError,
        ["cat", "dimension 0", "(2, 3)", "(3, 4)"],
    ),
    ("cat-ndim", lambda: gm.cat([_z(2, 3), _z(3)]), OpError, ["cat", "(2, 3)", "(3,)"]),
    ("cat-empty", lambda: gm.cat([]), OpError, ["cat", "non-empty"]),
    ("cat-0d", lambda: gm.cat([_z(), _z()]), OpError, ["cat", "zero-dimensional", "stack"]),
    ("stack-shapes", lambda: gm.stack([_z(2), _z(3)]), OpError, ["stack", "(2,)", "(3,)"]),
    ("reshape", lambda: _z(2, 3).reshape(4, 2), OpError, ["reshape", "(4, 2)", "size 6"]),
    ("view-two-minus-one", lambda: _z(2, 3).view(-1, -1), OpError, ["reshape", "-1"]),
    ("getitem-int", lambda: _z(3, 4)[3], IndexError, ["index 3", "dimension 0", "size 3"]),
    ("getitem-int-dim1", lambda: _z(3, 4)[:, -5], IndexError, ["index -5", "dimension 1"]),
    (
        "getitem-tensor",
        lambda: _z(3, 4)[_ix([0, 5])],
        IndexError,
        ["index", "index 5", "dimension 0", "size 3"],
    ),
    ("getitem-step", lambda: _z(3)[::-1], ValueError, ["step", "greater than zero", "flip"]),
    ("getitem-too-many", lambda: _z(3)[0, 1], IndexError, ["too many indices", "(3,)"]),
    ("getitem-two-ellipses", lambda: _z(3)[..., ...], IndexError, ["ellipsis"]),
    ("getitem-float-index", lambda: _z(3)[_ix([0.0])], IndexError, ["long, int or bool"]),
    (
        "getitem-mask-shape",
        lambda: _z(3, 4)[gm.ones(4, dtype=gm.bool)],
        IndexError,
        ["mask", "(4,)", "(3, 4)"],
    ),
    (
        "getitem-broadcast",
        lambda: _z(3, 4)[_ix([0, 1]), _ix([0, 1, 2])],
        OpError,
        ["index", "(2,)", "(3,)", "broadcast"],
    ),
    (
        "index-dims",
        lambda: gm.REGISTRY["index"](_z(3), _ix([0]), dims=[1]),
        OpError,
        ["index", "(1,)", "(3,)"],
    ),
    (
        "index_put-values",
        lambda: gm.REGISTRY["index_put"](_z(3, 2), _z(4), _ix([0]), dims=[0]),
        OpError,
        ["index_put", "(4,)", "(1, 2)"],
    ),
    (
        "index_put-dtype",
        lambda: gm.REGISTRY["index_put"](_z(3), gm.zeros(1, dtype=gm.float64), _ix([0]), dims=[0]),
        OpError,
        ["index_put", "float64", "float32", ".to("],
    ),
    (
        "slice-range",
        lambda: gm.REGISTRY["slice"](_z(3), starts=[4], stops=[5], steps=[1]),
        OpError,
        ["slice", "4:5", "size 3"],
    ),
    (
        "slice-step",
        lambda: gm.REGISTRY["slice"](_z(3), starts=[0], stops=[3], steps=[0]),
        OpError,
        ["slice", "step", "flip"],
    ),
    (
        "slice-arity",
        lambda: gm.REGISTRY["slice"](_z(3, 2), starts=[0], stops=[3], steps=[1]),
        OpError,
        ["slice", "(3, 2)", "one start"],
    ),
    ("gather-ndim", lambda: _z(3, 4).gather(1, _ix([0])), OpError, ["gather", "(3, 4)", "(1,)"]),
    (
        "gather-size",
        lambda: _z(3, 4).gather(1, _ix([[0]] * 4)),
        OpError,
        ["gather", "size 4", "dimension 0"],
    ),
    (
        "gather-range",
        lambda: _z(3, 4).gather(1, _ix([[4]])),
        IndexError,
        ["gather", "index 4", "size 4"],
    ),
    (
        "gather-negative",
        lambda: _z(3, 4).gather(1, _ix([[-1]])),
        IndexError,
        ["gather", "index -1"],
    ),
    ("gather-float-index", lambda: _z(3, 4).gather(1, _z(3, 4)), OpError, ["gather", "int64"]),
    (
        "scatter_add-dtype",
        lambda: _z(3).scatter_add(0, _ix([0]), gm.zeros(1, dtype=gm.float64)),
        OpError,
        ["scatter_add", "float64", ".to("],
    ),
    (
        "index_select-matrix",
        lambda: _z(3).index_select(0, _ix([[0]])),
        OpError,
        ["index_select", "vector", "(1, 1)"],
    ),
    (
        "index_add-shape",
        lambda: _z(3, 2).index_add(0, _ix([0, 1]), _z(3, 2)),
        OpError,
        ["index_add", "(3, 2)", "(2, 2)"],
    ),
    (
        "masked_fill-shape",
        lambda: _z(3).masked_fill(gm.ones(2, 3, dtype=gm.bool), 0.0),
        OpError,
        ["masked_fill", "(2, 3)", "(3,)"],
    ),
    ("mean-int", lambda: _ix([1, 2]).mean(), OpError, ["mean", "int64", "dtype="]),
    ("var-int", lambda: _ix([1, 2]).var(), OpError, ["var", "int64"]),
    ("amax-empty", lambda: _z(0, 3).amax(0), OpError, ["amax", "(0, 3)"]),
    ("max-empty", lambda: _z(0).max(), OpError, ["amax", "(0,)"]),
    ("argmax-dim", lambda: _z(2, 3).argmax(2), OpError, ["argmax", "[-2, 1]", "got 2"]),
    ("sum-dim", lambda: _z(2, 3).sum(5), OpError, ["sum", "got 5"]),
    ("sum-repeated-dim", lambda: _z(2, 3).sum((1, -1)), OpError, ["sum", "multiple times"]),
    ("cumsum-dim", lambda: _z(2, 3).cumsum(2), OpError, ["cumsum", "got 2"]),
    ("unsqueeze", lambda: _z(2, 3).unsqueeze(3), OpError, ["unsqueeze", "[-3, 2]", "got 3"]),
    ("squeeze", lambda: _z(2, 3).squeeze(2), OpError, ["squeeze", "got 2"]),
    ("transpose", lambda: _z(2, 3).transpose(0, 2), OpError, ["transpose", "got 2"]),
    ("permute", lambda: _z(2, 3).permute(0, 0), OpError, ["permute", "(0, 0)", "(2, 3)"]),
    ("expand", lambda: _z(2, 3).expand(4, 3), OpError, ["expand", "(4, 3)", "(2, 3)"]),
    ("repeat", lambda: _z(2, 3).repeat(2), OpError, ["repeat", "(2, 3)"]),
    ("narrow", lambda: _z(2, 3).narrow(1, 2, 2), OpError, ["narrow", "exceeds", "size (3)"]),
    ("select", lambda: gm.select(_z(2, 3), 1, 3), IndexError, ["select", "index 3"]),
    ("split", lambda: _z(2, 3).split([1, 1], 1), OpError, ["split", "[1, 1]", "sum exactly to 3"]),
    ("chunk", lambda: _z(2, 3).chunk(0), OpError, ["chunk", "greater than 0"]),
    ("flatten", lambda: _z(2, 3, 4).flatten(2, 1), OpError, ["flatten", "start_dim"]),
    ("unflatten", lambda: _z(2, 6).unflatten(1, (4, 2)), OpError, ["unflatten", "(4, 2)", "(6)"]),
    ("flip-repeated", lambda: _z(2, 3).flip((0, 0)), OpError, ["flip", "multiple times"]),
    ("t-3d", lambda: _z(2, 2, 2).t(), OpError, ["t:", "(2, 2, 2)", "transpose"]),
    ("tril-1d", lambda: _z(3).tril(), OpError, ["tril", "2 dimensions", "(3,)"]),
    ("topk-k", lambda: _z(3).topk(4), OpError, ["topk", "k (4)", "size 3"]),
    ("dot-2d", lambda: gm.dot(_z(2, 2), _z(2)), OpError, ["dot", "1D", "(2, 2)"]),
    ("dot-sizes", lambda: gm.dot(_z(3), _z(2)), OpError, ["dot", "(3,)", "(2,)"]),
    ("bmm", lambda: gm.bmm(_z(2, 3, 4), _z(3, 4, 5)), OpError, ["bmm", "(2, 3, 4)", "(3, 4, 5)"]),
    ("mv", lambda: gm.mv(_z(2, 3), _z(3, 1)), OpError, ["mv", "(3, 1)"]),
    ("outer", lambda: gm.outer(_z(2, 3), _z(3)), OpError, ["outer", "(2, 3)"]),
    ("matmul-inner", lambda: _z(2, 3) @ _z(2, 3), OpError, ["matmul", "(2, 3)", "3 and 2"]),
    (
        "matmul-dtypes",
        lambda: _z(2, 3) @ gm.zeros(3, 2, dtype=gm.float64),
        OpError,
        ["matmul", "float32", "float64", ".to("],
    ),
    # What torch refuses for bool tensors, refused before NumPy fails at run time.
    ("neg-bool", lambda: -_mask(3), OpError, ["neg", "bool", "(3,)", "logical_not"]),
    ("relu-bool", lambda: _mask(3).relu(), OpError, ["relu", "bool", "(3,)"]),
    ("sub-bool", lambda: _z(3) - _mask(3), OpError, ["sub", "bool", "logical_not"]),
    ("pow-bools", lambda: _mask(3) ** _mask(3), OpError, ["pow", "bool", ".long()"]),
    ("abs-bool", lambda: _mask(3).abs(), OpError, ["abs", "bool", "(3,)"]),
    ("argmax-bool", lambda: _mask(2, 3).argmax(1), OpError, ["argmax", "bool", "(2, 3)"]),
    ("argmin-bool", lambda: _mask(3).argmin(), OpError, ["argmin", "bool", "(3,)"]),
    (
        "clamp-bool-bounds",
        lambda: _mask(3).clamp(False, True),
        OpError,
        ["clamp", "bool", "(3,)", ".long()"],
    ),
    # What torch refuses for integer tensors, where NumPy would compute something else.
    (
        "leaky_relu-int",
        lambda: gm.nn.functional.leaky_relu(_ix([-2, 3])),
        OpError,
        ["leaky_relu", "int64", "(2,)", ".float()"],
    ),
    (
        "leaky_relu-bool",
        lambda: gm.nn.functional.leaky_relu(_mask(3)),
        OpError,
        ["leaky_relu", "bool", "(3,)", ".float()"],
    ),
    # The primitive (what a graph holds) clamps in its input's dtype: no fractional bound
    # for integers. gm.clamp casts first, as torch promotes.
    (
        "clamp-op-int-fraction",
        lambda: gm.REGISTRY["clamp"](_ix([-3, 0, 5]), min=-0.5),
        OpError,
        ["clamp", "min=-0.5", "int64", "(3,)", ".float()"],
    ),
    (
        "softmax_grad-dtypes",
        lambda: gm.REGISTRY["softmax_grad"](gm.zeros(3, dtype=gm.float64), _z(3), dim=-1),
        OpError,
        ["softmax_grad", "float32", "float64", ".to("],
    ),
    (
        "log_softmax_grad-int",
        lambda: gm.REGISTRY["log_softmax_grad"](_ix([1]), _ix([1]), dim=0),
        OpError,
        ["log_softmax_grad", "floating point", "int64"],
    ),
]


@pytest.mark.parametrize("fn, exc, parts", [pytest.param(*e[1:], id=e[0]) for e in ERRORS])
def test_error_names_op_and_shapes(fn, exc, parts) -> None:
    with pytest.raises(exc) as info:
        fn()
    message = str(info.value)
    missing = [p for p in parts if p not in message]
    assert not missing, f"{missing} not in the message: {message!r}"
