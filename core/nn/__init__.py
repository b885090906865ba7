"""gradmesh.core.nn: modules, ``Parameter``, ``init`` and ``functional``, like ``torch.nn``.

>>> import gradmesh.core as gm
>>> layer = gm.nn.Linear(3, 2)
>>> [tuple(p.shape) for p in layer.parameters()]
[(2, 3), (2,)]
"""

from . import functional, init, utils  # noqa: F401
from .modules import *  # noqa: F403  (every module class: gm.nn.Linear as torch.nn.Linear)
from .modules import __all__ as _module_names

__all__ = ["init", "functional", "utils", *_module_names]
