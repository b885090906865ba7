"""Datasets and a DataLoader with ``torch.utils.data``'s interface (in one process).

>>> import gradmesh.core as gm
>>> from gradmesh.core.utils.data import DataLoader, TensorDataset
>>> ds = TensorDataset(gm.arange(5.0), gm.arange(5))
>>> [tuple(x.tolist()) for x, _ in DataLoader(ds, batch_size=2)]
[(0.0, 1.0), (2.0, 3.0), (4.0,)]
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from .. import factories
from .. import functional as F
from ..random import Generator, torch_draws
from ..tensor import Tensor

__all__ = ["Dataset", "TensorDataset", "Subset", "DataLoader", "random_split", "default_collate"]


class Dataset:
    """A map-style dataset: ``__getitem__(i)`` and ``__len__``."""

    def __getitem__(self, index):
        raise NotImplementedError

    def __len__(self) -> int:
        raise NotImplementedError


class TensorDataset(Dataset):
    """Samples are the ``i``-th rows of tensors that share their first dimension."""

    def __init__(self, *tensors: Tensor):
        if any(t.shape[0] != tensors[0].shape[0] for t in tensors):
            raise ValueError("Size mismatch between tensors")
        self.tensors = tensors

    def __getitem__(self, index):
        return tuple(t[index] for t in self.tensors)

    def __len__(self) -> int:
        return self.tensors[0].shape[0]


class Subset(Dataset):
    """The samples of ``dataset`` at ``indices``."""

    def __init__(self, dataset, indices: Sequence[int]):
        self.dataset, self.indices = dataset, list(indices)

    def __getitem__(self, index):
        return self.dataset[self.indices[index]]

    def __len__(self) -> int:
        return len(self.indices)


def random_split(
    dataset, lengths: Sequence[int | float], generator: Generator | None = None
) -> list[Subset]:
    """Split ``dataset`` into random, non-overlapping subsets of ``lengths`` (counts, or
    fractions that sum to 1, whose remainder goes round-robin as torch does)."""
    n = len(dataset)
    if math.isclose(sum(lengths), 1) and sum(lengths) <= 1:
        counts = [int(math.floor(n * frac)) for frac in lengths]
        for i in range(n - sum(counts)):
            counts[i % len(counts)] += 1
        lengths = counts
    if sum(lengths) != n:
        raise ValueError("Sum of input lengths does not equal the length of the input dataset!")
    order = factories.randperm(n, generator=generator).tolist()
    subsets, start = [], 0
    for length in lengths:
        subsets.append(Subset(dataset, order[start : start + length]))
        start += length
    return subsets


def default_collate(batch: list) -> Any:
    """Stack a list of samples into a batch: tensors, arrays and numbers become one tensor
    (with a new first dimension); tuples, lists and dicts are collated field by field;
    strings stay a list."""
    first = batch[0]
    if isinstance(first, Tensor):
        return F.stack(list(batch))
    if isinstance(first, np.ndarray):
        return factories.tensor(np.stack(batch))
    if isinstance(first, (bool, np.bool_)):
        return factories.tensor(batch)
    if isinstance(first, numbers.Integral):
        return factories.tensor(batch, dtype="int64")
    if isinstance(first, numbers.Real):
        return factories.tensor(batch, dtype="float64")
    if isinstance(first, str):
        return list(batch)
    if isinstance(first, dict):
        return {k: default_collate([sample[k] for sample in batch]) for k in first}
    if isinstance(first, (tuple, list)):
        if any(len(sample) != len(first) for sample in batch):
            raise RuntimeError("each element in list of batch should be of equal size")
        fields = [default_collate(list(column)) for column in zip(*batch)]
        return tuple(fields) if isinstance(first, tuple) else fields
    raise TypeError(
        f"default_collate: batch must contain tensors, numpy arrays, numbers, "
        f"strings, dicts or lists; found {type(first).__name__}"
    )


class DataLoader:
    """Batches of a dataset: ``batch_size`` samples, in order or shuffled (reproducibly
    with ``generator``), the last smaller batch kept unless ``drop_last``."""

    def __init__(
        self,
        dataset,
        batch_size: int | None = 1,
        shuffle: bool = False,
        sampler=None,
        drop_last: bool = False,
        collate_fn: Callable[[list], Any] | None = None,
        generator: Generator | None = None,
        num_workers: int = 0,
        **_unused,
    ):
        if sampler is not None and shuffle:
            raise ValueError("sampler option is mutually exclusive with shuffle")
        if batch_size is not None and (not isinstance(batch_size, int) or batch_size <= 0):
            raise ValueError(
                f"batch_size should be a positive integer value, but got batch_size={batch_size}"
            )
        self.dataset, self.batch_size, self.shuffle = dataset, batch_size, shuffle
        self.sampler, self.drop_last, self.generator = sampler, drop_last, generator
        self.collate_fn = collate_fn or (
            default_collate if batch_size is not None else (lambda sample: sample)
        )

    def _indices(self) -> Iterator[int]:
        if self.sampler is not None:
            return iter(self.sampler)
        if self.shuffle:
            return self._shuffled(len(self.dataset))
        return iter(range(len(self.dataset)))

    def _shuffled(self, n: int) -> Iterator[int]:
        # torch's RandomSampler, draw for draw (core/random.py): one permutation per pass,
        # and a second one drawn (and cut to nothing) when the pass runs out.
        yield from factories.randperm(n, generator=self.generator).tolist()
        factories.randperm(n, generator=self.generator)

    def __iter__(self) -> Iterator:
        # torch's loader draws its workers' base seed (64 bits) first, also with no workers.
        torch_draws(self.generator, 2)
        indices = self._indices()
        if self.batch_size is None:
            for i in indices:
                yield self.collate_fn(self.dataset[i])
            return
        chunk: list[int] = []
        for i in indices:
            chunk.append(i)
            if len(chunk) == self.batch_size:
                yield self.collate_fn([self.dataset[j] for j in chunk])
                chunk = []
        if chunk and not self.drop_last:
            yield self.collate_fn([self.dataset[j] for j in chunk])

    def __len__(self) -> int:
        n = len(self.sampler) if self.sampler is not None else len(self.dataset)
        if self.batch_size is None:
            return n
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)
