"""The losses and distance functions of nn.functional beyond cross entropy, NLL, MSE and BCE
with logits (L1, smooth L1, Huber, BCE, KL divergence, the margin and embedding losses,
Poisson and Gaussian NLL, normalize, cosine similarity, pairwise distance, one_hot) and
their modules: values and gradients against torch in float64 and float32 for every
argument variant, the kinks where torch picks a subgradient, the errors, and a traced
graph. The ``binary_cross_entropy`` primitive's own numerics: tests/opspecs/loss.py."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from tracing import (
    assert_executed_equals_local,
    assert_local_matches_torch,
    assert_plan_equals_local,
)

import gradmesh.core as gm
import gradmesh.core.nn.functional as F
from gradmesh.core import nn

torch.set_num_threads(1)

# (rtol, atol); atol scales with the largest magnitude of torch's result, as float32
# gradients summed over a broadcast dim cancel to a few ulps of the terms.
TOL = {np.float64: (1e-10, 1e-12), np.float32: (2e-5, 1e-5)}


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _normal(*shape, seed=0) -> np.ndarray:
    return _rng(seed).standard_normal(shape)


def _uniform(lo, hi, *shape, seed=0) -> np.ndarray:
    return _rng(seed).uniform(lo, hi, shape)


def _signs(*shape, seed=0) -> np.ndarray:
    return _rng(seed).choice([-1.0, 1.0], size=shape)


def _classes(n: int, classes: int, seed=0) -> np.ndarray:
    return _rng(seed).integers(0, classes, n).astype(np.int64)


def _inputs(lib, arrays, diff, dtype):
    out = []
    for i, a in enumerate(arrays):
        a = np.asarray(a)
        if a.dtype.kind == "f":
            a = a.astype(dtype)
        out.append(lib.tensor(a, requires_grad=i in diff))
    return out


def _np(t) -> np.ndarray:
    return t.detach().numpy()


def assert_matches_torch(fn, arrays, diff=(0,), dtype=np.float64):
    """``fn(functional, *tensors)`` (the same code for gradmesh's nn.functional and torch's)
    gives torch's value, dtype and gradients for the inputs in ``diff``."""
    rtol, atol = TOL[dtype]
    xs, ts = _inputs(gm, arrays, diff, dtype), _inputs(torch, arrays, diff, dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # kl_div's 'mean' and torch's broadcast warnings
        out, ref = fn(F, *xs), fn(torch.nn.functional, *ts)
    assert tuple(out.shape) == tuple(ref.shape), (out.shape, ref.shape)
    assert out.dtype.name == str(ref.dtype).removeprefix("torch.")
    np.testing.assert_allclose(_np(out), _np(ref), rtol=rtol, atol=atol, err_msg="value")
    if not diff:
        return
    w = _normal(*ref.shape, seed=99)
    (out * gm.tensor(w.astype(dtype))).sum().backward()
    (ref * torch.tensor(w.astype(dtype))).sum().backward()
    for i in diff:
        want = _np(ts[i].grad)
        scale = max(1.0, float(np.abs(want).max(initial=0.0)))
        np.testing.assert_allclose(
            _np(xs[i].grad), want, rtol=rtol, atol=atol * scale, err_msg=f"gradient {i}"
        )


# ================================================================ value cases ======

X, Y = _normal(4, 5, seed=1), _normal(4, 5, seed=2)
P, Q = _uniform(0.02, 0.98, 4, 5, seed=3), _uniform(0.0, 1.0, 4, 5, seed=4)
W5 = _uniform(0.5, 2.0, 5, seed=5)
REDUCTIONS = ("none", "mean", "sum")

CASES = []


def case(name, fn, arrays, diff=(0,)):
    CASES.append(pytest.param(fn, arrays, diff, id=name))


for r in REDUCTIONS:
    case(f"l1-{r}", lambda F, x, y, r=r: F.l1_loss(x, y, reduction=r), [X, Y], (0, 1))
    case(
        f"l1-weight-{r}",
        lambda F, x, y, w, r=r: F.l1_loss(x, y, reduction=r, weight=w),
        [X, Y, _uniform(0.5, 2, 4, 5)],
        (0, 1),
    )
    case(f"l1-broadcast-{r}", lambda F, x, y, r=r: F.l1_loss(x, y, reduction=r), [X, Y[:1]], (0, 1))
    for beta in (1.0, 0.5, 0.0):
        case(
            f"smooth_l1-beta{beta}-{r}",
            lambda F, x, y, r=r, b=beta: F.smooth_l1_loss(x, y, reduction=r, beta=b),
            [X, Y],
            (0, 1),
        )
    for delta in (1.0, 0.3):
        case(
            f"huber-delta{delta}-{r}",
            lambda F, x, y, r=r, d=delta: F.huber_loss(x, y, reduction=r, delta=d),
            [X, Y],
            (0, 1),
        )
    case(
        f"huber-weight-{r}",
        lambda F, x, y, w, r=r: F.huber_loss(x, y, r, 0.5, w),
        [X, Y, _uniform(0.5, 2, 4, 5)],
        (0, 1),
    )
    case(f"bce-{r}", lambda F, p, q, r=r: F.binary_cross_entropy(p, q, reduction=r), [P, Q], (0, 1))
    case(
        f"bce-weight-{r}",
        lambda F, p, q, w, r=r: F.binary_cross_entropy(p, q, w, reduction=r),
        [P, Q, W5],
        (0, 1),
    )
    for margin in (0.0, 0.5):
        case(
            f"margin_ranking-{margin}-{r}",
            lambda F, a, b, t, r=r, m=margin: F.margin_ranking_loss(a, b, t, m, reduction=r),
            [X[:, 0], X[:, 1], _signs(4)],
            (0, 1, 2),
        )
        case(
            f"cosine_embedding-{margin}-{r}",
            lambda F, a, b, t, r=r, m=margin: F.cosine_embedding_loss(a, b, t, m, reduction=r),
            [X, Y, _signs(4, seed=7)],
            (0, 1),
        )
    case(
        f"hinge_embedding-{r}",
        lambda F, x, t, r=r: F.hinge_embedding_loss(x, t, 0.3, reduction=r),
        [X, _signs(4, 5)],
    )
    case(
        f"soft_margin-{r}",
        lambda F, x, t, r=r: F.soft_margin_loss(x, t, reduction=r),
        [X, _signs(4, 5)],
    )
    for p in (1, 2, 3):
        for swap in (False, True):
            case(
                f"triplet-p{p}-swap{swap}-{r}",
                lambda F, a, pos, neg, r=r, p=p, s=swap: F.triplet_margin_loss(
                    a, pos, neg, 0.7, p, 1e-6, s, reduction=r
                ),
                [X, Y, _normal(4, 5, seed=8)],
                (0, 1, 2),
            )
    for log_input in (True, False):
        for full in (False, True):
            case(
                f"poisson-log{log_input}-full{full}-{r}",
                lambda F, x, t, r=r, li=log_input, f=full: F.poisson_nll_loss(
                    x, t, li, f, reduction=r
                ),
                [X if log_input else P, _uniform(0.0, 4.0, 4, 5, seed=9)],
                (0, 1),
            )
    for full in (False, True):
        for var in (_uniform(0.1, 2, 4, 5), _uniform(0.1, 2, 4), _uniform(0.1, 2, 4, 1)):
            case(
                f"gaussian-full{full}-var{var.shape}-{r}",
                lambda F, x, y, v, r=r, f=full: F.gaussian_nll_loss(x, y, v, f, reduction=r),
                [X, Y, var],
                (0, 1, 2),
            )
    case(
        f"gaussian-float-var-{r}",
        lambda F, x, y, r=r: F.gaussian_nll_loss(x, y, 0.7, reduction=r),
        [X, Y],
        (0, 1),
    )
    case(
        f"gaussian-var-below-eps-{r}",  # clamped in value only: the gradient is var's own
        lambda F, x, y, v, r=r: F.gaussian_nll_loss(x, y, v, eps=0.05, reduction=r),
        [X, Y, _uniform(0.0, 0.1, 4, 5)],
        (0, 1, 2),
    )
    case(
        f"multilabel_soft_margin-{r}",
        lambda F, x, t, r=r: F.multilabel_soft_margin_loss(x, t, reduction=r),
        [X * 5, (Y > 0) * 1.0],
        (0, 1),
    )
    case(
        f"multilabel_soft_margin-weight-{r}",
        lambda F, x, t, w, r=r: F.multilabel_soft_margin_loss(x, t, w, reduction=r),
        [X, Q, W5],
        (0, 1),
    )
    for p in (1, 2):
        case(
            f"multi_margin-p{p}-{r}",
            lambda F, x, t, r=r, p=p: F.multi_margin_loss(x, t, p, 0.8, reduction=r),
            [X, _classes(4, 5)],
        )
        case(
            f"multi_margin-p{p}-weight-{r}",
            lambda F, x, t, w, r=r, p=p: F.multi_margin_loss(x, t, p, 1.0, w, reduction=r),
            [X, _classes(4, 5, seed=3), W5],
        )
    case(
        f"multi_margin-1d-{r}",
        lambda F, x, t, r=r: F.multi_margin_loss(x, t, reduction=r),
        [X[0], np.array(3)],
    )
    case(
        f"multi_margin-1d-target1-{r}",
        lambda F, x, t, r=r: F.multi_margin_loss(x, t, reduction=r),
        [X[0], np.array([1])],
    )
for r in REDUCTIONS + ("batchmean",):
    for log_target in (False, True):
        case(
            f"kl_div-log_target{log_target}-{r}",
            lambda F, x, t, r=r, lt=log_target: F.kl_div(x, t, reduction=r, log_target=lt),
            [X, Y if log_target else Q],
            (0, 1),
        )
    case(
        f"kl_div-0d-{r}",
        lambda F, x, t, r=r: F.kl_div(x, t, reduction=r),
        [X[0, 0], Q[0, 0]],
        (0, 1),
    )

for p in (1, 2, 3, 1.5, math.inf, -math.inf):
    for dim in (1, 0, -1):
        case(f"normalize-p{p}-dim{dim}", lambda F, x, p=p, d=dim: F.normalize(x, p, d), [X])
    case(
        f"pairwise_distance-p{p}",
        lambda F, a, b, p=p: F.pairwise_distance(a, b, p),
        [X, Y],
        (0, 1),
    )
    case(
        f"pairwise_distance-p{p}-keepdim-broadcast",
        lambda F, a, b, p=p: F.pairwise_distance(a, b, p, 1e-3, True),
        [X, Y[0]],
        (0, 1),
    )
case("pairwise_distance-p0", lambda F, a, b: F.pairwise_distance(a, b, 0), [X, Y.round()], ())
case("pairwise_distance-1d", lambda F, a, b: F.pairwise_distance(a, b), [X[0], Y[0]], (0, 1))
case("pairwise_distance-0d", lambda F, a, b: F.pairwise_distance(a, b), [X[0, 0], Y[0, 0]], (0, 1))
case("normalize-eps", lambda F, x: F.normalize(x, eps=3.0), [X])
for dim in (1, 0, -1):
    case(
        f"cosine_similarity-dim{dim}",
        lambda F, a, b, d=dim: F.cosine_similarity(a, b, d),
        [X, Y],
        (0, 1),
    )
case(
    "cosine_similarity-broadcast",
    lambda F, a, b: F.cosine_similarity(a, b, 1),
    [_normal(3, 1, 5), _normal(4, 5, seed=1)],
    (0, 1),
)
case(
    "cosine_similarity-3d-eps",
    lambda F, a, b: F.cosine_similarity(a, b, 2, eps=0.5),
    [_normal(2, 3, 4) * 0.1, _normal(2, 3, 4, seed=1)],
    (0, 1),
)
case(
    "cosine_similarity-int-and-float",
    lambda F, a, b: F.cosine_similarity(a, b),
    [np.arange(10).reshape(2, 5), Y[:2]],
    (1,),
)
case(
    "pairwise_distance-int",
    lambda F, a, b: F.pairwise_distance(a, b),
    [np.arange(10).reshape(2, 5), np.ones((2, 5), np.int64)],
    (),
)
case("one_hot", lambda F, t: F.one_hot(t), [np.array([[0, 3], [2, 2]])], ())
case("one_hot-num_classes", lambda F, t: F.one_hot(t, 6), [np.array([0, 3, 5])], ())
case("one_hot-0d", lambda F, t: F.one_hot(t, 4), [np.array(2)], ())
case("one_hot-empty", lambda F, t: F.one_hot(t, 3), [np.zeros((0, 2), np.int64)], ())


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("fn, arrays, diff", CASES)
def test_matches_torch(fn, arrays, diff, dtype):
    assert_matches_torch(fn, arrays, diff, dtype)


# ====================================================================== kinks ======
# Where torch's backward picks one side of a kink, gradmesh picks the same.

# Differences exactly 0 and exactly +-0.5 (all values are multiples of 1/4).
KINK_X = np.array([[1.0, 0.25, -0.5, 2.0, 0.0], [0.75, -1.25, 1.5, 0.5, -0.25]])
KINK_Y = np.array([[1.0, -0.25, 0.0, 2.0, 0.5], [1.25, -0.75, 1.5, 0.0, -0.25]])


@pytest.mark.parametrize("r", REDUCTIONS)
def test_l1_gradient_is_zero_where_input_equals_target(r):
    assert_matches_torch(lambda F, x, y: F.l1_loss(x, y, reduction=r), [KINK_X, KINK_Y], (0, 1))
    x = gm.tensor(KINK_X, requires_grad=True)
    F.l1_loss(x, gm.tensor(KINK_Y), reduction="sum").backward()
    assert np.all(x.grad.numpy()[KINK_X == KINK_Y] == 0)


@pytest.mark.parametrize("r", REDUCTIONS)
def test_smooth_l1_and_huber_at_the_switch_point(r):
    assert np.any(np.abs(KINK_X - KINK_Y) == 0.5)
    for beta in (0.5, 0.0):
        assert_matches_torch(
            lambda F, x, y, b=beta: F.smooth_l1_loss(x, y, reduction=r, beta=b),
            [KINK_X, KINK_Y],
            (0, 1),
        )
    assert_matches_torch(
        lambda F, x, y: F.huber_loss(x, y, reduction=r, delta=0.5), [KINK_X, KINK_Y], (0, 1)
    )
    x = gm.tensor(KINK_X, requires_grad=True)
    F.smooth_l1_loss(x, gm.tensor(KINK_Y), reduction="sum", beta=0.5).backward()
    at_beta = np.abs(KINK_X - KINK_Y) == 0.5
    assert np.array_equal(x.grad.numpy()[at_beta], np.sign(KINK_X - KINK_Y)[at_beta])


def test_hinges_at_zero():
    """clamp_min passes the gradient at 0 (margin ranking, hinge embedding, triplet), the
    multi-margin kernel does not (it counts only terms > 0)."""
    a, b = np.array([1.0, 0.5, -0.25]), np.array([0.5, 0.5, 0.25])
    for margin in (0.0, 0.5):
        assert_matches_torch(
            lambda F, a, b, t, m=margin: F.margin_ranking_loss(a, b, t, m, reduction="sum"),
            [a, b, np.array([1.0, 1.0, -1.0])],
            (0, 1, 2),
        )
    assert_matches_torch(
        lambda F, x, t: F.hinge_embedding_loss(x, t, 1.0, reduction="sum"),
        [np.array([1.0, 0.5, 1.0]), np.array([-1.0, -1.0, 1.0])],
    )
    # margin - x[y] + x[i] == 0 for some i (scores exact in binary).
    scores = np.array([[1.0, 0.0, 0.5, 0.25], [0.0, 0.0, 1.0, -1.0]])
    for p in (1, 2):
        assert_matches_torch(
            lambda F, x, t, p=p: F.multi_margin_loss(x, t, p, reduction="sum"),
            [scores, np.array([0, 2])],
        )
    anchor = np.array([[0.0, 0.0], [1.0, 1.0]])
    assert_matches_torch(  # d(a, p) - d(a, n) + margin == 0 in the first row
        lambda F, a, p, n: F.triplet_margin_loss(a, p, n, 1.0, 1, 0.0, reduction="sum"),
        [anchor, anchor + [[1.0, 0.0], [0.5, 0.0]], anchor + [[2.0, 0.0], [3.0, 0.0]]],
        (0, 1, 2),
    )


def test_kl_div_zero_target_counts_zero():
    assert_matches_torch(
        lambda F, x, t: F.kl_div(x, t, reduction="sum"),
        [np.array([0.3, -0.2, 1.0]), np.array([0.0, 0.5, 0.5])],
    )


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
def test_binary_cross_entropy_at_saturated_probabilities(dtype):
    """Logs clamped to -100 and the gradient's denominator to 1e-12, as in torch: finite
    values and gradients where a sigmoid has rounded to exactly 0 or 1."""
    p = np.array([0.0, 1.0, 0.0, 1.0, 1e-30, 0.5])
    t = np.array([0.0, 1.0, 1.0, 0.0, 0.3, 1.0])
    for r in REDUCTIONS:
        assert_matches_torch(
            lambda F, p, t, r=r: F.binary_cross_entropy(p, t, reduction=r), [p, t], (0,), dtype
        )
    x = gm.tensor(p, requires_grad=True)
    loss = F.binary_cross_entropy(x, gm.tensor(t), reduction="sum")
    loss.backward()
    assert np.isfinite(loss.item()) and np.all(np.isfinite(x.grad.numpy()))


def test_zero_and_tiny_vectors_in_norms():
    """A zero vector gets torch's gradient (0 from the norm, not nan), and cosine similarity
    clamps its norms in value only."""
    zero_row = np.vstack([np.zeros(5), X[1:]])
    assert_matches_torch(lambda F, x: F.normalize(x), [zero_row])
    assert_matches_torch(lambda F, x: F.normalize(x, 3), [zero_row])
    for scale in (0.0, 1e-12):
        assert_matches_torch(
            lambda F, a, b: F.cosine_similarity(a, b),
            [np.vstack([scale * X[:1], X[1:]]), Y],
            (0, 1),
        )
    for p in (1, 2, 3, math.inf):
        assert_matches_torch(lambda F, a, b, p=p: F.pairwise_distance(a, b, p, 0.0), [X, X], (0, 1))


# ===================================================================== errors ======

ERRORS = [
    (lambda: F.l1_loss(gm.ones(2), gm.ones(2), reduction="avg"), ValueError, "reduction"),
    (lambda: F.l1_loss(gm.ones(2), gm.ones(2), weight=gm.ones(3)), ValueError, "weight"),
    (lambda: F.smooth_l1_loss(gm.ones(2), gm.ones(2), beta=-1.0), RuntimeError, "beta"),
    (lambda: F.huber_loss(gm.ones(2), gm.ones(2), delta=0.0), RuntimeError, "delta"),
    (lambda: F.huber_loss(gm.ones(2), gm.ones(2), "avg"), ValueError, "reduction"),
    (lambda: F.binary_cross_entropy(gm.ones(2), gm.ones(3)), ValueError, "target size"),
    (lambda: F.binary_cross_entropy(gm.ones(2) * 2, gm.ones(2)), RuntimeError, "between 0 and 1"),
    (
        lambda: F.binary_cross_entropy(gm.ones(2, 3) / 2, gm.ones(2, 3), gm.ones(2)),
        RuntimeError,
        "weight|broadcast",
    ),
    (
        lambda: F.binary_cross_entropy(gm.ones(2) / 2, gm.ones(2, dtype=gm.float64)),
        RuntimeError,
        "dtype",
    ),
    (
        lambda: F.binary_cross_entropy(gm.ones(2) / 2, gm.ones(2), reduction="x"),
        ValueError,
        "reduction",
    ),
    (lambda: F.kl_div(gm.ones(2), gm.ones(2), reduction="avg"), ValueError, "reduction"),
    (lambda: F.normalize(gm.tensor([1, 2])), RuntimeError, "floating"),
    (
        lambda: F.cosine_similarity(gm.tensor([1, 2]), gm.tensor([1, 2]), 0),
        RuntimeError,
        "floating",
    ),
    (lambda: F.cosine_similarity(gm.ones(2, 3), gm.ones(2, 2)), RuntimeError, "broadcast|shape"),
    (lambda: F.one_hot(gm.tensor([0, -1])), RuntimeError, "non-negative"),
    (lambda: F.one_hot(gm.tensor([0, 3]), 3), RuntimeError, "smaller than num_classes"),
    (lambda: F.one_hot(gm.tensor([0, 1], dtype=gm.int32)), RuntimeError, "LongTensor"),
    (lambda: F.one_hot(gm.tensor([0.0, 1.0])), RuntimeError, "LongTensor"),
    (lambda: F.one_hot(gm.zeros(0, dtype=gm.int64)), RuntimeError, "empty tensor"),
    (
        lambda: F.margin_ranking_loss(gm.ones(3), gm.ones(3), gm.ones(3, 1)),
        RuntimeError,
        "same dimension",
    ),
    (
        lambda: F.hinge_embedding_loss(gm.ones(2), gm.ones(2), reduction="x"),
        ValueError,
        "reduction",
    ),
    (lambda: F.soft_margin_loss(gm.ones(2), gm.ones(2), reduction="x"), ValueError, "reduction"),
    (
        lambda: F.cosine_embedding_loss(gm.ones(2, 3), gm.ones(2, 3), gm.ones(2, 1)),
        RuntimeError,
        "multi-target",
    ),
    (
        lambda: F.cosine_embedding_loss(gm.ones(3), gm.ones(3), gm.ones(3)),
        RuntimeError,
        "1D target tensor expects 2D input",
    ),
    (
        lambda: F.triplet_margin_loss(gm.ones(2, 3), gm.ones(2, 3), gm.ones(3)),
        RuntimeError,
        "same number of dimensions",
    ),
    (
        lambda: F.triplet_margin_loss(gm.ones(2, 3), gm.ones(2, 3), gm.ones(2, 3), margin=0.0),
        ValueError,
        "margin",
    ),
    (lambda: F.poisson_nll_loss(gm.ones(2), gm.ones(2), reduction="x"), ValueError, "reduction"),
    (lambda: F.gaussian_nll_loss(gm.ones(3, 4), gm.ones(3, 4), gm.ones(2)), ValueError, "var"),
    (
        lambda: F.gaussian_nll_loss(gm.ones(3, 4), gm.ones(3, 4), -gm.ones(3, 4)),
        ValueError,
        "negative",
    ),
    (lambda: F.gaussian_nll_loss(gm.ones(3), gm.ones(3), -1.0), ValueError, "negative"),
    (
        lambda: F.gaussian_nll_loss(gm.ones(3), gm.ones(3), gm.ones(3), reduction="x"),
        ValueError,
        "reduction",
    ),
    (
        lambda: F.multilabel_soft_margin_loss(gm.ones(2, 3), gm.ones(2, 3), reduction="x"),
        ValueError,
        "reduction",
    ),
    (lambda: F.multi_margin_loss(gm.ones(2, 3), gm.tensor([0, 1]), p=3), ValueError, "p == 1"),
    (
        lambda: F.multi_margin_loss(gm.ones(2, 3), gm.tensor([0, 1]), weight=gm.ones(1, 3)),
        ValueError,
        "one-dimensional",
    ),
    (lambda: F.multi_margin_loss(gm.ones(2, 3), gm.tensor([0, 3])), RuntimeError, "out of range"),
    (lambda: F.multi_margin_loss(gm.ones(2, 3), gm.tensor([0, -1])), RuntimeError, "out of range"),
    (lambda: F.multi_margin_loss(gm.ones(2, 3), gm.tensor([0])), RuntimeError, "target size"),
    (
        lambda: F.multi_margin_loss(gm.ones(1, 2, 3), gm.tensor([[0]])),
        RuntimeError,
        "vector or matrix",
    ),
    (lambda: F.multi_margin_loss(gm.ones(2, 3), gm.tensor([0.0, 1.0])), RuntimeError, "int64"),
    (
        lambda: F.multi_margin_loss(gm.ones(2, 3), gm.tensor([0, 1]), weight=gm.ones(2)),
        RuntimeError,
        "weight size",
    ),
    (lambda: nn.TripletMarginLoss(margin=-1.0), ValueError, "margin"),
    (lambda: nn.MultiMarginLoss(p=3), ValueError, "p == 1"),
    (lambda: nn.MultiMarginLoss(weight=gm.ones(2, 2)), ValueError, "1D"),
    (lambda: nn.HuberLoss(delta="1"), TypeError, "delta"),
    (lambda: nn.L1Loss(reduction="avg"), ValueError, "reduction"),
    (lambda: nn.KLDivLoss(reduction="avg"), ValueError, "reduction"),
]


@pytest.mark.parametrize("call, exc, match", ERRORS, ids=[str(i) for i in range(len(ERRORS))])
def test_errors_are_torchs_exception_types(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_warnings_as_torch():
    with pytest.warns(UserWarning, match="target size"):
        F.l1_loss(gm.ones(2, 3), gm.ones(1, 3))
    with pytest.warns(UserWarning, match="'batchmean'"):
        F.kl_div(gm.ones(2, 3), gm.ones(2, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        F.kl_div(gm.ones(2, 3), gm.ones(2, 3), reduction="batchmean")
        F.smooth_l1_loss(gm.ones(2, 3), gm.ones(2, 3))


def test_soft_margin_target_gets_no_gradient_as_in_torch():
    t = gm.tensor([1.0, -1.0], requires_grad=True)
    x = gm.tensor([0.3, 0.2], requires_grad=True)
    F.soft_margin_loss(x, t).backward()
    assert t.grad is None and x.grad is not None


# ==================================================================== modules ======

W = _uniform(0.5, 2.0, 5, seed=6)
MODULES = [
    ("L1Loss", {}, [X, Y]),
    ("L1Loss", {"reduction": "sum"}, [X, Y]),
    ("L1Loss", {"size_average": False}, [X, Y]),
    ("SmoothL1Loss", {"beta": 0.5, "reduction": "none"}, [X, Y]),
    ("HuberLoss", {"delta": 0.5}, [X, Y]),
    ("BCELoss", {"weight": W}, [P, Q]),
    ("BCELoss", {"reduce": False}, [P, Q]),
    ("KLDivLoss", {"reduction": "batchmean", "log_target": True}, [X, Y]),
    ("KLDivLoss", {}, [X, Q]),
    ("MarginRankingLoss", {"margin": 0.2}, [X[:, 0], X[:, 1], _signs(4)]),
    ("HingeEmbeddingLoss", {"margin": 0.5, "reduction": "sum"}, [X, _signs(4, 5)]),
    ("SoftMarginLoss", {}, [X, _signs(4, 5)]),
    ("CosineEmbeddingLoss", {"margin": 0.1}, [X, Y, _signs(4)]),
    ("TripletMarginLoss", {"margin": 0.5, "p": 1, "swap": True}, [X, Y, _normal(4, 5, seed=3)]),
    ("PoissonNLLLoss", {"log_input": False, "full": True}, [P, _uniform(0, 4, 4, 5)]),
    ("GaussianNLLLoss", {"full": True, "eps": 1e-3}, [X, Y, _uniform(0.0, 1.0, 4, 1)]),
    ("MultiLabelSoftMarginLoss", {"weight": W}, [X, Q]),
    ("MultiMarginLoss", {"p": 2, "margin": 0.5, "weight": W}, [X, _classes(4, 5)]),
    ("CosineSimilarity", {"dim": 0, "eps": 1e-6}, [X, Y]),
    ("PairwiseDistance", {"p": 3.0, "keepdim": True}, [X, Y]),
]


def _construct(lib, name, kwargs):
    kwargs = {k: lib.tensor(v) if isinstance(v, np.ndarray) else v for k, v in kwargs.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy size_average / reduce flags
        return getattr(lib.nn, name)(**kwargs)


@pytest.mark.parametrize(
    "name, kwargs, arrays", MODULES, ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(MODULES)]
)
def test_module_matches_torch(name, kwargs, arrays):
    ours, theirs = _construct(gm, name, kwargs), _construct(torch, name, kwargs)
    assert repr(ours) == repr(theirs)
    for attr in type(theirs).__constants__:  # the options, under torch's names
        assert getattr(ours, attr) == getattr(theirs, attr), attr
    assert list(ours.state_dict()) == list(theirs.state_dict())
    floats = tuple(i for i, a in enumerate(arrays) if np.asarray(a).dtype.kind == "f")
    if name == "SoftMarginLoss":  # torch refuses a target that requires grad
        floats = (0,)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        xs, ts = _inputs(gm, arrays, floats, np.float64), _inputs(torch, arrays, floats, np.float64)
        out, ref = ours(*xs), theirs(*ts)
    np.testing.assert_allclose(_np(out), _np(ref), rtol=1e-10, atol=1e-12)
    (out * gm.tensor(_normal(*ref.shape))).sum().backward()
    (ref * torch.tensor(_normal(*ref.shape))).sum().backward()
    for i in floats:
        if ts[i].grad is not None:
            np.testing.assert_allclose(_np(xs[i].grad), _np(ts[i].grad), rtol=1e-10, atol=1e-12)


def test_modules_export_from_nn():
    names = [n for n, _, _ in MODULES]
    assert all(n in nn.__all__ and n in gm.nn.modules.__all__ for n in names)


# ===================================================================== graphs ======

PARAMS = {"w": np.array([1.5, -0.5, 2.0]), "b": np.array([0.1, 0.2, -0.3])}


def _losses(lib, p, x):
    """Every loss of this file on a (N, 3) batch: a model's output ``y`` against targets
    computed from the data, so the graph keeps its batch size free."""
    nf = lib.nn.functional
    y = x * p["w"] + p["b"]
    target = x * 0.5
    signs = (x > 0).to(x.dtype) * 2 - 1
    labels = x.argmax(1)
    terms = [
        nf.l1_loss(y, target),
        nf.smooth_l1_loss(y, target, beta=0.5),
        nf.huber_loss(y, target, reduction="sum", delta=0.7),
        nf.binary_cross_entropy(lib.sigmoid(y), lib.sigmoid(target), x.abs()),
        nf.kl_div(nf.log_softmax(y, 1), nf.softmax(target, 1), reduction="batchmean"),
        nf.margin_ranking_loss(y[:, 0], y[:, 1], signs[:, 2], 0.1),
        nf.hinge_embedding_loss(y, signs),
        nf.soft_margin_loss(y, signs),
        nf.cosine_embedding_loss(y, target, signs[:, 0], 0.2),
        nf.triplet_margin_loss(y, target, y.flip(1), swap=True),
        nf.poisson_nll_loss(y, target.abs(), full=True),
        nf.gaussian_nll_loss(y, target, (x * p["b"]).abs() + 0.1),
        nf.multilabel_soft_margin_loss(y, (signs > 0).to(x.dtype)),
        nf.multi_margin_loss(y, labels, 2, 0.5, lib.tensor([1.0, 0.5, 2.0], dtype=x.dtype)),
        nf.cosine_similarity(y, target).sum(),
        nf.pairwise_distance(y, target, 3).mean(),
        (nf.normalize(y, dim=0) * nf.one_hot(labels, 3)).sum(),
    ]
    return sum(terms[1:], terms[0])


def test_graph_runs_as_local_and_torch():
    assert_executed_equals_local(_losses, PARAMS)
    assert_plan_equals_local(_losses, PARAMS)
    assert_local_matches_torch(_losses, PARAMS)
