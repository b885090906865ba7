"""A training loop over a :class:`~gradmesh.client.coordinator.Job`, with a progress bar.

>>> history = fit(job, lambda epoch: batches(x, y, 256, seed=epoch), epochs=3)  # doctest: +SKIP
train: 100%|████████| 21/21 [00:04, loss=0.21, samples/s=1.3e+03, step=21]
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

__all__ = ["fit", "batches", "History"]


@dataclass
class History:
    """What ``fit`` saw: one entry per step."""

    steps: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    metrics: list[dict] = field(default_factory=list)
    samples: int = 0
    seconds: float = 0.0

    @property
    def samples_per_second(self) -> float:
        return self.samples / self.seconds if self.seconds > 0 else 0.0


def batches(
    *arrays: np.ndarray,
    batch_size: int,
    shuffle: bool = True,
    seed: int = 0,
    drop_last: bool = False,
) -> Iterator[tuple[np.ndarray, ...]]:
    """Cut arrays (same first dimension) into batches; shuffled by ``seed`` if asked.

    The same seed gives the same batches, so a run can be repeated bit for bit.
    """
    n = len(arrays[0])
    if any(len(a) != n for a in arrays):
        raise ValueError(f"arrays disagree on their length: {[len(a) for a in arrays]}")
    order = np.random.default_rng(seed).permutation(n) if shuffle else np.arange(n)
    for start in range(0, n, batch_size):
        idx = order[start : start + batch_size]
        if drop_last and len(idx) < batch_size:
            return
        yield tuple(np.ascontiguousarray(a[idx]) for a in arrays)


def fit(
    job,
    data: Iterable[Sequence] | Callable[[int], Iterable[Sequence]],
    epochs: int = 1,
    *,
    progress: bool = True,
    desc: str = "train",
    steps_per_epoch: int | None = None,
    on_step: Callable[[int, object], None] | None = None,
    in_flight: int | None = None,
) -> History:
    """Run ``job.step`` over every batch for ``epochs`` epochs; returns the :class:`History`.

    ``data``: a re-iterable of batches (tuples in the loss function's order), or a
    function ``epoch -> iterable of batches`` (e.g. reshuffled per epoch). The progress
    bar (tqdm) shows the loss, samples per second and the step id; give
    ``steps_per_epoch`` when ``data`` is a function so it can show the total.
    ``on_step(epoch, result)`` is called after every step.

    ``in_flight``: steps sent before the oldest one's result is awaited (default: the
    job's ``in_flight``: ``min(staleness + 1, 3)`` for a bounded-staleness job, else 1); results
    are still recorded in step order.
    """
    from tqdm.auto import tqdm

    history = History()
    total = steps_per_epoch * epochs if steps_per_epoch else None
    if total is None and not callable(data):
        try:
            total = len(data) * epochs  # type: ignore[arg-type]
        except TypeError:
            total = None
    bar = tqdm(total=total, desc=desc, disable=not progress, unit="step", leave=True)
    start = time.perf_counter()
    window = int(in_flight or getattr(job, "in_flight", None) or 1)
    running: deque = deque()  # (epoch, future) of the steps sent, oldest first

    def record(epoch: int, result) -> None:
        history.steps.append(result.step_id)
        history.losses.append(result.loss)
        history.metrics.append(result.metrics)
        history.samples += result.batch_size
        history.seconds = time.perf_counter() - start
        bar.update(1)
        bar.set_postfix(
            loss=f"{result.loss:.4f}",
            **{"samples/s": f"{history.samples_per_second:.0f}"},
            step=result.step_id,
            refresh=False,
        )
        if on_step is not None:
            on_step(epoch, result)

    try:
        for epoch in range(epochs):
            for batch in data(epoch) if callable(data) else data:
                if window <= 1:
                    record(epoch, job.step(*batch))
                    continue
                running.append((epoch, job.step_async(*batch)))
                if len(running) >= window:
                    done_epoch, future = running.popleft()
                    record(done_epoch, future.result())
        while running:
            done_epoch, future = running.popleft()
            record(done_epoch, future.result())
    finally:
        bar.close()
    history.seconds = time.perf_counter() - start
    return history
