"""Specs for ``gradmesh.core.ops.reduce``, ``ops.shape`` (incl. indexing) and ``ops.linalg``,
and for the public composites built on them (mean, var, max(dim), split, getitem, ...)."""

from __future__ import annotations

import numpy as np

from . import OpSpec, bool_array, int_array


def integer_valued(lo: int = -2, hi: int = 3):
    """Whole numbers as floats: ties in max/min/sort happen often."""

    def sample(shape, rng):
        return rng.integers(lo, hi, size=shape).astype(np.float64)

    return sample


def with_zeros(count_per_row: int):
    """Floats away from 0 except ``count_per_row`` exact zeros in each last-dim row."""

    def sample(shape, rng):
        a = rng.uniform(0.5, 1.5, size=shape) * rng.choice([-1.0, 1.0], size=shape)
        rows = a.reshape(-1, shape[-1])
        for row in rows:
            row[rng.choice(shape[-1], size=count_per_row, replace=False)] = 0.0
        return rows.reshape(shape)

    return sample


def fixed(values, dtype=np.int64):
    """A constant index array (its case shape is ignored): repeated and negative indices."""

    def sample(shape, rng):
        return np.asarray(values, dtype=dtype)

    return sample


def permutation(n: int):
    def sample(shape, rng):
        return rng.permutation(n)[: shape[0]].astype(np.int64)

    return sample


def spec(name, covers, fn, shapes, torch_fn=None, **kw) -> OpSpec:
    return OpSpec(name, tuple(covers), fn, torch_fn or fn, shapes, **kw)


X3 = [((2, 3, 4),)]
X2 = [((3, 4),)]

SPECS = [
    # ========================================================================= sum ====
    spec("sum", ["sum"], lambda lib, a: a.sum(), [((3, 4),), ((),), ((5,),), ((0, 3),)]),
    spec("sum-dim", ["sum"], lambda lib, a: a.sum(1), X3 + X2),
    spec("sum-dims-keepdim", ["sum"], lambda lib, a: a.sum(dim=(0, 2), keepdim=True), X3),
    spec("sum-negative-dim", ["sum"], lambda lib, a: a.sum(-1), X3),
    spec("sum-0d-dim", ["sum"], lambda lib, a: a.sum(0), [((),)]),
    spec("sum-empty-dim", ["sum"], lambda lib, a: a.sum(0), [((0, 3),)]),
    spec("sum-dtype", ["sum"], lambda lib, a: a.sum(1, dtype=lib.float64), X2),
    spec("sum-int", ["sum"], lambda lib, i: i.sum(0), X2, nondiff={0: int_array(9, -9)}),
    spec("sum-bool", ["sum"], lambda lib, m: m.sum(), X2, nondiff={0: bool_array()}),
    # ================================================================ mean, var, std ====
    spec("mean", ["sum", "div"], lambda lib, a: a.mean(), [((3, 4),), ((),)]),
    spec("mean-dim-keepdim", ["sum", "div"], lambda lib, a: a.mean(1, keepdim=True), X3),
    spec("mean-dims", ["sum", "div"], lambda lib, a: a.mean((0, 2)), X3),
    spec(
        "mean-int-dtype",
        ["sum", "cast"],
        lambda lib, i: i.mean(dtype=lib.float64),
        X2,
        nondiff={0: int_array(9)},
    ),
    spec("var", ["sum", "sub", "mul", "div"], lambda lib, a: a.var(), X2 + [((7,),)]),
    spec("var-dim", ["sum"], lambda lib, a: a.var(1), X3),
    spec("var-unbiased-false", ["sum"], lambda lib, a: a.var(1, unbiased=False), X3),
    spec("var-legacy-unbiased", ["sum"], lambda lib, a: a.var(False), X2),
    spec(
        "var-correction-keepdim",
        ["sum"],
        lambda lib, a: a.var(dim=(0, 2), correction=0, keepdim=True),
        X3,
    ),
    spec("std", ["sum", "sqrt"], lambda lib, a: a.std(), X2),
    spec("std-dim", ["sum", "sqrt"], lambda lib, a: a.std(0, keepdim=True), X3),
    # ========================================================== amax, amin, max, min ====
    spec("amax", ["amax"], lambda lib, a: a.amax(), X2 + [((),)]),
    spec("amax-dim", ["amax"], lambda lib, a: a.amax(1), X3),
    spec("amax-dims-keepdim", ["amax"], lambda lib, a: a.amax((0, 2), keepdim=True), X3),
    spec("amin", ["amin"], lambda lib, a: a.amin(), X2),
    spec("amin-dims", ["amin"], lambda lib, a: a.amin((-1, 0)), X3),
    # Ties share the gradient evenly; not differentiable there (no finite differences).
    spec("amax-ties", ["amax"], lambda lib, a: a.amax(1), X3, domain=integer_valued(), fd=False),
    spec(
        "amin-ties", ["amin"], lambda lib, a: a.amin((0, 1)), X3, domain=integer_valued(), fd=False
    ),
    spec("max", ["amax"], lambda lib, a: a.max(), X2 + [((),)]),
    spec("max-ties", ["amax"], lambda lib, a: a.max(), X2, domain=integer_valued(0, 2), fd=False),
    spec("min", ["amin"], lambda lib, a: a.min(), X2),
    spec("max-dim", ["argmax", "gather", "scatter_add"], lambda lib, a: a.max(1).values, X3 + X2),
    spec(
        "max-dim-keepdim",
        ["argmax", "gather"],
        lambda lib, a: a.max(-1, keepdim=True)[0],
        X3 + [((5,),)],
    ),
    spec("max-dim-0d", ["argmax", "gather"], lambda lib, a: a.max(0).values, [((),)]),
    # A tie's gradient goes to the first maximum, as torch's max(dim) does.
    spec(
        "max-dim-ties",
        ["argmax", "gather"],
        lambda lib, a: a.max(1).values,
        X3,
        domain=integer_valued(0, 2),
        fd=False,
    ),
    spec("min-dim", ["argmin", "gather"], lambda lib, a: a.min(0).values, X3),
    spec(
        "min-dim-ties",
        ["argmin", "gather"],
        lambda lib, a: a.min(2, keepdim=True).values,
        X3,
        domain=integer_valued(0, 2),
        fd=False,
    ),
    spec(
        "max-dim-indices",
        ["argmax"],
        lambda lib, a: a.max(1).indices,
        X3,
        domain=integer_valued(0, 2),
    ),
    # argmax refuses bool tensors (as torch's), max(dim) and min(dim) take them.
    spec(
        "max-dim-bool",
        ["argmax", "cast", "gather"],
        lambda lib, m: lib.stack([m.max(1).indices, m.max(1).values.long()]),
        X3,
        nondiff={0: bool_array()},
    ),
    spec(
        "min-dim-bool",
        ["argmin", "cast", "gather"],
        lambda lib, m: lib.stack([m.min(0).indices, m.min(0).values.long()]),
        X3,
        nondiff={0: bool_array()},
    ),
    spec("max-binary", ["maximum"], lambda lib, a, b: lib.max(a, b), [((3, 4), (4,))]),
    spec("argmax", ["argmax"], lambda lib, a: a.argmax(), X3, domain=integer_valued()),
    spec("argmax-dim", ["argmax"], lambda lib, a: a.argmax(1), X3, domain=integer_valued()),
    spec("argmax-keepdim", ["argmax"], lambda lib, a: lib.argmax(a, dim=-1, keepdim=True), X3),
    spec("argmax-flat-keepdim", ["argmax"], lambda lib, a: lib.argmax(a, keepdim=True), X3),
    spec("argmin", ["argmin"], lambda lib, a: a.argmin(), X3, domain=integer_valued()),
    spec("argmin-dim", ["argmin"], lambda lib, a: a.argmin(0), X3, domain=integer_valued()),
    # ================================================================ logsumexp, prod ====
    spec("logsumexp", ["logsumexp"], lambda lib, a: a.logsumexp(1), X3 + X2),
    spec(
        "logsumexp-dims-keepdim",
        ["logsumexp"],
        lambda lib, a: a.logsumexp((0, 2), keepdim=True),
        X3,
    ),
    spec(
        "logsumexp-large", ["logsumexp"], lambda lib, a: a.logsumexp(-1), X2, domain=(500.0, 800.0)
    ),
    spec(
        "logsumexp-int", ["logsumexp"], lambda lib, i: i.logsumexp(0), X2, nondiff={0: int_array(5)}
    ),
    spec("prod", ["prod"], lambda lib, a: a.prod(), X2),
    spec("prod-dim", ["prod"], lambda lib, a: a.prod(1), X3),
    spec("prod-keepdim", ["prod"], lambda lib, a: a.prod(0, keepdim=True), X2),
    # Exact zeros: d prod / d a_i is still the product of the others.
    spec("prod-one-zero", ["prod"], lambda lib, a: a.prod(-1), X3 + X2, domain=with_zeros(1)),
    spec("prod-two-zeros", ["prod"], lambda lib, a: a.prod(-1), X3, domain=with_zeros(2)),
    spec(
        "prod-three-zeros", ["prod"], lambda lib, a: a.prod(-1), [((2, 5),)], domain=with_zeros(3)
    ),
    spec("prod-int", ["prod"], lambda lib, i: i.prod(1), X2, nondiff={0: int_array(4, -3)}),
    # ======================================================================= all, any ====
    spec("all", ["all"], lambda lib, m: m.all(), X2, nondiff={0: bool_array(0.9)}),
    spec("all-dim", ["all"], lambda lib, m: m.all(1), X3, nondiff={0: bool_array(0.8)}),
    spec("any", ["any"], lambda lib, m: m.any(), X2, nondiff={0: bool_array(0.1)}),
    spec(
        "any-dim-keepdim",
        ["any"],
        lambda lib, m: lib.any(m, dim=0, keepdim=True),
        X3,
        nondiff={0: bool_array(0.2)},
    ),
    spec(
        "all-float",
        ["all", "any"],
        lambda lib, a: a.all(1) | a.any(0).all(),
        X2,
        domain=integer_valued(0, 3),
    ),
    # ========================================================================= cumsum ====
    spec("cumsum", ["cumsum", "flip"], lambda lib, a: a.cumsum(0), X3 + [((5,),)]),
    spec("cumsum-last", ["cumsum", "flip"], lambda lib, a: a.cumsum(-1), X3),
    spec("cumsum-0d", ["cumsum"], lambda lib, a: a.cumsum(0), [((),)]),
    spec("cumsum-int", ["cumsum"], lambda lib, i: i.cumsum(1), X2, nondiff={0: int_array(5)}),
    # =========================================================================== norm ====
    spec("norm", ["sum", "mul", "sqrt"], lambda lib, a: a.norm(), X2),
    spec("norm-dim", ["sum", "sqrt"], lambda lib, a: a.norm(dim=1, keepdim=True), X3),
    spec("norm-1", ["abs", "sum"], lambda lib, a: a.norm(p=1, dim=0), X2, domain=(0.2, 2.0)),
    spec("norm-inf", ["abs", "amax"], lambda lib, a: a.norm(p=float("inf"), dim=1), X2),
    spec("norm-3", ["pow"], lambda lib, a: a.norm(p=3), X2, domain=(0.2, 2.0)),
    # ========================================================= reshape and its aliases ====
    spec("reshape", ["reshape"], lambda lib, a: a.reshape(4, -1), X3 + [((4, 6),)]),
    spec("reshape-0d", ["reshape"], lambda lib, a: a.reshape(1, 1) * 2, [((),)]),
    spec("reshape-to-0d", ["reshape"], lambda lib, a: a.reshape(()), [((1, 1),)]),
    spec("view", ["reshape"], lambda lib, a: a.view(3, 2, 4), X3),
    spec("view_as", ["reshape"], lambda lib, a, b: a.view_as(b) * b, [((2, 6), (3, 4))]),
    spec("reshape_as", ["reshape"], lambda lib, a, b: a.reshape_as(b) + b, [((12,), (3, 4))]),
    spec("flatten", ["reshape"], lambda lib, a: a.flatten(), X3 + [((),)]),
    spec("flatten-range", ["reshape"], lambda lib, a: a.flatten(1, 2), [((2, 3, 4, 5),)]),
    spec("unflatten", ["reshape"], lambda lib, a: a.unflatten(1, (2, -1)), [((3, 6, 2),)]),
    spec("squeeze", ["reshape"], lambda lib, a: a.squeeze(), [((1, 3, 1, 4),)]),
    spec("squeeze-dim", ["reshape"], lambda lib, a: a.squeeze(-2), [((1, 3, 1, 4),)]),
    spec("squeeze-dims", ["reshape"], lambda lib, a: a.squeeze((0, 1)), [((1, 3, 1, 4),)]),
    spec("unsqueeze", ["reshape"], lambda lib, a: a.unsqueeze(1), X3 + X2),
    spec("unsqueeze-0d", ["reshape"], lambda lib, a: a.unsqueeze(-1), [((),)]),
    spec("unsqueeze-negative", ["reshape"], lambda lib, a: a.unsqueeze(-1), X2),
    # ======================================================== permute and transposes ====
    spec("permute", ["permute"], lambda lib, a: a.permute(2, 0, 1), X3),
    spec("permute-negative", ["permute"], lambda lib, a: a.permute(-1, 0, 1), X3),
    spec("transpose", ["permute"], lambda lib, a: a.transpose(0, 2), X3),
    spec("transpose-1d", ["mul"], lambda lib, a: a.transpose(0, -1) * 2, [((5,),)]),
    spec("t", ["permute"], lambda lib, a: a.t(), X2),
    spec("T", ["permute"], lambda lib, a: a.T, X2),
    spec("mT", ["permute"], lambda lib, a: a.mT, X3),
    spec("movedim", ["permute"], lambda lib, a: lib.movedim(a, 0, 2), X3),
    # ========================================================== expand and repeat ====
    spec("expand", ["expand"], lambda lib, a: a.expand(2, 3, 4), [((3, 1),), ((4,),), ((),)]),
    spec("expand-keep", ["expand"], lambda lib, a: a.expand(2, -1, 4), [((3, 1),)]),
    spec("expand_as", ["expand"], lambda lib, a, b: a.expand_as(b) * b, [((1, 4), (3, 4))]),
    spec("repeat", ["expand", "reshape"], lambda lib, a: a.repeat(2, 3), X2 + [((4,),)]),
    spec("repeat-new-dims", ["expand"], lambda lib, a: a.repeat(2, 1, 3), X2),
    # =========================================================== cat, stack, split ====
    spec(
        "cat",
        ["cat", "slice"],
        lambda lib, a, b, c: lib.cat([a, b, c], 1),
        [((2, 1, 4), (2, 3, 4), (2, 2, 4))],
    ),
    spec(
        "cat-negative-dim",
        ["cat"],
        lambda lib, a, b: lib.cat([a, b], dim=-1),
        [((3, 2), (3, 4)), ((2,), (5,))],
    ),
    spec("cat-self", ["cat"], lambda lib, a: lib.cat([a, a * 2, a], 0), X2),
    spec(
        "cat-int-float",
        ["cat"],
        lambda lib, a, i: lib.cat([a, i], 0),
        [((2, 3), (1, 3))],
        nondiff={1: int_array(5)},
    ),
    spec("concat", ["cat"], lambda lib, a, b: lib.concat((a, b)), [((1, 3), (2, 3))]),
    spec(
        "stack",
        ["stack", "slice"],
        lambda lib, a, b, c: lib.stack([a, b, c]),
        [((3, 4), (3, 4), (3, 4)), ((), (), ())],
    ),
    spec("stack-dim", ["stack"], lambda lib, a, b: lib.stack([a, b], dim=-1), [((2, 3), (2, 3))]),
    spec(
        "split",
        ["slice", "slice_grad"],
        lambda lib, a: lib.cat(a.split(3, 1)[::-1], 1),
        [((2, 7),)],
    ),
    spec(
        "split-sections",
        ["slice"],
        lambda lib, a: lib.stack(
            [p.sum() * (i + 1) for i, p in enumerate(a.split([1, 3, 0, 2], 0))]
        ),
        [((6, 2),)],
    ),
    spec("chunk", ["slice"], lambda lib, a: lib.cat(a.chunk(3, -1)[1:], -1), [((2, 8),)]),
    spec(
        "unbind",
        ["slice", "reshape"],
        lambda lib, a: sum(t * (i + 1) for i, t in enumerate(a.unbind(1))),
        X3,
    ),
    spec("narrow", ["slice", "slice_grad"], lambda lib, a: a.narrow(1, 1, 2), X3),
    spec("narrow-negative-start", ["slice"], lambda lib, a: lib.narrow(a, -1, -3, 2), X3),
    spec("select", ["slice", "reshape"], lambda lib, a: lib.select(a, 2, -1), X3),
    # ================================================= flip, roll, tril, triu ====
    spec("flip", ["flip"], lambda lib, a: a.flip(0), X3 + [((5,),)]),
    spec("flip-dims", ["flip"], lambda lib, a: a.flip((0, -1)), X3),
    spec("roll", ["cat", "slice"], lambda lib, a: a.roll(1, 1), X3),
    spec("roll-dims", ["cat"], lambda lib, a: a.roll((2, -1), (0, 2)), X3),
    spec("roll-flat", ["cat", "reshape"], lambda lib, a: a.roll(5), X2),
    spec("tril", ["tril"], lambda lib, a: a.tril(), X2 + X3),
    spec("tril-diagonal", ["tril"], lambda lib, a: a.tril(-1), [((4, 4),)]),
    spec("triu", ["triu"], lambda lib, a: a.triu(), X2 + X3),
    spec("triu-diagonal", ["triu"], lambda lib, a: a.triu(2), [((4, 5),)]),
    # ======================================================= getitem: basic index ====
    spec("getitem-int", ["slice", "slice_grad", "reshape"], lambda lib, a: a[1], X3 + X2),
    spec("getitem-negative-int", ["slice"], lambda lib, a: a[-1, 2], X3),
    spec("getitem-slice", ["slice"], lambda lib, a: a[1:3], [((4, 3),)]),
    spec("getitem-step", ["slice", "slice_grad"], lambda lib, a: a[:, ::2, 1::3], [((2, 5, 7),)]),
    spec("getitem-negative-bounds", ["slice"], lambda lib, a: a[-3:-1, :-2], [((4, 5),)]),
    spec("getitem-empty-slice", ["slice"], lambda lib, a: a[3:1] * 2, [((4, 5),)]),
    spec("getitem-clipped", ["slice"], lambda lib, a: a[1:100], [((4, 5),)]),
    spec("getitem-none-ellipsis", ["slice", "reshape"], lambda lib, a: a[None, ..., 1], X3),
    spec("getitem-ellipsis", ["slice"], lambda lib, a: a[..., 1:, None, ::2], X3),
    spec("getitem-full", ["slice"], lambda lib, a: a[:], X2),
    spec("getitem-ellipsis-only", ["slice"], lambda lib, a: a[...] * 2, [((),)] + X2),
    spec("getitem-0d-none", ["reshape"], lambda lib, a: a[None], [((),)]),
    spec(
        "iterate", ["slice"], lambda lib, a: lib.stack([r * (i + 1) for i, r in enumerate(a)]), X2
    ),
    # ==================================================== getitem: advanced index ====
    # Repeated indices accumulate in the gradient (index's vjp is index_put accumulate).
    spec("getitem-list", ["index", "index_put"], lambda lib, a: a[[0, 2, 0, 0]], X2),
    spec("getitem-list-negative", ["index"], lambda lib, a: a[[-1, 0, -1]], X2),
    spec(
        "getitem-tensor",
        ["index", "index_put"],
        lambda lib, a, i: a[i],
        [((5, 3), (7,)), ((5,), (2, 3)), ((5, 2), ())],
        nondiff={1: int_array(5)},
    ),
    spec(
        "getitem-tensor-repeated",
        ["index", "index_put"],
        lambda lib, a, i: a[i],
        [((4, 3), (6,))],
        nondiff={1: fixed([1, 1, 3, 1, -4, 0])},
    ),
    spec(
        "getitem-slice-then-tensor",
        ["slice", "index"],
        lambda lib, a, i: a[1:, i],
        [((4, 5), (3,))],
        nondiff={1: fixed([4, 0, 4])},
    ),
    spec(
        "getitem-tensor-then-slice",
        ["slice", "index"],
        lambda lib, a, i: a[i, ::2],
        [((4, 5), (2, 2))],
        nondiff={1: int_array(4)},
    ),
    spec(
        "getitem-int-and-tensor",
        ["index"],
        lambda lib, a, i: a[0, :, i],
        [((2, 3, 4), (5,))],
        nondiff={1: int_array(4)},
    ),
    spec(
        "getitem-tensor-and-int",
        ["index"],
        lambda lib, a, i: a[i, :, 1],
        [((2, 3, 4), (5,))],
        nondiff={1: int_array(2)},
    ),
    spec(
        "getitem-two-adjacent",
        ["index", "index_put"],
        lambda lib, a, i, j: a[:, i, j],
        [((2, 3, 4), (5,), (5,)), ((2, 3, 4), (2, 1), (3,))],
        nondiff={1: int_array(3), 2: int_array(4)},
    ),
    spec(
        "getitem-two-separated",
        ["index", "index_put"],
        lambda lib, a, i, j: a[i, :, j],
        [((2, 3, 4), (5,), (5,))],
        nondiff={1: int_array(2), 2: int_array(4)},
    ),
    spec(
        "getitem-tensor-int-tensor",
        ["index"],
        lambda lib, a, i, j: a[i, 0, j],
        [((2, 3, 4), (3,), (3,))],
        nondiff={1: int_array(2), 2: int_array(4)},
    ),
    spec(
        "getitem-none-and-tensor",
        ["index"],
        lambda lib, a, i: a[None, i],
        [((4, 3), (3,))],
        nondiff={1: int_array(4)},
    ),
    spec(
        "getitem-mask",
        ["nonzero", "index", "index_put"],
        lambda lib, a, m: a[m],
        [((3, 4), (3, 4)), ((3, 4), (3,))],
        nondiff={1: bool_array()},
    ),
    spec(
        "getitem-mask-after-slice",
        ["nonzero", "index"],
        lambda lib, a, m: a[:, m],
        [((3, 4), (4,))],
        nondiff={1: bool_array()},
    ),
    spec("getitem-mask-from-data", ["gt", "nonzero", "index"], lambda lib, a: a[a > 0], X3),
    spec(
        "getitem-mask-empty",
        ["nonzero", "index"],
        lambda lib, a, m: a[m] * 2,
        [((3, 4), (3,))],
        nondiff={1: bool_array(0.0)},
    ),
    # ================================= index_select, index_add, gather, scatter_add ====
    spec(
        "index_select",
        ["index", "index_put"],
        lambda lib, a, i: a.index_select(1, i),
        [((3, 5), (7,)), ((2, 4, 3), (2,))],
        nondiff={1: int_array(4)},
    ),
    spec(
        "index_select-1d",
        ["index"],
        lambda lib, a, i: a.index_select(0, i),
        [((5,), (3,)), ((5,), ())],
        nondiff={1: int_array(5)},
    ),
    spec(
        "index_add",
        ["index_put", "index"],
        lambda lib, a, s, i: a.index_add(0, i, s),
        [((4, 3), (6, 3), (6,))],
        nondiff={2: fixed([1, 1, 3, 1, 0, 1])},
    ),
    spec(
        "index_add-alpha",
        ["index_put", "mul"],
        lambda lib, a, s, i: lib.index_add(a, 1, i, s, alpha=-2.0),
        [((2, 4), (2, 3), (3,))],
        nondiff={2: int_array(4)},
    ),
    spec(
        "index_put-overwrite",
        ["index_put", "index"],
        lambda gm, a, v, i: gm.REGISTRY["index_put"](a, v, i, dims=[0], accumulate=False),
        [((5, 3), (4, 3), (4,)), ((5, 3), (3,), (2,))],
        torch_fn=lambda torch, a, v, i: a.index_put((i,), v),
        nondiff={2: permutation(5)},
    ),
    spec(
        "gather",
        ["gather", "scatter_add"],
        lambda lib, a, i: a.gather(1, i),
        [((3, 4), (3, 6)), ((3, 4), (2, 2))],
        nondiff={1: int_array(4)},
    ),
    spec(
        "gather-dim0",
        ["gather", "scatter_add"],
        lambda lib, a, i: lib.gather(a, 0, i),
        [((3, 4, 2), (5, 4, 1)), ((4,), (7,))],
        nondiff={1: int_array(3)},
    ),
    spec(
        "scatter_add",
        ["scatter_add", "gather"],
        lambda lib, a, s, i: a.scatter_add(1, i, s),
        [((3, 4), (3, 6), (3, 6)), ((3, 5), (3, 2), (3, 2))],
        nondiff={2: int_array(4)},
    ),
    # A src larger than the index: only its index-shaped corner is used. torch's backward
    # rejects that case, so the reference scatters the corner itself.
    spec(
        "scatter_add-src-larger",
        ["scatter_add", "gather", "slice_grad"],
        lambda gm, a, s, i: gm.scatter_add(a, 0, i, s),
        [((4, 3), (6, 4), (5, 2)), ((3, 5), (4, 6), (2, 3))],
        torch_fn=lambda torch, a, s, i: torch.scatter_add(a, 0, i, s[: i.shape[0], : i.shape[1]]),
        nondiff={2: int_array(3)},
    ),
    spec(
        "masked_fill",
        ["where"],
        lambda lib, a, m: a.masked_fill(m, -1.5),
        [((3, 4), (3, 4)), ((3, 4), (4,)), ((3, 4), ())],
        nondiff={1: bool_array()},
    ),
    spec(
        "masked_fill-tensor",
        ["where"],
        lambda lib, a, v, m: a.masked_fill(m, v),
        [((3, 4), (), (3, 1))],
        nondiff={2: bool_array()},
    ),
    spec(
        "nonzero",
        ["nonzero"],
        lambda lib, m: lib.nonzero(m),
        X3 + [((5,),)],
        nondiff={0: bool_array()},
    ),
    spec(
        "nonzero-float", ["nonzero"], lambda lib, a: lib.nonzero(a), X2, domain=integer_valued(0, 2)
    ),
    # ============================================================ sort, argsort, topk ====
    spec("sort", ["argsort", "gather"], lambda lib, a: a.sort(1).values, X3),
    spec(
        "sort-descending",
        ["argsort", "gather"],
        lambda lib, a: a.sort(dim=0, descending=True)[0],
        X3,
    ),
    spec(
        "sort-indices-stable",
        ["argsort"],
        lambda lib, a: lib.sort(a, dim=-1, stable=True).indices,
        X3,
        domain=integer_valued(),
    ),
    spec(
        "sort-descending-stable",
        ["argsort"],
        lambda lib, a: lib.sort(a, dim=0, descending=True, stable=True).indices,
        X3,
        domain=integer_valued(),
    ),
    spec("argsort", ["argsort"], lambda lib, a: a.argsort(), X3),
    spec("topk", ["argsort", "gather", "slice"], lambda lib, a: a.topk(2).values, X3),
    spec(
        "topk-smallest",
        ["argsort", "gather"],
        lambda lib, a: a.topk(3, dim=0, largest=False).values,
        [((5, 3),)],
    ),
    # ================================================ double backward through the linear ops ====
    # A linear op's gradient is constant, so its second order is trivially zero; behind a
    # nonlinearity its vjp's own vjp runs (index_put -> index, scatter_add -> gather, ...).
    spec(
        "getitem-tensor-exp",
        ["index", "index_put"],
        lambda lib, a, i: a[i].exp(),
        [((4, 3), (6,))],
        nondiff={1: fixed([1, 1, 3, 1, -4, 0])},
    ),
    spec(
        "getitem-mask-square",
        ["nonzero", "index", "index_put"],
        lambda lib, a, m: a[m] ** 2,
        [((3, 4), (3, 4))],
        nondiff={1: bool_array()},
    ),
    spec("getitem-slice-exp", ["slice", "slice_grad"], lambda lib, a: a[1:, ::2].exp(), X3),
    spec(
        "index_put-overwrite-exp",
        ["index_put", "index"],
        lambda gm, a, v, i: gm.REGISTRY["index_put"](a, v, i, dims=[0], accumulate=False).exp(),
        [((5, 3), (4, 3), (4,))],
        torch_fn=lambda torch, a, v, i: a.index_put((i,), v).exp(),
        nondiff={2: permutation(5)},
    ),
    spec(
        "index_add-exp",
        ["index_put", "index"],
        lambda lib, a, s, i: a.index_add(0, i, s).exp(),
        [((4, 3), (6, 3), (6,))],
        nondiff={2: fixed([1, 1, 3, 1, 0, 1])},
    ),
    spec(
        "gather-exp",
        ["gather", "scatter_add"],
        lambda lib, a, i: a.gather(1, i).exp(),
        [((3, 4), (3, 6))],
        nondiff={1: int_array(4)},
    ),
    spec(
        "scatter_add-exp",
        ["scatter_add", "gather"],
        lambda lib, a, s, i: a.scatter_add(1, i, s).exp(),
        [((3, 4), (3, 6), (3, 6))],
        nondiff={2: int_array(4)},
    ),
    spec(
        "cat-exp",
        ["cat", "slice", "slice_grad"],
        lambda lib, a, b: lib.cat([a, b], 1).exp(),
        [((2, 1, 4), (2, 3, 4))],
    ),
    spec(
        "stack-exp",
        ["stack", "slice", "slice_grad"],
        lambda lib, a, b: lib.stack([a, b], 1).exp(),
        [((2, 3), (2, 3))],
    ),
    spec("flip-exp", ["flip"], lambda lib, a: a.flip(1).exp(), X3),
    spec("cumsum-exp", ["cumsum", "flip"], lambda lib, a: a.cumsum(1).exp(), X3),
    spec("tril-exp", ["tril"], lambda lib, a: a.tril(1).exp(), X2),
    spec("triu-exp", ["triu"], lambda lib, a: a.triu(-1).exp(), X2),
    spec("expand-exp", ["expand", "sum"], lambda lib, a: a.expand(2, 3, 4).exp(), [((3, 1),)]),
    spec("permute-exp", ["permute"], lambda lib, a: a.permute(2, 0, 1).exp(), X3),
    spec(
        "max-dim-exp", ["argmax", "gather", "scatter_add"], lambda lib, a: a.max(1).values.exp(), X3
    ),
    spec("amax-square", ["amax"], lambda lib, a: a.amax(1) ** 2, X3),
    # ================================================================ linear algebra ====
    spec("mm", ["mm"], lambda lib, a, b: a.mm(b), [((3, 4), (4, 5)), ((1, 1), (1, 3))]),
    spec(
        "matmul",
        ["matmul"],
        lambda lib, a, b: a @ b,
        [
            ((3, 4), (4, 5)),
            ((2, 3, 4), (4, 5)),
            ((3, 4), (2, 4, 5)),
            ((2, 1, 3, 4), (5, 4, 2)),
            ((3, 4), (4,)),
            ((4,), (4, 5)),
            ((4,), (4,)),
            ((2, 3, 4), (4,)),
            ((4,), (2, 4, 3)),
        ],
    ),
    spec("bmm", ["matmul"], lambda lib, a, b: lib.bmm(a, b), [((2, 3, 4), (2, 4, 5))]),
    spec("mv", ["matmul"], lambda lib, a, v: lib.mv(a, v), [((3, 4), (4,))]),
    spec("dot", ["matmul"], lambda lib, a, b: lib.dot(a, b), [((5,), (5,))]),
    spec("outer", ["reshape", "mul"], lambda lib, a, b: lib.outer(a, b), [((3,), (4,))]),
]
