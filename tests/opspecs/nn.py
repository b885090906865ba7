"""Specs for ``gradmesh.core.ops.nn``: softmax, dropout, layer norm, embedding, conv2d,
pooling and losses, each against the matching ``torch.nn.functional`` call."""

from __future__ import annotations

import numpy as np

import gradmesh.core.nn.functional as F

from . import OpSpec, away_from_zero, int_array


def _tf(torch):
    return torch.nn.functional


def targets(classes: int, ignore: int | None = None, p_ignore: float = 0.3):
    """Class indices in [0, classes), some replaced by ``ignore`` (at least one kept)."""

    def sample(shape, rng):
        t = rng.integers(0, classes, size=shape).astype(np.int64)
        if ignore is not None and t.size:
            drop = rng.random(shape) < p_ignore
            t[drop] = ignore
            if t.reshape(-1)[0] == ignore:  # keep one, so 'mean' never divides by 0
                t.reshape(-1)[0] = (ignore + 1) % classes
        return t

    return sample


def dropout_reference(shape, p: float, seed: int) -> np.ndarray:
    """The documented mask: PCG64(seed) uniforms in float64, kept where >= p."""
    u = np.random.Generator(np.random.PCG64(seed)).random(shape)
    return (u >= p) / (1.0 - p)


SPECS: list[OpSpec] = []


def spec(name, covers, gm, torch, shapes, **kw) -> None:
    SPECS.append(OpSpec(name, tuple(covers), gm, torch, shapes, **kw))


# ================================================================ softmax family ======

for dim in (-1, 0, 1):
    spec(
        f"softmax-dim{dim}",
        ["softmax", "softmax_grad"],
        lambda gm, x, d=dim: F.softmax(x, d),
        lambda torch, x, d=dim: torch.softmax(x, d),
        [((4, 5),), ((2, 3, 4),)],
    )
    spec(
        f"log_softmax-dim{dim}",
        ["log_softmax", "log_softmax_grad"],
        lambda gm, x, d=dim: F.log_softmax(x, d),
        lambda torch, x, d=dim: torch.log_softmax(x, d),
        [((4, 5),), ((2, 3, 4),)],
    )
spec(
    "softmax-large",
    ["softmax", "softmax_grad", "log_softmax", "log_softmax_grad"],
    lambda gm, x: F.softmax(x * 100, -1) + F.log_softmax(x * 100, -1),
    lambda torch, x: torch.softmax(x * 100, -1) + torch.log_softmax(x * 100, -1),
    [((3, 6),)],
    fd=False,
)

# ======================================================================== dropout ======

for p, seed in ((0.3, 7), (0.8, 123)):
    spec(
        f"dropout_mask-p{p}",
        ["dropout_mask"],
        lambda gm, x, p=p, s=seed: x * gm.REGISTRY["dropout_mask"](x, p=p, seed=s),
        lambda torch, x, p=p, s=seed: (
            x * torch.from_numpy(dropout_reference(tuple(x.shape), p, s)).to(x.dtype)
        ),
        [((5, 7),), ((2, 3, 4),)],
    )

# ===================================================================== layer norm ======

spec(
    "layer_norm",
    ["layer_norm", "layer_norm_grad"],
    lambda gm, x: F.layer_norm(x, x.shape[-1:]),
    lambda torch, x: _tf(torch).layer_norm(x, x.shape[-1:]),
    [((4, 5),), ((2, 3, 6),)],
)
spec(
    "layer_norm-affine-2d",
    ["layer_norm", "layer_norm_grad"],
    lambda gm, x, w, b: F.layer_norm(x, (3, 4), w, b, eps=1e-3),
    lambda torch, x, w, b: _tf(torch).layer_norm(x, (3, 4), w, b, eps=1e-3),
    [((2, 3, 4), (3, 4), (3, 4)), ((3, 4), (3, 4), (3, 4))],
)

# ====================================================================== embedding ======

spec(
    "embedding",
    ["embedding", "embedding_grad"],
    lambda gm, i, w: F.embedding(i, w),
    lambda torch, i, w: _tf(torch).embedding(i, w),
    [((3, 4), (6, 5)), ((7,), (3, 2)), ((), (4, 3))],
    nondiff={0: int_array(3)},
)
# The padding row gets no gradient by definition, so finite differences do not apply.
spec(
    "embedding-padding",
    ["embedding", "embedding_grad"],
    lambda gm, i, w: F.embedding(i, w, padding_idx=1),
    lambda torch, i, w: _tf(torch).embedding(i, w, padding_idx=1),
    [((4, 5), (3, 4)), ((9,), (3, 2))],
    nondiff={0: int_array(3)},
    fd=False,
)
spec(
    "embedding-padding-negative",
    ["embedding", "embedding_grad"],
    lambda gm, i, w: F.embedding(i, w, padding_idx=-1),
    lambda torch, i, w: _tf(torch).embedding(i, w, padding_idx=-1),
    [((4, 5), (3, 4))],
    nondiff={0: int_array(3)},
    fd=False,
)

# ==================================================================== convolution ======

_CONV_COVERS = ["conv2d", "conv2d_input_grad", "conv2d_weight_grad"]
_CONV_CASES = {
    # name: (kwargs, [(input shape, weight shape), ...])
    "basic": ({}, [((2, 3, 6, 6), (4, 3, 3, 3)), ((1, 1, 5, 4), (2, 1, 2, 3))]),
    "stride2-pad1": (
        dict(stride=2, padding=1),
        [((2, 3, 7, 7), (4, 3, 3, 3)), ((1, 2, 6, 5), (3, 2, 3, 3))],
    ),
    "dilation2": (dict(dilation=2, padding=2), [((2, 2, 7, 8), (3, 2, 3, 3))]),
    "groups2": (dict(groups=2, padding=1), [((2, 4, 5, 5), (6, 2, 3, 3))]),
    "depthwise": (dict(groups=3, stride=(2, 1)), [((2, 3, 6, 5), (3, 1, 2, 2))]),
    "1x1": ({}, [((2, 3, 4, 4), (5, 3, 1, 1))]),
    "rect": (dict(stride=(1, 2), padding=(0, 1), dilation=(2, 1)), [((1, 2, 7, 6), (2, 2, 2, 3))]),
    "same": (dict(padding="same"), [((2, 2, 5, 5), (3, 2, 3, 3))]),
}
for case, (kw, shapes) in _CONV_CASES.items():
    spec(
        f"conv2d-{case}",
        _CONV_COVERS,
        lambda gm, x, w, kw=kw: F.conv2d(x, w, **kw),
        lambda torch, x, w, kw=kw: _tf(torch).conv2d(x, w, **kw),
        shapes,
    )
spec(
    "conv2d-bias",
    _CONV_COVERS,
    lambda gm, x, w, b: F.conv2d(x, w, b, stride=2, padding=1),
    lambda torch, x, w, b: _tf(torch).conv2d(x, w, b, stride=2, padding=1),
    [((2, 3, 6, 6), (4, 3, 3, 3), (4,)), ((1, 2, 5, 5), (2, 2, 3, 3), (2,))],
)
spec(
    "conv2d-unbatched",
    _CONV_COVERS,
    lambda gm, x, w, b: F.conv2d(x, w, b, padding=1, groups=2),
    lambda torch, x, w, b: _tf(torch).conv2d(x, w, b, padding=1, groups=2),
    [((4, 5, 5), (2, 2, 3, 3), (2,))],
)

# ======================================================================== pooling ======
# Pooling is piecewise linear: its gradient does not depend on x, so second order is zero.

_MAX_CASES = {
    "k2": (dict(kernel_size=2), [((2, 3, 6, 6),), ((1, 1, 5, 7),)]),
    "k3-s2-p1": (dict(kernel_size=3, stride=2, padding=1), [((2, 2, 7, 7),), ((1, 3, 6, 5),)]),
    "dilation2": (dict(kernel_size=2, stride=1, dilation=2), [((1, 2, 6, 6),)]),
    "ceil": (dict(kernel_size=3, stride=2, ceil_mode=True), [((2, 2, 6, 6),), ((1, 1, 8, 5),)]),
    "ceil-pad": (
        dict(kernel_size=(3, 2), stride=(2, 3), padding=(1, 1), ceil_mode=True),
        [((1, 2, 7, 8),)],
    ),
    "unbatched": (dict(kernel_size=2), [((3, 4, 4),)]),
}
for case, (kw, shapes) in _MAX_CASES.items():
    spec(
        f"max_pool2d-{case}",
        ["max_pool2d", "max_pool2d_grad", "max_pool2d_select"],
        lambda gm, x, kw=kw: F.max_pool2d(x, **kw),
        lambda torch, x, kw=kw: _tf(torch).max_pool2d(x, **kw),
        shapes,
    )

_AVG_CASES = {
    "k2": (dict(kernel_size=2), [((2, 3, 6, 6),), ((1, 1, 5, 7),)]),
    "k3-s2-p1": (dict(kernel_size=3, stride=2, padding=1), [((2, 2, 7, 7),)]),
    "exclude-pad": (
        dict(kernel_size=3, stride=2, padding=1, count_include_pad=False),
        [((2, 2, 7, 7),), ((1, 1, 6, 5),)],
    ),
    "ceil": (dict(kernel_size=3, stride=2, ceil_mode=True), [((1, 2, 6, 6),)]),
    "ceil-pad": (
        dict(kernel_size=(3, 2), stride=(2, 3), padding=1, ceil_mode=True),
        [((1, 2, 7, 8),)],
    ),
    "ceil-exclude": (
        dict(kernel_size=3, stride=2, padding=1, ceil_mode=True, count_include_pad=False),
        [((1, 2, 6, 6),)],
    ),
}
for case, (kw, shapes) in _AVG_CASES.items():
    spec(
        f"avg_pool2d-{case}",
        ["avg_pool2d", "avg_pool2d_grad"],
        lambda gm, x, kw=kw: F.avg_pool2d(x, **kw),
        lambda torch, x, kw=kw: _tf(torch).avg_pool2d(x, **kw),
        shapes,
    )

# ========================================================================= losses ======

_NLL = ["nll_loss", "nll_loss_grad"]
_NLL_W = ["nll_loss_weighted", "nll_loss_weighted_grad"]
_W5 = [0.5, 1.0, 2.0, 0.25, 1.5]  # class weights for 5 classes
_PW5 = [2.0, 0.25, 1.0, 0.5, 3.0]  # positive weights for 5 labels


def _weight(lib, like, values=_W5):
    return lib.tensor(values, dtype=like.dtype, device=like.device)


for reduction in ("mean", "sum", "none"):
    r = reduction
    spec(
        f"nll_loss-{r}",
        _NLL,
        lambda gm, x, t, r=r: F.nll_loss(x, t, reduction=r),
        lambda torch, x, t, r=r: _tf(torch).nll_loss(x, t, reduction=r),
        [((4, 5), (4,)), ((2, 5, 3), (2, 3)), ((5,), ())],
        nondiff={1: targets(5)},
    )
    spec(
        f"nll_loss-weight-ignore-{r}",
        _NLL_W,
        lambda gm, x, t, r=r: F.nll_loss(x, t, _weight(gm, x), ignore_index=2, reduction=r),
        lambda torch, x, t, r=r: _tf(torch).nll_loss(
            x, t, _weight(torch, x), ignore_index=2, reduction=r
        ),
        [((6, 5), (6,)), ((2, 5, 4), (2, 4))],
        nondiff={1: targets(5, ignore=2)},
    )
    spec(
        f"cross_entropy-{r}",
        ["log_softmax", "log_softmax_grad"] + _NLL,
        lambda gm, x, t, r=r: F.cross_entropy(x, t, reduction=r),
        lambda torch, x, t, r=r: _tf(torch).cross_entropy(x, t, reduction=r),
        [((4, 5), (4,)), ((2, 5, 3), (2, 3)), ((5,), ())],
        nondiff={1: targets(5)},
    )
    spec(
        f"cross_entropy-ignore-smoothing-{r}",
        ["log_softmax", "log_softmax_grad"] + _NLL,
        lambda gm, x, t, r=r: F.cross_entropy(x, t, reduction=r, label_smoothing=0.2),
        lambda torch, x, t, r=r: _tf(torch).cross_entropy(x, t, reduction=r, label_smoothing=0.2),
        [((6, 5), (6,)), ((2, 5, 3), (2, 3))],
        nondiff={1: targets(5, ignore=-100)},
    )
    spec(
        f"cross_entropy-weight-smoothing-{r}",
        ["log_softmax", "log_softmax_grad"] + _NLL_W,
        lambda gm, x, t, r=r: F.cross_entropy(
            x, t, _weight(gm, x), ignore_index=0, reduction=r, label_smoothing=0.1
        ),
        lambda torch, x, t, r=r: _tf(torch).cross_entropy(
            x, t, _weight(torch, x), ignore_index=0, reduction=r, label_smoothing=0.1
        ),
        [((6, 5), (6,)), ((2, 5, 3), (2, 3))],
        nondiff={1: targets(5, ignore=0)},
    )
    spec(
        f"cross_entropy-probs-{r}",
        ["log_softmax", "log_softmax_grad"],
        lambda gm, x, p, r=r: F.cross_entropy(
            x, p, _weight(gm, x), reduction=r, label_smoothing=0.1
        ),
        lambda torch, x, p, r=r: _tf(torch).cross_entropy(
            x, p, _weight(torch, x), reduction=r, label_smoothing=0.1
        ),
        [((4, 5), (4, 5)), ((2, 5, 3), (2, 5, 3))],
        domain=(0.0, 1.0),
    )
    spec(
        f"mse_loss-{r}",
        ["mse_loss"],
        lambda gm, x, y, r=r: F.mse_loss(x, y, reduction=r),
        lambda torch, x, y, r=r: _tf(torch).mse_loss(x, y, reduction=r),
        [((4, 5), (4, 5)), ((3,), (3,)), ((), ())],
    )
    spec(
        f"mse_loss-weight-{r}",
        ["mse_loss"],
        lambda gm, x, y, w, r=r: F.mse_loss(x, y, reduction=r, weight=w),
        lambda torch, x, y, w, r=r: _tf(torch).mse_loss(x, y, reduction=r, weight=w),
        [((4, 5), (4, 5), (4, 5))],
        domain=(0.2, 2.0),
    )
    spec(
        f"bce_with_logits-{r}",
        ["binary_cross_entropy_with_logits"],
        lambda gm, x, t, r=r: F.binary_cross_entropy_with_logits(x, t, reduction=r),
        lambda torch, x, t, r=r: _tf(torch).binary_cross_entropy_with_logits(x, t, reduction=r),
        [((4, 5), (4, 5)), ((3,), (3,))],
        domain=away_from_zero(0.05, 3.0),
    )
    # torch gives no gradient to weight and pos_weight: they are constants here.
    spec(
        f"bce_with_logits-weights-{r}",
        ["binary_cross_entropy_with_logits", "softplus"],
        lambda gm, x, t, r=r: F.binary_cross_entropy_with_logits(
            x, t, _weight(gm, x), reduction=r, pos_weight=_weight(gm, x, _PW5)
        ),
        lambda torch, x, t, r=r: _tf(torch).binary_cross_entropy_with_logits(
            x, t, _weight(torch, x), reduction=r, pos_weight=_weight(torch, x, _PW5)
        ),
        [((4, 5), (4, 5)), ((2, 3, 5), (2, 3, 5))],
        domain=away_from_zero(0.05, 3.0),
    )

spec(
    "linear",
    ["linear"],
    lambda gm, x, w, b: F.linear(x, w, b),
    lambda torch, x, w, b: _tf(torch).linear(x, w, b),
    [
        ((4, 3), (5, 3), (5,)),
        ((2, 4, 3), (5, 3), (5,)),
        ((3,), (2, 3), (2,)),
        ((1, 1), (1, 1), (1,)),
    ],
)
spec(
    "linear-nobias",
    ["matmul", "permute"],
    lambda gm, x, w: F.linear(x, w),
    lambda torch, x, w: _tf(torch).linear(x, w),
    [((4, 3), (5, 3)), ((2, 4, 3), (5, 3))],
)

# ====================================================================== recurrent ======


def _lstm_cell_reference(torch, gates, c):
    """torch's LSTM cell on summed gate pre-activations: [h', c']."""
    i, f, g, o = gates.chunk(4, -1)
    c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.cat([torch.sigmoid(o) * torch.tanh(c_new), c_new], -1)


# The vjp runs one NumPy kernel (not an op) without create_graph, and differentiable ops
# with it (second order): one spec for each path.
for name, covers, second in (
    ("lstm_cell", ["lstm_cell"], False),
    ("lstm_cell-second-order", ["lstm_cell"], True),
):
    spec(
        name,
        covers,
        lambda gm, gates, c: gm.REGISTRY["lstm_cell"](gates, c),
        _lstm_cell_reference,
        [((3, 8), (3, 2)), ((2, 12), (1, 3)), ((1, 4), (1, 1))],
        domain=(-3.0, 3.0),
        second_order=second,
    )


def _lstm_layer_reference(torch, xw, h0, c0, w_hh, reverse=False):
    """torch's LSTM recurrence over precomputed input projections: [h_t, c_t] per step."""
    h, c, outs = h0, c0, {}
    steps = range(xw.shape[1] - 1, -1, -1) if reverse else range(xw.shape[1])
    for t in steps:
        i, f, g, o = (xw[:, t] + h @ w_hh.T).chunk(4, -1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        outs[t] = torch.cat([h, c], -1)
    return torch.stack([outs[t] for t in range(xw.shape[1])], 1)


# As lstm_cell: the one-kernel backward through time, and differentiable ops when second
# order is asked for; states of the batch's size or one broadcast row; both directions.
_LSTM_LAYER_SHAPES = [((2, 3, 8), (2, 2), (2, 2), (8, 2)), ((3, 2, 12), (1, 3), (1, 3), (12, 3))]
for reverse in (False, True):
    for suffix, covers, second, shapes in (
        ("", ["lstm_layer"], False, _LSTM_LAYER_SHAPES),
        ("-second-order", ["lstm_layer"], True, _LSTM_LAYER_SHAPES[:1]),
    ):
        spec(
            f"lstm_layer{'-reverse' if reverse else ''}{suffix}",
            covers,
            lambda gm, xw, h0, c0, w, reverse=reverse: gm.REGISTRY["lstm_layer"](
                xw, h0, c0, w, reverse=reverse
            ),
            lambda torch, xw, h0, c0, w, reverse=reverse: _lstm_layer_reference(
                torch, xw, h0, c0, w, reverse
            ),
            shapes,
            domain=(-1.5, 1.5),
            second_order=second,
        )
