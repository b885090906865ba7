"""Specs for the primitives ``erf``, ``erfc``, ``erfinv``, ``elu`` (also selu and celu,
which are elu's ``scale`` and ``input_scale``) and ``hardtanh`` (also relu6) of
``gradmesh.core.ops.activation``, each against the matching torch call. Piecewise ops
draw their inputs away from the kinks; tests/engine/test_activations.py checks the kinks
themselves."""

from __future__ import annotations

import gradmesh.core.nn.functional as F

from . import OpSpec, away_from_zero, int_array
from .norm import away_from

SPECS: list[OpSpec] = []

UNARY = [((3, 4),), ((),), ((2, 3, 4),)]


def spec(name, covers, gm, torch, shapes=UNARY, **kw) -> None:
    SPECS.append(OpSpec(name, tuple(covers), gm, torch, shapes, **kw))


def _tf(torch):
    return torch.nn.functional


# ============================================================================ erf ======

for name in ("erf", "erfc"):
    spec(
        name,
        [name],
        lambda gm, x, n=name: getattr(x, n)(),
        lambda torch, x, n=name: getattr(x, n)(),
        domain=(-3.0, 3.0),
    )
# 4096 elements or more: NumPy's own float32 erf (gradmesh.core.ops.elementwise._erf).
spec("erf-large", ["erf"], lambda gm, x: gm.erf(x), lambda torch, x: torch.erf(x), [((64, 80),)])
spec(
    "erfinv",
    ["erfinv"],
    lambda gm, x: gm.erfinv(x),
    lambda torch, x: torch.erfinv(x),
    domain=(-0.9, 0.9),
)
# An integer tensor computes in the default float type, as torch's. (erfinv of -1 and 1
# is -inf and inf: both in one sum would be a NaN loss, which no two runs compare equal.)
for name, low in (("erf", -1), ("erfc", -1), ("erfinv", 0)):
    spec(
        f"{name}-int",
        [name],
        lambda gm, i, n=name: getattr(gm, n)(i),
        lambda torch, i, n=name: getattr(torch, n)(i),
        [((3, 4),)],
        nondiff={0: int_array(2, low)},
    )

# ============================================================================ elu ======

_ELU_CASES = {
    "elu": (lambda f, x: f.elu(x), ["elu"]),
    "elu-alpha": (lambda f, x: f.elu(x, alpha=0.5), ["elu"]),
    "selu": (lambda f, x: f.selu(x), ["elu"]),
    "celu": (lambda f, x: f.celu(x, alpha=2.0), ["elu"]),
}
for name, (fn, covers) in _ELU_CASES.items():
    spec(
        name,
        covers,
        lambda gm, x, fn=fn: fn(F, x),
        lambda torch, x, fn=fn: fn(_tf(torch), x),
        domain=away_from_zero(0.05, 3.0),
    )
# Large inputs of both signs: exp never overflows, at first or second order.
spec(
    "elu-large",
    ["elu"],
    lambda gm, x: F.elu(x * 1000) + F.celu(x * 1000, 0.5),
    lambda torch, x: _tf(torch).elu(x * 1000) + _tf(torch).celu(x * 1000, 0.5),
    [((4, 5),)],
    domain=away_from_zero(0.2, 2.0),
    fd=False,
)

# ======================================================================= hardtanh ======

spec(
    "hardtanh",
    ["hardtanh"],
    lambda gm, x: F.hardtanh(x),
    lambda torch, x: _tf(torch).hardtanh(x),
    domain=away_from([-1.0, 1.0], lo=-3.0, hi=3.0),
)
spec(
    "hardtanh-bounds",
    ["hardtanh"],
    lambda gm, x: F.hardtanh(x, -2.0, 0.5),
    lambda torch, x: _tf(torch).hardtanh(x, -2.0, 0.5),
    domain=away_from([-2.0, 0.5], lo=-4.0, hi=3.0),
)
spec(
    "relu6",
    ["hardtanh"],
    lambda gm, x: F.relu6(x),
    lambda torch, x: _tf(torch).relu6(x),
    domain=away_from([0.0, 6.0], lo=-3.0, hi=9.0),
)
# torch clamps an integer tensor in its own dtype.
spec(
    "hardtanh-int",
    ["hardtanh"],
    lambda gm, i: F.hardtanh(i, -2.0, 3.0),
    lambda torch, i: _tf(torch).hardtanh(i, -2.0, 3.0),
    [((3, 4),)],
    nondiff={0: int_array(6, -5)},
)
