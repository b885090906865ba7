"""Modules like ``torch.nn``'s: a ``Module`` holds Parameters, buffers and sub-modules.

A model written for torch.nn ports by changing the import. Names, argument order, default
initialisation, parameter order and ``state_dict`` keys all match torch's, so weights can
be copied between the two by key.

>>> import gradmesh.core as gm
>>> model = gm.nn.Sequential(gm.nn.Linear(4, 8), gm.nn.ReLU(), gm.nn.Linear(8, 2))
>>> [name for name, _ in model.named_parameters()]
['0.weight', '0.bias', '2.weight', '2.bias']
>>> model(gm.randn(3, 4)).shape
(3, 2)
"""
from __future__ import annotations

import math
import warnings
from collections import OrderedDict
from typing import Any, Callable, Iterable, Iterator, NamedTuple

import numpy as np

from .. import backend, dtypes
from .. import functional as CF
from ..autograd import no_grad, zero_grads
from ..tensor import Tensor, _share
from . import init

from . import functional as F


# ===================================================================== Parameter ======

class Parameter(Tensor):
    """A Tensor that a ``Module`` registers as a learnable weight (``requires_grad=True``).

    It is a leaf; ops on it return plain Tensors. ``Parameter(t)`` shares ``t``'s memory.
    """

    __slots__ = ()

    def __init__(self, data: Tensor | np.ndarray | None = None, requires_grad: bool = True):
        if data is None:
            data = np.empty((0,), dtype=dtypes.default_float.np)
        super().__init__(data, requires_grad=requires_grad)

    def __repr__(self) -> str:
        return "Parameter containing:\n" + super().__repr__()

    def __reduce_ex__(self, protocol):
        return (_rebuild_parameter, (backend.to_numpy(self._data), self.requires_grad))

    def __deepcopy__(self, memo):
        p = Parameter(self._data.copy(), self.requires_grad)
        if self.grad is not None:
            p.grad = Tensor._wrap(self.grad._data.copy())
        memo[id(self)] = p
        return p


def _rebuild_parameter(array, requires_grad):
    return Parameter(array, requires_grad)


# ======================================================================== Module ======

class _IncompatibleKeys(NamedTuple):
    missing_keys: list
    unexpected_keys: list


class Module:
    """Base class of every layer and model: subclass it, build layers in ``__init__``
    (after ``super().__init__()``) and write ``forward``.

    Attributes that are Parameters, Modules or registered buffers are tracked, so
    ``parameters()``, ``state_dict()``, ``to()`` and ``train()`` reach the whole tree.
    """

    training: bool

    def __init__(self) -> None:
        object.__setattr__(self, "training", True)
        object.__setattr__(self, "_parameters", OrderedDict())
        object.__setattr__(self, "_buffers", OrderedDict())
        object.__setattr__(self, "_non_persistent_buffers", set())
        object.__setattr__(self, "_modules", OrderedDict())

    def forward(self, *args, **kwargs):
        raise NotImplementedError(f"Module [{type(self).__name__}] is missing the required "
                                  f"\"forward\" function")

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    # -- registration ----------------------------------------------------------------------
    def _require_init(self, what: str) -> None:
        if "_parameters" not in self.__dict__:
            raise AttributeError(f"cannot assign {what} before Module.__init__() call; call "
                                 f"super().__init__() first in {type(self).__name__}.__init__")

    def register_parameter(self, name: str, param: Parameter | None) -> None:
        """Add a parameter (or a ``None`` placeholder, like a Linear without bias)."""
        self._require_init("parameters")
        self._check_name(name, "parameter")
        if param is not None and not isinstance(param, Parameter):
            raise TypeError(f"cannot assign '{type(param).__name__}' object to parameter "
                            f"'{name}' (gradmesh.core.nn.Parameter or None required); wrap it "
                            f"as nn.Parameter(tensor)")
        self._parameters[name] = param

    def register_buffer(self, name: str, tensor: Tensor | None, persistent: bool = True) -> None:
        """Add a tensor that is state but not learned (saved in ``state_dict`` if persistent)."""
        self._require_init("buffers")
        self._check_name(name, "buffer")
        if tensor is not None and not isinstance(tensor, Tensor):
            raise TypeError(f"cannot assign '{type(tensor).__name__}' object to buffer "
                            f"'{name}' (Tensor or None required)")
        self._buffers[name] = tensor
        if persistent:
            self._non_persistent_buffers.discard(name)
        else:
            self._non_persistent_buffers.add(name)

    def add_module(self, name: str, module: "Module | None") -> None:
        self._require_init("child modules")
        if module is not None and not isinstance(module, Module):
            raise TypeError(f"{type(module).__name__} is not a Module subclass")
        if not isinstance(name, str) or "." in name or name == "":
            raise KeyError(f"module name must be a non-empty string without '.', got {name!r}")
        self._modules[name] = module

    register_module = add_module

    def _check_name(self, name: str, kind: str) -> None:
        if not isinstance(name, str) or "." in name or name == "":
            raise KeyError(f"{kind} name must be a non-empty string without '.', got {name!r}")
        if hasattr(self, name) and name not in self._parameters and name not in self._buffers:
            raise KeyError(f"attribute '{name}' already exists")

    def __setattr__(self, name: str, value: Any) -> None:
        d = self.__dict__
        params = d.get("_parameters")
        if isinstance(value, Parameter):
            self._require_init("parameters")
            self._remove_from(name, d, self._buffers, self._modules)
            self.register_parameter(name, value)
        elif params is not None and name in params:
            if value is not None:
                raise TypeError(f"cannot assign '{type(value).__name__}' as parameter "
                                f"'{name}' (gradmesh.core.nn.Parameter or None expected)")
            params[name] = None
        elif isinstance(value, Module):
            self._require_init("child modules")
            self._remove_from(name, d, self._parameters, self._buffers)
            self._modules[name] = value
        elif d.get("_modules") is not None and name in self._modules:
            if value is not None:
                raise TypeError(f"cannot assign '{type(value).__name__}' as child module "
                                f"'{name}' (Module or None expected)")
            self._modules[name] = None
        elif d.get("_buffers") is not None and name in self._buffers:
            if value is not None and not isinstance(value, Tensor):
                raise TypeError(f"cannot assign '{type(value).__name__}' as buffer '{name}' "
                                f"(Tensor or None expected)")
            self._buffers[name] = value
        else:
            object.__setattr__(self, name, value)

    @staticmethod
    def _remove_from(name: str, *dicts) -> None:
        for d in dicts:
            d.pop(name, None)

    def __getattr__(self, name: str) -> Any:
        # Only called when normal lookup fails: parameters, buffers and children live in
        # their own dicts so that order and kind are known.
        d = self.__dict__
        for registry in ("_parameters", "_buffers", "_modules"):
            if registry in d and name in d[registry]:
                return d[registry][name]
        raise AttributeError(f"'{type(self).__name__}' object has no attribute '{name}'")

    def __delattr__(self, name: str) -> None:
        for registry in (self._parameters, self._buffers, self._modules):
            if name in registry:
                del registry[name]
                self._non_persistent_buffers.discard(name)
                return
        object.__delattr__(self, name)

    def __dir__(self):
        return sorted(set(super().__dir__()) | set(self._parameters) | set(self._buffers)
                      | set(self._modules))

    # -- traversal -------------------------------------------------------------------------
    def named_modules(self, memo: set | None = None, prefix: str = "",
                      remove_duplicate: bool = True) -> Iterator[tuple[str, "Module"]]:
        """This module and every descendant, depth first, with dotted names ('' for self)."""
        memo = set() if memo is None else memo
        if remove_duplicate:
            if id(self) in memo:
                return
            memo.add(id(self))
        yield prefix, self
        for name, child in self._modules.items():
            if child is not None:
                yield from child.named_modules(memo, f"{prefix}.{name}" if prefix else name,
                                               remove_duplicate)

    def modules(self) -> Iterator["Module"]:
        for _, m in self.named_modules():
            yield m

    def named_children(self) -> Iterator[tuple[str, "Module"]]:
        seen = set()
        for name, child in self._modules.items():
            if child is not None and id(child) not in seen:
                seen.add(id(child))
                yield name, child

    def children(self) -> Iterator["Module"]:
        for _, child in self.named_children():
            yield child

    def _named_members(self, registry: str, prefix: str, recurse: bool,
                       remove_duplicate: bool = True):
        seen = set()
        modules = (self.named_modules(prefix=prefix, remove_duplicate=remove_duplicate)
                   if recurse else [(prefix, self)])
        for mod_prefix, module in modules:
            for name, value in getattr(module, registry).items():
                if value is None or (remove_duplicate and id(value) in seen):
                    continue
                seen.add(id(value))
                yield (f"{mod_prefix}.{name}" if mod_prefix else name), value

    def named_parameters(self, prefix: str = "", recurse: bool = True,
                         remove_duplicate: bool = True) -> Iterator[tuple[str, Parameter]]:
        """``(dotted name, Parameter)`` pairs in torch's order; shared weights appear once."""
        return self._named_members("_parameters", prefix, recurse, remove_duplicate)

    def parameters(self, recurse: bool = True) -> Iterator[Parameter]:
        for _, p in self.named_parameters(recurse=recurse):
            yield p

    def named_buffers(self, prefix: str = "", recurse: bool = True,
                      remove_duplicate: bool = True) -> Iterator[tuple[str, Tensor]]:
        return self._named_members("_buffers", prefix, recurse, remove_duplicate)

    def buffers(self, recurse: bool = True) -> Iterator[Tensor]:
        for _, b in self.named_buffers(recurse=recurse):
            yield b

    def get_submodule(self, target: str) -> "Module":
        module = self
        for part in target.split(".") if target else []:
            child = module._modules.get(part)
            if child is None:
                raise AttributeError(f"{type(module).__name__} has no submodule {part!r} "
                                     f"(looking up {target!r})")
            module = child
        return module

    def apply(self, fn: Callable[["Module"], None]) -> "Module":
        """Call ``fn`` on every descendant, then on this module (e.g. custom initialisation)."""
        for child in self.children():
            child.apply(fn)
        fn(self)
        return self

    # -- modes and gradients ---------------------------------------------------------------
    def train(self, mode: bool = True) -> "Module":
        """Set training mode (dropout active) on this module and every descendant."""
        if not isinstance(mode, bool):
            raise ValueError("training mode is expected to be boolean")
        for m in self.modules():
            object.__setattr__(m, "training", mode)
        return self

    def eval(self) -> "Module":
        """Evaluation mode: ``train(False)``."""
        return self.train(False)

    def requires_grad_(self, requires_grad: bool = True) -> "Module":
        for p in self.parameters():
            p.requires_grad_(requires_grad)
        return self

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear every parameter's ``.grad``: drop it (default) or fill it with zeros."""
        zero_grads(self.parameters(), set_to_none)

    # -- device and dtype ------------------------------------------------------------------
    def _apply(self, fn: Callable[[Any], Any]) -> "Module":
        """Replace every parameter's and buffer's array with ``fn(array)``, in place.

        The Parameter objects stay the same, so an optimizer built before ``to()`` still
        updates the model.
        """
        for m in self.modules():
            for p in m._parameters.values():
                if p is None:
                    continue
                p._data = fn(p._data)
                if p.grad is not None:
                    p.grad._data = fn(p.grad._data)
            for name, b in m._buffers.items():
                if b is not None:
                    b._data = fn(b._data)
        return self

    def to(self, *args, dtype=None, device=None) -> "Module":
        """``to(dtype)``, ``to(device)`` or both; only floating point tensors change dtype."""
        for a in args:
            if isinstance(a, Tensor):
                dtype, device = a.dtype, a.device
            elif isinstance(a, str) and a.split(":")[0] in ("cpu", "cuda"):
                device = a
            else:
                dtype = a
        if dtype is not None:
            dtype = dtypes.as_dtype(dtype)
            if not dtype.is_floating_point:
                raise TypeError(f"nn.Module.to only accepts floating point dtypes, but got "
                                f"desired dtype={dtype}")
        xp = backend.xp_for(device) if device is not None else None

        def convert(a):
            if xp is not None and backend.xp_of(a) is not xp:
                a = xp.asarray(backend.to_numpy(a)) if xp is not np else backend.to_numpy(a)
            if dtype is not None and a.dtype.kind == "f" and a.dtype != dtype.np:
                a = a.astype(dtype.np)
            return a
        return self._apply(convert)

    def share_memory(self) -> "Module":
        """Move every CPU parameter and buffer into one shared-memory segment
        (``Tensor.share_memory_``), as torch's ``share_memory``: a gradmesh worker on this
        host then reads them where they are, with no copy per call."""
        tensors = {id(t): t for t in [*self.parameters(), *self.buffers()]
                   if t is not None and t.device == "cpu" and not t.is_shared()}
        if tensors:
            _share(list(tensors.values()))
        return self

    def double(self) -> "Module":
        return self.to(dtypes.float64)

    def float(self) -> "Module":
        return self.to(dtypes.float32)

    def half(self) -> "Module":
        return self.to(dtypes.float16)

    def cpu(self) -> "Module":
        return self.to("cpu")

    def cuda(self) -> "Module":
        return self.to("cuda")

    # -- state_dict ------------------------------------------------------------------------
    def state_dict(self, prefix: str = "", keep_vars: bool = False) -> "OrderedDict[str, Tensor]":
        """Parameters and persistent buffers by dotted name, sharing memory with the model.

        The values are detached Tensors (the Parameters themselves with ``keep_vars=True``).
        """
        out: OrderedDict[str, Tensor] = OrderedDict()
        # A module shared under two names is saved under both, as torch does.
        for mod_prefix, m in self.named_modules(prefix=prefix.rstrip("."),
                                                remove_duplicate=False):
            dot = f"{mod_prefix}." if mod_prefix else ""
            for name, p in m._parameters.items():
                if p is not None:
                    out[dot + name] = p if keep_vars else p.detach()
            for name, b in m._buffers.items():
                if b is not None and name not in m._non_persistent_buffers:
                    out[dot + name] = b if keep_vars else b.detach()
        return out

    def load_state_dict(self, state_dict: dict, strict: bool = True) -> _IncompatibleKeys:
        """Copy values (Tensors or arrays, e.g. from a torch model) into this model by key.

        Everything is checked before anything is copied: a shape mismatch always raises,
        and with ``strict=True`` so do missing and unexpected keys. Values are cast to each
        parameter's dtype and device.
        """
        if not isinstance(state_dict, dict):
            raise TypeError(f"expected state_dict to be dict-like, got "
                            f"{type(state_dict).__name__}")
        own = self.state_dict(keep_vars=True)
        missing = [k for k in own if k not in state_dict]
        unexpected = [k for k in state_dict if k not in own]
        errors = []
        sources = {}
        for key, target in own.items():
            if key not in state_dict:
                continue
            value = state_dict[key]
            array = value._data if isinstance(value, Tensor) else np.asarray(value)
            if tuple(array.shape) != tuple(target.shape):
                errors.append(f"size mismatch for {key}: copying a param with shape "
                              f"{tuple(array.shape)} from checkpoint, the shape in current "
                              f"model is {tuple(target.shape)}.")
            sources[key] = array
        if strict:
            if unexpected:
                errors.insert(0, "Unexpected key(s) in state_dict: "
                              + ", ".join(f'"{k}"' for k in unexpected) + ".")
            if missing:
                errors.insert(0, "Missing key(s) in state_dict: "
                              + ", ".join(f'"{k}"' for k in missing) + ".")
        if errors:
            hint = ("\n\tCheck that the checkpoint was saved from the same architecture, or "
                    "pass strict=False to skip missing and unexpected keys.")
            raise RuntimeError(f"Error(s) in loading state_dict for {type(self).__name__}:\n\t"
                               + "\n\t".join(errors) + hint)
        with no_grad():
            for key, array in sources.items():
                target = own[key]
                xp = backend.xp_of(target._data)
                if backend.xp_of(array) is not xp:
                    array = xp.asarray(backend.to_numpy(array))
                target._data[...] = array
        return _IncompatibleKeys(missing, unexpected)

    # -- display ---------------------------------------------------------------------------
    def extra_repr(self) -> str:
        """The text between the parentheses of this module's repr (its arguments)."""
        return ""

    def _get_name(self) -> str:
        return type(self).__name__

    def __repr__(self) -> str:
        extra = self.extra_repr()
        lines = extra.split("\n") if extra else []
        for name, child in self._modules.items():
            text = _add_indent(repr(child), 2)
            lines.append(f"({name}): {text}")
        head = self._get_name() + "("
        if not self._modules and len(lines) <= 1:
            return head + (lines[0] if lines else "") + ")"
        return head + "\n  " + "\n  ".join(lines) + "\n)"


def _add_indent(text: str, spaces: int) -> str:
    first, *rest = text.split("\n")
    return "\n".join([first] + [" " * spaces + line for line in rest])


# ===================================================================== containers =====

class Sequential(Module):
    """Modules applied in order; index, slice, ``len`` and iterate like a list.

    >>> import gradmesh.core as gm
    >>> len(gm.nn.Sequential(gm.nn.Linear(2, 2), gm.nn.Tanh()))
    2
    """

    def __init__(self, *args: Any):         # Modules, or one OrderedDict of them
        super().__init__()
        if len(args) == 1 and isinstance(args[0], OrderedDict):
            for name, module in args[0].items():
                self.add_module(name, module)
        else:
            for i, module in enumerate(args):
                self.add_module(str(i), module)

    def _index(self, idx: int) -> str:
        n = len(self._modules)
        if not -n <= idx < n:
            raise IndexError(f"index {idx} is out of range for {type(self).__name__} of "
                             f"length {n}")
        return list(self._modules)[idx % n]

    def __getitem__(self, idx):
        if isinstance(idx, slice):
            return type(self)(OrderedDict(list(self._modules.items())[idx]))
        return self._modules[self._index(idx)]

    def __setitem__(self, idx: int, module: Module) -> None:
        self.add_module(self._index(idx), module)

    def __delitem__(self, idx) -> None:
        keys = list(self._modules)[idx] if isinstance(idx, slice) else [self._index(idx)]
        for key in keys:
            del self._modules[key]
        # Renumber so that str(i) keys stay 0..n-1, as torch does.
        items = list(self._modules.items())
        self._modules.clear()
        for i, (_, m) in enumerate(items):
            self._modules[str(i)] = m

    def __len__(self) -> int:
        return len(self._modules)

    def __iter__(self) -> Iterator[Module]:
        return iter(self._modules.values())

    def append(self, module: Module) -> "Sequential":
        self.add_module(str(len(self)), module)
        return self

    def forward(self, x):
        for module in self._modules.values():
            x = module(x)
        return x


class ModuleList(Module):
    """A list of modules whose parameters the parent sees; it has no ``forward``."""

    def __init__(self, modules: Iterable[Module] | None = None):
        super().__init__()
        if modules is not None:
            self.extend(modules)

    def _index(self, idx: int) -> str:
        n = len(self._modules)
        if not -n <= idx < n:
            raise IndexError(f"index {idx} is out of range for ModuleList of length {n}")
        return str(idx % n)

    def __getitem__(self, idx):
        if isinstance(idx, slice):
            return ModuleList(list(self._modules.values())[idx])
        return self._modules[self._index(idx)]

    def __setitem__(self, idx: int, module: Module) -> None:
        self.add_module(self._index(idx), module)

    def __delitem__(self, idx) -> None:
        modules = list(self._modules.values())
        del modules[idx if isinstance(idx, slice) else int(self._index(idx))]
        self._modules.clear()
        self.extend(modules)

    def __len__(self) -> int:
        return len(self._modules)

    def __iter__(self) -> Iterator[Module]:
        return iter(self._modules.values())

    def append(self, module: Module) -> "ModuleList":
        self.add_module(str(len(self)), module)
        return self

    def extend(self, modules: Iterable[Module]) -> "ModuleList":
        for m in modules:
            self.append(m)
        return self

    def insert(self, index: int, module: Module) -> None:
        modules = list(self._modules.values())
        modules.insert(index, module)
        self._modules.clear()
        self.extend(modules)

    def __repr__(self) -> str:
        # Like torch: runs of identical modules print once, as "(0-11): 12 x Block(...)".
        reprs = [repr(m) for m in self]
        if not reprs:
            return self._get_name() + "()"
        runs: list[list] = []
        for i, r in enumerate(reprs):
            if runs and runs[-1][2] == r:
                runs[-1][1] = i
            else:
                runs.append([i, i, r])
        lines = [_add_indent(f"({a}): {r}" if a == b else f"({a}-{b}): {b - a + 1} x {r}", 2)
                 for a, b, r in runs]
        return self._get_name() + "(\n  " + "\n  ".join(lines) + "\n)"


# ========================================================================= layers =====

class Identity(Module):
    """Returns its input; accepts and ignores any arguments."""

    def __init__(self, *args, **kwargs):
        super().__init__()

    def forward(self, x):
        return x


class Linear(Module):
    """``y = x @ weight.T + bias``; weight ``(out_features, in_features)``.

    Initialised like torch: weight ~ kaiming_uniform(a=sqrt(5)) = U(±1/sqrt(in_features)),
    bias ~ U(±1/sqrt(in_features)).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 device=None, dtype=None):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = Parameter(_empty((out_features, in_features), dtype, device))
        if bias:
            self.bias = Parameter(_empty((out_features,), dtype, device))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        _reset_weight_and_bias(self.weight, self.bias)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}")


def _empty(shape: tuple, dtype, device) -> Tensor:
    dt = dtypes.as_dtype(dtype) if dtype is not None else dtypes.default_float
    return Tensor(backend.xp_for(device).zeros(shape, dtype=dt.np))


def _reset_weight_and_bias(weight: Tensor, bias: Tensor | None) -> None:
    """torch's default for Linear and ConvNd (``reset_parameters``)."""
    init.kaiming_uniform_(weight, a=math.sqrt(5))
    if bias is not None:
        fan_in, _ = init.calculate_fan_in_and_fan_out(weight)
        bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
        init.uniform_(bias, -bound, bound)


def _pair(v, name: str) -> tuple[int, int]:
    if isinstance(v, (tuple, list)):
        if len(v) != 2:
            raise ValueError(f"{name} must be an int or a pair of ints, got {v!r}")
        return int(v[0]), int(v[1])
    return int(v), int(v)


class Conv2d(Module):
    """2-D convolution over ``(N, C_in, H, W)``; weight ``(C_out, C_in // groups, kH, kW)``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 dilation=1, groups: int = 1, bias: bool = True, padding_mode: str = "zeros",
                 device=None, dtype=None):
        super().__init__()
        if groups <= 0 or in_channels % groups or out_channels % groups:
            raise ValueError(f"Conv2d: in_channels ({in_channels}) and out_channels "
                             f"({out_channels}) must both be divisible by groups ({groups})")
        if padding_mode != "zeros":
            raise NotImplementedError(f"Conv2d: padding_mode={padding_mode!r} is not "
                                      f"supported; use 'zeros'")
        if isinstance(padding, str) and padding not in ("valid", "same"):
            raise ValueError(f"Conv2d: invalid padding string {padding!r}; use 'valid', "
                             f"'same' or ints")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = _pair(kernel_size, "kernel_size")
        self.stride = _pair(stride, "stride")
        self.padding = padding if isinstance(padding, str) else _pair(padding, "padding")
        self.dilation = _pair(dilation, "dilation")
        self.groups = groups
        self.padding_mode = padding_mode
        self.weight = Parameter(_empty((out_channels, in_channels // groups) + self.kernel_size,
                                       dtype, device))
        if bias:
            self.bias = Parameter(_empty((out_channels,), dtype, device))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        _reset_weight_and_bias(self.weight, self.bias)

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.weight, self.bias, stride=self.stride, padding=self.padding,
                        dilation=self.dilation, groups=self.groups)

    def extra_repr(self) -> str:
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
             f"stride={self.stride}")
        if self.padding != (0, 0):
            s += f", padding={self.padding}"
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.bias is None:
            s += ", bias=False"
        return s


class Embedding(Module):
    """A lookup table ``weight[indices]``; weight ``(num_embeddings, embedding_dim)`` ~ N(0, 1)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None,
                 device=None, dtype=None):
        super().__init__()
        if padding_idx is not None:
            if not -num_embeddings <= padding_idx < num_embeddings:
                raise ValueError(f"Embedding: padding_idx {padding_idx} must be within "
                                 f"num_embeddings ({num_embeddings})")
            padding_idx %= num_embeddings
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.padding_idx = padding_idx
        self.weight = Parameter(_empty((num_embeddings, embedding_dim), dtype, device))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init.normal_(self.weight)
        if self.padding_idx is not None:
            self.weight._data[self.padding_idx] = 0

    def forward(self, indices: Tensor) -> Tensor:
        return F.embedding(indices, self.weight, padding_idx=self.padding_idx)

    def extra_repr(self) -> str:
        s = f"{self.num_embeddings}, {self.embedding_dim}"
        return s + (f", padding_idx={self.padding_idx}" if self.padding_idx is not None else "")


class LayerNorm(Module):
    """Normalise over the trailing ``normalized_shape`` dims; weight ones, bias zeros."""

    def __init__(self, normalized_shape, eps: float = 1e-5, elementwise_affine: bool = True,
                 bias: bool = True, device=None, dtype=None):
        super().__init__()
        if isinstance(normalized_shape, int):
            normalized_shape = (normalized_shape,)
        self.normalized_shape = tuple(int(s) for s in normalized_shape)
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        if elementwise_affine:
            self.weight = Parameter(_empty(self.normalized_shape, dtype, device))
            if bias:
                self.bias = Parameter(_empty(self.normalized_shape, dtype, device))
            else:
                self.register_parameter("bias", None)
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.weight is not None:
            init.ones_(self.weight)
        if self.bias is not None:
            init.zeros_(self.bias)

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return (f"{self.normalized_shape}, eps={self.eps}, "
                f"elementwise_affine={self.elementwise_affine}, bias={self.bias is not None}")


class Dropout(Module):
    """Zero each element with probability ``p`` in training and scale the rest by 1/(1-p);
    the identity in ``eval()`` mode."""

    def __init__(self, p: float = 0.5, inplace: bool = False):
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")
        self.p = p
        self.inplace = inplace

    def forward(self, x: Tensor) -> Tensor:
        return F.dropout(x, p=self.p, training=self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}, inplace={self.inplace}"


class Flatten(Module):
    """Flatten dims ``start_dim..end_dim`` into one (by default all but the batch dim)."""

    def __init__(self, start_dim: int = 1, end_dim: int = -1):
        super().__init__()
        self.start_dim = start_dim
        self.end_dim = end_dim

    def forward(self, x: Tensor) -> Tensor:
        n = max(x.ndim, 1)
        start, end = self.start_dim % n, self.end_dim % n
        if start > end:
            raise ValueError(f"Flatten: start_dim ({self.start_dim}) comes after end_dim "
                             f"({self.end_dim}) for an input of shape {tuple(x.shape)}")
        shape = x.shape
        merged = 1
        for s in shape[start:end + 1]:
            merged *= s
        return CF.reshape(x, shape[:start] + (merged,) + shape[end + 1:])

    def extra_repr(self) -> str:
        return f"start_dim={self.start_dim}, end_dim={self.end_dim}"


class MaxPool2d(Module):
    """Max over ``kernel_size`` windows (stride defaults to the kernel size)."""

    def __init__(self, kernel_size, stride=None, padding=0, dilation=1,
                 return_indices: bool = False, ceil_mode: bool = False):
        super().__init__()
        self.kernel_size = kernel_size
        self.stride = stride if stride is not None else kernel_size
        self.padding = padding
        self.dilation = dilation
        self.return_indices = return_indices
        self.ceil_mode = ceil_mode

    def forward(self, x: Tensor) -> Tensor:
        return F.max_pool2d(
            x, self.kernel_size, stride=self.stride, padding=self.padding,
            dilation=self.dilation, ceil_mode=self.ceil_mode,
            return_indices=self.return_indices)

    def extra_repr(self) -> str:
        return (f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}, "
                f"dilation={self.dilation}, ceil_mode={self.ceil_mode}")


class AvgPool2d(Module):
    """Mean over ``kernel_size`` windows (stride defaults to the kernel size)."""

    def __init__(self, kernel_size, stride=None, padding=0, ceil_mode: bool = False,
                 count_include_pad: bool = True, divisor_override: int | None = None):
        super().__init__()
        self.kernel_size = kernel_size
        self.stride = stride if stride is not None else kernel_size
        self.padding = padding
        self.ceil_mode = ceil_mode
        self.count_include_pad = count_include_pad
        self.divisor_override = divisor_override

    def forward(self, x: Tensor) -> Tensor:
        return F.avg_pool2d(
            x, self.kernel_size, stride=self.stride, padding=self.padding,
            ceil_mode=self.ceil_mode, count_include_pad=self.count_include_pad,
            divisor_override=self.divisor_override)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"


# ==================================================================== activations =====

class ReLU(Module):
    def __init__(self, inplace: bool = False):
        super().__init__()
        self.inplace = inplace      # accepted for torch compatibility; results are new tensors

    def forward(self, x: Tensor) -> Tensor:
        return CF.relu(x)

    def extra_repr(self) -> str:
        return "inplace=True" if self.inplace else ""


class Tanh(Module):
    def forward(self, x: Tensor) -> Tensor:
        return CF.tanh(x)


class Sigmoid(Module):
    def forward(self, x: Tensor) -> Tensor:
        return CF.sigmoid(x)


class GELU(Module):
    def __init__(self, approximate: str = "none"):
        super().__init__()
        if approximate not in ("none", "tanh"):
            raise ValueError(f"GELU: approximate must be 'none' or 'tanh', got {approximate!r}")
        self.approximate = approximate

    def forward(self, x: Tensor) -> Tensor:
        return CF.gelu(x, approximate=self.approximate)

    def extra_repr(self) -> str:
        return f"approximate={self.approximate!r}"


class LeakyReLU(Module):
    def __init__(self, negative_slope: float = 0.01, inplace: bool = False):
        super().__init__()
        self.negative_slope = negative_slope
        self.inplace = inplace

    def forward(self, x: Tensor) -> Tensor:
        return CF.leaky_relu(x, self.negative_slope)

    def extra_repr(self) -> str:
        return f"negative_slope={self.negative_slope}" + (", inplace=True" if self.inplace
                                                           else "")


def _softmax_dim(name: str, dim: int | None, ndim: int) -> int:
    if dim is not None:
        return dim
    # torch's legacy rule for a missing dim, with its warning.
    warnings.warn(f"Implicit dimension choice for {name} has been deprecated. Change the call "
                  f"to include dim=X as an argument.", stacklevel=3)
    return 0 if ndim in (0, 1, 3) else 1


class Softmax(Module):
    def __init__(self, dim: int | None = None):
        super().__init__()
        self.dim = dim

    def forward(self, x: Tensor) -> Tensor:
        return F.softmax(x, _softmax_dim("softmax", self.dim, x.ndim))

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


class LogSoftmax(Module):
    def __init__(self, dim: int | None = None):
        super().__init__()
        self.dim = dim

    def forward(self, x: Tensor) -> Tensor:
        return F.log_softmax(x, _softmax_dim("log_softmax", self.dim, x.ndim))

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


# ========================================================================= losses =====

def _check_reduction(reduction: str) -> str:
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"{reduction!r} is not a valid value for reduction; use 'mean', "
                         f"'sum' or 'none'")
    return reduction


class CrossEntropyLoss(Module):
    """``log_softmax`` then ``nll_loss`` over class logits ``(N, C, ...)``."""

    def __init__(self, weight: Tensor | None = None, ignore_index: int = -100,
                 reduction: str = "mean", label_smoothing: float = 0.0):
        super().__init__()
        self.register_buffer("weight", weight)
        self.ignore_index = ignore_index
        self.reduction = _check_reduction(reduction)
        self.label_smoothing = label_smoothing

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return F.cross_entropy(
            input, target, weight=self.weight, ignore_index=self.ignore_index,
            reduction=self.reduction, label_smoothing=self.label_smoothing)


class NLLLoss(Module):
    """Negative log-likelihood of log-probabilities ``(N, C, ...)`` at class ``target``."""

    def __init__(self, weight: Tensor | None = None, ignore_index: int = -100,
                 reduction: str = "mean"):
        super().__init__()
        self.register_buffer("weight", weight)
        self.ignore_index = ignore_index
        self.reduction = _check_reduction(reduction)

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return F.nll_loss(input, target, weight=self.weight, ignore_index=self.ignore_index,
                          reduction=self.reduction)


class MSELoss(Module):
    """Mean (or summed) squared error."""

    def __init__(self, reduction: str = "mean"):
        super().__init__()
        self.reduction = _check_reduction(reduction)

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return F.mse_loss(input, target, reduction=self.reduction)


class BCEWithLogitsLoss(Module):
    """Sigmoid + binary cross-entropy in one numerically stable step."""

    def __init__(self, weight: Tensor | None = None, reduction: str = "mean",
                 pos_weight: Tensor | None = None):
        super().__init__()
        self.register_buffer("weight", weight)
        self.register_buffer("pos_weight", pos_weight)
        self.reduction = _check_reduction(reduction)

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return F.binary_cross_entropy_with_logits(
            input, target, weight=self.weight, reduction=self.reduction,
            pos_weight=self.pos_weight)


# ================================= activations, norms, adaptive pooling, convolutions =====
# (SiLU, Mish, Hardswish, BatchNorm1d/2d, GroupNorm, RMSNorm, AdaptiveAvgPool2d, Conv1d,
# ConvTranspose2d, Upsample), over the functions of the same section of nn/functional.py.

class _InplaceActivation(Module):
    """An elementwise activation with torch's (ignored) ``inplace`` flag."""
    _fn: Callable[[Tensor], Tensor]

    def __init__(self, inplace: bool = False):
        super().__init__()
        self.inplace = inplace      # accepted for torch compatibility; results are new tensors

    def forward(self, x: Tensor) -> Tensor:
        return type(self)._fn(x)

    def extra_repr(self) -> str:
        return "inplace=True" if self.inplace else ""


class SiLU(_InplaceActivation):
    _fn = F.silu


class Mish(_InplaceActivation):
    _fn = F.mish


class Hardswish(_InplaceActivation):
    _fn = F.hardswish


def _ones_and_zeros(module: Module, shape: tuple, affine: bool, bias: bool, dtype,
                    device) -> None:
    """``weight`` (ones) and ``bias`` (zeros) Parameters of ``shape`` where ``affine`` (and
    ``bias``), None placeholders otherwise."""
    for name, wanted, fill in (("weight", affine, init.ones_), ("bias", affine and bias,
                                                                 init.zeros_)):
        if wanted:
            setattr(module, name, Parameter(_empty(shape, dtype, device)))
            fill(getattr(module, name))
        else:
            module.register_parameter(name, None)


class _BatchNorm(Module):
    """Batch normalisation over (N, C, *) as torch's: batch statistics in training (and
    when no running statistics are tracked), running ones in eval. ``momentum=None`` makes
    the running statistics a cumulative average over ``num_batches_tracked`` batches.

    Updating the running statistics writes the module's buffers, which a traced graph
    cannot do: trace a model with BatchNorm in eval mode (``model.eval()``)."""
    _ndims: tuple

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, device=None,
                 dtype=None, *, bias: bool = True):
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
            self.register_buffer("num_batches_tracked", Tensor(
                backend.xp_for(device).zeros((), dtype=np.int64)))
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
            raise ValueError(f"{type(self).__name__}: expected "
                             f"{' or '.join(f'{d}D' for d in self._ndims)} input (got "
                             f"{x.ndim}D input of shape {tuple(x.shape)})")
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                factor = 1.0 / float(self.num_batches_tracked.item())
        use_batch = self.training or self.running_mean is None
        keep = not self.training or self.track_running_stats
        return F.batch_norm(x, self.running_mean if keep else None,
                            self.running_var if keep else None, self.weight, self.bias,
                            use_batch, factor, self.eps)

    def extra_repr(self) -> str:
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
                f"affine={self.affine}, bias={self.bias is not None}, "
                f"track_running_stats={self.track_running_stats}")


class BatchNorm1d(_BatchNorm):
    """Batch normalisation of (N, C) or (N, C, L)."""
    _ndims = (2, 3)


class BatchNorm2d(_BatchNorm):
    """Batch normalisation of (N, C, H, W)."""
    _ndims = (4,)


class GroupNorm(Module):
    """Normalise (N, C, *) over groups of C / num_groups channels; per-channel affine."""

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5,
                 affine: bool = True, device=None, dtype=None, *, bias: bool = True):
        super().__init__()
        if num_groups < 1 or num_channels % num_groups:
            raise ValueError(f"GroupNorm: num_channels ({num_channels}) must be divisible by "
                             f"num_groups ({num_groups})")
        self.num_groups, self.num_channels = num_groups, num_channels
        self.eps, self.affine = eps, affine
        _ones_and_zeros(self, (num_channels,), affine, bias, dtype, device)

    def forward(self, x: Tensor) -> Tensor:
        return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return (f"{self.num_groups}, {self.num_channels}, eps={self.eps}, affine={self.affine}, "
                f"bias={self.bias is not None}")


class RMSNorm(Module):
    """x / sqrt(mean(x², trailing dims) + eps) * weight; ``eps=None``: the dtype's eps."""

    def __init__(self, normalized_shape, eps: float | None = None,
                 elementwise_affine: bool = True, device=None, dtype=None):
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
        return (f"{self.normalized_shape}, eps={self.eps}, "
                f"elementwise_affine={self.elementwise_affine}")


class AdaptiveAvgPool2d(Module):
    """Mean over torch's adaptive windows, to ``output_size`` (H, W) (None: keep it)."""

    def __init__(self, output_size):
        super().__init__()
        self.output_size = output_size

    def forward(self, x: Tensor) -> Tensor:
        return F.adaptive_avg_pool2d(x, self.output_size)

    def extra_repr(self) -> str:
        return f"output_size={self.output_size}"


def _check_conv(name: str, in_channels: int, out_channels: int, groups: int,
                padding_mode: str) -> None:
    if groups <= 0 or in_channels % groups or out_channels % groups:
        raise ValueError(f"{name}: in_channels ({in_channels}) and out_channels "
                         f"({out_channels}) must both be divisible by groups ({groups})")
    if padding_mode != "zeros":
        raise NotImplementedError(f"{name}: padding_mode={padding_mode!r} is not supported; "
                                  f"use 'zeros' (or F.pad before the convolution)")


def _single(v, name: str) -> tuple[int]:
    if isinstance(v, (tuple, list)):
        if len(v) != 1:
            raise ValueError(f"{name} must be an int or a 1-tuple, got {v!r}")
        return (int(v[0]),)
    return (int(v),)


def _conv_repr(conv: Module, **defaults) -> str:
    """torch's ConvNd repr: the attributes in ``defaults`` only where they differ."""
    s = (f"{conv.in_channels}, {conv.out_channels}, kernel_size={conv.kernel_size}, "
         f"stride={conv.stride}")
    for name, default in defaults.items():
        if getattr(conv, name) != default:
            s += f", {name}={getattr(conv, name)}"
    if conv.groups != 1:
        s += f", groups={conv.groups}"
    return s + (", bias=False" if conv.bias is None else "")


class Conv1d(Module):
    """1-D convolution over (N, C_in, L); weight (C_out, C_in // groups, k)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 dilation=1, groups: int = 1, bias: bool = True, padding_mode: str = "zeros",
                 device=None, dtype=None):
        super().__init__()
        _check_conv("Conv1d", in_channels, out_channels, groups, padding_mode)
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size = _single(kernel_size, "kernel_size")
        self.stride, self.dilation = _single(stride, "stride"), _single(dilation, "dilation")
        self.padding = padding if isinstance(padding, str) else _single(padding, "padding")
        self.padding_mode = padding_mode
        self.weight = Parameter(_empty((out_channels, in_channels // groups) +
                                       self.kernel_size, dtype, device))
        if bias:
            self.bias = Parameter(_empty((out_channels,), dtype, device))
        else:
            self.register_parameter("bias", None)
        _reset_weight_and_bias(self.weight, self.bias)

    def forward(self, x: Tensor) -> Tensor:
        return F.conv1d(x, self.weight, self.bias, self.stride, self.padding, self.dilation,
                        self.groups)

    def extra_repr(self) -> str:
        return _conv_repr(self, padding=(0,), dilation=(1,))


class ConvTranspose2d(Module):
    """Transposed 2-D convolution; weight (C_in, C_out // groups, kH, kW)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 output_padding=0, groups: int = 1, bias: bool = True, dilation=1,
                 padding_mode: str = "zeros", device=None, dtype=None):
        super().__init__()
        _check_conv("ConvTranspose2d", in_channels, out_channels, groups, padding_mode)
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size = _pair(kernel_size, "kernel_size")
        self.stride, self.padding = _pair(stride, "stride"), _pair(padding, "padding")
        self.output_padding = _pair(output_padding, "output_padding")
        self.dilation = _pair(dilation, "dilation")
        self.padding_mode = padding_mode
        self.weight = Parameter(_empty((in_channels, out_channels // groups) +
                                       self.kernel_size, dtype, device))
        if bias:
            self.bias = Parameter(_empty((out_channels,), dtype, device))
        else:
            self.register_parameter("bias", None)
        _reset_weight_and_bias(self.weight, self.bias)

    def forward(self, x: Tensor) -> Tensor:
        return F.conv_transpose2d(x, self.weight, self.bias, self.stride, self.padding,
                                  self.output_padding, self.groups, self.dilation)

    def extra_repr(self) -> str:
        return _conv_repr(self, padding=(0, 0), output_padding=(0, 0), dilation=(1, 1))


class Upsample(Module):
    """``F.interpolate`` as a layer: to ``size`` or by ``scale_factor``."""

    def __init__(self, size=None, scale_factor=None, mode: str = "nearest",
                 align_corners: bool | None = None, recompute_scale_factor: bool | None = None):
        super().__init__()
        self.size, self.mode, self.align_corners = size, mode, align_corners
        self.scale_factor = float(scale_factor) if isinstance(scale_factor, (int, float)) \
            else (tuple(float(f) for f in scale_factor) if scale_factor else None)
        self.recompute_scale_factor = recompute_scale_factor

    def forward(self, x: Tensor) -> Tensor:
        return F.interpolate(x, self.size, self.scale_factor, self.mode, self.align_corners,
                             self.recompute_scale_factor)

    def extra_repr(self) -> str:
        what = f"scale_factor={self.scale_factor}" if self.scale_factor is not None else \
            f"size={self.size}"
        return f"{what}, mode={self.mode!r}"
# ==================================================================== transformers ======

import copy  # noqa: E402


class MultiheadAttention(Module):
    """Attention over ``num_heads`` heads, as ``torch.nn.MultiheadAttention``: parameters
    ``in_proj_weight`` (3E, E), ``in_proj_bias`` (3E,) and ``out_proj`` (a Linear), so
    ``state_dict`` keys match torch's. Inputs (L, N, E), or (N, L, E) with
    ``batch_first``; ``forward`` returns ``(output, weights or None)``."""

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 add_bias_kv: bool = False, add_zero_attn: bool = False, kdim=None, vdim=None,
                 batch_first: bool = False, device=None, dtype=None):
        super().__init__()
        if add_bias_kv or add_zero_attn:
            raise NotImplementedError("MultiheadAttention: add_bias_kv and add_zero_attn are "
                                      "not supported")
        if embed_dim % num_heads:
            raise ValueError(f"MultiheadAttention: embed_dim ({embed_dim}) must be divisible "
                             f"by num_heads ({num_heads})")
        self.embed_dim, self.num_heads, self.dropout = embed_dim, num_heads, dropout
        self.batch_first = batch_first
        self.head_dim = embed_dim // num_heads
        self.kdim = embed_dim if kdim is None else kdim
        self.vdim = embed_dim if vdim is None else vdim
        self._qkv_same_embed_dim = self.kdim == embed_dim and self.vdim == embed_dim
        same = self._qkv_same_embed_dim     # one (3E, E) weight, else one per projection
        self.register_parameter("in_proj_weight", Parameter(
            _empty((3 * embed_dim, embed_dim), dtype, device)) if same else None)
        for name, width in (("q", embed_dim), ("k", self.kdim), ("v", self.vdim)):
            self.register_parameter(f"{name}_proj_weight", None if same else Parameter(
                _empty((embed_dim, width), dtype, device)))
        if bias:
            self.in_proj_bias = Parameter(_empty((3 * embed_dim,), dtype, device))
        else:
            self.register_parameter("in_proj_bias", None)
        self.out_proj = Linear(embed_dim, embed_dim, bias=bias, device=device, dtype=dtype)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        for w in self._projections():
            init.xavier_uniform_(w)
        if self.in_proj_bias is not None:
            init.zeros_(self.in_proj_bias)
            init.zeros_(self.out_proj.bias)

    def forward(self, query: Tensor, key: Tensor, value: Tensor,
                key_padding_mask: Tensor | None = None, need_weights: bool = True,
                attn_mask: Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False):
        if is_causal and attn_mask is None:
            raise RuntimeError("MultiheadAttention: is_causal is a hint that attn_mask is the "
                               "causal mask; pass that attn_mask too")
        return F.multi_head_attention(
            query, key, value, self.num_heads,
            self.in_proj_weight if self._qkv_same_embed_dim else self._projections(),
            self.in_proj_bias, self.out_proj.weight, self.out_proj.bias, dropout_p=self.dropout,
            training=self.training, key_padding_mask=key_padding_mask,
            need_weights=need_weights, attn_mask=attn_mask,
            average_attn_weights=average_attn_weights, batch_first=self.batch_first)

    def _projections(self) -> tuple:
        if self._qkv_same_embed_dim:
            return (self.in_proj_weight,)
        return (self.q_proj_weight, self.k_proj_weight, self.v_proj_weight)


def _activation(activation) -> Callable[[Tensor], Tensor]:
    if callable(activation):
        return activation
    if activation in ("relu", "gelu"):
        return getattr(F, activation)
    raise RuntimeError(f"activation should be relu/gelu, not {activation}")


class _TransformerLayer(Module):
    """What the encoder and decoder layers share: the feed-forward block and its norms."""

    def _feed_forward_init(self, d_model, dim_feedforward, dropout, activation, layer_norm_eps,
                           norm_first, bias, norms, device, dtype) -> None:
        kw = {"device": device, "dtype": dtype}
        self.linear1 = Linear(d_model, dim_feedforward, bias=bias, **kw)
        self.dropout = Dropout(dropout)
        self.linear2 = Linear(dim_feedforward, d_model, bias=bias, **kw)
        self.norm_first = norm_first
        for i in range(1, norms + 1):
            setattr(self, f"norm{i}", LayerNorm(d_model, eps=layer_norm_eps, bias=bias, **kw))
        for i in range(1, norms + 1):
            setattr(self, f"dropout{i}", Dropout(dropout))
        self.activation = _activation(activation)

    def _ff_block(self, drop: Module) -> Callable[[Tensor], Tensor]:
        return lambda x: drop(self.linear2(self.dropout(self.activation(self.linear1(x)))))

    def _residual(self, x: Tensor, block, norm: Module) -> Tensor:
        """``x + block(norm(x))`` with ``norm_first``, else ``norm(x + block(x))``."""
        return x + block(norm(x)) if self.norm_first else norm(x + block(x))


def _attention_block(attn: MultiheadAttention, drop: Module, mask, padding, is_causal,
                     memory=None) -> Callable[[Tensor], Tensor]:
    def block(x: Tensor) -> Tensor:
        kv = x if memory is None else memory
        out = attn(x, kv, kv, attn_mask=mask, key_padding_mask=padding, need_weights=False,
                   is_causal=is_causal)[0]
        return drop(out)
    return block


class TransformerEncoderLayer(_TransformerLayer):
    """Self-attention and a feed-forward block, each with a residual and a LayerNorm (after
    it, or before it with ``norm_first``), as ``torch.nn.TransformerEncoderLayer``."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int = 2048,
                 dropout: float = 0.1, activation="relu", layer_norm_eps: float = 1e-5,
                 batch_first: bool = False, norm_first: bool = False, bias: bool = True,
                 device=None, dtype=None):
        super().__init__()
        self.self_attn = MultiheadAttention(d_model, nhead, dropout=dropout, bias=bias,
                                            batch_first=batch_first, device=device, dtype=dtype)
        self._feed_forward_init(d_model, dim_feedforward, dropout, activation, layer_norm_eps,
                                norm_first, bias, 2, device, dtype)

    def forward(self, src: Tensor, src_mask: Tensor | None = None,
                src_key_padding_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        sa = _attention_block(self.self_attn, self.dropout1, src_mask, src_key_padding_mask,
                              is_causal)
        x = self._residual(src, sa, self.norm1)
        return self._residual(x, self._ff_block(self.dropout2), self.norm2)


class TransformerDecoderLayer(_TransformerLayer):
    """Self-attention, attention over ``memory`` and a feed-forward block, each with a
    residual and a LayerNorm, as ``torch.nn.TransformerDecoderLayer``."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int = 2048,
                 dropout: float = 0.1, activation="relu", layer_norm_eps: float = 1e-5,
                 batch_first: bool = False, norm_first: bool = False, bias: bool = True,
                 device=None, dtype=None):
        super().__init__()
        kw = {"dropout": dropout, "bias": bias, "batch_first": batch_first, "device": device,
              "dtype": dtype}
        self.self_attn = MultiheadAttention(d_model, nhead, **kw)
        self.multihead_attn = MultiheadAttention(d_model, nhead, **kw)
        self._feed_forward_init(d_model, dim_feedforward, dropout, activation, layer_norm_eps,
                                norm_first, bias, 3, device, dtype)

    def forward(self, tgt: Tensor, memory: Tensor, tgt_mask: Tensor | None = None,
                memory_mask: Tensor | None = None,
                tgt_key_padding_mask: Tensor | None = None,
                memory_key_padding_mask: Tensor | None = None, tgt_is_causal: bool = False,
                memory_is_causal: bool = False) -> Tensor:
        sa = _attention_block(self.self_attn, self.dropout1, tgt_mask, tgt_key_padding_mask,
                              tgt_is_causal)
        ca = _attention_block(self.multihead_attn, self.dropout2, memory_mask,
                              memory_key_padding_mask, memory_is_causal, memory)
        x = self._residual(tgt, sa, self.norm1)
        x = self._residual(x, ca, self.norm2)
        return self._residual(x, self._ff_block(self.dropout3), self.norm3)


class TransformerEncoder(Module):
    """``num_layers`` copies of ``encoder_layer`` (``layers.0``, ...), then ``norm`` if given,
    as ``torch.nn.TransformerEncoder``."""

    def __init__(self, encoder_layer: TransformerEncoderLayer, num_layers: int,
                 norm: Module | None = None, enable_nested_tensor: bool = True,
                 mask_check: bool = True):
        super().__init__()
        self.layers = ModuleList(copy.deepcopy(encoder_layer) for _ in range(num_layers))
        self.num_layers, self.norm = num_layers, norm

    def forward(self, src: Tensor, mask: Tensor | None = None,
                src_key_padding_mask: Tensor | None = None,
                is_causal: bool | None = None) -> Tensor:
        for layer in self.layers:
            src = layer(src, src_mask=mask, src_key_padding_mask=src_key_padding_mask,
                        is_causal=bool(is_causal))
        return src if self.norm is None else self.norm(src)


class TransformerDecoder(Module):
    """``num_layers`` copies of ``decoder_layer`` (``layers.0``, ...), then ``norm`` if given,
    as ``torch.nn.TransformerDecoder``."""

    def __init__(self, decoder_layer: TransformerDecoderLayer, num_layers: int,
                 norm: Module | None = None):
        super().__init__()
        self.layers = ModuleList(copy.deepcopy(decoder_layer) for _ in range(num_layers))
        self.num_layers, self.norm = num_layers, norm

    def forward(self, tgt: Tensor, memory: Tensor, tgt_mask: Tensor | None = None,
                memory_mask: Tensor | None = None,
                tgt_key_padding_mask: Tensor | None = None,
                memory_key_padding_mask: Tensor | None = None,
                tgt_is_causal: bool | None = None, memory_is_causal: bool = False) -> Tensor:
        for layer in self.layers:
            tgt = layer(tgt, memory, tgt_mask, memory_mask, tgt_key_padding_mask,
                        memory_key_padding_mask, bool(tgt_is_causal), memory_is_causal)
        return tgt if self.norm is None else self.norm(tgt)


# ================================================================ recurrent layers ======
# Compositions over time steps: the input projection of a whole sequence is one matmul,
# then each step is a cell over that step's slice. A traced graph unrolls the loop, so it
# fixes the sequence length (a graph per length); the batch size stays free where the
# initial states are zeros (``hx=None``) and the graph reads ``output`` rather than slicing
# ``h_n`` by layer (``h_n[-1]`` records the batch size; ``output[:, -1]`` does not). A cell maps
# (step input projection, state tuple, w_hh, b_hh) to (output h, new state tuple); a state
# of Nones is the zero initial state: h is one zero row that broadcasts over the batch
# (w_hh still gets its zero gradient, as in torch) and the ``f * c`` and ``z * h`` terms
# are left out; exact, and no constant shaped by the batch size in a traced graph.

from ..factories import zeros as _zeros  # noqa: E402
from ..registry import OpError, fmt  # noqa: E402


def _recurrent(h: Tensor | None, w_hh: Tensor, b_hh: Tensor | None) -> Tensor:
    """``h @ w_hh.T + b_hh``, where ``h=None`` is zeros: a (1, 4H) or (1, 3H) row."""
    if h is None:
        h = _zeros((1, w_hh.shape[1]), dtype=w_hh.dtype, device=w_hh.device)
    return F.linear(h, w_hh, b_hh)


def _lstm_cell(xw: Tensor, state, w_hh: Tensor, b_hh: Tensor | None):
    h, c = state
    i, f, g, o = CF.chunk(xw + _recurrent(h, w_hh, b_hh), 4, -1)
    c = CF.sigmoid(i) * CF.tanh(g) if c is None else \
        CF.sigmoid(f) * c + CF.sigmoid(i) * CF.tanh(g)
    h = CF.sigmoid(o) * CF.tanh(c)
    return h, (h, c)


def _gru_cell(xw: Tensor, state, w_hh: Tensor, b_hh: Tensor | None):
    (h,) = state
    xr, xz, xn = CF.chunk(xw, 3, -1)
    hr, hz, hn = CF.chunk(_recurrent(h, w_hh, b_hh), 3, -1)
    r, z = CF.sigmoid(xr + hr), CF.sigmoid(xz + hz)
    n = CF.tanh(xn + r * hn)
    h = (1 - z) * n if h is None else (1 - z) * n + z * h
    return h, (h,)


def _reset_recurrent(module: Module) -> None:
    """torch's initialisation of recurrent weights: all U(±1/sqrt(hidden_size))."""
    bound = 1.0 / math.sqrt(module.hidden_size) if module.hidden_size > 0 else 0.0
    for p in module.parameters():
        init.uniform_(p, -bound, bound)


class _RNNBase(Module):
    """Multi-layer, optionally bidirectional recurrence with torch's parameter names
    (``weight_ih_l0``, ``weight_hh_l0``, ``bias_ih_l0``, ``bias_hh_l0``, ``..._reverse``)
    and initialisation U(±1/sqrt(hidden_size))."""

    _gates: int
    _cell: Callable

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1,
                 bias: bool = True, batch_first: bool = False, dropout: float = 0.0,
                 bidirectional: bool = False, proj_size: int = 0, device=None, dtype=None):
        super().__init__()
        if proj_size:
            raise NotImplementedError(f"{type(self).__name__}: proj_size is not supported")
        if not 0.0 <= dropout <= 1.0:
            raise ValueError(f"dropout should be a number in range [0, 1], got {dropout}")
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.bias, self.batch_first, self.dropout = bias, batch_first, float(dropout)
        self.bidirectional = bidirectional
        g = self._gates * hidden_size
        for layer in range(num_layers):
            width = input_size if layer == 0 else hidden_size * self._directions
            for sfx in self._suffixes(layer):
                shapes = {"weight_ih": (g, width), "weight_hh": (g, hidden_size)}
                if bias:
                    shapes.update(bias_ih=(g,), bias_hh=(g,))
                for name, shape in shapes.items():
                    self.register_parameter(name + sfx, Parameter(_empty(shape, dtype, device)))
        self.reset_parameters()

    @property
    def _directions(self) -> int:
        return 2 if self.bidirectional else 1

    def _suffixes(self, layer: int) -> list[str]:
        return [f"_l{layer}", f"_l{layer}_reverse"][:self._directions]

    def reset_parameters(self) -> None:
        _reset_recurrent(self)

    def _weights(self, sfx: str):
        return (getattr(self, f"weight_ih{sfx}"), getattr(self, f"weight_hh{sfx}"),
                getattr(self, f"bias_ih{sfx}", None), getattr(self, f"bias_hh{sfx}", None))

    def _run(self, x: Tensor, state, sfx: str, reverse: bool):
        """One direction of one layer over x (N, L, in): the outputs (N, L, H), final state.
        Batch first, so that a traced graph's time slices keep the batch size free."""
        w_ih, w_hh, b_ih, b_hh = self._weights(sfx)
        steps = CF.unbind(F.linear(x, w_ih, b_ih), 1)
        outs = []
        for xw in (reversed(steps) if reverse else steps):
            h, state = type(self)._cell(xw, state, w_hh, b_hh)
            outs.append(h)
        return CF.stack(outs[::-1] if reverse else outs, 1), state

    def _check_input(self, x: Tensor) -> bool:
        name = type(self).__name__
        if x.ndim not in (2, 3) or x.shape[-1] != self.input_size:
            raise OpError(f"{name}: expected input of shape (L, N, {self.input_size}) (batch "
                          f"first: (N, L, {self.input_size}); unbatched: (L, "
                          f"{self.input_size})), got {fmt(x.shape)}")
        return x.ndim == 3

    def _initial(self, hx: Tensor | None, n: int, batched: bool) -> Tensor | None:
        want = (self.num_layers * self._directions, n, self.hidden_size)
        if hx is None:
            return None
        if not batched:
            hx = CF.unsqueeze(hx, 1)
        if tuple(hx.shape) != want:
            raise OpError(f"{type(self).__name__}: expected hidden state of shape "
                          f"{fmt(want if batched else want[:1] + want[2:])}, got "
                          f"{fmt(hx.shape if batched else hx.shape[:1] + hx.shape[2:])}")
        return hx

    def _forward(self, x: Tensor, states: list, batched: bool):
        """``states``: per state kind (h; or h and c) a tensor (layers*dirs, N, H)."""
        if not batched:
            x = CF.unsqueeze(x, 0)
        elif not self.batch_first:
            x = CF.transpose(x, 0, 1)
        per_kind = [CF.unbind(s, 0) if s is not None else
                    [None] * (self.num_layers * self._directions) for s in states]
        finals = []
        for layer in range(self.num_layers):
            outs = []
            for d, sfx in enumerate(self._suffixes(layer)):
                k = layer * self._directions + d
                out, final = self._run(x, tuple(s[k] for s in per_kind), sfx, reverse=d == 1)
                outs.append(out)
                finals.append(final)
            x = outs[0] if len(outs) == 1 else CF.cat(outs, -1)
            if self.dropout and self.training and layer < self.num_layers - 1:
                x = F.dropout(x, self.dropout, True)
        finals = [CF.stack([f[i] for f in finals], 0) for i in range(len(states))]
        if not batched:
            return CF.squeeze(x, 0), [CF.squeeze(f, 1) for f in finals]
        return (x if self.batch_first else CF.transpose(x, 0, 1)), finals

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}"
        for name, default in (("num_layers", 1), ("bias", True), ("batch_first", False),
                              ("dropout", 0.0), ("bidirectional", False)):
            if getattr(self, name) != default:
                s += f", {name}={getattr(self, name)}"
        return s


class LSTM(_RNNBase):
    """``torch.nn.LSTM``: gates (i, f, g, o); ``forward(input, (h0, c0))`` returns
    ``output, (h_n, c_n)``."""
    _gates = 4
    _cell = staticmethod(_lstm_cell)

    def forward(self, input: Tensor, hx=None):
        batched = self._check_input(input)
        n = input.shape[0 if self.batch_first else 1] if batched else 1
        h0, c0 = hx if hx is not None else (None, None)
        states = [self._initial(h0, n, batched), self._initial(c0, n, batched)]
        out, (h, c) = self._forward(input, states, batched)
        return out, (h, c)


class GRU(_RNNBase):
    """``torch.nn.GRU``: gates (r, z, n); ``forward(input, h0)`` returns ``output, h_n``."""
    _gates = 3
    _cell = staticmethod(_gru_cell)

    def forward(self, input: Tensor, hx: Tensor | None = None):
        batched = self._check_input(input)
        n = input.shape[0 if self.batch_first else 1] if batched else 1
        out, (h,) = self._forward(input, [self._initial(hx, n, batched)], batched)
        return out, h


class _CellBase(Module):
    """One step of a recurrence, with torch's names ``weight_ih``, ``weight_hh``, ``bias_ih``,
    ``bias_hh`` and initialisation U(±1/sqrt(hidden_size))."""

    _gates: int
    _cell: Callable

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, device=None,
                 dtype=None):
        super().__init__()
        self.input_size, self.hidden_size, self.bias = input_size, hidden_size, bias
        g = self._gates * hidden_size
        shapes = {"weight_ih": (g, input_size), "weight_hh": (g, hidden_size)}
        if bias:
            shapes.update(bias_ih=(g,), bias_hh=(g,))
        for name, shape in shapes.items():
            self.register_parameter(name, Parameter(_empty(shape, dtype, device)))
        if not bias:
            self.register_parameter("bias_ih", None)
            self.register_parameter("bias_hh", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        _reset_recurrent(self)

    def _step(self, input: Tensor, state: tuple):
        """The cell on (N, in) or unbatched (in,) input; ``state``: Nones or (N, H) each."""
        name = type(self).__name__
        if input.ndim not in (1, 2) or input.shape[-1] != self.input_size:
            raise OpError(f"{name}: expected input of shape (N, {self.input_size}) or "
                          f"({self.input_size},), got {fmt(input.shape)}")
        batched = input.ndim == 2
        want = input.shape[:-1] + (self.hidden_size,)
        for s in state:
            if s is not None and tuple(s.shape) != want:
                raise OpError(f"{name}: expected hidden state of shape {fmt(want)}, got "
                              f"{fmt(s.shape)}")
        if not batched:
            input = CF.unsqueeze(input, 0)
            state = tuple(None if s is None else CF.unsqueeze(s, 0) for s in state)
        xw = F.linear(input, self.weight_ih, self.bias_ih)
        _, state = type(self)._cell(xw, state, self.weight_hh, self.bias_hh)
        return state if batched else tuple(CF.squeeze(s, 0) for s in state)

    def extra_repr(self) -> str:
        return f"{self.input_size}, {self.hidden_size}" + ("" if self.bias else ", bias=False")


class LSTMCell(_CellBase):
    """``torch.nn.LSTMCell``: ``forward(input, (h, c))`` returns ``(h', c')``."""
    _gates = 4
    _cell = staticmethod(_lstm_cell)

    def forward(self, input: Tensor, hx=None):
        return self._step(input, tuple(hx) if hx is not None else (None, None))


class GRUCell(_CellBase):
    """``torch.nn.GRUCell``: ``forward(input, h)`` returns ``h'``."""
    _gates = 3
    _cell = staticmethod(_gru_cell)

    def forward(self, input: Tensor, hx: Tensor | None = None):
        return self._step(input, (hx,))[0]
