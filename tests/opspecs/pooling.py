"""Specs for the compositions of package C: ``addbmm``, pixel (un)shuffle, the 1-d pools
(over the 2-d ops), adaptive avg/max pooling in 1-d and 2-d (max: a gather and
``max(dim)``) and ``instance_norm`` (``layer_norm`` per instance). Random inputs have no
ties; tests/engine/test_layers_more.py checks the tie-breaking of the max pools."""

from __future__ import annotations

from . import OpSpec


def spec(name, covers, fn, shapes, **kw) -> OpSpec:
    return OpSpec(name, tuple(covers), fn, fn, shapes, **kw)


def nnf(name: str, *args, **kwargs):
    """``lib.nn.functional.<name>(x, *args, **kwargs)`` for gradmesh and torch alike."""
    return lambda lib, *xs: getattr(lib.nn.functional, name)(*xs, *args, **kwargs)


SPECS = [
    spec(
        "addbmm",
        ["matmul", "sum", "add"],
        lambda lib, c, a, b: lib.addbmm(c, a, b),
        [((3, 5), (2, 3, 4), (2, 4, 5)), ((5,), (2, 3, 4), (2, 4, 5))],
    ),
    spec(
        "addbmm-alpha-beta",
        ["matmul", "mul"],
        lambda lib, c, a, b: c.addbmm(a, b, beta=0.5, alpha=-2.0),
        [((1, 5), (2, 3, 4), (2, 4, 5))],
    ),
    spec(
        "addbmm-beta-zero",
        ["matmul"],
        lambda lib, c, a, b: lib.addbmm(c, a, b, beta=0),
        [((3, 5), (2, 3, 4), (2, 4, 5))],
    ),
    spec("pixel_shuffle", ["reshape", "permute"], nnf("pixel_shuffle", 2), [((2, 8, 3, 2),)]),
    spec("pixel_shuffle-unbatched", ["reshape"], nnf("pixel_shuffle", 3), [((9, 2, 1),)]),
    spec("pixel_unshuffle", ["reshape", "permute"], nnf("pixel_unshuffle", 2), [((2, 2, 4, 6),)]),
    spec(
        "max_pool1d",
        ["max_pool2d"],
        nnf("max_pool1d", 3, 2, 1),
        [((2, 3, 9),), ((3, 8),)],
        second_order=False,
    ),
    spec(
        "max_pool1d-dilation-ceil",
        ["max_pool2d"],
        nnf("max_pool1d", 2, 2, 1, 2, True),
        [((2, 2, 10),)],
        second_order=False,
    ),
    spec("avg_pool1d", ["avg_pool2d"], nnf("avg_pool1d", 3, 2, 1), [((2, 3, 9),), ((3, 8),)]),
    spec(
        "avg_pool1d-ceil-no-pad-count",
        ["avg_pool2d"],
        nnf("avg_pool1d", 3, 2, 1, True, False),
        [((2, 2, 10),)],
    ),
    spec(
        "adaptive_avg_pool1d",
        ["matmul"],
        nnf("adaptive_avg_pool1d", 4),
        [((2, 3, 10),), ((3, 7),)],
    ),
    spec(
        "adaptive_max_pool1d",
        ["index", "gather"],
        nnf("adaptive_max_pool1d", 4),
        [((2, 3, 10),), ((3, 7),)],
        second_order=False,
    ),
    spec(
        "adaptive_max_pool2d",
        ["index", "gather"],
        nnf("adaptive_max_pool2d", (3, 4)),
        [((2, 3, 7, 10),), ((2, 5, 6),)],
        second_order=False,
    ),
    spec(
        "adaptive_max_pool2d-keep-width",
        ["index", "gather"],
        nnf("adaptive_max_pool2d", (2, None)),
        [((1, 2, 5, 3),)],
        second_order=False,
    ),
    spec("instance_norm", ["layer_norm"], nnf("instance_norm"), [((2, 3, 5),), ((2, 3, 4, 3),)]),
    spec(
        "instance_norm-affine",
        ["layer_norm", "channel_affine"],
        lambda lib, x, w, b: lib.nn.functional.instance_norm(x, weight=w, bias=b, eps=1e-3),
        [((2, 3, 5), (3,), (3,))],
    ),
]
