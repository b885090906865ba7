"""Specs for ``gradmesh.core.ops.elementwise``: arithmetic, unary math, activations,
comparisons, selection and dtype ops, with broadcasting, 0-d tensors, Python scalars and
int tensors mixing with floats (torch's promotion rules)."""

from __future__ import annotations

import numpy as np

from . import OpSpec, away_from_zero, bool_array, int_array

# Shape cases every broadcasting binary op runs: same shape, both sides broadcasting,
# a missing leading dim, and 0-d operands on either side.
BINARY = [((3, 4), (3, 4)), ((3, 1), (1, 4)), ((4,), (3, 4)), ((), (3, 4)), ((2, 3), ())]
UNARY = [((3, 4),), ((),), ((2, 3, 4),)]


def integer_valued(lo: int = -2, hi: int = 3):
    """Floats that are whole numbers: ties and equalities happen often."""

    def sample(shape, rng):
        return rng.integers(lo, hi, size=shape).astype(np.float64)

    return sample


def nonzero_ints(lo: int = 1, hi: int = 5):
    def sample(shape, rng):
        return rng.integers(lo, hi, size=shape) * rng.choice([-1, 1], size=shape)

    return sample


def binary(name, fn, domain=(-2.0, 2.0), **kw) -> OpSpec:
    return OpSpec(
        name,
        (name,),
        lambda gm, a, b: fn(a, b),
        lambda torch, a, b: fn(a, b),
        BINARY,
        domain=domain,
        **kw,
    )


def unary(
    name, gm_fn, torch_fn=None, domain=(-2.0, 2.0), covers=None, shapes=UNARY, **kw
) -> OpSpec:
    torch_fn = torch_fn or gm_fn
    return OpSpec(
        name,
        covers or (name,),
        lambda gm, a: gm_fn(gm, a),
        lambda torch, a: torch_fn(torch, a),
        shapes,
        domain=domain,
        **kw,
    )


def method(name: str, *args, **kwargs):
    """``lambda lib, a: a.name(*args, **kwargs)`` for both libraries."""
    return lambda lib, a: getattr(a, name)(*args, **kwargs)


SPECS = [
    # ------------------------------------------------------------------- arithmetic ----
    binary("add", lambda a, b: a + b),
    binary("sub", lambda a, b: a - b),
    binary("mul", lambda a, b: a * b),
    binary("div", lambda a, b: a / b, domain=away_from_zero(0.5, 2.0)),
    binary("pow", lambda a, b: a**b, domain=(0.5, 2.0)),
    binary("maximum", lambda a, b: a.maximum(b)),
    binary("minimum", lambda a, b: a.minimum(b)),
    OpSpec(
        "add-alpha",
        ("add", "mul"),
        lambda gm, a, b: gm.add(a, b, alpha=2.5),
        lambda torch, a, b: torch.add(a, b, alpha=2.5),
        BINARY[:2],
    ),
    OpSpec(
        "sub-alpha",
        ("sub", "mul"),
        lambda gm, a, b: gm.sub(a, b, alpha=0.5),
        lambda torch, a, b: torch.sub(a, b, alpha=0.5),
        BINARY[:2],
    ),
    # Ties: the gradient is split evenly between the two sides, as torch does. Not
    # differentiable there, so no finite differences.
    OpSpec(
        "maximum-ties",
        ("maximum",),
        lambda gm, a, b: gm.maximum(a, b),
        lambda torch, a, b: torch.maximum(a, b),
        BINARY[:3],
        domain=integer_valued(),
        fd=False,
    ),
    OpSpec(
        "minimum-ties",
        ("minimum",),
        lambda gm, a, b: gm.minimum(a, b),
        lambda torch, a, b: torch.minimum(a, b),
        BINARY[:3],
        domain=integer_valued(),
        fd=False,
    ),
    # The same tensor on both sides: its gradients add up.
    OpSpec("mul-self", ("mul",), lambda gm, a: a * a, lambda torch, a: a * a, UNARY),
    OpSpec(
        "pow-self", ("pow",), lambda gm, a: a**a, lambda torch, a: a**a, UNARY, domain=(0.5, 2.0)
    ),
    # -------------------------------------------------------------- Python scalars ----
    # A Python float keeps a float32 tensor float32; an int keeps it whatever it is.
    OpSpec("add-scalar", ("add",), lambda gm, a: a + 2.5, lambda torch, a: a + 2.5, UNARY),
    OpSpec("radd-int", ("add",), lambda gm, a: 3 + a, lambda torch, a: 3 + a, UNARY),
    OpSpec("rsub-scalar", ("sub",), lambda gm, a: 1.5 - a, lambda torch, a: 1.5 - a, UNARY),
    OpSpec("sub-scalar", ("sub",), lambda gm, a: a - 1, lambda torch, a: a - 1, UNARY),
    OpSpec("mul-scalar", ("mul",), lambda gm, a: a * 2, lambda torch, a: a * 2, UNARY),
    OpSpec("rmul-scalar", ("mul",), lambda gm, a: -0.5 * a, lambda torch, a: -0.5 * a, UNARY),
    OpSpec("div-scalar", ("div",), lambda gm, a: a / 4, lambda torch, a: a / 4, UNARY),
    OpSpec(
        "rdiv-scalar",
        ("div",),
        lambda gm, a: 2.0 / a,
        lambda torch, a: 2.0 / a,
        UNARY,
        domain=away_from_zero(0.5, 2.0),
    ),
    OpSpec("pow-int-scalar", ("pow",), lambda gm, a: a**3, lambda torch, a: a**3, UNARY),
    OpSpec(
        "pow-float-scalar",
        ("pow",),
        lambda gm, a: a**0.5,
        lambda torch, a: a**0.5,
        UNARY,
        domain=(0.5, 2.0),
    ),
    OpSpec("rpow-scalar", ("pow",), lambda gm, a: 2.0**a, lambda torch, a: 2.0**a, UNARY),
    OpSpec(
        "maximum-scalar",
        ("maximum",),
        lambda gm, a: gm.maximum(a, gm.tensor(0.5, device=a.device)),
        lambda torch, a: torch.maximum(a, torch.tensor(0.5)),
        UNARY[:1],
    ),
    # ------------------------------------------------------- division with rounding ----
    # Python's rules, as torch: the remainder takes the divisor's sign. floor_divide has no
    # gradient (torch's backward raises), so its specs take int tensors only.
    OpSpec(
        "remainder",
        ("remainder",),
        lambda gm, a, b: a % b,
        lambda torch, a, b: a % b,
        BINARY,
        domain=away_from_zero(0.3, 3.0),
    ),
    OpSpec(
        "remainder-scalar",
        ("remainder",),
        lambda gm, a: gm.remainder(a, -0.75),
        lambda torch, a: torch.remainder(a, -0.75),
        UNARY,
        domain=away_from_zero(0.1, 3.0),
    ),
    OpSpec(
        "remainder-int-tensors",
        ("remainder",),
        lambda gm, i, j: i % j,
        lambda torch, i, j: i % j,
        [((3, 4), (4,)), ((), (3,))],
        nondiff={0: int_array(9, -9), 1: nonzero_ints()},
    ),
    OpSpec(
        "floor_divide-int-tensors",
        ("floor_divide",),
        lambda gm, i, j: i // j,
        lambda torch, i, j: i // j,
        [((3, 4), (4,)), ((), (3,))],
        nondiff={0: int_array(9, -9), 1: nonzero_ints()},
    ),
    OpSpec(
        "floor_divide-by-float",
        ("floor_divide",),
        lambda gm, i: gm.div(i, -2.5, rounding_mode="floor"),
        lambda torch, i: torch.div(i, -2.5, rounding_mode="floor"),
        [((3, 4),)],
        nondiff={0: int_array(9, -9)},
    ),
    # ---------------------------------------------- int tensors mixing with floats ----
    # A float tensor and an int tensor give the float's dtype; two ints divide into
    # float32; an int tensor and a Python float give float32.
    OpSpec(
        "mul-int-tensor",
        ("mul",),
        lambda gm, a, i: a * i,
        lambda torch, a, i: a * i,
        [((3, 4), (3, 4)), ((3, 1), (4,))],
        nondiff={1: int_array(5, -5)},
    ),
    OpSpec(
        "div-by-int-tensor",
        ("div",),
        lambda gm, a, i: a / i,
        lambda torch, a, i: a / i,
        [((3, 4), (3, 4)), ((), (3,))],
        nondiff={1: nonzero_ints()},
    ),
    OpSpec(
        "add-int-tensor-scalar",
        ("add",),
        lambda gm, i: i + 2.5,
        lambda torch, i: i + 2.5,
        [((3, 4),)],
        nondiff={0: int_array(5)},
    ),
    OpSpec(
        "mul-int-tensors",
        ("mul",),
        lambda gm, i, j: i * j,
        lambda torch, i, j: i * j,
        [((3, 4), (3, 1))],
        nondiff={0: int_array(5), 1: int_array(5)},
    ),
    OpSpec(
        "div-int-tensors",
        ("div",),
        lambda gm, i, j: i / j,
        lambda torch, i, j: i / j,
        [((3, 4), (4,))],
        nondiff={0: int_array(9), 1: nonzero_ints()},
    ),
    OpSpec(
        "sub-float-0d-int",
        ("sub",),
        lambda gm, a, i: i - a,
        lambda torch, a, i: i - a,
        [((), (3, 4))],
        nondiff={1: int_array(5)},
    ),
    # ------------------------------------------------------------------ bool tensors ----
    # torch's sign of a bool tensor is itself; a bool base to an int power is int64.
    unary("sign-bool", lambda lib, m: m.sign(), covers=("sign",), nondiff={0: bool_array()}),
    OpSpec(
        "pow-bool-int",
        ("pow",),
        lambda gm, m, i: m**i,
        lambda torch, m, i: m**i,
        BINARY,
        nondiff={0: bool_array(), 1: int_array(3)},
    ),
    # ------------------------------------------------------------------- unary math ----
    unary("neg", lambda lib, a: -a),
    unary("exp", lambda lib, a: a.exp()),
    unary("log", lambda lib, a: a.log(), domain=(0.2, 2.0)),
    unary("log1p", lambda lib, a: a.log1p(), domain=(-0.5, 2.0)),
    unary("sqrt", lambda lib, a: a.sqrt(), domain=(0.2, 2.0)),
    unary("abs", lambda lib, a: a.abs(), domain=away_from_zero()),
    unary("sign", lambda lib, a: a.sign(), domain=away_from_zero()),
    unary("sin", lambda lib, a: a.sin()),
    unary("cos", lambda lib, a: a.cos()),
    unary("tanh", lambda lib, a: a.tanh()),
    unary("sigmoid", lambda lib, a: a.sigmoid(), domain=(-6.0, 6.0)),
    unary("sigmoid-extreme", lambda lib, a: a.sigmoid(), covers=("sigmoid",), domain=(-60.0, 60.0)),
    unary("relu", lambda lib, a: a.relu(), domain=away_from_zero()),
    unary(
        "leaky_relu",
        lambda gm, a: gm.leaky_relu(a, 0.2),
        lambda torch, a: torch.nn.functional.leaky_relu(a, 0.2),
        domain=away_from_zero(),
    ),
    unary(
        "gelu",
        lambda gm, a: gm.gelu(a),
        lambda torch, a: torch.nn.functional.gelu(a),
        covers=("gelu", "gelu_grad"),
        domain=(-3.0, 3.0),
    ),
    unary(
        "gelu-tanh",
        lambda gm, a: gm.gelu(a, approximate="tanh"),
        lambda torch, a: torch.nn.functional.gelu(a, approximate="tanh"),
        covers=("gelu", "gelu_grad"),
        domain=(-3.0, 3.0),
    ),
    unary(
        "softplus",
        lambda gm, a: gm.softplus(a),
        lambda torch, a: torch.nn.functional.softplus(a),
        domain=(-4.0, 4.0),
    ),
    # beta and a low threshold: both branches, linear above beta * x > threshold.
    unary(
        "softplus-threshold",
        lambda gm, a: gm.softplus(a, beta=2.0, threshold=1.0),
        lambda torch, a: torch.nn.functional.softplus(a, beta=2.0, threshold=1.0),
        covers=("softplus",),
        domain=(-2.0, 2.0),
    ),
    unary("square", lambda lib, a: a.square(), covers=("mul",)),
    unary("rsqrt", lambda lib, a: a.rsqrt(), covers=("sqrt", "div"), domain=(0.3, 2.0)),
    unary(
        "reciprocal",
        lambda lib, a: a.reciprocal(),
        covers=("div",),
        domain=away_from_zero(0.5, 2.0),
    ),
    unary("clamp", lambda lib, a: a.clamp(-0.5, 0.7), covers=("clamp",)),
    unary("clamp-min", lambda lib, a: a.clamp(min=0.3), covers=("clamp",)),
    unary("clamp-max", lambda lib, a: a.clamp(max=-0.3), covers=("clamp",)),
    OpSpec(
        "clamp-tensors",
        ("maximum", "minimum"),
        lambda gm, a, lo, hi: gm.clamp(a, lo, hi + 1.0),
        lambda torch, a, lo, hi: torch.clamp(a, lo, hi + 1.0),
        [((3, 4), (4,), (3, 1))],
    ),
    # Bounds promote like any Python scalar: a float one makes an int tensor float32 (not
    # cut to an int bound), an int one keeps it int64 and makes a bool tensor int64.
    unary(
        "clamp-int-float-bounds",
        lambda lib, i: lib.clamp(i, -0.5, 0.7),
        covers=("clamp", "cast"),
        nondiff={0: int_array(6, -3)},
    ),
    unary(
        "clamp-int-float-min",
        lambda lib, i: i.clamp(min=0.0),
        covers=("clamp", "cast"),
        nondiff={0: int_array(6, -3)},
    ),
    unary(
        "clamp-int-int-bounds",
        lambda lib, i: i.clamp(-1, 2),
        covers=("clamp",),
        nondiff={0: int_array(6, -3)},
    ),
    unary(
        "clamp-bool-int-bounds",
        lambda lib, m: m.clamp(0, 1),
        covers=("clamp", "cast"),
        nondiff={0: bool_array()},
    ),
    unary(
        "clamp-bool-float-max",
        lambda lib, m: m.clamp(max=0.5),
        covers=("clamp", "cast"),
        nondiff={0: bool_array()},
    ),
    # -------------------------------------------------------------------- selection ----
    OpSpec(
        "where",
        ("where",),
        lambda gm, c, a, b: gm.where(c, a, b),
        lambda torch, c, a, b: torch.where(c, a, b),
        [
            ((3, 4), (3, 4), (3, 4)),
            ((3, 1), (1, 4), (4,)),
            ((3, 4), (), (3, 4)),
            ((), (2, 3), (2, 3)),
        ],
        nondiff={0: bool_array()},
    ),
    OpSpec(
        "where-scalar",
        ("where",),
        lambda gm, c, a: gm.where(c, a, 0.0),
        lambda torch, c, a: torch.where(c, a, 0.0),
        [((3, 4), (3, 4))],
        nondiff={0: bool_array()},
    ),
    # ------------------------------------------------------------------ comparisons ----
    # Whole numbers, so that equal elements occur; results are bool, forward only.
    *[
        OpSpec(
            name,
            (name,),
            (lambda n: lambda gm, a, b: getattr(gm, n)(a, b))(name),
            (lambda n: lambda torch, a, b: getattr(torch, n)(a, b))(name),
            BINARY[:4],
            domain=integer_valued(),
        )
        for name in ("eq", "ne", "lt", "le", "gt", "ge")
    ],
    OpSpec(
        "compare-operators",
        ("eq", "ne", "lt", "le", "gt", "ge"),
        lambda gm, a, b: ((a == b) | (a < b)) & ~(a > b) & (a <= b) & (a >= a) & (a != b),
        lambda torch, a, b: ((a == b) | (a < b)) & ~(a > b) & (a <= b) & (a >= a) & (a != b),
        BINARY[:2],
        domain=integer_valued(),
    ),
    OpSpec("compare-scalar", ("lt",), lambda gm, a: a < 1, lambda torch, a: a < 1, UNARY),
    OpSpec(
        "logical_and",
        ("logical_and",),
        lambda gm, a, b: gm.logical_and(a, b),
        lambda torch, a, b: torch.logical_and(a, b),
        BINARY[:3],
        nondiff={0: bool_array(), 1: bool_array()},
    ),
    OpSpec(
        "logical_or",
        ("logical_or",),
        lambda gm, a, b: gm.logical_or(a, b),
        lambda torch, a, b: torch.logical_or(a, b),
        BINARY[:3],
        nondiff={0: bool_array(), 1: bool_array()},
    ),
    OpSpec(
        "logical_not",
        ("logical_not",),
        lambda gm, a: gm.logical_not(a),
        lambda torch, a: torch.logical_not(a),
        UNARY,
        nondiff={0: bool_array()},
    ),
    OpSpec(
        "logical-float",
        ("logical_and", "logical_not"),
        lambda gm, a, b: gm.logical_and(a, gm.logical_not(b)),
        lambda torch, a, b: torch.logical_and(a, torch.logical_not(b)),
        BINARY[:2],
        domain=integer_valued(-1, 2),
    ),
    # ------------------------------------------------------------- dtype and device ----
    # In the float32 runs a.float() is a no-op and a.double() a real cast.
    # Rounding to float32 is far coarser than the finite differences' steps.
    unary("cast-float32", lambda lib, a: a.float() * 3, covers=("cast", "mul"), fd=False),
    unary("cast-float64", lambda lib, a: a.double() * 3, covers=("mul",)),
    unary("cast-int", lambda lib, a: (a * 3).long(), covers=("cast",)),
    unary("cast-int-to-float", lambda lib, a: a.long().float(), covers=("cast",)),
    unary("clone", lambda lib, a: a.clone()),
    # --------------------------------------------------------------- gradient stop ----
    # detach() dispatches stop_gradient only while a tracer records (the graph tracer, and
    # the dispatch recorders of these tests); the second spec calls the primitive itself.
    # Finite differences cannot see a stop: the values are the same with or without it.
    unary("stop_gradient", lambda lib, a: a * a.detach(), covers=("stop_gradient",), fd=False),
    OpSpec(
        "stop_gradient-primitive",
        ("stop_gradient",),
        lambda gm, a, b: (a + b) * gm.REGISTRY["stop_gradient"](a - b),
        lambda torch, a, b: (a + b) * (a - b).detach(),
        BINARY[:2],
        fd=False,
    ),
    unary(
        "to_device",
        lambda gm, a: gm.to_device(a, "cpu") * 2,
        lambda torch, a: a.to("cpu") * 2,
        covers=("to_device",),
    ),
]
