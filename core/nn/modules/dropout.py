"""Channel and alpha dropout modules, as torch's: ``p`` and ``inplace`` (accepted, the
result is new) as ``Dropout``'s, active in training mode only."""

from __future__ import annotations

from ...tensor import Tensor
from .. import functional as F
from .layers import Dropout


class Dropout1d(Dropout):
    """Zero whole channels of (N, C, L) or (C, L) input with probability ``p`` in training,
    scale the rest by 1/(1-p)."""

    def forward(self, x: Tensor) -> Tensor:
        return F.dropout1d(x, self.p, self.training)


class Dropout2d(Dropout):
    """Zero whole channels of (N, C, H, W) input with probability ``p`` in training, scale
    the rest by 1/(1-p); a 3-D input is (N, C, L), with torch's warning."""

    def forward(self, x: Tensor) -> Tensor:
        return F.dropout2d(x, self.p, self.training)


class Dropout3d(Dropout):
    """Zero whole channels of (N, C, D, H, W) or (C, D, H, W) input with probability ``p``
    in training, scale the rest by 1/(1-p)."""

    def forward(self, x: Tensor) -> Tensor:
        return F.dropout3d(x, self.p, self.training)


class AlphaDropout(Dropout):
    """``F.alpha_dropout`` in training: for SELU networks, keeps zero mean, unit variance."""

    def forward(self, x: Tensor) -> Tensor:
        return F.alpha_dropout(x, self.p, self.training)


class FeatureAlphaDropout(Dropout):
    """``F.feature_alpha_dropout`` in training: alpha dropout of whole channels."""

    def forward(self, x: Tensor) -> Tensor:
        return F.feature_alpha_dropout(x, self.p, self.training)
