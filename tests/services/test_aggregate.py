"""Micro-batching, weights, seeds, the fixed summation tree and shard placement."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gradmesh.server.aggregate import (
    TreeSum,
    combine_buffers,
    loss_scales,
    micro_batch_seed,
    micro_batches,
    place,
    place_rows,
    tree_sum,
)


def test_micro_batches_cut_fixed_size_with_a_smaller_last_one():
    assert micro_batches(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert micro_batches(8, 4) == [(0, 4), (4, 8)]
    assert micro_batches(3, 8) == [(0, 3)]


@pytest.mark.parametrize("batch,micro", [(0, 4), (4, 0), (-1, 2)])
def test_micro_batches_reject_empty_sizes(batch, micro):
    with pytest.raises(ValueError, match="must be >= 1"):
        micro_batches(batch, micro)


def test_loss_scales_weight_each_micro_batch_by_its_share():
    assert loss_scales(10, 4) == [0.4, 0.4, 0.2]
    assert sum(loss_scales(128, 32)) == 1.0


def test_seeds_depend_only_on_job_step_and_micro_batch():
    a = micro_batch_seed("job", 3, 1)
    assert a == micro_batch_seed("job", 3, 1)
    others = {
        micro_batch_seed("job", 3, 2),
        micro_batch_seed("job", 4, 1),
        micro_batch_seed("other", 3, 1),
    }
    assert a not in others and len(others) == 3
    assert 0 <= a < 2**63


def test_tree_is_the_documented_pairwise_tree():
    g = [np.float32(v) for v in (1e8, 1.0, -1e8, 1.0, 0.5)]
    expected = ((g[0] + g[1]) + (g[2] + g[3])) + g[4]
    assert tree_sum(g) == expected
    assert tree_sum([7]) == 7


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 33), seed=st.integers(0, 2**32 - 1))
def test_tree_sum_is_bitwise_independent_of_arrival_order(n, seed):
    rng = np.random.default_rng(seed)
    values = [
        rng.standard_normal(5).astype(np.float32) * 10.0 ** rng.integers(-3, 4) for _ in range(n)
    ]
    reference = tree_sum([v.copy() for v in values])
    t = TreeSum(n)
    for i in rng.permutation(n):
        t.add(int(i), values[i].copy())
    assert np.array_equal(t.result(), reference)


def test_tree_sum_ignores_duplicates_and_reports_missing():
    t = TreeSum(3)
    assert t.add(1, np.float32(1.0))
    assert not t.add(1, np.float32(100.0))
    assert t.missing() == [0, 2] and not t.complete
    with pytest.raises(ValueError, match=r"leaves \[0, 2\] missing"):
        t.result()
    with pytest.raises(IndexError):
        t.add(3, np.float32(0.0))
    t.add(0, np.float32(2.0))
    t.add(2, np.float32(4.0))
    assert t.result() == 7.0


def test_in_order_arrival_keeps_only_a_logarithmic_number_of_partial_sums():
    t = TreeSum(64)
    peak = 0
    for i in range(64):
        t.add(i, np.float32(i))
        peak = max(peak, len(t._nodes))
    assert peak <= 7
    assert t.result() == sum(range(64))


def test_place_balances_bytes_largest_first_ties_by_name():
    sizes = {"w1": 400, "b1": 4, "w2": 300, "b2": 4, "w3": 100}
    assert place(sizes, 2) == {"w1": 0, "b1": 0, "w2": 1, "b2": 1, "w3": 1}
    # Equal sizes go in name order onto the least loaded shard (lower index on ties).
    assert place({"b": 8, "a": 8, "c": 8}, 2) == {"a": 0, "b": 1, "c": 0}
    assert place(sizes, 1) == {n: 0 for n in sizes}
    assert set(place(sizes, 8).values()) <= set(range(8))
    with pytest.raises(ValueError):
        place(sizes, 0)


def test_combine_buffers_weighted_mean_in_float64_and_counters_once():
    rng = np.random.default_rng(0)
    updates = [
        {"mean": rng.standard_normal(5).astype(np.float32), "count": np.int64(8)} for _ in range(3)
    ]
    weights = loss_scales(10, 4)  # 0.4, 0.4, 0.2
    got = combine_buffers(updates, weights)
    want = sum(np.float64(w) * u["mean"].astype(np.float64) for u, w in zip(updates, weights))
    assert got["mean"].dtype == np.float32
    assert np.array_equal(got["mean"], want.astype(np.float32))
    assert got["count"] == 8 and got["count"].dtype == np.int64
    # One micro-batch: its update exactly.
    assert np.array_equal(combine_buffers(updates[:1], [1.0])["mean"], updates[0]["mean"])


def _shard_bytes(pieces, sizes, shards):
    load = [0] * shards
    for name, parts in pieces.items():
        size, rows = sizes[name]
        for shard, start, stop in parts:
            load[shard] += size * (stop - start) // rows if rows else size
    return load


@pytest.mark.parametrize("shards", [1, 2, 3, 5, 8])
def test_place_rows_cuts_large_parameters_so_no_shard_holds_much_more_than_its_share(shards):
    # The MLP 784-512-512-10 in float32: (bytes, rows) per parameter.
    sizes = {
        "0.weight": (512 * 784 * 4, 512),
        "0.bias": (512 * 4, 512),
        "2.weight": (512 * 512 * 4, 512),
        "2.bias": (512 * 4, 512),
        "4.weight": (10 * 512 * 4, 10),
        "4.bias": (10 * 4, 10),
        "scale": (4, 0),  # a scalar: never cut
    }
    pieces = place_rows(sizes, shards)
    assert list(pieces) == list(sizes)
    for name, parts in pieces.items():
        rows = sizes[name][1]
        # Row ranges in order, covering every row once; one piece per shard.
        assert [p[1] for p in parts] == [0] + [p[2] for p in parts[:-1]]
        assert parts[-1][2] == rows
        assert len({p[0] for p in parts}) == len(parts)
    total = sum(size for size, _ in sizes.values())
    share = -(-total // shards)
    widest_row = 784 * 4
    assert max(_shard_bytes(pieces, sizes, shards)) <= share + widest_row
    assert sum(_shard_bytes(pieces, sizes, shards)) == total
    assert place_rows(sizes, shards) == pieces  # deterministic


def test_place_rows_without_split_is_place():
    sizes = {"w1": 400, "b1": 4, "w2": 300, "b2": 4, "w3": 100}
    whole = place_rows({n: (b, 4) for n, b in sizes.items()}, 2, split=False)
    assert {n: parts[0][0] for n, parts in whole.items()} == place(sizes, 2)
    assert all(parts == [(parts[0][0], 0, 4)] for parts in whole.values())
    # Uncut: 400 bytes on one shard; cut: each shard holds its share.
    cut = place_rows({n: (b, 4) for n, b in sizes.items()}, 2)
    assert _shard_bytes(cut, {n: (b, 4) for n, b in sizes.items()}, 2) == [404, 404]
    with pytest.raises(ValueError):
        place_rows({"w": (8, 2)}, 0)


def test_a_job_clipping_by_norm_keeps_its_parameters_whole():
    # clip_grad_norm's per-parameter norms are taken over whole tensors on the shards.
    from gradmesh.server.placement import place

    params = {"w": np.zeros((8, 4), np.float32), "b": np.zeros(8, np.float32)}
    names = list(params)
    by_norm = {"kind": "norm", "max_norm": 1.0, "norm_type": 2.0}
    assert place(names, params, 2, by_norm) == ({"w": 0, "b": 1}, {})
    for clipping in (None, {"kind": "value", "clip_value": 1.0}):
        placement, pieces = place(names, params, 2, clipping)
        assert pieces == {"w": [(0, 0, 5), (1, 5, 8)]} and placement == {"w": 0, "b": 1}
