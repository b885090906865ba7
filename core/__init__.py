"""gradmesh.core: an autograd engine with PyTorch's semantics over NumPy or CuPy.

>>> import gradmesh.core as gm
>>> w = gm.tensor([[1.0], [2.0]], requires_grad=True)
>>> loss = (gm.tensor([[3.0, 4.0]]) @ w).sum()
>>> loss.backward()
>>> w.grad.tolist()
[[3.0], [4.0]]
"""
# The ops first: importing them fills the registry and, through it, loads the Tensor, the
# dispatcher and the functional API in an order that their import cycles allow.
from . import ops  # noqa: F401
from . import autograd as autograd, dtypes as dtypes
from ._api import *  # noqa: F401,F403  (every public function: gm.exp, gm.sum, ...)
from .autograd import (enable_grad as enable_grad, is_grad_enabled as is_grad_enabled,
                       no_grad as no_grad, set_grad_enabled as set_grad_enabled)
from .backend import cuda_available as cuda_available
from .dtypes import (DType as DType, float16 as float16, float32 as float32,
                     float64 as float64, int32 as int32, int64 as int64)
from .dtypes import bool_ as bool  # noqa: F401  (gm.bool, as torch.bool)
from .factories import (arange as arange, as_tensor as as_tensor, empty as empty, eye as eye,
                        from_numpy as from_numpy, full as full, full_like as full_like,
                        is_tensor as is_tensor, linspace as linspace, ones as ones,
                        ones_like as ones_like, rand as rand, rand_like as rand_like,
                        randint as randint, randn as randn, randn_like as randn_like,
                        randperm as randperm, tensor as tensor, zeros as zeros,
                        zeros_like as zeros_like)
from .random import (Generator as Generator, initial_seed as initial_seed,
                     manual_seed as manual_seed)
from .registry import REGISTRY as REGISTRY, OpError as OpError
from .tensor import Tensor as Tensor
from .devices import device as device
from .interop import from_dlpack as from_dlpack
from .saving import load as load, save as save

half, float, double, long, int = float16, float32, float64, int64, int32

from . import nn as nn, optim as optim  # noqa: E402  (gm.nn.Linear, gm.optim.SGD)
from . import utils as utils  # noqa: E402  (gm.utils.data.DataLoader)
