"""Where a job's parameters live: each on one shard, or cut into row slices over several
(by bytes, :func:`~gradmesh.server.aggregate.place_rows`), and how whole tensors are cut
for the shards and joined from what they return."""

from __future__ import annotations

import numpy as np

from gradmesh.server.aggregate import (
    place_rows,
)
from gradmesh.server.job import Job


def place(names: list[str], params: dict, shards: int, clipping) -> tuple[dict, dict]:
    """``(placement, pieces)`` of a new job: every parameter's (first) shard, and the row
    slices of the ones cut over several shards. clip_grad_norm needs each parameter's norm
    over the whole tensor with torch's own summation, which norms of slices cannot give
    bit for bit: a job clipping by norm keeps its parameters whole."""
    rows = {n: int(params[n].shape[0]) if params[n].ndim else 0 for n in names}
    sizes = {n: (int(params[n].nbytes), rows[n]) for n in names}
    split = clipping is None or clipping["kind"] == "value"
    parts = place_rows(sizes, shards, split=split)
    placement = {n: ps[0][0] for n, ps in parts.items()}
    return placement, {n: ps for n, ps in parts.items() if len(ps) > 1}


def used_shards(job: Job) -> list[int]:
    used = set(job.placement.values())
    for parts in job.pieces.values():
        used.update(shard for shard, _, _ in parts)
    return sorted(used)


def names_on(job: Job, i: int, names) -> list[str]:
    """The names among ``names`` of which shard ``i`` holds the whole or a slice."""
    return [
        n
        for n in names
        if (any(p[0] == i for p in job.pieces[n]) if n in job.pieces else job.placement.get(n) == i)
    ]


def parts_on(job: Job, i: int, arrays: dict, names) -> dict:
    """What shard ``i`` holds of ``arrays`` (whole tensors of ``names``): whole ones, and
    its row slice (a view) of a cut one, under the parameter's name."""
    out = {}
    for n in names_on(job, i, names):
        rows = [(start, stop) for shard, start, stop in job.pieces.get(n, ()) if shard == i]
        out[n] = arrays[n][rows[0][0] : rows[0][1]] if rows else arrays[n]
    return out


def assemble(job: Job, parts: list[dict]) -> dict:
    """Whole tensors from what each used shard returned (``parts`` in ``used_shards``
    order): a cut parameter's slices joined in row order."""
    by_shard = dict(zip(used_shards(job), parts))
    arrays: dict = {}
    for part in parts:
        arrays.update(part)
    for n, pieces in job.pieces.items():
        if n in arrays:
            arrays[n] = np.concatenate([by_shard[shard][n] for shard, _, _ in pieces])
    return arrays
