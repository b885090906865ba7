"""gradmesh.core: an autograd engine with PyTorch's semantics over NumPy or CuPy.

>>> import gradmesh.core as gm
>>> w = gm.tensor([[1.0], [2.0]], requires_grad=True)
>>> loss = (gm.tensor([[3.0, 4.0]]) @ w).sum()
>>> loss.backward()
>>> w.grad.tolist()
[[3.0], [4.0]]
"""
from . import autograd, dtypes, ops  # noqa: F401  (ops fills the registry)
from .autograd import enable_grad, is_grad_enabled, no_grad, set_grad_enabled
from .backend import cuda_available
from .dtypes import DType, bool_ as bool, float16, float32, float64, int32, int64
from .random import Generator, initial_seed, manual_seed
from .registry import REGISTRY, OpError
from .tensor import (Tensor, arange, as_tensor, empty, eye, from_numpy, full, full_like,
                     is_tensor, linspace, ones, ones_like, rand, rand_like, randint, randn,
                     randn_like, randperm, tensor, zeros, zeros_like)
from .tensor import _install_methods

_install_methods()

# Every public function of gradmesh.core.functional, under the same name as torch's.
from . import functional as _functional  # noqa: E402
globals().update({name: fn for name, fn in vars(_functional).items()
                  if not name.startswith("_") and callable(fn)
                  and getattr(fn, "__module__", None) == _functional.__name__})

half, float, double, long, int = float16, float32, float64, int64, int32

from . import nn, optim  # noqa: E402,F401  (gm.nn.Linear, gm.optim.SGD)
