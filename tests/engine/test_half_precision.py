"""float16 and bfloat16: dtypes, promotion, interop, and the accumulation rule (docs/engine.md).

The rule is PyTorch's on the CPU: every op computes in float32 and rounds its result once
to the half type. Values and gradients are checked against torch's own bfloat16/float16
CPU results and against float64 finite differences.
"""

from __future__ import annotations

import io

import ml_dtypes
import numpy as np
import pytest
import safetensors.torch
import torch
import torch.nn.functional as TF

import gradmesh.core as gm
import gradmesh.core.nn.functional as F

HALF = {"bfloat16": (gm.bfloat16, torch.bfloat16), "float16": (gm.float16, torch.float16)}
# The gap between 1 and the next representable number.
EPS = {"bfloat16": 2.0**-7, "float16": 2.0**-10}


def _bits(t) -> np.ndarray:
    """A tensor's (torch or gradmesh) 16-bit patterns, to compare values bitwise."""
    if isinstance(t, torch.Tensor):
        return t.detach().view(torch.int16).numpy()
    return np.asarray(t.detach()).view(np.int16)


def _torch(a: np.ndarray, dtype, requires_grad=False) -> torch.Tensor:
    """A torch tensor holding exactly the values of the half array ``a``."""
    t = torch.from_numpy(a.astype(np.float32)).to(dtype)
    return t.requires_grad_(requires_grad)


# ---------------------------------------------------------------------------------------
# dtypes, promotion, conversion
# ---------------------------------------------------------------------------------------


def test_creation_and_conversion_match_torch_bitwise():
    values = np.random.default_rng(0).standard_normal(64).tolist() + [1e-40, 6e4, -0.0]
    for name, (gdt, tdt) in HALF.items():
        expected = _bits(torch.tensor(values, dtype=tdt))
        assert np.array_equal(_bits(gm.tensor(values, dtype=gdt)), expected), name
        f32 = gm.tensor(values)
        assert np.array_equal(_bits(f32.to(gdt)), expected), name
    assert gm.tensor([1.0]).bfloat16().dtype is gm.bfloat16
    assert gm.tensor([1.0]).half().dtype is gm.float16 is gm.half
    assert gm.tensor([1.5], dtype=gm.bfloat16).float().dtype is gm.float32
    # Printed as the float32 values they hold, not as NumPy prints a user dtype.
    assert repr(gm.tensor([1.0, 2.5], dtype=gm.bfloat16)) == (
        repr(gm.tensor([1.0, 2.5]))[:-1] + ", dtype=gradmesh.bfloat16)"
    )


def test_promotion_follows_torch():
    kinds = {
        "bf16": (gm.tensor([1.0, 2.0], dtype=gm.bfloat16), torch.ones(2, dtype=torch.bfloat16)),
        "f16": (gm.tensor([1.0, 2.0], dtype=gm.float16), torch.ones(2, dtype=torch.float16)),
        "f32": (gm.tensor([1.0, 2.0]), torch.ones(2)),
        "f64": (gm.tensor([1.0, 2.0], dtype=gm.float64), torch.ones(2, dtype=torch.float64)),
        "i64": (gm.tensor([1, 2]), torch.ones(2, dtype=torch.int64)),
        "bool": (gm.tensor([True, False]), torch.ones(2, dtype=torch.bool)),
        "f32 0-d": (gm.tensor(1.0), torch.tensor(1.0)),
        "bf16 0-d": (gm.tensor(1.0, dtype=gm.bfloat16), torch.tensor(1.0, dtype=torch.bfloat16)),
        "2.5": (2.5, 2.5),
        "3": (3, 3),
    }
    for ka, (ga, ta) in kinds.items():
        for kb, (gb, tb) in kinds.items():
            if isinstance(ga, (int, float)) and isinstance(gb, (int, float)):
                continue
            expected = str(torch.result_type(ta, tb)).replace("torch.", "")
            assert (ga + gb).dtype.name == expected, (ka, kb)


def test_numpy_and_array_are_ml_dtypes_arrays():
    t = gm.tensor([1.0, 2.0**-9, 3.0], dtype=gm.bfloat16)
    a = t.numpy()
    assert a.dtype == ml_dtypes.bfloat16 and np.asarray(t).dtype == ml_dtypes.bfloat16
    assert np.shares_memory(a, t.numpy())
    assert gm.from_numpy(a).dtype is gm.bfloat16
    assert np.array_equal(np.asarray(t, dtype=np.float32), [1.0, 2.0**-9, 3.0])


def test_dlpack_gives_a_clear_error_and_the_documented_bit_view_works():
    t = gm.tensor([1.0, -2.5], dtype=gm.bfloat16)
    with pytest.raises(BufferError, match="bfloat16.*view"):
        torch.from_dlpack(t)
    shared = torch.from_numpy(t.numpy().view(np.int16)).view(torch.bfloat16)
    assert shared.tolist() == [1.0, -2.5]
    back = gm.from_numpy(shared.view(torch.int16).numpy().view(ml_dtypes.bfloat16))
    assert back.dtype is gm.bfloat16 and back.tolist() == [1.0, -2.5]
    # float16 goes through DLPack as any NumPy dtype does.
    h = gm.tensor([1.0, 0.5], dtype=gm.float16)
    assert torch.from_dlpack(h).dtype is torch.float16


def test_torch_bfloat16_tensors_come_in_through_their_bits():
    """torch's numpy() and DLPack refuse bfloat16: gm.tensor copies one, gm.as_tensor and
    gm.from_dlpack share its memory; the other way torch gets a clear error."""
    t = torch.tensor([[1.5, -2.25, 3e38], [0.0, -0.0, float("inf")]], dtype=torch.bfloat16)
    for make in (gm.tensor, gm.as_tensor, gm.from_dlpack):
        got = make(t)
        assert got.dtype is gm.bfloat16 and got.shape == (2, 3)
        np.testing.assert_array_equal(_bits(got), _bits(t))
    strided = gm.tensor(t.T[::2])
    np.testing.assert_array_equal(_bits(strided), _bits(t.T[::2]))
    gm.as_tensor(t).add_(1)
    gm.from_dlpack(t).add_(1)
    gm.tensor(t).add_(100)  # a copy: t does not see it
    assert t[0, :2].tolist() == [3.5, -0.25]
    assert gm.as_tensor(t, dtype=gm.float32).dtype is gm.float32
    ours = gm.tensor([1.0, -2.5], dtype=gm.bfloat16)
    for take in (torch.as_tensor, torch.tensor, torch.from_dlpack):
        with pytest.raises(BufferError, match="bfloat16.*view"):
            take(ours)


def test_a_torch_bfloat16_tensor_that_requires_grad_is_refused_as_float32_ones_are():
    """torch refuses numpy() of a tensor that requires grad; its int16 view would not, so
    gradmesh refuses it itself, with torch's message, as for a float32 tensor."""
    for dtype in (torch.float32, torch.bfloat16):
        t = torch.ones(3, dtype=dtype, requires_grad=True)
        for make in (gm.tensor, gm.as_tensor, gm.from_dlpack):
            with pytest.raises((RuntimeError, BufferError), match="require"):
                make(t)
        assert gm.tensor(t.detach()).shape == (3,)


@np.errstate(invalid="ignore")  # NaN patterns are among the probes
def _float32_probes(half_np) -> np.ndarray:
    """float32 values where rounding to ``half_np`` can go wrong: every half value, the
    midpoints between neighbours (ties) and one float32 step either side of them, NaNs
    with payloads, infinities, subnormals, and random bit patterns."""
    every = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(half_np)
    finite = np.unique(every.astype(np.float64)[np.isfinite(every.astype(np.float64))])
    mids = ((finite[:-1] + finite[1:]) / 2).astype(np.float32)  # exact in float32
    beyond = np.array([65504.0, 65519.996, 65520.0, 65536.0, 3.4e38], np.float32)
    around = np.concatenate([mids, beyond, every.astype(np.float32)])
    bits = [
        around.view(np.uint32),
        np.nextafter(around, np.float32(np.inf)).view(np.uint32),
        np.nextafter(around, np.float32(-np.inf)).view(np.uint32),
        np.array([0x7F800001, 0x7F810000, 0x7FC00000, 0x7FFFFFFF, 0x7F802000, 1, 0x7FFFFF]),
        np.random.default_rng(3).integers(0, 1 << 32, 1 << 20, dtype=np.uint32),
    ]
    probes = np.concatenate([b.astype(np.uint32) for b in bits])
    return np.concatenate([probes, probes | 0x80000000]).view(np.float32)


@pytest.mark.parametrize("dtype_name", sorted(HALF))
def test_bit_conversions_equal_numpy_and_ml_dtypes_astype(dtype_name):
    """gradmesh converts between the half types and float32 on the bits (core/dtypes.py);
    the results equal NumPy's and ml_dtypes' astype bit for bit: every half value to
    float32, and float32 values at and around every rounding boundary to half (every float32
    value was checked once for bfloat16, a sixteenth of them for float16: minutes)."""
    half_np = HALF[dtype_name][0].np
    every = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(half_np)
    wide = gm.dtypes.astype(every, np.float32)
    np.testing.assert_array_equal(wide.view(np.uint32), every.astype(np.float32).view(np.uint32))
    probes = _float32_probes(half_np)
    with np.errstate(invalid="ignore", over="ignore"):
        want = probes.astype(half_np).view(np.uint16)
    got = gm.dtypes.astype(probes, half_np)
    assert got.dtype == half_np
    np.testing.assert_array_equal(got.view(np.uint16), want)
    # Shapes and strides: a 0-d array and a transposed view keep their shape.
    grid = probes[:12].reshape(3, 4).T
    assert gm.dtypes.astype(grid, half_np).shape == (4, 3)
    np.testing.assert_array_equal(
        gm.dtypes.astype(grid, half_np).view(np.uint16), grid.astype(half_np).view(np.uint16)
    )
    assert gm.dtypes.astype(np.float32(1.5) * np.ones((), np.float32), half_np).shape == ()


def test_bfloat16_is_refused_on_cuda_before_cupy_is_asked():
    for move in (
        lambda: gm.ones(2).bfloat16().to("cuda"),
        lambda: gm.ones(2).to("cuda", gm.bfloat16),
    ):
        with pytest.raises(TypeError, match="CuPy has no bfloat16"):
            move()


def test_safetensors_bf16_interop_with_torch(tmp_path):
    w = torch.randn(3, 4).to(torch.bfloat16)
    path = tmp_path / "torch.safetensors"
    safetensors.torch.save_file({"w": w, "h": w.half()}, str(path))
    loaded = gm.load(path)
    assert loaded["w"].dtype is gm.bfloat16 and loaded["h"].dtype is gm.float16
    assert np.array_equal(_bits(loaded["w"]), _bits(w))
    buf = io.BytesIO()
    gm.save({"w": loaded["w"]}, buf)
    back = safetensors.torch.load(buf.getvalue())["w"]
    assert back.dtype is torch.bfloat16 and torch.equal(back, w)


# ---------------------------------------------------------------------------------------
# The accumulation rule: ops against torch's bfloat16/float16 CPU kernels
# ---------------------------------------------------------------------------------------

# name: (gradmesh fn, torch fn, float input shapes, integer inputs (passed after the floats;
# before them for embedding))
OPS = {
    "add": (lambda a, b: a + b, lambda a, b: a + b, [(3, 4), (4,)], []),
    "mul": (lambda a, b: a * b, lambda a, b: a * b, [(3, 4), (3, 1)], []),
    "exp": (gm.exp, torch.exp, [(3, 4)], []),
    "tanh": (gm.tanh, torch.tanh, [(3, 4)], []),
    "sigmoid": (gm.sigmoid, torch.sigmoid, [(3, 4)], []),
    "gelu": (F.gelu, TF.gelu, [(3, 4)], []),
    "softmax": (lambda a: F.softmax(a, dim=-1), lambda a: TF.softmax(a, dim=-1), [(3, 7)], []),
    "log_softmax": (
        lambda a: F.log_softmax(a, dim=-1),
        lambda a: TF.log_softmax(a, dim=-1),
        [(3, 7)],
        [],
    ),
    "sum": (lambda a: a.sum(dim=1), lambda a: a.sum(dim=1), [(3, 40)], []),
    "mean": (lambda a: a.mean(), lambda a: a.mean(), [(3, 40)], []),
    "matmul": (lambda a, b: a @ b, lambda a, b: a @ b, [(4, 16), (16, 3)], []),
    "linear": (F.linear, TF.linear, [(4, 16), (3, 16), (3,)], []),
    "conv2d": (
        lambda x, w, b: F.conv2d(x, w, b, padding=1),
        lambda x, w, b: TF.conv2d(x, w, b, padding=1),
        [(2, 3, 5, 5), (4, 3, 3, 3), (4,)],
        [],
    ),
    "layer_norm": (
        lambda x, w, b: F.layer_norm(x, (8,), w, b),
        lambda x, w, b: TF.layer_norm(x, (8,), w, b),
        [(4, 8), (8,), (8,)],
        [],
    ),
    "cross_entropy": (F.cross_entropy, TF.cross_entropy, [(5, 7)], [[0, 3, 6, 2, 1]]),
    "embedding": (F.embedding, TF.embedding, [(10, 4)], [[1, 3, 3, 9, 0, 2]]),
}

# Where torch's CPU kernel computes exactly what the rule does (float32, one rounding) the
# results are equal bitwise (seeded inputs). Elsewhere torch orders its float32 sums
# differently, or fuses a backward formula that gradmesh writes as several rounded ops
# (tanh's 1 - out**2, layer_norm's): there the results agree within ULPS units of the
# half type's epsilon times the result's largest magnitude.
BITWISE_VALUES = {"add", "mul", "exp", "tanh", "sigmoid", "gelu", "softmax", "sum", "mean"}
BITWISE_VALUES |= {"matmul", "linear", "embedding"}
BITWISE_GRADS = {"exp", "softmax", "sum", "mean", "matmul", "linear", "embedding"}
ULPS = 2.0


def _run_op(name, dtype_name, seed=0):
    """(gradmesh inputs, output), (torch inputs, output) and the upstream gradient ``u``."""
    gm_fn, torch_fn, shapes, ints = OPS[name]
    gdt, tdt = HALF[dtype_name]
    rng = np.random.default_rng(seed)
    arrays = [rng.standard_normal(s).astype(np.float32).astype(gdt.np) for s in shapes]
    g_in = [gm.tensor(a, requires_grad=True) for a in arrays]
    t_in = [_torch(a, tdt, requires_grad=True) for a in arrays]
    g_args = g_in + [gm.tensor(i) for i in ints]
    t_args = t_in + [torch.tensor(i) for i in ints]
    if name == "embedding":
        g_args, t_args = g_args[::-1], t_args[::-1]
    g_out, t_out = gm_fn(*g_args), torch_fn(*t_args)
    u = rng.standard_normal(tuple(t_out.shape)).astype(np.float32).astype(gdt.np)
    g_out.backward(gm.tensor(u))
    t_out.backward(_torch(u, tdt))
    return (g_in, g_out), (t_in, t_out), u


def _assert_close(got, want, dtype_name, what, ulps=ULPS):
    got = np.asarray(got.detach(), np.float64)
    want = want.detach().double().numpy()
    scale = max(np.abs(want).max(), np.finfo(np.float32).tiny)
    worst = np.abs(got - want).max() / (EPS[dtype_name] * scale)
    assert worst <= ulps, f"{what}: {worst:.2f} ulps from torch"


@pytest.mark.parametrize("dtype_name", sorted(HALF))
@pytest.mark.parametrize("name", sorted(OPS))
def test_op_matches_torch_half_kernels(name, dtype_name):
    (g_in, g_out), (t_in, t_out), _ = _run_op(name, dtype_name)
    assert g_out.dtype is HALF[dtype_name][0]
    if name in BITWISE_VALUES:
        assert np.array_equal(_bits(g_out), _bits(t_out))
    else:
        _assert_close(g_out, t_out, dtype_name, f"{name} value")
    for i, (g, t) in enumerate(zip(g_in, t_in)):
        assert g.grad.dtype is g.dtype  # a half parameter's gradient is half, as torch's
        if name in BITWISE_GRADS:
            assert np.array_equal(_bits(g.grad), _bits(t.grad)), f"{name} grad {i}"
        else:
            _assert_close(g.grad, t.grad, dtype_name, f"{name} grad {i}")


@pytest.mark.parametrize("dtype_name", sorted(HALF))
@pytest.mark.parametrize("name", sorted(OPS))
def test_op_gradient_against_float64_finite_differences(name, dtype_name):
    """⟨u, J v⟩ by central differences of the op in float64 at the same (half) inputs,
    against the half-precision ⟨vjp(u), v⟩; within 4 epsilons of the half type."""
    (g_in, _), _, u = _run_op(name, dtype_name)
    gm_fn, _, _, ints = OPS[name]
    rng = np.random.default_rng(1)
    x64 = [np.asarray(g.detach(), np.float64) for g in g_in]
    v = [rng.standard_normal(x.shape) for x in x64]

    def f(step):
        args = [gm.tensor(x + step * d) for x, d in zip(x64, v)] + [gm.tensor(i) for i in ints]
        out = gm_fn(*(args[::-1] if name == "embedding" else args))
        return float((np.asarray(out, np.float64) * np.asarray(u, np.float64)).sum())

    h = 1e-6
    directional = (f(h) - f(-h)) / (2 * h)
    grads = [np.asarray(g.grad, np.float64) for g in g_in]
    projected = sum(float((g * d).sum()) for g, d in zip(grads, v))
    scale = sum(float(np.abs(g * d).sum()) for g, d in zip(grads, v))
    assert abs(projected - directional) <= 4 * EPS[dtype_name] * scale


# ---------------------------------------------------------------------------------------
# Training in bfloat16, locally and through a worker
# ---------------------------------------------------------------------------------------


def _bf16_mlp():
    gm.manual_seed(0)
    return gm.nn.Sequential(gm.nn.Linear(8, 16), gm.nn.Tanh(), gm.nn.Linear(16, 4)).bfloat16()


def _batch():
    rng = np.random.default_rng(0)
    return rng.standard_normal((32, 8)).astype(np.float32), rng.integers(0, 4, 32)


def _loss(model, x, y):
    return F.cross_entropy(model(x), y)


def test_bf16_sgd_training_follows_torch_trajectory():
    """10 SGD steps of a bf16 MLP from the same bf16 weights: every loss within 2 bf16
    epsilons (relative) of torch's, and every final weight within 2 epsilons of its
    tensor's largest magnitude. (The SGD update itself is torch's bit for bit, see
    test_half_parameter_updates_equal_torch_bitwise; the losses and gradients differ from
    torch's by about an ulp from the first step, so the trajectories drift that much.)"""
    model = _bf16_mlp()
    tmodel = torch.nn.Sequential(
        torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4)
    ).bfloat16()
    with torch.no_grad():
        for p, tp in zip(model.parameters(), tmodel.parameters()):
            tp.copy_(_torch(p.detach().numpy(), torch.bfloat16))
    opt = gm.optim.SGD(model.parameters(), lr=0.1)
    topt = torch.optim.SGD(tmodel.parameters(), lr=0.1)
    x, y = _batch()
    gx, tx = gm.tensor(x).bfloat16(), torch.from_numpy(x).bfloat16()
    eps = EPS["bfloat16"]
    for step in range(10):
        opt.zero_grad()
        loss = _loss(model, gx, gm.tensor(y))
        loss.backward()
        opt.step()
        topt.zero_grad()
        tloss = TF.cross_entropy(tmodel(tx), torch.from_numpy(y))
        tloss.backward()
        topt.step()
        assert loss.dtype is gm.bfloat16
        assert abs(loss.item() - tloss.item()) <= 2 * eps * abs(tloss.item()), step
    for p, tp in zip(model.parameters(), tmodel.parameters()):
        assert p.dtype is gm.bfloat16
        want = tp.detach().double().numpy()
        assert (
            np.abs(np.asarray(p.detach(), np.float64) - want).max() <= 2 * eps * np.abs(want).max()
        )


def _autocast_loss(model, x, y):
    with gm.autocast(device_type="cpu", dtype=gm.bfloat16):
        return F.cross_entropy(model(x), y)


@pytest.mark.parametrize("how", ["bf16 model", "autocast"])
def test_bf16_gradients_through_a_worker_equal_local_ones_bitwise(worker, how):
    from gradmesh.client import WorkerClient

    x, y = _batch()
    if how == "autocast":  # float32 parameters; the traced graph records autocast's casts
        gm.manual_seed(0)
        model = gm.nn.Sequential(gm.nn.Linear(8, 16), gm.nn.Tanh(), gm.nn.Linear(16, 4))
        fn, gx = _autocast_loss, gm.tensor(x)
    else:
        model, fn, gx = _bf16_mlp(), _loss, gm.tensor(x).bfloat16()
    loss = fn(model, gx, gm.tensor(y))
    loss.backward()
    with WorkerClient(worker.address) as client:
        r = client.compute_gradients(fn, model, gx, gm.tensor(y))
    assert r.loss.dtype == loss.dtype.np
    assert np.array_equal(r.loss, np.asarray(loss.detach()))
    for name, p in model.named_parameters():
        got = r.gradients[name]
        assert got.dtype == p.dtype.np, name
        assert np.array_equal(got.view(np.int8), np.asarray(p.grad).view(np.int8)), name


# ---------------------------------------------------------------------------------------
# autocast
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype_name", sorted(HALF))
def test_autocast_follows_torch_cpu_autocast(dtype_name):
    """A float32 model under autocast: the logits are the half type and bitwise torch's,
    the loss is float32, and the float32 gradients are within 3 half epsilons of torch's
    (times each gradient's largest magnitude): 2 alone, but torch's float32 backward
    sums in an order that follows its thread count, which earlier tests in the same
    process change (2.26 measured in a full run)."""
    gdt, tdt = HALF[dtype_name]
    gm.manual_seed(0)
    model = gm.nn.Sequential(
        gm.nn.Linear(8, 16), gm.nn.GELU(), gm.nn.LayerNorm(16), gm.nn.Linear(16, 4)
    )
    tmodel = torch.nn.Sequential(
        torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.LayerNorm(16), torch.nn.Linear(16, 4)
    )
    with torch.no_grad():
        for p, tp in zip(model.parameters(), tmodel.parameters()):
            tp.copy_(torch.from_numpy(p.detach().numpy()))
    x, y = _batch()
    with gm.autocast(device_type="cpu", dtype=gdt):
        out = model(gm.tensor(x))
        loss = F.cross_entropy(out, gm.tensor(y))
    with torch.autocast("cpu", dtype=tdt):
        tout = tmodel(torch.from_numpy(x))
        tloss = TF.cross_entropy(tout, torch.from_numpy(y))
    assert out.dtype is gdt and loss.dtype is gm.float32
    assert np.array_equal(_bits(out), _bits(tout))
    assert loss.item() == pytest.approx(tloss.item(), rel=1e-6)
    loss.backward()
    tloss.backward()
    for p, tp in zip(model.parameters(), tmodel.parameters()):
        assert p.grad.dtype is gm.float32
        _assert_close(p.grad, tp.grad, dtype_name, "gradient", ulps=3.0)
    # Outside the context ops run in their inputs' dtypes again.
    assert model(gm.tensor(x)).dtype is gm.float32


def test_autocast_refuses_what_it_does_not_do():
    with pytest.raises(ValueError, match="device_type 'cuda'"):
        gm.autocast(device_type="cuda")
    with pytest.raises(ValueError, match="dtype must be bfloat16 or float16"):
        gm.autocast(device_type="cpu", dtype=gm.float64)
    with gm.autocast(device_type="cpu", enabled=False):
        assert (gm.ones(2, 3) @ gm.ones(3, 2)).dtype is gm.float32


# ---------------------------------------------------------------------------------------
# optimizer updates of half parameters
# ---------------------------------------------------------------------------------------

# One configuration per rule, with the options that add kernels to its update.
HALF_OPTIMIZERS = [
    ("SGD", dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=0.01)),
    ("SGD", dict(lr=0.05, momentum=0.9, nesterov=True, maximize=True)),
    ("Adam", dict(lr=0.01, weight_decay=0.1, amsgrad=True)),
    ("AdamW", dict(lr=0.01, weight_decay=0.1)),
    ("RMSprop", dict(lr=0.01, momentum=0.9, centered=True, weight_decay=0.01)),
    ("Adagrad", dict(lr=0.1, lr_decay=0.01, weight_decay=0.01, initial_accumulator_value=0.1)),
    ("Adamax", dict(lr=0.01, weight_decay=0.01)),
    ("NAdam", dict(lr=0.01, weight_decay=0.1, decoupled_weight_decay=True)),
]

# The half-precision optimizer tests follow the arithmetic of torch's x86 kernels.
X86_KERNELS = pytest.mark.skipif(
    torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"),
    reason="gradmesh follows the arithmetic of torch's x86 kernels (AVX2 and AVX-512)",
)


@X86_KERNELS
@pytest.mark.parametrize("dtype_name", sorted(HALF))
@pytest.mark.parametrize("name,kwargs", HALF_OPTIMIZERS, ids=lambda v: str(v))
def test_half_parameter_updates_equal_torch_bitwise(name, kwargs, dtype_name):
    """20 steps of every optimizer on a half parameter, fed torch's gradients: parameter
    and state equal torch's bit for bit, and the state keeps torch's dtypes. Shapes of 64
    elements (whole vector steps of torch's kernels), 10 (all in their scalar loop) and
    111 (both).
    Bit for bit under ATEN_CPU_CAPABILITY=avx2 too."""
    gdt, tdt = HALF[dtype_name]
    rng = np.random.default_rng(11)
    for shape in ((4, 16), (10,), (3, 37)):
        start = rng.standard_normal(shape).astype(np.float32).astype(gdt.np)
        p, tp = gm.tensor(start).requires_grad_(), _torch(start, tdt, requires_grad=True)
        opt, topt = (
            getattr(gm.optim, name)([p], **kwargs),
            getattr(torch.optim, name)([tp], **kwargs),
        )
        for _ in range(20):
            grad = rng.standard_normal(shape).astype(np.float32).astype(gdt.np)
            p.grad, tp.grad = gm.tensor(grad), _torch(grad, tdt)
            opt.step()
            topt.step()
        assert p.dtype is gdt and tp.isfinite().all()
        np.testing.assert_array_equal(_bits(p), _bits(tp))
        _assert_same_optimizer_state(opt.state[p], topt.state[tp])


@X86_KERNELS
@pytest.mark.parametrize("dtype_name", sorted(HALF))
@pytest.mark.parametrize("name,kwargs", HALF_OPTIMIZERS, ids=lambda v: str(v))
def test_large_half_parameter_updates_equal_torch_bitwise(name, kwargs, dtype_name):
    """A parameter of 32877 elements (several of _fma32's blocks and of the conversions',
    and a tail past torch's last vector step) equals torch on one thread (on several,
    torch splits the tail per thread) bit for bit after 3 steps. float16
    gets an eps it can hold: with 1e-8 (0 in float16) some elements become 0/0, whose NaN
    bits differ from torch's."""
    gdt, tdt = HALF[dtype_name]
    if dtype_name == "float16" and name in ("Adam", "AdamW", "NAdam"):
        kwargs = {**kwargs, "eps": 1e-4}
    rng = np.random.default_rng(12)
    shape = (3, 2 * 16384 // 3 + 37)
    start = rng.standard_normal(shape).astype(np.float32).astype(gdt.np)
    p, tp = gm.tensor(start).requires_grad_(), _torch(start, tdt, requires_grad=True)
    opt = getattr(gm.optim, name)([p], **kwargs)
    topt = getattr(torch.optim, name)([tp], **kwargs)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(3):
            grad = rng.standard_normal(shape).astype(np.float32).astype(gdt.np)
            p.grad, tp.grad = gm.tensor(grad), _torch(grad, tdt)
            opt.step()
            topt.step()
    finally:
        torch.set_num_threads(threads)
    np.testing.assert_array_equal(_bits(p), _bits(tp))
    _assert_same_optimizer_state(opt.state[p], topt.state[tp])


def _assert_same_optimizer_state(ours: dict, theirs: dict) -> None:
    """Same arrays, bit for bit and of the same dtype (half, or float32 for NAdam's
    mu_product), and the same step count (SGD's torch state has none)."""
    assert sorted(set(ours) - {"step"}) == sorted(set(theirs) - {"step"})
    if "step" in theirs:
        assert ours["step"] == int(theirs["step"])
    for key, want in theirs.items():
        if key == "step":
            continue
        got = np.asarray(ours[key])
        assert str(got.dtype) == str(want.dtype).removeprefix("torch."), key
        want_bits = want.view(torch.int16 if got.itemsize == 2 else torch.int32).numpy()
        np.testing.assert_array_equal(got.view(want_bits.dtype), want_bits, err_msg=key)


@pytest.mark.parametrize("dtype_name", sorted(HALF))
def test_half_training_moves_from_torch_to_gradmesh_mid_run_bitwise(dtype_name):
    """A torch Adam state dict of a half parameter loads (bfloat16 tensors included), and
    the run continues as torch's, bit for bit."""
    gdt, tdt = HALF[dtype_name]
    rng = np.random.default_rng(5)
    start = rng.standard_normal((4, 16)).astype(np.float32).astype(gdt.np)
    grads = [rng.standard_normal((4, 16)).astype(np.float32).astype(gdt.np) for _ in range(10)]
    tp = _torch(start, tdt, requires_grad=True)
    topt = torch.optim.Adam([tp], lr=0.01, eps=1e-3)
    for grad in grads[:5]:
        tp.grad = _torch(grad, tdt)
        topt.step()
    p = gm.tensor(tp.detach().float().numpy().astype(gdt.np)).requires_grad_()
    opt = gm.optim.Adam([p], lr=0.01, eps=1e-3)
    opt.load_state_dict(topt.state_dict())
    for grad in grads[5:]:
        p.grad, tp.grad = gm.tensor(grad), _torch(grad, tdt)
        opt.step()
        topt.step()
    np.testing.assert_array_equal(_bits(p), _bits(tp))
    _assert_same_optimizer_state(opt.state[p], topt.state[tp])
