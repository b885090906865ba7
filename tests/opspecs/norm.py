"""Specs for ``gradmesh.core.ops.norm``, ``.conv`` and ``.activation`` and the functional
compositions over them (batch/group/RMS norm, pad, adaptive pooling, interpolate, conv1d, transposed
conv2d, silu/mish/hardswish), each against the matching ``torch.nn.functional`` call."""

from __future__ import annotations

import numpy as np

import gradmesh.core.nn.functional as F

from . import OpSpec
from .nn import targets

SPECS: list[OpSpec] = []


def spec(name, covers, gm, torch, shapes, **kw) -> None:
    SPECS.append(OpSpec(name, tuple(covers), gm, torch, shapes, **kw))


def _tf(torch):
    return torch.nn.functional


def away_from(points, gap=0.1, lo=-5.0, hi=5.0):
    """Uniform in [lo, hi] but at least ``gap`` from each kink in ``points``."""

    def sample(shape, rng):
        a = rng.uniform(lo, hi, size=shape)
        for p in points:
            near = np.abs(a - p) < gap
            a[near] = p + np.where(a[near] >= p, gap, -gap)
        return a

    return sample


# ==================================================================== activations ======

for name in ("silu", "mish"):
    spec(
        name,
        [name],
        lambda gm, x, n=name: getattr(F, n)(x),
        lambda torch, x, n=name: getattr(_tf(torch), n)(x),
        [((4, 5),), ((),), ((2, 3, 4),)],
        domain=(-6.0, 6.0),
    )
spec(
    "silu-large",
    ["silu", "mish"],
    lambda gm, x: F.silu(x * 100) + F.mish(x * 100),
    lambda torch, x: _tf(torch).silu(x * 100) + _tf(torch).mish(x * 100),
    [((3, 6),)],
    fd=False,
)
spec(
    "hardswish",
    ["hardswish"],
    lambda gm, x: F.hardswish(x),
    lambda torch, x: _tf(torch).hardswish(x),
    [((6, 7),), ((40,),)],
    domain=away_from([-3.0, 3.0]),
)

# ======================================================================== padding ======

_PAD_CASES = {
    "constant": ((1, 2), "constant", 0.0, [((2, 3, 4),), ((5,),)]),
    "constant-value-2d": ((1, 0, 2, 3), "constant", 1.5, [((2, 3, 4),)]),
    "constant-crop": ((-1, 2, 1, -2), "constant", 0.0, [((2, 4, 5),)]),
    "constant-3dims": ((1, 1, 0, 2, 1, 0), "constant", 0.0, [((2, 2, 3, 2),)]),
    "reflect-1d": ((2, 3), "reflect", None, [((2, 3, 5),), ((3, 4),)]),
    "reflect-2d": ((1, 2, 2, 1), "reflect", None, [((2, 2, 4, 5),), ((2, 3, 3),)]),
    "reflect-3d": ((1, 1, 2, 0, 1, 2), "reflect", None, [((1, 2, 3, 4, 3),)]),
    "replicate-1d": ((3, 1), "replicate", None, [((2, 3, 2),)]),
    "replicate-2d": ((2, 3, 1, 4), "replicate", None, [((2, 2, 3, 4),), ((1, 1, 1),)]),
}
for case, (p, mode, value, shapes) in _PAD_CASES.items():
    spec(
        f"pad-{case}",
        ["pad", "pad_grad"],
        lambda gm, x, p=p, m=mode, v=value: F.pad(x, p, m, v),
        lambda torch, x, p=p, m=mode, v=value: _tf(torch).pad(x, p, m, v),
        shapes,
    )

# ================================================================== normalisation ======

_BN = ["batch_norm", "batch_norm_grad"]
spec(
    "batch_norm-train",
    _BN,
    lambda gm, x: F.batch_norm(x, None, None, training=True),
    lambda torch, x: _tf(torch).batch_norm(x, None, None, training=True),
    [((4, 3),), ((2, 3, 5),), ((2, 3, 4, 3),)],
)
spec(
    "batch_norm-train-affine",
    _BN,
    lambda gm, x, w, b: F.batch_norm(x, None, None, w, b, training=True, eps=1e-3),
    lambda torch, x, w, b: _tf(torch).batch_norm(x, None, None, w, b, training=True, eps=1e-3),
    [((3, 4, 2, 2), (4,), (4,)), ((5, 2), (2,), (2,))],
)


def _train_with_running_stats(lib, x, w, b):
    """A training-mode step with running statistics: their new values (momentum 0.5)
    are added to the output, so the values are compared with torch's; torch gives them
    no gradient, nor does gradmesh (so no finite differences here)."""
    c = x.shape[1]
    rm = lib.zeros(c, dtype=x.dtype)
    rv = lib.ones(c, dtype=x.dtype)
    out = _tf(lib).batch_norm(x, rm, rv, w, b, training=True, momentum=0.5)
    return out + (rm * 3 + rv).reshape((1, c) + (1,) * (x.ndim - 2))


spec(
    "batch_norm-train-running-stats",
    _BN + ["batch_norm_stats", "channel_affine", "channel_affine_grad"],
    _train_with_running_stats,
    _train_with_running_stats,
    [((3, 4, 2, 2), (4,), (4,)), ((5, 2), (2,), (2,)), ((2, 3, 5), (3,), (3,))],
    fd=False,
)


def _stats(lib, like):
    """Fixed running mean and variance for 4 channels (torch gives them no gradient)."""
    return (
        lib.tensor([0.5, -1.0, 0.0, 2.0], dtype=like.dtype),
        lib.tensor([1.0, 0.25, 2.0, 0.5], dtype=like.dtype),
    )


spec(
    "batch_norm-eval",
    ["sqrt", "reshape"],
    lambda gm, x, w, b: F.batch_norm(x, *_stats(gm, x), w, b, training=False),
    lambda torch, x, w, b: _tf(torch).batch_norm(x, *_stats(torch, x), w, b, training=False),
    [((3, 4, 2, 2), (4,), (4,)), ((2, 4), (4,), (4,))],
)
spec(
    "group_norm",
    ["layer_norm", "layer_norm_grad"],
    lambda gm, x, w, b: F.group_norm(x, 2, w, b, eps=1e-4),
    lambda torch, x, w, b: _tf(torch).group_norm(x, 2, w, b, eps=1e-4),
    [((2, 4, 3, 3), (4,), (4,)), ((3, 6, 5), (6,), (6,)), ((2, 2), (2,), (2,))],
)
spec(
    "group_norm-noaffine",
    ["layer_norm", "layer_norm_grad"],
    lambda gm, x: F.group_norm(x, 3),
    lambda torch, x: _tf(torch).group_norm(x, 3),
    [((2, 6, 2, 2),), ((1, 3, 4),)],
)
spec(
    "rms_norm",
    ["sqrt", "sum"],
    lambda gm, x, w: F.rms_norm(x, (x.shape[-1],), w),
    lambda torch, x, w: _tf(torch).rms_norm(x, (x.shape[-1],), w),
    [((4, 5), (5,)), ((2, 3, 6), (6,))],
)
spec(
    "rms_norm-2d-eps",
    ["sqrt", "sum"],
    lambda gm, x: F.rms_norm(x, x.shape[-2:], eps=1e-3),
    lambda torch, x: _tf(torch).rms_norm(x, x.shape[-2:], eps=1e-3),
    [((2, 3, 4),)],
)

# ======================================================================= pooling ======

for out in (1, (2, 3), (3, None), (5, 4)):
    spec(
        f"adaptive_avg_pool2d-{out}",
        ["matmul"],
        lambda gm, x, o=out: F.adaptive_avg_pool2d(x, o),
        lambda torch, x, o=out: _tf(torch).adaptive_avg_pool2d(x, o),
        [((2, 3, 7, 5),), ((2, 5, 9),)],
    )

_INTERP_CASES = {
    "nearest-size": (dict(size=(5, 7)), [((2, 3, 3, 4),)]),
    "nearest-scale2": (dict(scale_factor=2), [((1, 2, 3, 3),), ((2, 2, 5),)]),
    "nearest-down": (dict(size=(2, 3), mode="nearest"), [((1, 2, 5, 7),)]),
    "bilinear-scale": (dict(scale_factor=(2, 1.5), mode="bilinear"), [((2, 2, 3, 4),)]),
    "bilinear-size-down": (dict(size=(2, 5), mode="bilinear"), [((1, 2, 5, 3),)]),
    "bilinear-align": (dict(size=(6, 4), mode="bilinear", align_corners=True), [((1, 2, 3, 3),)]),
    "linear": (dict(scale_factor=2.5, mode="linear"), [((2, 3, 4),)]),
    "linear-recompute": (
        dict(scale_factor=1.7, mode="linear", recompute_scale_factor=True),
        [((2, 1, 6),)],
    ),
}
for case, (kw, shapes) in _INTERP_CASES.items():
    spec(
        f"interpolate-{case}",
        ["matmul"],
        lambda gm, x, kw=kw: F.interpolate(x, **kw),
        lambda torch, x, kw=kw: _tf(torch).interpolate(x, **kw),
        shapes,
    )

# ==================================================================== convolution ======

_CONV = ["conv2d", "conv2d_input_grad", "conv2d_weight_grad"]
_CONV1D_CASES = {
    "basic": ({}, [((2, 3, 8), (4, 3, 3), (4,)), ((3, 7), (2, 3, 2), (2,))]),
    "stride-pad-dilation": (dict(stride=2, padding=2, dilation=2), [((2, 2, 9), (3, 2, 3), (3,))]),
    "groups-same": (dict(groups=2, padding="same"), [((2, 4, 6), (4, 2, 3), (4,))]),
}
for case, (kw, shapes) in _CONV1D_CASES.items():
    spec(
        f"conv1d-{case}",
        _CONV,
        lambda gm, x, w, b, kw=kw: F.conv1d(x, w, b, **kw),
        lambda torch, x, w, b, kw=kw: _tf(torch).conv1d(x, w, b, **kw),
        shapes,
    )

_CONVT_CASES = {
    "basic": ({}, [((2, 3, 4, 4), (3, 2, 3, 3), (2,)), ((3, 3, 2), (3, 4, 2, 2), (4,))]),
    "stride2-pad1-outpad1": (
        dict(stride=2, padding=1, output_padding=1),
        [((2, 2, 3, 4), (2, 3, 3, 3), (3,))],
    ),
    "rect": (
        dict(stride=(2, 1), padding=(0, 1), output_padding=(1, 0), dilation=(1, 2)),
        [((1, 2, 3, 3), (2, 2, 2, 3), (2,))],
    ),
    "groups": (dict(groups=2, stride=2), [((2, 4, 3, 3), (4, 3, 2, 2), (6,))]),
}
for case, (kw, shapes) in _CONVT_CASES.items():
    spec(
        f"conv_transpose2d-{case}",
        _CONV,
        lambda gm, x, w, b, kw=kw: F.conv_transpose2d(x, w, b, **kw),
        lambda torch, x, w, b, kw=kw: _tf(torch).conv_transpose2d(x, w, b, **kw),
        shapes,
    )

# ======================================================= segmentation-style losses ======
# cross_entropy over (N, C, d1, d2) logits with (N, d1, d2) targets (U-Net's loss).

_W4 = [0.5, 2.0, 1.0, 1.5]
spec(
    "cross_entropy-2d-spatial",
    ["log_softmax", "log_softmax_grad", "nll_loss_weighted", "nll_loss_weighted_grad"],
    lambda gm, x, t: F.cross_entropy(
        x, t, gm.tensor(_W4, dtype=x.dtype), ignore_index=3, label_smoothing=0.1
    ),
    lambda torch, x, t: _tf(torch).cross_entropy(
        x, t, torch.tensor(_W4, dtype=x.dtype), ignore_index=3, label_smoothing=0.1
    ),
    [((2, 4, 3, 2), (2, 3, 2)), ((1, 4, 2, 2, 3), (1, 2, 2, 3))],
    nondiff={1: targets(4, ignore=3)},
)
