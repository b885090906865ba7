"""Tensor element types and PyTorch's type-promotion rules."""

from __future__ import annotations

import math

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


class finfo:
    """Machine limits of a float dtype, as ``torch.finfo`` (``finfo()``: the default float
    dtype's). ``dtype`` is the name, as torch's.

    >>> import gradmesh.core as gm
    >>> gm.finfo(gm.bfloat16).eps, gm.finfo(gm.float16).max
    (0.0078125, 65504.0)
    """

    def __init__(self, type=None):  # noqa: A002  (torch's argument name)
        d = default_float if type is None else as_dtype(type)
        if not d.is_floating_point:
            raise TypeError(
                f"gradmesh.finfo() requires a floating point input type, got {d}; use "
                f"gradmesh.iinfo for integer types"
            )
        info = ml_dtypes.finfo(d.np)
        self.bits = int(info.bits)
        self.eps = float(info.eps)
        self.max = float(info.max)
        self.min = float(info.min)
        self.tiny = self.smallest_normal = float(info.smallest_normal)
        # 10 ** -(decimal digits), as torch and NumPy define it, in float64 (ml_dtypes
        # rounds bfloat16's to bfloat16).
        self.resolution = 10.0 ** -int(-math.log10(self.eps))
        self.dtype = d.name

    def __eq__(self, other) -> bool:
        return isinstance(other, finfo) and other.dtype == self.dtype

    def __hash__(self) -> int:
        return hash(("finfo", self.dtype))

    def __repr__(self) -> str:
        return (
            f"finfo(resolution={self.resolution:g}, min={self.min:g}, max={self.max:g}, "
            f"eps={self.eps:g}, smallest_normal={self.smallest_normal:g}, "
            f"tiny={self.tiny:g}, dtype={self.dtype})"
        )


class iinfo:
    """Limits of an integer dtype, as ``torch.iinfo``: ``bits``, ``min``, ``max``, ``dtype``.

    >>> import gradmesh.core as gm
    >>> gm.iinfo(gm.int32).max
    2147483647
    """

    def __init__(self, type):  # noqa: A002  (torch's argument name)
        d = as_dtype(type)
        if d is bool_:
            raise TypeError("gradmesh.bool is not supported by gradmesh.iinfo")
        if d.is_floating_point:
            raise TypeError(
                f"gradmesh.iinfo() requires an integer input type, got {d}; use "
                f"gradmesh.finfo for float types"
            )
        info = np.iinfo(d.np)
        self.bits, self.min, self.max = int(info.bits), int(info.min), int(info.max)
        self.dtype = d.name

    def __eq__(self, other) -> bool:
        return isinstance(other, iinfo) and other.dtype == self.dtype

    def __hash__(self) -> int:
        return hash(("iinfo", self.dtype))

    def __repr__(self) -> str:
        return f"iinfo(min={self.min:g}, max={self.max:g}, dtype={self.dtype})"


def is_floating(np_dtype) -> bool:
    """Whether a NumPy dtype is a float type gradmesh supports (bfloat16 included)."""
    return np_dtype.kind == "f" or np_dtype == ml_dtypes.bfloat16


# ---------------------------------------------------------------------------------------
# float16 and bfloat16 <-> float32 on the bits
# ---------------------------------------------------------------------------------------
# bfloat16 is the top half of a float32, so both conversions are integer arithmetic on the
# bits; float16's need a rebiased exponent. They are bit for bit ml_dtypes' and NumPy's
# astype (NaNs included; tests/engine/test_half_precision.py) and 1.6 to 2.5 times faster,
# far more for float16 subnormals, where NumPy's astype takes a slow path.

_BFLOAT16 = bfloat16.np
_FLOAT32 = float32.np


def bfloat16_to_float32(a: np.ndarray) -> np.ndarray:
    """The float32 values of a bfloat16 array (exact): its bits shifted up by 16."""
    out = np.empty(a.shape, _FLOAT32)
    np.left_shift(a.view(np.uint16), 16, out=out.view(np.uint32), dtype=np.uint32)
    return out


def float32_to_bfloat16(x: np.ndarray) -> np.ndarray:
    """``x`` rounded to bfloat16, to nearest with ties to even, on its bits."""
    return _blockwise(_round_to_bfloat16, x, _BFLOAT16)


def _round_to_bfloat16(src, dst, rounded, _) -> None:
    """Adding 0x7FFF plus the lowest kept bit carries into the kept bits exactly when the
    dropped half is above the halfway point, or at it with the kept part odd."""
    bits = src.view(np.uint32)
    np.right_shift(bits, 16, out=rounded)
    rounded &= 1
    rounded += 0x7FFF
    rounded += bits
    rounded >>= 16
    np.copyto(dst.view(np.uint16), rounded, casting="unsafe")
    nan = np.isnan(src)
    if nan.any():
        # ml_dtypes' NaN: the quiet NaN of the same sign, whatever the payload.
        dst.view(np.uint16)[nan] = ((bits[nan] >> 16) & 0x8000).astype(np.uint16) | 0x7FC0


_FLOAT16 = float16.np
_F16_NORMAL_SMALLEST = 113 << 23  # float32 bits of 2**-14, float16's smallest normal
_F16_OVERFLOW = 143 << 23  # float32 bits of 2**16: at or beyond, infinity or NaN
_F32_INFINITY = 0x7F800000
_F16_REBIAS = (1 << 32) - (112 << 23)  # minus float32's exponent bias less float16's, mod 2**32
# Adding 0.5 to a float32 below 2**-14 leaves float16's subnormal bits, rounded by the FPU
# to nearest even, at the bottom of the sum's significand.
_F16_SUBNORMAL_MAGIC = _FLOAT32.type(0.5)
_F16_SUBNORMAL_MAGIC_BITS = 126 << 23


def float16_to_float32(a: np.ndarray) -> np.ndarray:
    """The float32 values of a float16 array (exact)."""
    return _blockwise(_widen_float16, a, _FLOAT32)


def _widen_float16(src, dst, scratch, _) -> None:
    """Exponent and significand shifted into place and rebiased by a multiplication by
    2**112 (exact, and it normalizes float16's subnormals), infinities and NaNs given
    float32's top exponent, then the sign."""
    half, bits = src.view(np.uint16), dst.view(np.uint32)
    np.bitwise_and(half, 0x7FFF, out=bits, dtype=np.uint32)
    bits <<= 13
    dst *= _FLOAT32.type(2.0**112)
    np.bitwise_and(half, 0x7C00, out=scratch, dtype=np.uint32)
    special = scratch == 0x7C00
    if special.any():
        bits[special] |= _F32_INFINITY
    np.bitwise_and(half, 0x8000, out=scratch, dtype=np.uint32)
    scratch <<= 16
    bits |= scratch


def float32_to_float16(x: np.ndarray) -> np.ndarray:
    """``x`` rounded to float16, to nearest with ties to even, on its bits (NumPy's
    ``astype`` bit for bit, NaN payloads included)."""
    return _blockwise(_round_to_float16, x, _FLOAT16)


def _round_to_float16(src, dst, magnitude, rounded) -> None:
    """Normal results: rebias the exponent and round the 13 dropped bits as bfloat16's 16
    are rounded; subnormal ones: the FPU rounds (``_F16_SUBNORMAL_MAGIC``); beyond float16's
    range: infinity or NaN."""
    bits = src.view(np.uint32)
    np.bitwise_and(bits, 0x7FFFFFFF, out=magnitude)
    np.right_shift(magnitude, 13, out=rounded)
    rounded &= 1
    rounded += magnitude
    rounded += _F16_REBIAS + 0xFFF
    rounded >>= 13
    small = magnitude < _F16_NORMAL_SMALLEST
    if small.any():
        tiny = magnitude[small].view(_FLOAT32) + _F16_SUBNORMAL_MAGIC
        rounded[small] = tiny.view(np.uint32) - _F16_SUBNORMAL_MAGIC_BITS
    large = magnitude >= _F16_OVERFLOW
    if large.any():
        rounded[large] = _float16_beyond_range(magnitude[large])
    np.right_shift(bits, 16, out=magnitude)
    magnitude &= 0x8000
    rounded |= magnitude
    np.copyto(dst.view(np.uint16), rounded, casting="unsafe")


def _float16_beyond_range(magnitude: np.ndarray) -> np.ndarray:
    """Infinity, or for a NaN NumPy's float16 NaN: the top of its payload, kept a NaN."""
    payload = (magnitude & 0x7FFFFF) >> 13
    payload[(payload == 0) & (magnitude > _F32_INFINITY)] = 1
    return np.where(magnitude > _F32_INFINITY, 0x7C00 + payload, 0x7C00)


# Conversions run over blocks of 131072 elements (faster than smaller or no blocks, measured)
# with two scratch arrays that serve every block: the output is the one large allocation.
_BLOCK = 1 << 17


def _blockwise(kernel, a: np.ndarray, out_dtype) -> np.ndarray:
    out = np.empty(a.shape, out_dtype)
    src, dst = a.reshape(-1), out.reshape(-1)
    n = min(src.size, _BLOCK)
    scratch = (np.empty(n, np.uint32), np.empty(n, np.uint32))
    for start in range(0, src.size, _BLOCK):
        block = slice(start, start + _BLOCK)
        size = dst[block].size
        kernel(src[block], dst[block], scratch[0][:size], scratch[1][:size])
    return out


_BIT_CASTS = {
    (_BFLOAT16, _FLOAT32): bfloat16_to_float32,
    (_FLOAT32, _BFLOAT16): float32_to_bfloat16,
    (_FLOAT16, _FLOAT32): float16_to_float32,
    (_FLOAT32, _FLOAT16): float32_to_float16,
}


def astype(a, np_dtype):
    """``a.astype(np_dtype)``, through the bit conversions between a half type and float32
    (the same bits, faster) for NumPy arrays."""
    cast = _BIT_CASTS.get((a.dtype, np.dtype(np_dtype)))
    if cast is None or type(a) is not np.ndarray:
        return a.astype(np_dtype)
    return cast(a)
