"""Deterministic data parallelism: micro-batches, their weights and seeds, the fixed
summation tree, and the placement of parameters over shards.

Everything here is a pure function of its arguments, so the coordinator, the shards and a
single-process reference run (tests/cluster/test_determinism.py) compute exactly the same thing.

>>> micro_batches(10, 4)
[(0, 4), (4, 8), (8, 10)]
>>> [float(w) for w in loss_scales(10, 4)]
[0.4, 0.4, 0.2]
>>> tree_sum([1.0, 2.0, 3.0])
6.0
>>> place({"a": 8, "b": 4, "c": 4}, 2)
{'a': 0, 'b': 1, 'c': 1}
>>> place_rows({"w": (12, 3), "b": (4, 1)}, 2)
{'w': [(0, 0, 2), (1, 2, 3)], 'b': [(1, 0, 1)]}
"""

from __future__ import annotations

import hashlib
from typing import Any, Callable, Sequence

import numpy as np

__all__ = [
    "micro_batches",
    "loss_scales",
    "micro_batch_seed",
    "tree_sum",
    "TreeSum",
    "place",
    "place_rows",
    "combine_buffers",
]


def micro_batches(batch_size: int, micro_batch_size: int) -> list[tuple[int, int]]:
    """Row ranges ``[(start, stop), ...]`` cutting a batch into fixed-size micro-batches.

    Every micro-batch has ``micro_batch_size`` rows except possibly the last, smaller one.
    """
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
    return [
        (start, min(start + micro_batch_size, batch_size))
        for start in range(0, batch_size, micro_batch_size)
    ]


def loss_scales(batch_size: int, micro_batch_size: int) -> list[float]:
    """The weight of each micro-batch's mean loss: ``rows / batch_size``.

    With a loss that is a mean over the batch, the weighted sum of the micro-batches'
    losses (and gradients) equals the full batch's, up to the rounding of micro-batching.
    The weights are Python floats (doubles): the worker multiplies by them in the graph's
    dtype, the same way for every worker.
    """
    return [
        (stop - start) / batch_size for start, stop in micro_batches(batch_size, micro_batch_size)
    ]


def combine_buffers(
    updates: Sequence[dict[str, np.ndarray]], weights: Sequence[float]
) -> dict[str, np.ndarray]:
    """A step's new buffers from its micro-batches' (docs/training.md, "Buffers").

    ``updates[m]`` holds the buffers micro-batch ``m`` computed from the step's starting
    ones, ``weights[m]`` its :func:`loss_scales` weight (rows / batch size). A floating
    buffer becomes the weighted mean ``sum_m weights[m] * updates[m]``, accumulated in
    float64 in micro-batch order and rounded once to the buffer's dtype; any other buffer
    (``num_batches_tracked``) takes micro-batch 0's value, so a counter advances once per
    step. One micro-batch gives its update unchanged.

    >>> a, b = {"mean": np.float32([1.0, 2.0])}, {"mean": np.float32([3.0, 6.0])}
    >>> combine_buffers([a, b], [0.75, 0.25])["mean"].tolist()
    [1.5, 3.0]
    """
    out = {}
    for name, first in updates[0].items():
        first = np.asarray(first)
        if not np.issubdtype(first.dtype, np.floating):
            out[name] = first.copy()
            continue
        total = np.zeros(first.shape, np.float64)
        for update, weight in zip(updates, weights):
            total += np.float64(weight) * np.asarray(update[name], np.float64)
        out[name] = total.astype(first.dtype)
    return out


def micro_batch_seed(job_id: str, step_id: int, micro_batch: int) -> int:
    """The random seed of one micro-batch: the first 8 bytes of SHA-256("job/step/mb").

    It depends on nothing else, so a dropout mask is the same on whichever worker runs it.
    Fits in 63 bits (NumPy's and protobuf's uint64 both take it).
    """
    digest = hashlib.sha256(f"{job_id}/{step_id}/{micro_batch}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


class TreeSum:
    """The fixed pairwise sum of ``n`` values, computed as they arrive in any order.

    Level 0 holds the values; node ``i`` of level ``k + 1`` is node ``2i`` of level ``k``
    plus node ``2i + 1`` (or node ``2i`` alone when level ``k`` has no ``2i + 1``). A node
    is computed as soon as both its children are known and the children are dropped, so
    in-order arrival keeps only about log2(n) partial sums alive. The result depends on
    ``n`` only, never on the arrival order.

    ``add`` is a function of two values returning their sum (default ``a + b``); it may
    reuse the left operand's memory, which ``TreeSum`` owns once given.
    """

    def __init__(self, n: int, add: Callable[[Any, Any], Any] | None = None):
        if n < 1:
            raise ValueError(f"TreeSum needs n >= 1, got {n}")
        self.n = n
        self._add = add or (lambda a, b: a + b)
        # Width of each level, from the leaves up to the root (width 1).
        self._widths = [n]
        while self._widths[-1] > 1:
            self._widths.append((self._widths[-1] + 1) // 2)
        self._nodes: dict[tuple[int, int], Any] = {}
        self._seen: set[int] = set()

    def __contains__(self, index: int) -> bool:
        return index in self._seen

    def __len__(self) -> int:
        """Number of distinct leaves received."""
        return len(self._seen)

    @property
    def complete(self) -> bool:
        return len(self._seen) == self.n

    def missing(self) -> list[int]:
        return [i for i in range(self.n) if i not in self._seen]

    def add(self, index: int, value: Any) -> bool:
        """Give leaf ``index`` its value; returns False (and ignores it) for a duplicate."""
        if not 0 <= index < self.n:
            raise IndexError(f"leaf {index} out of range for a sum of {self.n}")
        if index in self._seen:
            return False
        self._seen.add(index)
        level, i = 0, index
        while True:
            if level == len(self._widths) - 1:
                self._nodes[(level, i)] = value
                return True
            sibling = i ^ 1
            if sibling >= self._widths[level]:
                # No sibling: carried up unchanged.
                level, i = level + 1, i // 2
                continue
            other = self._nodes.pop((level, sibling), None)
            if other is None:
                self._nodes[(level, i)] = value
                return True
            left, right = (value, other) if i < sibling else (other, value)
            value = self._add(left, right)
            level, i = level + 1, i // 2

    def result(self) -> Any:
        if not self.complete:
            raise ValueError(f"sum incomplete: leaves {self.missing()} missing")
        return self._nodes[(len(self._widths) - 1, 0)]


def tree_sum(values: Sequence[Any], add: Callable[[Any, Any], Any] | None = None) -> Any:
    """Sum ``values`` with the fixed pairwise tree of ``TreeSum``.

    >>> tree_sum([1, 2, 3, 4, 5])
    15
    """
    t = TreeSum(len(values), add)
    for i, v in enumerate(values):
        t.add(i, v)
    return t.result()


def place(sizes: dict[str, int], shards: int) -> dict[str, int]:
    """Assign parameters to shards balanced by bytes: deterministic and greedy.

    Largest parameter first onto the shard with the fewest bytes so far; ties between
    parameters of equal size are broken by name, ties between shards by the lower index.
    """
    if shards < 1:
        raise ValueError(f"need at least one shard, got {shards}")
    load = [0] * shards
    placement: dict[str, int] = {}
    for name, size in sorted(sizes.items(), key=lambda kv: (-kv[1], kv[0])):
        target = min(range(shards), key=lambda s: (load[s], s))
        placement[name] = target
        load[target] += size
    return {name: placement[name] for name in sizes}


def place_rows(
    sizes: dict[str, tuple[int, int]], shards: int, split: bool = True
) -> dict[str, list[tuple[int, int, int]]]:
    """Assign parameters to shards by bytes, cutting the large ones into row slices.

    ``sizes``: name -> ``(bytes, rows)`` (rows: the length of dim 0, 0 for a scalar).
    Returns name -> ``[(shard, start, stop), ...]``: rows ``start:stop`` of the parameter
    on ``shard``, in row order (one piece ``(shard, 0, rows)`` when it is not cut).

    Each shard's share is ``ceil(total / shards)`` bytes. Largest parameter first (ties
    by name) onto the shard with the fewest bytes so far (ties: the lower index), whole
    when it fits in that shard's share or cannot be cut (fewer than 2 rows, or not
    ``split``); else the shard gets as many rows as fill its share (rounded up to a whole
    row) and the rest goes on to the next least loaded shard. So no shard holds more than
    its share plus one row, plus what uncuttable parameters force; a shard holds at most
    one piece of a parameter, so pieces keep the parameter's name on their shards.
    """
    if shards < 1:
        raise ValueError(f"need at least one shard, got {shards}")
    share = -(-sum(size for size, _ in sizes.values()) // shards)
    load = [0] * shards
    pieces: dict[str, list[tuple[int, int, int]]] = {}
    for name, (size, rows) in sorted(sizes.items(), key=lambda kv: (-kv[1][0], kv[0])):
        target = min(range(shards), key=lambda s: (load[s], s))
        if load[target] + size <= share or not split or rows < 2:
            pieces[name] = [(target, 0, rows)]
            load[target] += size
            continue
        pieces[name] = _cut(size, rows, share, load)
    return {name: pieces[name] for name in sizes}


def _cut(size: int, rows: int, share: int, load: list[int]) -> list[tuple[int, int, int]]:
    """Rows of one parameter of ``size`` bytes dealt to the least loaded shards, each
    filled to ``share`` (``load`` is updated)."""
    row_bytes = size // rows
    parts, start = [], 0
    while start < rows:
        target = min(range(len(load)), key=lambda s: (load[s], s))
        room = share - load[target]
        # Rounded up to a whole row; at least one row (room > 0 while rows remain, since
        # the shards' shares add up to at least the total).
        stop = min(rows, start + max(1, -(-room // row_bytes)))
        parts.append((target, start, stop))
        load[target] += (stop - start) * row_bytes
        start = stop
    return sorted(parts, key=lambda p: p[1])
