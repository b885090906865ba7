"""Every primitive op, checked four ways for each spec in ``tests/opspecs`` and each case:

* forward and gradient against PyTorch, in float64 (the spec's tolerances) and float32;
* float64 central finite differences of ``sum(out * w)`` at up to 20 random coordinates;
* a random projection: ``<u, vjp(w)>`` against the directional derivative ``<w, J u>``;
* second order, where the spec says so: the gradient of ``<grad, v>`` against PyTorch.

``test_every_op_has_a_spec`` fails when an op is registered without a spec that covers it,
and ``test_spec_runs_what_it_covers`` when a spec claims an op it never runs.
"""
from __future__ import annotations

import importlib
import pkgutil
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

import gradmesh.core as gm
from gradmesh.core.registry import REGISTRY

gm_tensor = importlib.import_module("gradmesh.core.tensor")    # gm.tensor is the function

sys.path.insert(0, str(Path(__file__).parent))
import opspecs  # noqa: E402
from opspecs import OpSpec  # noqa: E402

torch.set_num_threads(1)    # the suite shares 2 cores; tiny tensors gain nothing from more

EPS = 1e-6                  # torch.autograd.gradcheck's defaults
FD_ATOL, FD_RTOL = 1e-5, 1e-3
FD_PROBES = 20              # coordinates probed per input: keeps large shapes fast
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


CASES = [pytest.param(spec, i, id=_case_id(spec, i))
         for spec in SPECS for i in range(len(spec.shapes))]


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
    return [gm.tensor(_cast(a, dtype), requires_grad=requires_grad and i in diff)
            for i, a in enumerate(arrays)]


def _torch_inputs(arrays, diff, dtype=np.float64):
    return [torch.tensor(_cast(a, dtype), requires_grad=i in diff)
            for i, a in enumerate(arrays)]


def _np(t) -> np.ndarray:
    if isinstance(t, torch.Tensor):
        return t.detach().numpy(force=True)     # force: torch's second order gives ZeroTensors
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
    atol, rtol = (spec.atol, spec.rtol) if dtype is np.float64 else (
        max(spec.atol, F32_ATOL), max(spec.rtol, F32_RTOL))
    arrays, diff = _inputs(spec, case)
    xs, ts = _gm_inputs(arrays, diff, dtype), _torch_inputs(arrays, diff, dtype)
    out, ref = spec.gm(gm, *xs), spec.torch(torch, *ts)

    assert out.dtype.name == str(ref.dtype).removeprefix("torch."), \
        f"dtype {out.dtype}, torch gives {ref.dtype}"
    assert out.requires_grad == ref.requires_grad, \
        f"requires_grad is {out.requires_grad}, torch has {ref.requires_grad}"
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
                failures.append(f"input {i}{list(coord)}: analytic {grad[coord]:.8g}, "
                                f"numeric {numeric:.8g}")
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
    assert abs(projected - directional) <= FD_ATOL + FD_RTOL * max(abs(directional), scale), \
        f"<u, vjp(w)> = {projected:.10g} but <w, J u> = {directional:.10g}"


def _second_order(lib, spec_fn, inputs, diff, w, v):
    """Gradient w.r.t. the inputs of <grad(sum(out * w)), v> (create_graph)."""
    xs = [inputs[i] for i in diff]
    out = spec_fn(lib, *inputs)
    loss = (out * lib.tensor(w)).sum()
    grads = lib.autograd.grad(loss, xs, create_graph=True, allow_unused=True)
    terms = [(g * lib.tensor(v[i])).sum() for i, g in zip(diff, grads)
             if g is not None and g.requires_grad]
    if not terms:
        return [None] * len(xs)       # the gradient is constant: the op is linear
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
    for i, g, t in zip(diff, _grads_as_arrays(got, arrays, diff),
                       _grads_as_arrays(want, arrays, diff)):
        _assert_close(g, t, max(spec.atol, 1e-6), max(spec.rtol, 1e-6),
                      f"second order, input {i}")


# ---------------------------------------------------------------------------------------
# Coverage of the registry
# ---------------------------------------------------------------------------------------

def test_every_op_has_a_spec() -> None:
    covered = {name for spec in SPECS for name in spec.covers}
    missing = sorted(set(REGISTRY) - covered)
    assert not missing, (f"ops without a test spec: {missing}; add an OpSpec that covers each "
                         f"to a module in tests/opspecs/")


def test_covers_name_registered_ops() -> None:
    unknown = {spec.name: sorted(set(spec.covers) - set(REGISTRY)) for spec in SPECS
               if set(spec.covers) - set(REGISTRY)}
    assert not unknown, f"specs cover ops that are not registered: {unknown}"


def test_spec_names_are_unique() -> None:
    names = [spec.name for spec in SPECS]
    assert len(names) == len(set(names)), sorted({n for n in names if names.count(n) > 1})


class _Recorder:
    """A dispatch tracer that only notes the names of the ops that run."""

    def __init__(self):
        self.seen: set[str] = set()

    def record(self, op, inputs, attrs, result) -> None:
        self.seen.add(op.name)


@pytest.mark.parametrize("spec", SPECS, ids=[s.name for s in SPECS])
def test_spec_runs_what_it_covers(spec: OpSpec) -> None:
    """A spec's ``covers`` are ops that its forward, backward or second order really run."""
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
    assert set(spec.covers) <= recorder.seen, \
        f"{spec.name} never runs {sorted(set(spec.covers) - recorder.seen)}"
