"""gradmesh.core: an autograd engine with PyTorch's semantics over NumPy or CuPy.

>>> import gradmesh.core as gm
>>> w = gm.tensor([[1.0], [2.0]], requires_grad=True)
>>> loss = (gm.tensor([[3.0, 4.0]]) @ w).sum()
>>> loss.backward()
>>> w.grad.tolist()
[[3.0], [4.0]]
"""

from . import allocator as _allocator

_allocator.steady_heap()  # fresh pages cost a quarter of a CNN step (core/allocator.py)

# The ops first: importing them fills the registry and, through it, loads the Tensor, the
# dispatcher and the functional API in an order that their import cycles allow.
from . import autograd as autograd
from . import dtypes as dtypes
from . import ops  # noqa: F401
from ._api import *  # noqa: F401,F403  (every public function: gm.exp, gm.sum, ...)
from .autograd import enable_grad as enable_grad
from .autograd import is_grad_enabled as is_grad_enabled
from .autograd import no_grad as no_grad
from .autograd import set_grad_enabled as set_grad_enabled
from .backend import cuda_available as cuda_available
from .devices import device as device
from .dtypes import DType as DType
from .dtypes import bfloat16 as bfloat16
from .dtypes import bool_ as bool  # noqa: F401  (gm.bool, as torch.bool)
from .dtypes import finfo as finfo
from .dtypes import float16 as float16
from .dtypes import float32 as float32
from .dtypes import float64 as float64
from .dtypes import iinfo as iinfo
from .dtypes import int32 as int32
from .dtypes import int64 as int64
from .factories import arange as arange
from .factories import as_tensor as as_tensor
from .factories import empty as empty
from .factories import eye as eye
from .factories import from_numpy as from_numpy
from .factories import full as full
from .factories import full_like as full_like
from .factories import is_tensor as is_tensor
from .factories import linspace as linspace
from .factories import ones as ones
from .factories import ones_like as ones_like
from .factories import rand as rand
from .factories import rand_like as rand_like
from .factories import randint as randint
from .factories import randn as randn
from .factories import randn_like as randn_like
from .factories import randperm as randperm
from .factories import tensor as tensor
from .factories import zeros as zeros
from .factories import zeros_like as zeros_like
from .interop import from_dlpack as from_dlpack
from .precision import autocast as autocast
from .random import Generator as Generator
from .random import initial_seed as initial_seed
from .random import manual_seed as manual_seed
from .registry import REGISTRY as REGISTRY
from .registry import OpError as OpError
from .saving import load as load
from .saving import save as save
from .tensor import Tensor as Tensor

half, float, double, long, int = float16, float32, float64, int64, int32

from . import nn as nn  # noqa: E402  (gm.nn.Linear, gm.optim.SGD)
from . import optim as optim
from . import utils as utils  # noqa: E402  (gm.utils.data.DataLoader)
