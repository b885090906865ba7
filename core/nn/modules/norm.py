"""Normalisation layers with running statistics or groups: BatchNorm1d/2d,
InstanceNorm1d/2d, GroupNorm, RMSNorm."""

from __future__ import annotations

import warnings

import numpy as np

from ... import backend, dtypes
from ...tensor import Tensor
from .. import functional as F
from .. import init
from .layers import _empty
from .module import Module, Parameter


def _ones_and_zeros(module: Module, shape: tuple, affine: bool, bias: bool, dtype, device) -> None:
    """``weight`` (ones) and ``bias`` (zeros) Parameters of ``shape`` where ``affine`` (and
    ``bias``), None placeholders otherwise."""
    for name, wanted, fill in (
        ("weight", affine, init.ones_),
        ("bias", affine and bias, init.zeros_),
    ):
        if wanted:
            setattr(module, name, Parameter(_empty(shape, dtype, device)))
            fill(getattr(module, name))
        else:
            module.register_parameter(name, None)


class _BatchNorm(Module):
    """Batch normalisation over (N, C, *) as torch's: batch statistics in training (and
    when no running statistics are tracked), running ones in eval. ``momentum=None`` makes
    the running statistics a cumulative average over ``num_batches_tracked`` batches.

    Traced in train mode, the running statistics and ``num_batches_tracked`` are the
    graph's BUFFER inputs and their updates its buffer-update outputs (``graph.trace``);
    in eval mode they are constants of the graph."""

    _ndims: tuple

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
    ):
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        _ones_and_zeros(self, (num_features,), affine, bias, dtype, device)
        if track_running_stats:
            self.register_buffer("running_mean", _empty((num_features,), dtype, device))
            self.register_buffer("running_var", _empty((num_features,), dtype, device))
            self.register_buffer(
                "num_batches_tracked", Tensor(backend.xp_for(device).zeros((), dtype=np.int64))
            )
            self.reset_running_stats()
        else:
            for name in ("running_mean", "running_var", "num_batches_tracked"):
                self.register_buffer(name, None)

    def reset_running_stats(self) -> None:
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(1)
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        if self.weight is not None:
            init.ones_(self.weight)
        if self.bias is not None:
            init.zeros_(self.bias)

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim not in self._ndims:
            raise ValueError(
                f"{type(self).__name__}: expected "
                f"{' or '.join(f'{d}D' for d in self._ndims)} input (got "
                f"{x.ndim}D input of shape {tuple(x.shape)})"
            )
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                # A tensor, not .item(): a traced graph computes it from the buffer.
                factor = 1.0 / self.num_batches_tracked.to(dtypes.float64)
        use_batch = self.training or self.running_mean is None
        keep = not self.training or self.track_running_stats
        return F.batch_norm(
            x,
            self.running_mean if keep else None,
            self.running_var if keep else None,
            self.weight,
            self.bias,
            use_batch,
            factor,
            self.eps,
        )

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
            f"affine={self.affine}, bias={self.bias is not None}, "
            f"track_running_stats={self.track_running_stats}"
        )


class BatchNorm1d(_BatchNorm):
    """Batch normalisation of (N, C) or (N, C, L)."""

    _ndims = (2, 3)


class BatchNorm2d(_BatchNorm):
    """Batch normalisation of (N, C, H, W)."""

    _ndims = (4,)


class _InstanceNorm(_BatchNorm):
    """Normalisation of each (sample, channel) over its spatial dims, as torch's. Unlike
    BatchNorm, affine and running statistics are off by default; when tracked, training
    updates them with the mean over the batch of each instance's statistics and eval uses
    them (``num_batches_tracked`` is kept for state_dict compatibility, never counted)."""

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = False,
        track_running_stats: bool = False,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
    ):
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias
        )

    def forward(self, x: Tensor) -> Tensor:
        name, batched = type(self).__name__, self._ndims[1]
        if x.ndim not in self._ndims:
            raise ValueError(
                f"{name}: expected {self._ndims[0]}D or {batched}D input (got {x.ndim}D "
                f"input of shape {tuple(x.shape)})"
            )
        dim = x.ndim - batched + 1
        if x.shape[dim] != self.num_features:
            if self.affine:
                raise ValueError(
                    f"{name}: expected the input's size at dim={dim} to match "
                    f"num_features ({self.num_features}), but got: {x.shape[dim]}."
                )
            # As torch: without affine parameters num_features is not used.
            warnings.warn(
                f"{name}: input's size at dim={dim} does not match num_features",
                stacklevel=2,
            )
        unbatched = x.ndim < batched
        out = F.instance_norm(
            x.unsqueeze(0) if unbatched else x,
            self.running_mean,
            self.running_var,
            self.weight,
            self.bias,
            self.training or not self.track_running_stats,
            self.momentum if self.momentum is not None else 0.0,
            self.eps,
        )
        return out.squeeze(0) if unbatched else out


class InstanceNorm1d(_InstanceNorm):
    """Instance normalisation of (N, C, L) or (C, L)."""

    _ndims = (2, 3)


class InstanceNorm2d(_InstanceNorm):
    """Instance normalisation of (N, C, H, W) or (C, H, W)."""

    _ndims = (3, 4)


class GroupNorm(Module):
    """Normalise (N, C, *) over groups of C / num_groups channels; per-channel affine."""

    def __init__(
        self,
        num_groups: int,
        num_channels: int,
        eps: float = 1e-5,
        affine: bool = True,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
    ):
        super().__init__()
        if num_groups < 1 or num_channels % num_groups:
            raise ValueError(
                f"GroupNorm: num_channels ({num_channels}) must be divisible by "
                f"num_groups ({num_groups})"
            )
        self.num_groups, self.num_channels = num_groups, num_channels
        self.eps, self.affine = eps, affine
        _ones_and_zeros(self, (num_channels,), affine, bias, dtype, device)

    def forward(self, x: Tensor) -> Tensor:
        return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return (
            f"{self.num_groups}, {self.num_channels}, eps={self.eps}, affine={self.affine}, "
            f"bias={self.bias is not None}"
        )


class RMSNorm(Module):
    """x / sqrt(mean(x², trailing dims) + eps) * weight; ``eps=None``: the dtype's eps."""

    def __init__(
        self,
        normalized_shape,
        eps: float | None = None,
        elementwise_affine: bool = True,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if isinstance(normalized_shape, int):
            normalized_shape = (normalized_shape,)
        self.normalized_shape = tuple(int(s) for s in normalized_shape)
        self.eps, self.elementwise_affine = eps, elementwise_affine
        if elementwise_affine:
            self.weight = Parameter(_empty(self.normalized_shape, dtype, device))
            init.ones_(self.weight)
        else:
            self.register_parameter("weight", None)

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, self.normalized_shape, self.weight, self.eps)

    def extra_repr(self) -> str:
        return (
            f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}"
        )
