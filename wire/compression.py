"""The wire encoding of a compressed gradient (shard.proto, ``PushGradientsRequest.
compressed_gradients``): one int32 tensor per parameter (the contract has no uint8: the
bytes below, zero-padded to a multiple of 4 and read as little-endian int32 words),
decoded against the parameter's dtype and shape.

* ``topk``: ``k`` little-endian int32 flat (C-order) indices, ascending, then the ``k``
  values in the parameter's dtype; every other element is zero.
* ``sign``: one bit per element in ``numpy.packbits`` order (big bit first; 1 is
  ``+scale``, 0 is ``-scale``), then the scale in the parameter's dtype.
"""

from __future__ import annotations

import numpy as np

__all__ = ["encode", "encode_topk", "decode", "to_words"]

INDEX = np.dtype("<i4")
WORD = 4


def to_words(blob: np.ndarray) -> np.ndarray:
    """Bytes (uint8) as little-endian int32 words, zero-padded to a whole word."""
    padded = np.zeros(-(-blob.size // WORD) * WORD, np.uint8)
    padded[: blob.size] = blob
    return padded.view(INDEX)


def encode(kind: str, c: np.ndarray) -> np.ndarray:
    """The words of ``c`` (a compressor's output: top-k values among zeros, or +-scale)."""
    flat = np.ascontiguousarray(c).reshape(-1)
    little = flat.dtype.newbyteorder("<")
    if kind == "topk":
        idx = np.flatnonzero(flat)
        return encode_topk(idx, flat[idx])
    scale = np.abs(flat[0]) if flat.size else flat.dtype.type(0)
    # The sign bit, not > 0: a zero scale's -0.0 comes back as -0.0.
    bits = np.packbits(~np.signbit(flat))
    return to_words(np.concatenate([bits, np.asarray([scale], little).view(np.uint8)]))


def encode_topk(indices: np.ndarray, values: np.ndarray) -> np.ndarray:
    """The top-k words of the nonzero ``values`` at the ascending flat ``indices``."""
    little = values.dtype.newbyteorder("<")
    idx = indices.astype(INDEX)
    return to_words(np.concatenate([idx.view(np.uint8), values.astype(little).view(np.uint8)]))


def decode(kind: str, words: np.ndarray, dtype: np.dtype, shape: tuple) -> np.ndarray:
    """The dense gradient; ValueError saying what is wrong with ``words``."""
    blob = np.ascontiguousarray(words, INDEX).reshape(-1).view(np.uint8)
    size, item = int(np.prod(shape, dtype=np.int64)), np.dtype(dtype).itemsize
    little = np.dtype(dtype).newbyteorder("<")
    out = np.zeros(size, dtype)
    if kind == "topk":
        k, extra = divmod(blob.size, INDEX.itemsize + item)
        if extra >= WORD or np.any(blob[blob.size - extra :]) or k > size:
            raise ValueError(
                f"{blob.size} bytes is not k int32 indices and k {np.dtype(dtype).name} "
                f"values for k <= {size}"
            )
        idx = blob[: k * INDEX.itemsize].view(INDEX)
        if k and (idx.min() < 0 or idx.max() >= size or np.any(np.diff(idx) <= 0)):
            raise ValueError(f"indices must be ascending and in [0, {size})")
        out[idx] = blob[k * INDEX.itemsize : k * (INDEX.itemsize + item)].view(little)
    elif kind == "sign":
        used = -(-size // 8) + item
        if blob.size != -(-used // WORD) * WORD:
            raise ValueError(
                f"{blob.size} bytes; sign needs {-(-size // 8)} bytes of bits and a "
                f"{np.dtype(dtype).name} scale, padded to whole words"
            )
        scale = blob[used - item : used].view(little)[0]
        bits = np.unpackbits(blob[: used - item], count=size).astype(bool)
        out[:] = np.where(bits, scale, -scale)
    else:
        raise ValueError(f"unknown compression {kind!r} (topk or sign)")
    return out.reshape(shape)
