"""The autograd engine keeps PyTorch's semantics: gradient accumulation, freed graphs,
non-scalar outputs, grad modes, leaves, higher-order gradients, deep graphs, in-place
rules, NumPy interop and dtype promotion. Each test states the torch behaviour it copies."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import gradmesh.core as gm


def f64(values, requires_grad=False) -> gm.Tensor:
    return gm.tensor(values, dtype=gm.float64, requires_grad=requires_grad)


# =================================================================== accumulation ======


def test_grad_accumulates_across_backward_calls_until_zeroed() -> None:
    x = f64([1.0, 2.0, 3.0], requires_grad=True)
    (x * x).sum().backward()
    np.testing.assert_array_equal(x.grad.numpy(), [2.0, 4.0, 6.0])
    (3 * x).sum().backward()
    np.testing.assert_array_equal(x.grad.numpy(), [5.0, 7.0, 9.0])
    x.grad.zero_()
    (3 * x).sum().backward()
    np.testing.assert_array_equal(x.grad.numpy(), [3.0, 3.0, 3.0])
    x.grad = None
    x.sum().backward()
    np.testing.assert_array_equal(x.grad.numpy(), [1.0, 1.0, 1.0])


def test_a_tensor_used_twice_gets_both_gradients() -> None:
    x = f64(3.0, requires_grad=True)
    y = x * 2
    (y * y + y).backward()  # d/dx (4x^2 + 2x) = 8x + 2
    assert x.grad.item() == 26.0


def test_grads_are_writable_and_alias_nothing() -> None:
    # add passes one gradient to both sides, sum's is a read-only broadcast, reshape's a
    # view: each leaf still gets its own writable .grad, as optimizers update it in place.
    a, b = f64([[1.0, 2.0]], requires_grad=True), f64([3.0, 4.0], requires_grad=True)
    (a.reshape(2) + b).sum().backward()
    with gm.no_grad():
        a.grad.mul_(10)
    b.grad.zero_()
    assert a.grad.tolist() == [[10.0, 10.0]] and b.grad.tolist() == [0.0, 0.0]
    x = gm.ones(3, requires_grad=True)
    x.sum().backward()
    x.grad.zero_()
    assert x.grad.tolist() == [0.0, 0.0, 0.0]


def test_gradient_keeps_the_leaf_dtype() -> None:
    x = gm.tensor([1.0, 2.0], requires_grad=True)  # float32
    (x.double() * 3).sum().backward()
    assert x.grad.dtype is gm.float32


# ================================================================= freed graphs ======


def test_second_backward_through_a_freed_graph_raises() -> None:
    x = f64([1.0, 2.0], requires_grad=True)
    y = (x.exp() * x).sum()
    y.backward()
    with pytest.raises(
        RuntimeError, match="backward through the graph a second time.*retain_graph=True"
    ):
        y.backward()


def test_retain_graph_allows_a_second_backward() -> None:
    x = f64([1.0, 2.0], requires_grad=True)
    y = (x.exp() * x).sum()
    y.backward(retain_graph=True)
    first = x.grad.numpy().copy()
    y.backward()
    np.testing.assert_allclose(x.grad.numpy(), 2 * first)


# ======================================================= non-scalar outputs ======


def test_backward_on_a_non_scalar_needs_a_gradient() -> None:
    x = f64([[1.0, 2.0], [3.0, 4.0]], requires_grad=True)
    y = x * x
    with pytest.raises(RuntimeError, match=r"only for scalar outputs.*\(2, 2\).*gradient="):
        y.backward()
    y.backward(gradient=f64([[1.0, 0.0], [0.5, 2.0]]))
    np.testing.assert_array_equal(x.grad.numpy(), [[2.0, 0.0], [3.0, 16.0]])


def test_backward_gradient_of_the_wrong_shape_raises() -> None:
    x = f64([1.0, 2.0], requires_grad=True)
    with pytest.raises(RuntimeError, match=r"\(3,\).*\(2,\)"):
        (x * 2).backward(gradient=f64([1.0, 1.0, 1.0]))


def test_backward_on_a_one_element_tensor_needs_no_gradient() -> None:
    x = f64([2.0], requires_grad=True)
    (x * x).backward()  # numel 1, like torch
    assert x.grad.tolist() == [4.0]


def test_backward_on_a_tensor_without_grad_raises() -> None:
    with pytest.raises(RuntimeError, match="does not require grad"):
        f64([1.0]).sum().backward()


# ====================================================================== grad modes ======


def test_no_grad_records_nothing() -> None:
    x = f64([1.0, 2.0], requires_grad=True)
    with gm.no_grad():
        y = (x * 2).exp().sum()
    assert not y.requires_grad and y.grad_fn is None and y.is_leaf
    with pytest.raises(RuntimeError):
        y.backward()


def test_no_grad_as_a_decorator_and_enable_grad_inside_it() -> None:
    x = f64([1.0], requires_grad=True)

    @gm.no_grad()
    def f(t):
        with gm.enable_grad():
            inner = t * 2
        return inner, t * 3

    inner, outer = f(x)
    assert inner.requires_grad and inner.grad_fn is not None
    assert not outer.requires_grad
    assert gm.is_grad_enabled()
    with gm.set_grad_enabled(False):
        assert not (x * 2).requires_grad
    assert (x * 2).requires_grad


def test_detach_shares_data_and_leaves_the_graph() -> None:
    x = f64([1.0, 2.0], requires_grad=True)
    y = x * 2
    d = y.detach()
    assert not d.requires_grad and d.grad_fn is None
    np.testing.assert_array_equal(d.numpy(), [2.0, 4.0])
    (x * d).sum().backward()  # d is a constant: gradient d, not 2 * 2x
    np.testing.assert_array_equal(x.grad.numpy(), [2.0, 4.0])
    with gm.no_grad():
        d.add_(1)
    np.testing.assert_array_equal(y.detach().numpy(), [3.0, 5.0])  # same storage


def test_requires_grad_on_a_non_leaf_raises() -> None:
    x = f64([1.0], requires_grad=True)
    y = x * 2
    with pytest.raises(RuntimeError, match="leaf"):
        y.requires_grad_(False)
    assert f64([1.0]).requires_grad_().requires_grad


def test_only_floating_point_tensors_can_require_grad() -> None:
    with pytest.raises(RuntimeError, match="floating point"):
        gm.tensor([1, 2], requires_grad=True)
    with pytest.raises(RuntimeError, match="floating point"):
        gm.tensor([1, 2]).requires_grad_()


def test_integer_results_do_not_require_grad() -> None:
    x = f64([[1.0, 3.0], [2.0, 0.0]], requires_grad=True)
    for out in (x.argmax(1), x > 1, x.max(1).indices, x.long()):
        assert not out.requires_grad and out.grad_fn is None
    assert (x.max(1).values).requires_grad


def test_retain_grad_keeps_a_non_leaf_gradient() -> None:
    x = f64([1.0, 2.0], requires_grad=True)
    y = x * 3
    y.retain_grad()
    z = x * 4  # not retained: no .grad, as in torch
    (y * y + z).sum().backward()
    assert y.retains_grad and not z.retains_grad
    np.testing.assert_array_equal(y.grad.numpy(), [6.0, 12.0])
    with pytest.warns(UserWarning, match="not a leaf Tensor"):  # torch warns too
        assert z.grad is None
    np.testing.assert_array_equal(x.grad.numpy(), [18.0 + 4, 36.0 + 4])


# ========================================================== higher-order gradients ======


def test_grad_of_grad() -> None:
    x = f64(2.0, requires_grad=True)
    (g,) = gm.autograd.grad(x**4, x, create_graph=True)
    (h,) = gm.autograd.grad(g, x, create_graph=True)
    (t,) = gm.autograd.grad(h, x)
    assert (g.item(), h.item(), t.item()) == (32.0, 48.0, 48.0)  # 4x^3, 12x^2, 24x


def test_autograd_grad_leaves_grad_untouched() -> None:
    x = f64([1.0, 2.0], requires_grad=True)
    (g,) = gm.autograd.grad((x * x).sum(), x)
    np.testing.assert_array_equal(g.numpy(), [2.0, 4.0])
    assert x.grad is None


def test_hessian_vector_product_matches_torch() -> None:
    rng = np.random.default_rng(0)
    w_np, x_np, v_np = rng.standard_normal((4, 3)), rng.standard_normal(3), rng.standard_normal(3)

    def hvp(lib, w, x, v):
        loss = ((w @ x).tanh() ** 2).sum() + (x * x * x).sum()
        (g,) = lib.autograd.grad(loss, x, create_graph=True)
        (hv,) = lib.autograd.grad((g * v).sum(), x)
        return hv

    ours = hvp(gm, f64(w_np), f64(x_np, requires_grad=True), f64(v_np))
    ref = hvp(torch, torch.tensor(w_np), torch.tensor(x_np, requires_grad=True), torch.tensor(v_np))
    np.testing.assert_allclose(ours.numpy(), ref.numpy(), rtol=1e-10, atol=1e-12)


def test_allow_unused() -> None:
    x, unused = f64([1.0], requires_grad=True), f64([2.0], requires_grad=True)
    y = (x * 3).sum()
    with pytest.raises(RuntimeError, match="allow_unused=True"):
        gm.autograd.grad(y, [x, unused], retain_graph=True)
    gx, gu = gm.autograd.grad(y, [x, unused], allow_unused=True)
    assert gx.tolist() == [3.0] and gu is None


def test_autograd_grad_of_an_input_that_does_not_require_grad_raises() -> None:
    x = f64([1.0], requires_grad=True)
    with pytest.raises(RuntimeError, match="does not require grad"):
        gm.autograd.grad((x * 2).sum(), f64([1.0]))


def test_backward_with_inputs_accumulates_only_those() -> None:
    a, b = f64([1.0], requires_grad=True), f64([2.0], requires_grad=True)
    (a * b).sum().backward(inputs=[a])
    assert a.grad.tolist() == [2.0] and b.grad is None


# ===================================================================== deep graphs ======


@pytest.mark.parametrize("retain", [False, True])
def test_slices_of_one_tensor_sum_their_gradients_like_torch(retain) -> None:
    # Unbound steps, overlapping slices and the whole tensor used again: the engine adds
    # slice gradients into the pending sum's region in place; the totals must be torch's,
    # and a retained gradient must not be changed by later in-place additions.
    x = np.random.default_rng(3).standard_normal((2, 5, 3))
    results = []
    for lib in (gm, torch):
        leaf = lib.tensor(x, requires_grad=True)
        y = leaf * 2
        if retain:
            y.retain_grad()
        steps = y.unbind(1)
        loss = sum(((k + 1) * s).sum() for k, s in enumerate(steps))
        loss = loss + (y[:, 1:4] ** 2).sum() + (y[:, 2:] * y[:, :3]).sum() + y.sum()
        loss.backward()
        results.append((leaf.grad.numpy(), y.grad.numpy() if retain else None))
    np.testing.assert_allclose(results[0][0], results[1][0], rtol=1e-12)
    if retain:
        np.testing.assert_allclose(results[0][1], results[1][1], rtol=1e-12)


def test_a_100000_node_chain_backpropagates() -> None:
    """The topological sort is iterative: no recursion limit on deep graphs."""
    x = f64([1.0, 2.0], requires_grad=True)
    c = f64(1.0001)
    y = x
    for _ in range(100_000):
        y = y * c
    y.sum().backward()
    np.testing.assert_allclose(x.grad.numpy(), [1.0001**100_000] * 2, rtol=1e-9)


# ========================================================================= errors ======


def test_mm_of_a_vector_names_mm_and_both_shapes() -> None:
    # A popular tutorial multiplies a (2,) vector with a (2, 1) matrix through mm.
    with pytest.raises(gm.OpError) as info:
        gm.mm(gm.ones(2), gm.ones(2, 1))
    message = str(info.value)
    assert "mm" in message and "(2,)" in message and "(2, 1)" in message
    assert "matmul" in message  # and it says what to use instead


def test_integer_division_by_zero_raises_as_torch() -> None:
    for fn in (lambda a, b: a // b, lambda a, b: a % b):
        with pytest.raises(RuntimeError, match="ZeroDivisionError"):
            fn(torch.tensor([3, 4]), torch.tensor([1, 0]))
        with pytest.raises(gm.OpError, match="ZeroDivisionError"):
            fn(gm.tensor([3, 4]), gm.tensor([1, 0]))
    with pytest.raises(gm.OpError, match="remainder: not supported for a bool tensor"):
        gm.tensor([True]) % gm.tensor([True])
    assert (gm.tensor([7.0]) // 0.0).tolist() == (torch.tensor([7.0]) // 0.0).tolist()


def test_inplace_ops_on_a_leaf_that_requires_grad_raise() -> None:
    x = gm.ones(3, requires_grad=True)
    for update in (
        lambda: x.add_(1),
        lambda: x.mul_(2),
        lambda: x.zero_(),
        lambda: x.fill_(0.0),
        lambda: x.copy_(gm.zeros(3)),
    ):
        with pytest.raises(RuntimeError, match="in-place"):
            update()
    with pytest.raises(RuntimeError, match="in-place.*no_grad"):
        x -= 0.1 * gm.ones(3)  # the classic `w -= lr * w.grad` outside no_grad
    np.testing.assert_array_equal(x.detach().numpy(), [1.0, 1.0, 1.0])
    with gm.no_grad():
        x -= 0.5
        x.mul_(2)
    assert x.is_leaf and x.requires_grad
    np.testing.assert_array_equal(x.detach().numpy(), [1.0, 1.0, 1.0])


def test_augmented_assignment_on_a_non_leaf_stays_differentiable() -> None:
    x = f64([1.0, 2.0], requires_grad=True)
    h = x * 2
    h += x  # 3x
    h.sum().backward()
    np.testing.assert_array_equal(x.grad.numpy(), [3.0, 3.0])


# ================================================================= numpy interop ======


def test_from_numpy_shares_memory_both_ways() -> None:
    a = np.zeros(3)
    t = gm.from_numpy(a)
    assert t.dtype is gm.float64  # like torch.from_numpy: no conversion
    a[0] = 5.0
    assert t[0].item() == 5.0
    t.numpy()[1] = 7.0
    assert a[1] == 7.0
    with gm.no_grad():
        t.add_(1)
    np.testing.assert_array_equal(a, [6.0, 8.0, 1.0])


def test_numpy_of_a_tensor_that_requires_grad_raises() -> None:
    t = f64([1.0, 2.0], requires_grad=True)
    with pytest.raises(RuntimeError, match=r"detach\(\)\.numpy\(\)"):
        t.numpy()
    view = t.detach().numpy()
    view[0] = 9.0
    assert t.detach()[0].item() == 9.0


def test_tensor_copies_its_data() -> None:
    a = np.ones(2)
    t = gm.tensor(a)
    a[0] = 3.0
    assert t.tolist() == [1.0, 1.0]


# ================================================================= dtype promotion ======


@pytest.mark.parametrize(
    "make, want",
    [
        (lambda: gm.tensor([1, 2]) * 2.5, gm.float32),  # int64 * float
        (lambda: gm.tensor([1, 2]) * 2, gm.int64),
        (lambda: gm.tensor([1.0]) * gm.tensor([1.0], dtype=gm.float64), gm.float64),
        (lambda: gm.tensor([1.0]) * 2.5, gm.float32),  # stays float32
        (lambda: gm.tensor([1.0], dtype=gm.float64) * 2.5, gm.float64),
        (lambda: gm.tensor([1, 2]) / gm.tensor([2, 2]), gm.float32),  # true division
        (lambda: gm.tensor([1.0]) + gm.tensor(2.0, dtype=gm.float64), gm.float32),  # 0-d loses
        (lambda: gm.tensor([1, 2]) + gm.tensor(2.0, dtype=gm.float64), gm.float64),  # unless
        (lambda: gm.tensor([True]) + 1, gm.int64),
        (lambda: gm.tensor([1, 2], dtype=gm.int32) * gm.tensor([1, 2]), gm.int64),
        (lambda: gm.tensor([1, 2], dtype=gm.int32) + 1, gm.int32),
        (lambda: gm.tensor([True, False]).sum(), gm.int64),
    ],
)
def test_dtype_promotion_matches_torch(make, want) -> None:
    assert make().dtype is want


def test_promotion_table_agrees_with_torch_result_type() -> None:
    kinds = {
        "float32": (gm.float32, torch.float32),
        "float64": (gm.float64, torch.float64),
        "int64": (gm.int64, torch.int64),
        "int32": (gm.int32, torch.int32),
        "bool": (gm.bool, torch.bool),
    }
    for a_name, (ga, ta) in kinds.items():
        for b_name, (gb, tb) in kinds.items():
            for a_dim, b_dim in ((1, 1), (0, 1), (1, 0)):
                x = gm.ones([2] * a_dim, dtype=ga) + gm.ones([2] * b_dim, dtype=gb)
                r = torch.ones([2] * a_dim, dtype=ta) + torch.ones([2] * b_dim, dtype=tb)
                assert x.dtype.name == str(r.dtype).removeprefix("torch."), (
                    a_name,
                    a_dim,
                    b_name,
                    b_dim,
                )


def test_setitem_writes_in_place_and_refuses_tensors_that_require_grad():
    x = gm.arange(6.0).reshape(2, 3)
    x[x > 2] = 0.0
    x[0, 1] = gm.tensor(7.0)
    assert x.tolist() == [[0.0, 7.0, 2.0], [0.0, 0.0, 0.0]]
    w = gm.ones(3, requires_grad=True)
    with pytest.raises(RuntimeError, match="in-place"):
        w[0] = 5.0
    with gm.no_grad():
        w[0] = 5.0
    assert w.tolist() == [5.0, 1.0, 1.0]
