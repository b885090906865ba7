"""Test specifications for the primitive ops, one list per module of ``gradmesh.core.ops``.

``tests/engine/test_ops.py`` runs every spec three ways: forward and gradient against PyTorch
(float32 and float64), float64 central finite differences, and second order where
``second_order`` is set. Every op in the registry must be covered by some spec's ``covers``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np


@dataclass
class OpSpec:
    name: str  # test id, e.g. "add" or "cross_entropy-smoothing"
    covers: tuple  # registry op names this spec exercises
    gm: Callable  # (gm, *inputs) -> Tensor, with gm = gradmesh.core
    torch: Callable  # (torch, *inputs) -> torch.Tensor, the same computation
    shapes: list  # list of cases; each case a tuple of input shapes
    domain: tuple = (-2.0, 2.0)  # float inputs are drawn uniformly from this range
    # index -> fn(shape, rng) returning an int64 or bool numpy array (targets, indices, masks);
    # such inputs are passed to both libraries as tensors and never differentiated.
    nondiff: dict = field(default_factory=dict)
    second_order: bool = True  # check grad-of-grad (smooth ops)
    fd: bool = True  # check against float64 finite differences
    float32: bool = True  # also compare in float32
    atol: float = 1e-6  # float64 tolerances against torch
    rtol: float = 1e-6


def away_from_zero(lo: float = 0.2, hi: float = 2.0):
    """A domain sampler for ops with a kink at 0 (abs, relu): |x| in [lo, hi], random sign."""

    def sample(shape, rng):
        return rng.uniform(lo, hi, size=shape) * rng.choice([-1.0, 1.0], size=shape)

    return sample


def int_array(high: int, low: int = 0):
    def sample(shape, rng):
        return rng.integers(low, high, size=shape).astype(np.int64)

    return sample


def bool_array(p: float = 0.5):
    def sample(shape, rng):
        return rng.random(shape) < p

    return sample
