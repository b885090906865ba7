"""Compressed replies with error feedback, the residuals held by the worker (worker.proto,
``WorkerCompression``; docs/training.md, "Compressed gradients").

For each requested gradient ``g`` the loss depends on: ``p = g + e``, ``c = C(p)``,
``e = p - c``; ``c`` goes out in the wire encoding, ``e`` stays here under (residual set,
residual index, parameter). The compressor and the encoding are the coordinator mode's
(:mod:`gradmesh.server.compression`, :mod:`gradmesh.wire.compression`), so a worker's reply
decodes to what the coordinator would have computed from the same residual.

The residuals are bounded: least recently used keys go first past ``capacity`` bytes
(their error is lost: the next call with that key starts from zeros), and they live in
memory only (a restarted worker has none).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from gradmesh.server import compression
from gradmesh.server.runtime import ServiceError
from gradmesh.server.worker.checks import INVALID
from gradmesh.wire import compression as wire_compression

__all__ = ["CompressionRequest", "ResidualStore", "check_compression"]


@dataclass(frozen=True, slots=True)
class CompressionRequest:
    """A request's ``WorkerCompression``, checked: the compressor's description and the
    residuals' key and round."""

    spec: dict
    key: tuple[str, int]  # (residual set, residual index)
    round: int


def check_compression(kind: str, ratio: float, residual_set: str, index: int, round_: int):
    """A ``WorkerCompression``'s values as a :class:`CompressionRequest`;
    INVALID_ARGUMENT naming the field when one is bad."""
    try:
        spec = compression.validate({"kind": kind, "ratio": ratio})
    except ValueError as e:
        raise ServiceError(INVALID, str(e), str(e).split()[0]) from None
    if not residual_set:
        raise ServiceError(
            INVALID,
            "compression.residual_set must name the residuals (a coordinator: its job id)",
            "compression.residual_set",
        )
    return CompressionRequest(spec, (residual_set, int(index)), int(round_))


class _Scratch:
    """Work memory of top-k's selection, reused call after call: fresh pages for a 64 MB
    gradient cost more than the selection itself (page faults measured 2.5x its time on
    the development VM). Holds about 2.25x the largest gradient's bytes; one caller at a
    time (``lock``)."""

    def __init__(self):
        self.lock = threading.Lock()
        self._buffers: dict[str, np.ndarray] = {}

    def get(self, role: str, size: int, dtype) -> np.ndarray:
        buf = self._buffers.get(role)
        if buf is None or buf.size < size or buf.dtype != dtype:
            buf = self._buffers[role] = np.empty(size, dtype)
        return buf[:size]


def _top_indices(flat: np.ndarray, k: int, scratch: _Scratch) -> np.ndarray:
    """``compression._top_indices(np.abs(flat), k)`` (the same indices, in the same
    order) in ``scratch``'s memory."""
    n = flat.size
    magnitude = np.abs(flat, out=scratch.get("magnitude", n, flat.dtype))
    work = scratch.get("work", n, flat.dtype)
    np.copyto(work, magnitude)
    work.partition(n - k)
    threshold = work[n - k]
    mask = scratch.get("mask", n, np.bool_)
    above = np.flatnonzero(np.greater(magnitude, threshold, out=mask))
    at = np.flatnonzero(np.equal(magnitude, threshold, out=mask))[: k - above.size]
    return np.concatenate([above, at])


def _in_place(spec: dict, p: np.ndarray, scratch: _Scratch) -> np.ndarray | None:
    """The words of ``C(p)``, ``p`` turned into its residual ``p - C(p)``, the bits of
    the coordinator mode's ``compress`` and ``encode`` in fewer passes over ``p``; None
    where they would not be (a NaN scale: ``p`` is left as it was)."""
    if spec["kind"] == "topk":
        return _topk_in_place(spec["ratio"], p, scratch)
    flat = p.reshape(-1)
    scale = np.mean(np.abs(flat), dtype=np.float64).astype(flat.dtype)
    if np.isnan(scale):
        return None
    positive = flat >= 0
    flat -= np.where(positive, scale, -scale)
    # The bits of the signs of +-scale: scale >= 0, so a set bit is exactly p >= 0.
    bits = np.packbits(positive)
    little = flat.dtype.newbyteorder("<")
    return wire_compression.to_words(
        np.concatenate([bits, np.asarray([scale], little).view(np.uint8)])
    )


def _topk_in_place(ratio: float, p: np.ndarray, scratch: _Scratch) -> np.ndarray:
    """Top-k's words for ``p``, which becomes its residual: the bits of
    ``encode(compress(p))`` and ``p - compress(p)`` with passes over the kept elements
    only (the selection is the coordinator mode's)."""
    flat = p.reshape(-1)
    with scratch.lock:
        kept = _top_indices(flat, compression.kept_count(flat.size, ratio), scratch)
    kept.sort()
    values = flat[kept]
    flat[kept] -= values  # p - c there (0, or NaN from inf); elsewhere p - 0 is p
    nonzero = values != 0  # the encoding carries nonzero values only
    return wire_compression.encode_topk(kept[nonzero], values[nonzero])


@dataclass
class _Entry:
    """One key's residuals: the round that last updated them, and the residuals before
    and after that round's update (a retry of the round starts from ``before``)."""

    round: int
    before: dict[str, np.ndarray]
    after: dict[str, np.ndarray]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.before.values()) + sum(
            a.nbytes for a in self.after.values()
        )


class ResidualStore:
    """The worker's error-feedback residuals, least recently used keys out first past
    ``capacity`` bytes (0: none kept, compression without error feedback). Thread-safe."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._entries: OrderedDict[tuple, _Entry] = OrderedDict()
        self._lock = threading.Lock()
        self.evicted = 0  # keys dropped to stay within capacity
        self._scratch = _Scratch()

    def _start(self, call: CompressionRequest) -> dict[str, np.ndarray]:
        """The residuals a call starts from: a retry of the key's last round starts where
        that round did, any other round from what it left."""
        with self._lock:
            entry = self._entries.get(call.key)
            if entry is None:
                return {}
            self._entries.move_to_end(call.key)
            return entry.before if call.round == entry.round else entry.after

    def _store(self, call: CompressionRequest, before: dict, after: dict) -> None:
        entry = _Entry(call.round, before, after)
        size = entry.nbytes
        with self._lock:
            self._entries.pop(call.key, None)
            if size > self.capacity:
                self.evicted += 1
                return
            total = sum(e.nbytes for e in self._entries.values())
            while self._entries and total + size > self.capacity:
                _, old = self._entries.popitem(last=False)
                total -= old.nbytes
                self.evicted += 1
            self._entries[call.key] = entry

    def compress(
        self, call: CompressionRequest, gradients: list[tuple[str, np.ndarray]]
    ) -> list[tuple[str, np.ndarray]]:
        """Each gradient compressed with error feedback, as (name, int32 words) in the
        wire encoding; the new residuals kept."""
        before = self._start(call)
        spec = call.spec
        after, out = {}, []
        for name, g in gradients:
            e = before.get(name)
            p = np.asarray(g) + e if e is not None else np.array(g)
            words = _in_place(spec, p, self._scratch) if p.size else None
            if words is not None:
                after[name] = p
            else:
                c = compression.compress(spec, p)
                after[name] = p - c
                words = wire_compression.encode(spec["kind"], c)
            out.append((name, words))
        self._store(call, before, after)
        return out

    def __len__(self) -> int:
        return len(self._entries)
