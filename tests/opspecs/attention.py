"""Specs for the composites of attention models: ``addmm``, ``baddbmm``, ``einsum``
(permute, expand, reshape, matmul and sum), ``topk``'s indices and
``scaled_dot_product_attention``."""

from __future__ import annotations

from . import OpSpec, bool_array


def spec(name, covers, fn, shapes, torch_fn=None, **kw) -> OpSpec:
    return OpSpec(name, tuple(covers), fn, torch_fn or fn, shapes, **kw)


def einsum(equation: str, *shapes) -> OpSpec:
    return spec(
        f"einsum-{equation}",
        ["matmul", "reshape"] if "," in equation else ["sum"],
        lambda lib, *ops: lib.einsum(equation, *ops),
        [shapes],
    )


def attention_mask(shape, rng):
    """A bool mask with one query row that sees no key (torch gives it zeros)."""
    m = rng.random(shape) < 0.6
    m[..., 1, :] = False
    return m


def sdpa(**kw):
    return lambda lib, q, k, v, *mask: lib.nn.functional.scaled_dot_product_attention(
        q, k, v, *mask, **kw
    )


QKV = ((2, 3, 4, 5), (2, 3, 6, 5), (2, 3, 6, 7))

SPECS = [
    spec(
        "baddbmm",
        ["matmul", "add"],
        lambda lib, c, a, b: lib.baddbmm(c, a, b),
        [((2, 3, 5), (2, 3, 4), (2, 4, 5)), ((5,), (2, 3, 4), (2, 4, 5))],
    ),
    spec(
        "baddbmm-alpha-beta",
        ["matmul", "mul"],
        lambda lib, c, a, b: c.baddbmm(a, b, beta=0.5, alpha=-2.0),
        [((1, 3, 5), (2, 3, 4), (2, 4, 5))],
    ),
    spec(
        "baddbmm-beta-zero",
        ["matmul"],
        lambda lib, c, a, b: lib.baddbmm(c, a, b, beta=0),
        [((2, 3, 5), (2, 3, 4), (2, 4, 5))],
    ),
    spec(
        "addmm",
        ["mm", "add", "mul"],
        lambda lib, c, a, b: lib.addmm(c, a, b, beta=2.0, alpha=0.5),
        [((3, 5), (3, 4), (4, 5)), ((5,), (3, 4), (4, 5))],
    ),
    einsum("ij,jk->ik", (3, 4), (4, 5)),
    einsum("bij,bjk->bik", (2, 3, 4), (2, 4, 5)),
    einsum("bhqd,bhkd->bhqk", (2, 3, 4, 5), (2, 3, 6, 5)),
    einsum("ij,kj", (3, 4), (5, 4)),
    einsum("i,j->ij", (3,), (4,)),
    einsum("ij,ij->i", (3, 4), (3, 4)),
    einsum("...ij,...jk->...ik", (2, 3, 4), (4, 5)),
    einsum("bn,anm,bm->ba", (2, 3), (4, 3, 5), (2, 5)),
    einsum("ij,j->i", (3, 4), (1,)),
    einsum("ijk->kj", (2, 3, 4)),
    einsum("ijk->", (2, 3, 4)),
    spec(
        "topk-indices",
        ["argsort", "gather"],
        lambda lib, a: (lambda values, indices: values * indices)(*a.topk(2, 1)),
        [((3, 5, 2),)],
    ),
    spec("sdpa", ["matmul", "softmax"], sdpa(), [QKV, ((4, 5), (6, 5), (6, 3))]),
    spec("sdpa-causal-scale", ["matmul", "tril", "where"], sdpa(is_causal=True, scale=0.7), [QKV]),
    spec(
        "sdpa-bool-mask",
        ["matmul", "where", "all"],
        sdpa(),
        [QKV + ((4, 6),)],
        nondiff={3: attention_mask},
    ),
    spec("sdpa-float-mask", ["matmul", "add"], sdpa(), [QKV + ((3, 4, 6),)]),
    spec(
        "sdpa-bool-mask-batched",
        ["matmul", "where"],
        sdpa(),
        [QKV + ((2, 1, 4, 6),)],
        nondiff={3: bool_array(0.7)},
    ),
]
