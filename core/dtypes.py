"""Tensor element types and PyTorch's type-promotion rules."""

from __future__ import annotations

import ml_dtypes
import numpy as np


class DType:
    """A tensor element type, printed like torch's (``gradmesh.float32``)."""

    __slots__ = ("name", "np", "is_floating_point", "itemsize")

    def __init__(self, name: str, np_dtype: type | np.dtype):
        self.name = name
        self.np = np.dtype(np_dtype)
        # NumPy files ml_dtypes' bfloat16 under kind "V" (a user type), not "f".
        self.is_floating_point = self.np.kind == "f" or self.np == ml_dtypes.bfloat16
        self.itemsize = self.np.itemsize

    def __repr__(self) -> str:
        return f"gradmesh.{self.name}"

    def __reduce__(self):
        return (by_name, (self.name,))


float16 = DType("float16", np.float16)
# NumPy has no bfloat16; ml_dtypes (from the JAX project) registers one with NumPy.
bfloat16 = DType("bfloat16", ml_dtypes.bfloat16)
float32 = DType("float32", np.float32)
float64 = DType("float64", np.float64)
int32 = DType("int32", np.int32)
int64 = DType("int64", np.int64)
bool_ = DType("bool", np.bool_)

ALL = (float16, bfloat16, float32, float64, int32, int64, bool_)
_BY_NP = {d.np: d for d in ALL}
_BY_NAME = {d.name: d for d in ALL}
# Rank within a category; a higher rank wins when two of the same category meet.
# float16 and bfloat16 share a rank: neither holds the other, they meet in float32 (torch).
_RANK = {bool_: 0, int32: 1, int64: 2, float16: 3, bfloat16: 3, float32: 4, float64: 5}
HALF = (float16, bfloat16)

default_float = float32


def by_name(name: str) -> DType:
    try:
        return _BY_NAME[name]
    except KeyError:
        raise TypeError(f"unknown dtype {name!r}; expected one of {sorted(_BY_NAME)}") from None


def from_numpy(np_dtype) -> DType:
    """The gradmesh dtype of a NumPy dtype (float64 stays float64, like torch.from_numpy)."""
    try:
        return _BY_NP[np.dtype(np_dtype)]
    except KeyError:
        raise TypeError(
            f"arrays of dtype {np.dtype(np_dtype)} are not supported; "
            f"use one of {[d.name for d in ALL]}"
        ) from None


def as_dtype(d) -> DType:
    """Accept a gradmesh dtype, a NumPy dtype or a name."""
    if isinstance(d, DType):
        return d
    if isinstance(d, str):
        return by_name(d)
    return from_numpy(d)


def _category(d: DType) -> int:
    return 2 if d.is_floating_point else (0 if d is bool_ else 1)


def promote(a: DType, b: DType, a_is_scalar: bool = False, b_is_scalar: bool = False) -> DType:
    """torch.result_type for two operands.

    A float beats an integer whatever the width (int64 + float32 -> float32, unlike NumPy),
    and a 0-d operand only decides the type when it is of a higher category than the other.
    """
    if a is b:
        return a
    ca, cb = _category(a), _category(b)
    if a_is_scalar != b_is_scalar and ca == cb:
        return b if a_is_scalar else a
    if ca != cb:
        return a if ca > cb else b
    if _RANK[a] == _RANK[b]:
        return float32  # float16 with bfloat16
    return a if _RANK[a] > _RANK[b] else b


def is_floating(np_dtype) -> bool:
    """Whether a NumPy dtype is a float type gradmesh supports (bfloat16 included)."""
    return np_dtype.kind == "f" or np_dtype == ml_dtypes.bfloat16


# ---------------------------------------------------------------------------------------
# bfloat16 <-> float32 on the bits
# ---------------------------------------------------------------------------------------
# bfloat16 is the top half of a float32, so both conversions are integer arithmetic on the
# bits, several times faster than ml_dtypes' element loop and bit for bit the same (NaN
# included; tests/engine/test_half_precision.py checks every bfloat16 and a float32 sample).

_BFLOAT16 = bfloat16.np
_FLOAT32 = float32.np


def bfloat16_to_float32(a: np.ndarray) -> np.ndarray:
    """The float32 values of a bfloat16 array (exact): its bits shifted up by 16."""
    out = np.empty(a.shape, _FLOAT32)
    np.left_shift(a.view(np.uint16), 16, out=out.view(np.uint32), dtype=np.uint32)
    return out


def float32_to_bfloat16(x: np.ndarray) -> np.ndarray:
    """``x`` rounded to bfloat16, to nearest with ties to even, on its bits: adding
    0x7FFF plus the lowest kept bit carries into the kept bits exactly when the dropped
    half is above the halfway point, or at it with the kept part odd."""
    bits = np.ascontiguousarray(x).view(np.uint32)
    rounded = bits >> 16
    rounded &= 1
    rounded += 0x7FFF
    rounded += bits
    rounded >>= 16
    out = rounded.astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        # ml_dtypes' NaN: the quiet NaN of the same sign, whatever the payload.
        out[nan] = ((bits[nan] >> 16) & 0x8000).astype(np.uint16) | 0x7FC0
    return out.view(_BFLOAT16)


def astype(a, np_dtype):
    """``a.astype(np_dtype)``, through the bit conversions where bfloat16 meets float32."""
    np_dtype = np.dtype(np_dtype)
    if a.dtype == _BFLOAT16 and np_dtype == _FLOAT32:
        return bfloat16_to_float32(a)
    if a.dtype == _FLOAT32 and np_dtype == _BFLOAT16:
        return float32_to_bfloat16(a)
    return a.astype(np_dtype)
