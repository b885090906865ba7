"""Specs for ``gradmesh.core.ops.loss``: binary cross entropy on probabilities, through
``nn.functional.binary_cross_entropy`` (every reduction, with and without a weight)."""

from __future__ import annotations

import gradmesh.core.nn.functional as F

from . import OpSpec

SPECS: list[OpSpec] = []


def _weight(lib, like):
    """A constant class weight over the last dim (torch refuses a weight that needs grad)."""
    return lib.tensor([2.0, 0.25, 1.0, 0.5, 3.0], dtype=like.dtype, device=like.device)


# Probabilities and targets in (0, 1): the gradient's denominator x * (1 - x) stays well
# away from torch's 1e-12 floor (the saturated ends are tests/engine/test_losses.py's).
for r in ("none", "mean", "sum"):
    SPECS.append(
        OpSpec(
            f"binary_cross_entropy-{r}",
            ("binary_cross_entropy",),
            lambda gm, x, t, r=r: F.binary_cross_entropy(x, t, reduction=r),
            lambda torch, x, t, r=r: torch.nn.functional.binary_cross_entropy(x, t, reduction=r),
            [((4, 5), (4, 5)), ((3,), (3,)), ((), ())],
            domain=(0.05, 0.95),
        )
    )
    SPECS.append(
        OpSpec(
            f"binary_cross_entropy-weight-{r}",
            ("binary_cross_entropy",),
            lambda gm, x, t, r=r: F.binary_cross_entropy(x, t, _weight(gm, x), reduction=r),
            lambda torch, x, t, r=r: torch.nn.functional.binary_cross_entropy(
                x, t, _weight(torch, x), reduction=r
            ),
            [((4, 5), (4, 5)), ((2, 3, 5), (2, 3, 5))],
            domain=(0.05, 0.95),
        )
    )
