"""Data and interop utilities against torch: gradient clipping, save/load (no pickle),
``device``, ``utils.data`` (Dataset, TensorDataset, DataLoader, random_split), DLPack and
NumPy's array protocol."""

from __future__ import annotations

import io

import numpy as np
import pytest
import safetensors
import torch

import gradmesh.core as gm
from gradmesh.core.nn.utils import clip_grad_norm_, clip_grad_value_
from gradmesh.core.utils.data import DataLoader, Dataset, TensorDataset, random_split

_rng = np.random.default_rng(7)
GRADS = [
    _rng.standard_normal((3, 4)).astype(np.float32),
    _rng.standard_normal(5).astype(np.float32) * 3,
]


def _with_grads(lib):
    params = []
    for g in GRADS:
        p = lib.zeros(g.shape, requires_grad=True)
        p.grad = lib.tensor(g.copy())
        params.append(p)
    return params


# ------------------------------------------------------------------ clipping ----------


@pytest.mark.parametrize(
    "max_norm,norm_type", [(1.0, 2.0), (100.0, 2.0), (0.5, 1), (2.0, float("inf")), (1.5, 3.0)]
)
def test_clip_grad_norm_matches_torch(max_norm, norm_type):
    ours, theirs = _with_grads(gm), _with_grads(torch)
    a = clip_grad_norm_(ours, max_norm, norm_type)
    b = torch.nn.utils.clip_grad_norm_(theirs, max_norm, norm_type)
    np.testing.assert_allclose(a.item(), b.item(), rtol=1e-6)
    for p, q in zip(ours, theirs):
        np.testing.assert_allclose(p.grad.numpy(), q.grad.numpy(), rtol=1e-6, atol=1e-7)
    assert gm.nn.utils.clip_grad_norm_ is clip_grad_norm_


def test_clip_grad_norm_refuses_a_non_finite_norm_when_asked():
    for lib, clip in ((gm, clip_grad_norm_), (torch, torch.nn.utils.clip_grad_norm_)):
        p = lib.zeros(2, requires_grad=True)
        p.grad = lib.tensor([float("inf"), 1.0])
        with pytest.raises(RuntimeError, match="is non-finite, so it cannot be clipped"):
            clip([p], 1.0, error_if_nonfinite=True)


def test_clip_grad_value_matches_torch():
    ours, theirs = _with_grads(gm), _with_grads(torch)
    clip_grad_value_(ours, 0.7)
    torch.nn.utils.clip_grad_value_(theirs, 0.7)
    for p, q in zip(ours, theirs):
        np.testing.assert_array_equal(p.grad.numpy(), q.grad.numpy())


# ------------------------------------------------------------------ save / load -------


def test_save_load_round_trips_a_model_and_an_optimizer(tmp_path):
    model = gm.nn.Sequential(gm.nn.Linear(3, 4), gm.nn.ReLU(), gm.nn.Linear(4, 1))
    opt = gm.optim.Adam(model.parameters(), lr=0.01)
    model(gm.randn(2, 3)).sum().backward()
    opt.step()
    path = tmp_path / "ckpt.safetensors"
    gm.save(
        {
            "model": model.state_dict(),
            "opt": opt.state_dict(),
            "epoch": 3,
            "note": ("a", None, 1.5),
        },
        path,
    )
    with safetensors.safe_open(str(path), "np") as f:  # plain tensors, no pickle inside
        assert "model.0.weight" in f.keys()
    loaded = gm.load(path)
    assert loaded["epoch"] == 3 and loaded["note"] == ("a", None, 1.5)
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(loaded["model"][k].numpy(), v.detach().numpy())
        assert loaded["model"][k].dtype is v.dtype
    assert set(loaded["opt"]["state"]) == {0, 1, 2, 3}  # int keys stay ints
    fresh = gm.nn.Sequential(gm.nn.Linear(3, 4), gm.nn.ReLU(), gm.nn.Linear(4, 1))
    fresh.load_state_dict(loaded["model"])
    again = gm.optim.Adam(fresh.parameters(), lr=0.01)
    again.load_state_dict(loaded["opt"])


@pytest.mark.parametrize("name", ["model.pt", "weights"])
def test_save_writes_the_path_it_is_given(tmp_path, name):
    # torch.save(sd, "model.pt") then torch.load("model.pt"): no ".npz" appended.
    path = tmp_path / name
    gm.save({"w": gm.ones(2)}, str(path))
    assert [p.name for p in tmp_path.iterdir()] == [name]
    assert gm.load(str(path))["w"].tolist() == [1.0, 1.0]


def test_save_refuses_objects_that_need_pickle_and_load_never_unpickles():
    with pytest.raises(TypeError, match="cannot store a object"):
        gm.save({"x": object()}, io.BytesIO())
    buf = io.BytesIO()
    np.savez(
        buf,
        __structure__=np.frombuffer(b'{"value": 1}', np.uint8),
        t0=np.array([object()], dtype=object),
    )
    buf.seek(0)
    with pytest.raises(ValueError, match="allow_pickle"):
        gm.load(buf)


# ------------------------------------------------------------------ device ------------


def test_device_behaves_like_torch_device():
    for lib in (gm, torch):
        d = lib.device("cuda:1")
        assert (d.type, d.index, str(d)) == ("cuda", 1, "cuda:1")
        assert repr(d) == "device(type='cuda', index=1)"
        assert lib.device("cpu").index is None and lib.device("cuda", 0) == lib.device("cuda:0")
        with pytest.raises(RuntimeError):
            lib.device("tpu")
    t = gm.zeros(2, device=gm.device("cpu")).to(gm.device("cpu"))
    assert t.device == "cpu" and t.device.type == torch.zeros(1).device.type
    assert repr(t.device) == repr(torch.zeros(1).device) and t.device.index is None


# ------------------------------------------------------------------ utils.data --------


def test_dataloader_batches_tuples_dicts_and_numbers_like_torch():
    x, y = np.arange(10.0).reshape(5, 2).astype(np.float32), np.arange(5)

    class Pairs(Dataset):
        def __len__(self):
            return 5

        def __getitem__(self, i):
            return {"x": x[i], "y": int(y[i]), "w": float(i) / 2, "name": f"s{i}"}

    for drop_last in (False, True):
        ours = list(DataLoader(Pairs(), batch_size=2, drop_last=drop_last))
        theirs = list(torch.utils.data.DataLoader(Pairs(), batch_size=2, drop_last=drop_last))
        assert len(ours) == len(theirs) == (2 if drop_last else 3)
        for a, b in zip(ours, theirs):
            for k in ("x", "y", "w"):
                np.testing.assert_array_equal(a[k].numpy(), b[k].numpy())
                assert a[k].dtype.name == str(b[k].dtype).removeprefix("torch.")
            assert a["name"] == b["name"]
    ds = TensorDataset(gm.tensor(x), gm.tensor(y))
    ((xb, yb),) = [b for b in DataLoader(ds, batch_size=5)]
    assert xb.tolist() == x.tolist() and yb.tolist() == y.tolist()
    assert len(DataLoader(ds, batch_size=2)) == 3 and len(DataLoader(ds, 2, drop_last=True)) == 2


def test_shuffle_with_a_generator_is_reproducible_and_a_permutation():
    ds = TensorDataset(gm.arange(20))

    def epoch(seed):
        g = gm.Generator().manual_seed(seed)
        return [
            v
            for (b,) in DataLoader(ds, batch_size=6, shuffle=True, generator=g)
            for v in b.tolist()
        ]

    assert epoch(1) == epoch(1) != epoch(2)
    assert sorted(epoch(1)) == list(range(20)) and epoch(1) != list(range(20))


def test_randperm_is_torchs_for_the_same_seed():
    for seed in (0, 7, 2**40 + 3):  # torch seeds its MT19937 with the low 32 bits
        g, t = gm.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        for n in (0, 1, 2, 10, 257):
            assert gm.randperm(n, generator=g).tolist() == torch.randperm(n, generator=t).tolist()
    g = gm.Generator().manual_seed(3)
    state = g.get_state()
    first = gm.randperm(9, generator=g).tolist()
    assert gm.randperm(9, generator=g.set_state(state)).tolist() == first


@pytest.mark.parametrize(
    "n, batch_size, drop_last", [(10, 4, False), (12, 4, False), (10, 4, True)]
)
def test_shuffled_batches_follow_torch_across_epochs(n, batch_size, drop_last):
    # torch draws a base seed per epoch and a second permutation when a pass runs out: the
    # order of every epoch, and of a permutation drawn after a partial epoch, must match.
    def epochs(lib, loader_cls):
        g = lib.Generator().manual_seed(5)
        loader = loader_cls(
            lib.utils.data.TensorDataset(lib.arange(n)),
            batch_size=batch_size,
            shuffle=True,
            drop_last=drop_last,
            generator=g,
        )
        seen = [[b.tolist() for (b,) in loader] for _ in range(3)]
        for (b,) in loader:  # a partial epoch, then the generator used directly
            seen.append(b.tolist())
            break
        return seen, lib.randperm(n, generator=g).tolist()

    assert epochs(gm, DataLoader) == epochs(torch, torch.utils.data.DataLoader)


def test_random_split_like_torch():
    ds = TensorDataset(gm.arange(10))
    parts = random_split(ds, [0.5, 0.3, 0.2], generator=gm.Generator().manual_seed(0))
    sizes = [len(p) for p in parts]
    tparts = torch.utils.data.random_split(
        range(10), [0.5, 0.3, 0.2], generator=torch.Generator().manual_seed(0)
    )
    assert [[int(p[i][0]) for i in range(len(p))] for p in parts] == [list(p) for p in tparts]
    assert sizes == [len(p) for p in tparts] == [5, 3, 2]
    assert sorted(int(p[i][0]) for p in parts for i in range(len(p))) == list(range(10))
    assert [len(p) for p in random_split(ds, [0.34, 0.33, 0.33])] == [
        len(p) for p in torch.utils.data.random_split(range(10), [0.34, 0.33, 0.33])
    ]
    with pytest.raises(ValueError, match="Sum of input lengths"):
        random_split(ds, [3, 3])


# ------------------------------------------------------------------ interop -----------


def test_dlpack_shares_memory_with_torch_and_numpy():
    t = gm.arange(6.0).reshape(2, 3)
    for view in (torch.from_dlpack(t), np.from_dlpack(t)):
        view[0, 0] = 42
        assert t[0, 0].item() == 42
    back = gm.from_dlpack(torch.ones(3, dtype=torch.float64))
    assert back.dtype is gm.float64 and back.tolist() == [1.0, 1.0, 1.0]
    src = np.zeros(2, np.float32)
    gm.from_dlpack(src).add_(1)
    assert src.tolist() == [1.0, 1.0]
    with pytest.raises(RuntimeError, match="Can't export tensors that require gradient"):
        torch.from_dlpack(gm.ones(2, requires_grad=True))


def test_array_protocol_copies_when_asked():
    t = gm.arange(3.0)
    shared, copied = np.asarray(t), np.array(t, copy=True)
    t.add_(1)
    assert shared.tolist() == [1.0, 2.0, 3.0] and copied.tolist() == [0.0, 1.0, 2.0]
    with pytest.raises(ValueError, match="avoid copy"):
        np.array(t, dtype=np.float64, copy=False)
    assert np.asarray(t, dtype=np.float64).dtype == np.float64
    tt = torch.as_tensor(t)
    assert tt.tolist() == [1.0, 2.0, 3.0] and tt.dtype == torch.float32
