"""PyTorch's semantics of in-place ops and ``.grad``, each case run side by side with torch:
version counters, in-place ops on non-leaves (history rebased), augmented assignment in
place, and the warning on reading a non-leaf's ``.grad``."""

import re
import warnings

import numpy as np
import pytest
import torch

import gradmesh.core as gm

_MODIFIED = "modified by an inplace operation"


def _both(fn):
    """``fn(lib, x)`` with x = [0.5, -1, 2] requiring grad, in gradmesh and torch; returns
    both x's."""
    xs = (
        gm.tensor([0.5, -1.0, 2.0], requires_grad=True),
        torch.tensor([0.5, -1.0, 2.0], requires_grad=True),
    )
    for lib, x in zip((gm, torch), xs):
        fn(lib, x)
    return xs


@pytest.mark.parametrize(
    "change",
    [
        lambda y: y.mul_(0),
        lambda y: y.zero_(),
        lambda y: y.add_(1),
        lambda y: y.copy_(y * 2),
        lambda y: y.__setitem__(0, 5.0),
        lambda y: y.reshape(3).fill_(1.0),
    ],
)
def test_changing_a_saved_output_under_no_grad_raises_in_backward(change):
    for lib in (gm, torch):
        x = lib.tensor([0.5, -1.0, 2.0], requires_grad=True)
        y = x.sigmoid()  # sigmoid's backward reads its output
        with lib.no_grad():
            change(y)
        with pytest.raises(RuntimeError, match=_MODIFIED):
            y.sum().backward()


def test_changing_a_saved_input_raises_and_names_the_node():
    a = gm.tensor([1.0, 2.0], requires_grad=True)
    h = a * 1
    z = (h * h).sum()  # mul reads both inputs
    with gm.no_grad():
        h.add_(1)
    with pytest.raises(RuntimeError, match=_MODIFIED + r".*input 0 of MulBackward"):
        z.backward()


def test_changing_an_input_only_its_shape_is_read_from_does_not_raise():
    """add and sum save no values (torch agrees): the gradient is the same after the change."""

    def run(lib):
        x = lib.tensor([1.0, 2.0], requires_grad=True)
        h = x * 1
        z = (h + 3).sum() + h.sum()
        with lib.no_grad():
            h.mul_(5)
        z.backward()
        return x.grad.tolist()

    assert run(gm) == run(torch) == [2.0, 2.0]


def test_versions_count_changes_of_the_storage_through_views():
    for lib in (gm, torch):
        t = lib.zeros(2, 3)
        assert t._version == 0
        t.add_(1)
        t[0].mul_(2)  # through a view: the same storage
        t += 1
        assert t._version == 3, lib


def test_version_checks_do_not_change_gradients():
    x = gm.tensor([0.5, -1.0, 2.0], requires_grad=True)
    y = (x.exp() * x).sum()
    w = gm.zeros(1)
    w.add_(1)  # an unrelated in-place change: every node is checked
    y.backward()
    np.testing.assert_array_equal(
        x.grad.numpy(), (np.exp(x.detach().numpy()) * (1 + x.detach().numpy()))
    )


def test_augmented_assignment_changes_the_tensor_in_place():
    for lib in (gm, torch):
        h = lib.ones(2)
        g = h
        h += 1
        h *= 3
        h -= 1
        h /= 5
        assert g is h and g.tolist() == [1.0, 1.0]


@pytest.mark.parametrize(
    "update",
    [
        lambda lib, h, x: h.mul_(2),
        lambda lib, h, x: h.add_(x, alpha=3),
        lambda lib, h, x: h.sub_(1),
        lambda lib, h, x: h.div_(x),
        lambda lib, h, x: h.mul_(x),
        lambda lib, h, x: h.clamp_(0.0, 2.0),
        lambda lib, h, x: (h * 1).mul_(x).add_(h),
        lambda lib, h, x: h.copy_(x * x),
        lambda lib, h, x: h.fill_(x.sum()),
        lambda lib, h, x: h.zero_(),
    ],
)
def test_in_place_ops_on_non_leaves_rebase_their_history(update):
    outs = []

    def fn(lib, x):
        h = x * x + 1
        alias = h
        r = update(lib, h, x)
        (r * x).sum().backward()
        outs.append((alias.detach().numpy().copy(), r.grad_fn is not None))

    gx, tx = _both(fn)
    np.testing.assert_allclose(gx.grad.numpy(), tx.grad.numpy(), rtol=1e-6)
    np.testing.assert_allclose(outs[0][0], outs[1][0], rtol=1e-6)
    assert outs[0][1] and outs[1][1]


def test_augmented_assignment_on_a_non_leaf_matches_torch():
    def fn(lib, x):
        h = x * 2
        g = h
        h += x
        h *= x
        g.sum().backward()

    gx, tx = _both(fn)
    np.testing.assert_allclose(gx.grad.numpy(), tx.grad.numpy(), rtol=1e-6)


def test_a_plain_tensor_updated_from_one_that_requires_grad_gets_a_history():
    def fn(lib, x):
        acc = lib.zeros(3)
        acc += x * 2
        acc.add_(x)
        assert acc.requires_grad and not acc.is_leaf
        acc.sum().backward()

    gx, tx = _both(fn)
    np.testing.assert_array_equal(gx.grad.numpy(), tx.grad.numpy())


def test_in_place_on_a_node_output_that_its_backward_reads_raises():
    for lib in (gm, torch):
        x = lib.tensor([0.5, 1.0], requires_grad=True)
        y = x.exp()
        y.mul_(2)  # recorded, but exp's own output is now changed
        with pytest.raises(RuntimeError, match=_MODIFIED):
            y.sum().backward()


def test_leaves_that_require_grad_still_refuse_in_place_ops():
    for lib in (gm, torch):
        w = lib.ones(2, requires_grad=True)
        with pytest.raises(RuntimeError, match="leaf Variable that requires grad"):
            w += 1
        with lib.no_grad():
            w -= 0.5
        assert w.is_leaf and w.tolist() == [0.5, 0.5]


def test_reading_grad_of_a_non_leaf_warns_as_torch():
    for lib in (gm, torch):
        x = lib.ones(2, requires_grad=True)
        h = x * 2
        with pytest.warns(UserWarning, match=re.escape("is not a leaf Tensor is being accessed")):
            assert h.grad is None
        h.retain_grad()
        h.sum().backward()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert h.grad.tolist() == [1.0, 1.0] and x.grad.tolist() == [2.0, 2.0]
            assert lib.ones(1).grad is None  # a leaf: no warning


@pytest.mark.parametrize(
    "use",
    [
        lambda h, x: h + x,
        lambda h, x: h.sum() * x,
        lambda h, x: h.reshape(3, 1).expand(3, 2).sum(1),
    ],
)
def test_nodes_made_before_an_in_place_op_keep_the_old_history(use):
    """``z = use(h)`` then ``h.mul_(3)``: z's gradient flows through h as it was, while
    h's new value has the new history (torch records edges when a node is made)."""

    def fn(lib, x):
        h = x * 2
        z = use(h, x)
        h.mul_(3)
        (z.sum() + (h * h).sum()).backward()

    gx, tx = _both(fn)
    np.testing.assert_allclose(gx.grad.numpy(), tx.grad.numpy(), rtol=1e-6)


def test_a_plain_tensor_used_before_it_got_a_history_gets_no_gradient():
    def fn(lib, x):
        acc = lib.ones(3)
        y = acc + x  # acc had no history here
        acc += x * x
        (y.sum() + acc.sum()).backward()
        assert acc.grad_fn is not None

    gx, tx = _both(fn)
    np.testing.assert_allclose(gx.grad.numpy(), tx.grad.numpy(), rtol=1e-6)


@pytest.mark.parametrize(
    "assign",
    [
        lambda lib, h, x: h.__setitem__(0, 5.0),
        lambda lib, h, x: h.__setitem__(slice(1, None), x[:2] * 3),
        lambda lib, h, x: h.__setitem__(h > 2, x.sum()),
        lambda lib, h, x: h.__setitem__(lib.tensor([2, 0]), x[0]),
    ],
)
def test_assignment_into_a_non_leaf_is_recorded_like_torch(assign):
    def fn(lib, x):
        h = x * x
        assign(lib, h, x)
        (h * x).sum().backward()

    gx, tx = _both(fn)
    np.testing.assert_allclose(gx.grad.numpy(), tx.grad.numpy(), rtol=1e-6)


def test_a_traced_graph_follows_in_place_ops_that_autograd_records():
    """In grad mode ``t *= w`` on a non-leaf changes t (and its alias) with gradient: the
    traced graph gives the loss and gradients of eager code."""
    from gradmesh.core.graph import trace, validate
    from gradmesh.core.plan import compile_plan

    def fn(p, x):
        t = p["w"] * 2
        alias = t
        t += 1
        t *= p["w"]
        t.div_(p["w"] + 1)
        return (alias * alias).sum() + (x * 0).sum()

    w0 = np.array([1.0, 2.0, 3.0], np.float32)
    x0 = np.zeros((2, 1), np.float32)
    graph = validate(trace(fn, {"w": gm.tensor(w0)}, x0))
    result = compile_plan(graph, {"x0": x0.shape}).run({"w": w0}, {"x0": x0})
    w = gm.tensor(w0, requires_grad=True)
    loss = fn({"w": w}, gm.tensor(x0))
    loss.backward()
    tw = torch.tensor(w0, requires_grad=True)
    tloss = fn({"w": tw}, torch.tensor(x0))
    tloss.backward()
    assert result.loss == loss.item()
    np.testing.assert_array_equal(result.grads["w"], w.grad.numpy())
    np.testing.assert_allclose(w.grad.numpy(), tw.grad.numpy(), rtol=1e-6)


# ------------------------------------------------------------- NaN inputs' gradients ---

_NAN = float("nan")


@pytest.mark.parametrize("create_graph", [False, True])  # the bitwise kernel, the ops
@pytest.mark.parametrize(
    "fn",
    [
        lambda lib, a, b: lib.relu(a),
        lambda lib, a, b: lib.maximum(a, b),
        lambda lib, a, b: lib.minimum(a, b),
        lambda lib, a, b: lib.maximum(a, b[:1]),  # broadcast
        lambda lib, a, b: lib.clamp(a, -0.5, 1.0),
    ],
    ids=["relu", "maximum", "minimum", "maximum-broadcast", "clamp"],
)
def test_gradients_through_nan_inputs_are_torchs(fn, create_graph):
    """torch routes a gradient through a NaN by its kernels' comparisons: relu passes it
    (not a <= 0), maximum and minimum give it to both sides (neither side wins)."""
    a_vals = [_NAN, -1.0, 0.0, 2.0, _NAN, 1.5]
    b_vals = [0.0, -1.0, _NAN, 1.0, _NAN, 3.0]
    grads = []
    for lib in (gm, torch):
        a = lib.tensor(a_vals, requires_grad=True)
        b = lib.tensor(b_vals, requires_grad=True)
        out = fn(lib, a, b)
        found = lib.autograd.grad(
            [out], [a, b], [lib.ones_like(out)], create_graph=create_graph, allow_unused=True
        )
        grads.append([None if g is None else np.asarray(g.detach().numpy()) for g in found])
    for ours, theirs in zip(*grads):
        assert (ours is None) == (theirs is None)
        if ours is not None:
            np.testing.assert_array_equal(ours, theirs)
