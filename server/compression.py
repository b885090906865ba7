"""Gradient compression with error feedback: an opt-in job mode that trades exactness for
bytes (docs/training.md, "Compressed gradients").

A job created with ``compression={"kind": "topk", "ratio": 0.01}`` (or ``{"kind":
"sign"}``) has each micro-batch gradient compressed before the shards sum it. Error
feedback (Seide et al. 2014; Karimireddy et al. 2019, EF-SignSGD; Stich et al. 2018,
top-k with memory) adds what compression dropped last time back in before compressing
again, so that nothing is lost for good, only delayed:

    p = g + e;  c = C(p);  e = p - c;  c goes on, e stays.

``topk`` keeps the ``ratio`` fraction of elements with the largest magnitude (at least
one), sent as int32 indices and values; ``sign`` sends one bit per element and one scale,
the mean magnitude of ``p`` (so that ``c`` has ``p``'s L1 norm).

The residual ``e`` is kept per (micro-batch index, parameter): the micro-batch, not the
worker, is the unit (any worker may compute any micro-batch), so the compressed mode is
still a pure function of the batches and stays reproducible run to run whatever the
number of workers; it is not equal to the synchronous mode.
The wire encoding, for remote shards, is :mod:`gradmesh.wire.compression`.

With ``"where": "worker"`` the workers compress their replies and keep the residuals
(:mod:`gradmesh.server.worker.residuals`, per (job, micro-batch index, parameter)); the
coordinator only counts the bytes (:meth:`StagedResiduals.received`) and forwards the
encoded gradients.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "KINDS",
    "validate",
    "compress",
    "encoded_bytes",
    "Residuals",
]

KINDS = ("topk", "sign")
PLACES = ("coordinator", "worker")  # where the residuals are kept
INDEX_BYTES = 4  # int32 indices of the kept elements


def validate(spec: dict) -> dict:
    """A compression description, normalised; ValueError naming the field when bad.
    ``where`` stays out of the result unless it is "worker", so that the coordinator
    mode's description (part of a job's content and id) is what it always was."""
    where = spec.get("where") or "coordinator"
    if where not in PLACES:
        raise ValueError(f"compression.where must be one of {list(PLACES)}, got {where!r}")
    placed = {"where": "worker"} if where == "worker" else {}
    kind = spec.get("kind")
    if kind not in KINDS:
        raise ValueError(f"compression.kind must be one of {list(KINDS)}, got {kind!r}")
    if kind == "sign":
        if spec.get("ratio"):
            raise ValueError("compression.ratio applies to kind 'topk' only")
        return {"kind": "sign", **placed}
    ratio = spec.get("ratio")
    if not isinstance(ratio, (int, float)) or not 0.0 < float(ratio) <= 1.0:
        raise ValueError(f"compression.ratio must be in (0, 1] for topk, got {ratio!r}")
    return {"kind": "topk", "ratio": float(ratio), **placed}


def at_worker(spec: dict | None) -> bool:
    """Whether the workers compress (and keep the residuals) for this description."""
    return spec is not None and spec.get("where") == "worker"


def _kept(size: int, ratio: float) -> int:
    return max(1, min(size, int(np.ceil(ratio * size))))


def _top_indices(magnitude: np.ndarray, k: int) -> np.ndarray:
    """The indices of the ``k`` largest magnitudes in linear time; ties at the threshold
    go to the lowest indices, so that the choice does not depend on the selection
    algorithm."""
    threshold = np.partition(magnitude, magnitude.size - k)[magnitude.size - k]
    above = np.flatnonzero(magnitude > threshold)
    at = np.flatnonzero(magnitude == threshold)[: k - above.size]
    return np.concatenate([above, at])


def kept_count(size: int, ratio: float) -> int:
    """How many of ``size`` elements top-k keeps at ``ratio`` (at least one)."""
    return _kept(size, ratio)


def compress(spec: dict, p: np.ndarray) -> np.ndarray:
    """``C(p)``: what the receiver reconstructs, dense, in ``p``'s dtype and shape."""
    flat = p.reshape(-1)
    out = np.zeros_like(flat)
    if flat.size == 0:
        return out.reshape(p.shape)
    if spec["kind"] == "topk":
        idx = _top_indices(np.abs(flat), _kept(flat.size, spec["ratio"]))
        out[idx] = flat[idx]
    else:
        scale = np.mean(np.abs(flat), dtype=np.float64).astype(flat.dtype)
        out[:] = np.where(flat >= 0, scale, -scale)
    return out.reshape(p.shape)


def encoded_bytes(spec: dict, a: np.ndarray) -> int:
    """Bytes of ``C(p)`` in the compressed encoding (indices and values; or bits and a
    scale; padded to whole int32 words: :mod:`gradmesh.wire.compression`), against
    ``a.nbytes`` dense."""
    if spec["kind"] == "topk":
        used = _kept(a.size, spec["ratio"]) * (INDEX_BYTES + a.itemsize) if a.size else 0
    else:
        used = -(-a.size // 8) + a.itemsize
    return -(-used // 4) * 4


@dataclass
class Residuals:
    """A job's error-feedback residuals, per (micro-batch index, parameter). A step's
    updates are staged and kept only when the step is applied, so that a failed attempt
    (retried, perhaps with other workers) does not feed its error back twice."""

    spec: dict
    kept: dict[tuple[int, str], np.ndarray] = field(default_factory=dict)
    dense_bytes: int = 0
    sent_bytes: int = 0

    def stage(self) -> "StagedResiduals":
        return StagedResiduals(self)


@dataclass
class StagedResiduals:
    """One step attempt's residual updates and byte counts, committed when it applies."""

    owner: Residuals
    new: dict[tuple[int, str], np.ndarray] = field(default_factory=dict)
    # (dense, encoded) bytes per (micro-batch, parameter): a micro-batch given again (its
    # push failed and it was recomputed) is counted once.
    sizes: dict[tuple[int, str], tuple[int, int]] = field(default_factory=dict)
    # Micro-batches arrive on several threads at once.
    lock: threading.Lock = field(default_factory=threading.Lock)

    def apply(self, m: int, grads: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Micro-batch ``m``'s gradients compressed with error feedback (each micro-batch
        is given once per attempt: the first result of it)."""
        out = {}
        for name, g in grads.items():
            e = self.owner.kept.get((m, name))
            p = np.asarray(g) + e if e is not None else np.array(g)
            c = compress(self.owner.spec, p)
            with self.lock:
                self.new[(m, name)] = p - c
                self.sizes[(m, name)] = (p.nbytes, encoded_bytes(self.owner.spec, p))
            out[name] = c
        return out

    def received(self, m: int, sizes: dict[str, tuple[int, int]]) -> None:
        """Micro-batch ``m``'s (dense, as sent) bytes per parameter, for a job whose
        workers compress (the residuals are theirs: nothing else to stage)."""
        with self.lock:
            self.sizes.update({(m, name): size for name, size in sizes.items()})

    def commit(self) -> None:
        self.owner.kept.update(self.new)
        self.owner.dense_bytes += sum(dense for dense, _ in self.sizes.values())
        self.owner.sent_bytes += sum(sent for _, sent in self.sizes.values())
