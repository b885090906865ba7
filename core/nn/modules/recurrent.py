"""Recurrent layers: the Elman RNN, LSTM and GRU, their cells.

The input projection of a whole sequence is one matmul. An LSTM layer then runs its time
loop inside one op (``lstm_layer``, core/ops/nn.py); GRU and RNN compose a cell per step
over that step's slice, which a traced graph unrolls. Either way a graph fixes the sequence
length (a graph per length); the batch size stays free where the initial states are zeros
(``hx=None``), reading ``output`` or ``h_n[-1]`` (the tracer keeps a batch-sized
dimension past dim 0 free, core/graph/tracer.py). A cell maps (step input
projection, state tuple, w_hh, b_hh) to (output h, new state tuple); a state of Nones is the
zero initial state: h is one zero row that broadcasts over the batch (w_hh still gets its
zero gradient, as in torch), the LSTM's c one zero row too, and GRU's ``z * h`` term is
left out; exact, and no constant shaped by the batch size in a traced graph.
"""

from __future__ import annotations

import math
import warnings
from typing import Callable

from ... import functional as CF
from ...factories import zeros as _zeros
from ...registry import REGISTRY, OpError, fmt
from ...tensor import Tensor
from .. import functional as F
from .. import init
from .layers import _empty
from .module import Module, Parameter


def _recurrent(h: Tensor | None, w_hh: Tensor, b_hh: Tensor | None) -> Tensor:
    """``h @ w_hh.T + b_hh``, where ``h=None`` is zeros: a (1, 4H) or (1, 3H) row."""
    if h is None:
        h = _zeros((1, w_hh.shape[1]), dtype=w_hh.dtype, device=w_hh.device)
    return F.linear(h, w_hh, b_hh)


def _lstm_cell(xw: Tensor, state, w_hh: Tensor, b_hh: Tensor | None):
    # The gates' elementwise part is one op (core/ops/nn.py, lstm_cell): h and c side by side.
    h, c = state
    hs = w_hh.shape[1]
    if c is None:
        c = _zeros((1, hs), dtype=w_hh.dtype, device=w_hh.device)
    hc = REGISTRY["lstm_cell"](xw + _recurrent(h, w_hh, b_hh), c)
    h = CF.narrow(hc, 1, 0, hs)
    return h, (h, CF.narrow(hc, 1, hs, hs))


def _gru_cell(xw: Tensor, state, w_hh: Tensor, b_hh: Tensor | None):
    (h,) = state
    xr, xz, xn = CF.chunk(xw, 3, -1)
    hr, hz, hn = CF.chunk(_recurrent(h, w_hh, b_hh), 3, -1)
    r, z = CF.sigmoid(xr + hr), CF.sigmoid(xz + hz)
    n = CF.tanh(xn + r * hn)
    h = (1 - z) * n if h is None else (1 - z) * n + z * h
    return h, (h,)


def _rnn_cell(xw: Tensor, state, w_hh: Tensor, b_hh: Tensor | None, nonlinearity: str):
    (h,) = state
    pre = xw + _recurrent(h, w_hh, b_hh)
    if nonlinearity == "tanh":
        h = CF.tanh(pre)
    elif nonlinearity == "relu":
        h = F.relu(pre)
    else:  # torch's RNNCell accepts any name and refuses it here
        raise RuntimeError(f"Unknown nonlinearity: {nonlinearity}")
    return h, (h,)


def _reset_recurrent(module: Module) -> None:
    """torch's initialisation of recurrent weights: all U(±1/sqrt(hidden_size))."""
    bound = 1.0 / math.sqrt(module.hidden_size) if module.hidden_size > 0 else 0.0
    for p in module.parameters():
        init.uniform_(p, -bound, bound)


class _RNNBase(Module):
    """Multi-layer, optionally bidirectional recurrence with torch's parameter names
    (``weight_ih_l0``, ``weight_hh_l0``, ``bias_ih_l0``, ``bias_hh_l0``, ``..._reverse``)
    and initialisation U(±1/sqrt(hidden_size)). ``_cell`` is one step, see the module's
    docstring."""

    _gates: int
    _cell: Callable

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        proj_size: int = 0,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if proj_size:
            raise NotImplementedError(f"{type(self).__name__}: proj_size is not supported")
        if not 0.0 <= dropout <= 1.0:
            raise ValueError(f"dropout should be a number in range [0, 1], got {dropout}")
        if dropout > 0 and num_layers == 1:
            warnings.warn(
                "dropout option adds dropout after all but last recurrent layer, so non-zero "
                "dropout expects num_layers greater than 1, but got "
                f"dropout={dropout} and num_layers={num_layers}",
                stacklevel=2,
            )
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
        return [f"_l{layer}", f"_l{layer}_reverse"][: self._directions]

    def reset_parameters(self) -> None:
        _reset_recurrent(self)

    def _weights(self, sfx: str):
        return (
            getattr(self, f"weight_ih{sfx}"),
            getattr(self, f"weight_hh{sfx}"),
            getattr(self, f"bias_ih{sfx}", None),
            getattr(self, f"bias_hh{sfx}", None),
        )

    def _run(self, x: Tensor, state, sfx: str, reverse: bool):
        """One direction of one layer over x (N, L, in): the outputs (N, L, H), final state.
        Batch first, so that a traced graph's time slices keep the batch size free."""
        w_ih, w_hh, b_ih, b_hh = self._weights(sfx)
        steps = CF.unbind(F.linear(x, w_ih, b_ih), 1)
        outs = []
        for xw in reversed(steps) if reverse else steps:
            h, state = self._cell(xw, state, w_hh, b_hh)
            outs.append(h)
        return CF.stack(outs[::-1] if reverse else outs, 1), state

    def _check_input(self, x: Tensor) -> bool:
        name = type(self).__name__
        if x.ndim not in (2, 3) or x.shape[-1] != self.input_size:
            raise OpError(
                f"{name}: expected input of shape (L, N, {self.input_size}) (batch "
                f"first: (N, L, {self.input_size}); unbatched: (L, "
                f"{self.input_size})), got {fmt(x.shape)}"
            )
        return x.ndim == 3

    def _initial(self, hx: Tensor | None, n: int, batched: bool) -> Tensor | None:
        want = (self.num_layers * self._directions, n, self.hidden_size)
        if hx is None:
            return None
        if not batched:
            hx = CF.unsqueeze(hx, 1)
        if tuple(hx.shape) != want:
            raise OpError(
                f"{type(self).__name__}: expected hidden state of shape "
                f"{fmt(want if batched else want[:1] + want[2:])}, got "
                f"{fmt(hx.shape if batched else hx.shape[:1] + hx.shape[2:])}"
            )
        return hx

    def _forward(self, x: Tensor, states: list, batched: bool):
        """``states``: per state kind (h; or h and c) a tensor (layers*dirs, N, H)."""
        if not batched:
            x = CF.unsqueeze(x, 0)
        elif not self.batch_first:
            x = CF.transpose(x, 0, 1)
        per_kind = [
            CF.unbind(s, 0) if s is not None else [None] * (self.num_layers * self._directions)
            for s in states
        ]
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
        for name, default in (
            ("num_layers", 1),
            ("bias", True),
            ("batch_first", False),
            ("dropout", 0.0),
            ("bidirectional", False),
        ):
            if getattr(self, name) != default:
                s += f", {name}={getattr(self, name)}"
        return s


class LSTM(_RNNBase):
    """``torch.nn.LSTM``: gates (i, f, g, o); ``forward(input, (h0, c0))`` returns
    ``output, (h_n, c_n)``."""

    _gates = 4
    _cell = staticmethod(_lstm_cell)

    def _run(self, x: Tensor, state, sfx: str, reverse: bool):
        # The whole time loop is one op (core/ops/nn.py, lstm_layer), its output [h_t, c_t]
        # per step; both biases go into the input projection once, summed first (a (4H,)
        # addition instead of one over every step's (N, 4H) projection, and its gradient).
        w_ih, w_hh, b_ih, b_hh = self._weights(sfx)
        xw = F.linear(x, w_ih, None if b_ih is None else b_ih + b_hh)
        hs = self.hidden_size
        h0, c0 = (
            s if s is not None else _zeros((1, hs), dtype=w_hh.dtype, device=w_hh.device)
            for s in state
        )
        out = REGISTRY["lstm_layer"](xw, h0, c0, w_hh, reverse=reverse)
        last = CF.select(out, 1, 0 if reverse else x.shape[1] - 1)
        h_n, c_n = CF.narrow(last, 1, 0, hs), CF.narrow(last, 1, hs, hs)
        return CF.narrow(out, 2, 0, hs), (h_n, c_n)

    def forward(self, input: Tensor, hx=None):
        batched = self._check_input(input)
        n = input.shape[0 if self.batch_first else 1] if batched else 1
        h0, c0 = hx if hx is not None else (None, None)
        states = [self._initial(h0, n, batched), self._initial(c0, n, batched)]
        out, (h, c) = self._forward(input, states, batched)
        return out, (h, c)


class _HiddenStateRNN(_RNNBase):
    """A recurrence whose only state is h: ``forward(input, h0)`` returns ``output, h_n``."""

    def forward(self, input: Tensor, hx: Tensor | None = None):
        batched = self._check_input(input)
        n = input.shape[0 if self.batch_first else 1] if batched else 1
        out, (h,) = self._forward(input, [self._initial(hx, n, batched)], batched)
        return out, h


class GRU(_HiddenStateRNN):
    """``torch.nn.GRU``: gates (r, z, n); ``forward(input, h0)`` returns ``output, h_n``."""

    _gates = 3
    _cell = staticmethod(_gru_cell)


class RNN(_HiddenStateRNN):
    """``torch.nn.RNN``, the Elman recurrence ``h_t = act(x_t W_ih^T + b_ih + h_{t-1} W_hh^T +
    b_hh)`` with ``nonlinearity`` 'tanh' or 'relu'; ``forward(input, h0)`` returns ``output,
    h_n``."""

    _gates = 1

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        nonlinearity: str = "tanh",
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        device=None,
        dtype=None,
    ):
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(
                f"Unknown nonlinearity '{nonlinearity}'. Select from 'tanh' or 'relu'."
            )
        super().__init__(
            input_size,
            hidden_size,
            num_layers,
            bias,
            batch_first,
            dropout,
            bidirectional,
            device=device,
            dtype=dtype,
        )
        self.nonlinearity = nonlinearity

    def _cell(self, xw: Tensor, state, w_hh: Tensor, b_hh: Tensor | None):
        return _rnn_cell(xw, state, w_hh, b_hh, self.nonlinearity)


class _CellBase(Module):
    """One step of a recurrence, with torch's names ``weight_ih``, ``weight_hh``, ``bias_ih``,
    ``bias_hh`` and initialisation U(±1/sqrt(hidden_size))."""

    _gates: int
    _cell: Callable

    def __init__(
        self, input_size: int, hidden_size: int, bias: bool = True, device=None, dtype=None
    ):
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
            raise OpError(
                f"{name}: expected input of shape (N, {self.input_size}) or "
                f"({self.input_size},), got {fmt(input.shape)}"
            )
        batched = input.ndim == 2
        want = input.shape[:-1] + (self.hidden_size,)
        for s in state:
            if s is not None and tuple(s.shape) != want:
                raise OpError(
                    f"{name}: expected hidden state of shape {fmt(want)}, got {fmt(s.shape)}"
                )
        if not batched:
            input = CF.unsqueeze(input, 0)
            state = tuple(None if s is None else CF.unsqueeze(s, 0) for s in state)
        xw = F.linear(input, self.weight_ih, self.bias_ih)
        _, state = self._cell(xw, state, self.weight_hh, self.bias_hh)
        return state if batched else tuple(CF.squeeze(s, 0) for s in state)

    def extra_repr(self) -> str:
        return f"{self.input_size}, {self.hidden_size}" + ("" if self.bias else ", bias=False")


class LSTMCell(_CellBase):
    """``torch.nn.LSTMCell``: ``forward(input, (h, c))`` returns ``(h', c')``."""

    _gates = 4
    _cell = staticmethod(_lstm_cell)

    def forward(self, input: Tensor, hx=None):
        return self._step(input, tuple(hx) if hx is not None else (None, None))


class _HiddenStateCell(_CellBase):
    """A cell whose only state is h: ``forward(input, h)`` returns ``h'``."""

    def forward(self, input: Tensor, hx: Tensor | None = None):
        return self._step(input, (hx,))[0]


class GRUCell(_HiddenStateCell):
    """``torch.nn.GRUCell``: ``forward(input, h)`` returns ``h'``."""

    _gates = 3
    _cell = staticmethod(_gru_cell)


class RNNCell(_HiddenStateCell):
    """``torch.nn.RNNCell``: ``forward(input, h)`` returns ``h' = act(input W_ih^T + b_ih +
    h W_hh^T + b_hh)``, ``nonlinearity`` 'tanh' or 'relu' (another name fails in forward,
    as torch's)."""

    _gates = 1

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        bias: bool = True,
        nonlinearity: str = "tanh",
        device=None,
        dtype=None,
    ):
        super().__init__(input_size, hidden_size, bias, device=device, dtype=dtype)
        self.nonlinearity = nonlinearity

    def _cell(self, xw: Tensor, state, w_hh: Tensor, b_hh: Tensor | None):
        return _rnn_cell(xw, state, w_hh, b_hh, self.nonlinearity)

    def extra_repr(self) -> str:
        s = super().extra_repr()
        return s if self.nonlinearity == "tanh" else s + f", nonlinearity={self.nonlinearity}"
