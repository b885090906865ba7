"""gm.save / gm.load: safetensors files, interchangeable with safetensors.torch, never pickle."""

from __future__ import annotations

import io
import json
import struct

import numpy as np
import pytest
import safetensors.torch
import torch

import gradmesh.core as gm


def _mlp():
    gm.manual_seed(0)
    return gm.nn.Sequential(gm.nn.Linear(3, 4), gm.nn.ReLU(), gm.nn.Linear(4, 2))


def _metadata(data: bytes) -> dict:
    (size,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + size])["__metadata__"]


def _train(model, opt, steps: int, start: int) -> None:
    for i in range(start, start + steps):
        x = gm.tensor(np.linspace(-1, 1, 15, dtype=np.float32).reshape(5, 3) * (i + 1))
        opt.zero_grad()
        (model(x) ** 2).mean().backward()
        opt.step()


def test_a_state_dict_round_trips_with_torch_keys_and_nested_values_in_the_metadata():
    model = _mlp()
    opt = gm.optim.Adam(model.parameters(), lr=0.01)
    _train(model, opt, 1, 0)
    buf = io.BytesIO()
    obj = {"model": model.state_dict(), "opt": opt.state_dict(), "note": ("a", None, 1.5, 3)}
    gm.save(obj, buf)
    data = buf.getvalue()
    assert "model.0.weight" in safetensors.numpy.load(data)
    assert "opt.state.0.exp_avg" in safetensors.numpy.load(data)
    assert "gradmesh" in _metadata(data)

    loaded = gm.load(io.BytesIO(data))
    assert loaded["note"] == ("a", None, 1.5, 3)
    assert list(loaded["model"]) == list(model.state_dict())
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(loaded["model"][k].numpy(), v.detach().numpy())
        assert loaded["model"][k].dtype is v.dtype
    assert set(loaded["opt"]["state"]) == {0, 1, 2, 3}  # int keys stay ints
    state = opt.state_dict()
    assert loaded["opt"]["param_groups"] == state["param_groups"]
    for i, s in state["state"].items():
        for k, v in s.items():
            got = loaded["opt"]["state"][i][k]
            want = v.numpy() if isinstance(v, gm.Tensor) else v
            np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_zero_d_tensors_keep_their_shape_and_load_into_a_fresh_model(tmp_path):
    # BatchNorm's num_batches_tracked is 0-d: saved as (1,), it no longer loaded (strict).
    model = gm.nn.Sequential(gm.nn.Conv2d(3, 4, 3), gm.nn.BatchNorm2d(4))
    model(gm.randn(2, 3, 5, 5))
    path = tmp_path / "bn.pt"
    gm.save(model.state_dict(), path)
    loaded = gm.load(path)
    assert {k: tuple(v.shape) for k, v in loaded.items()} == {
        k: tuple(v.shape) for k, v in model.state_dict().items()
    }
    assert loaded["1.num_batches_tracked"].shape == () and loaded["1.num_batches_tracked"] == 1
    fresh = gm.nn.Sequential(gm.nn.Conv2d(3, 4, 3), gm.nn.BatchNorm2d(4))
    fresh.load_state_dict(loaded)
    assert safetensors.torch.load_file(path)["1.num_batches_tracked"].shape == torch.Size([])


def test_a_flat_state_dict_is_read_by_safetensors_torch_into_a_torch_model(tmp_path):
    model = _mlp()
    path = tmp_path / "model.safetensors"
    gm.save(model.state_dict(), path)
    theirs = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    theirs.load_state_dict(safetensors.torch.load_file(str(path)))
    for (name, p), q in zip(model.named_parameters(), theirs.parameters()):
        assert np.array_equal(p.detach().numpy(), q.detach().numpy()), name


def test_load_reads_what_safetensors_torch_wrote(tmp_path):
    torch.manual_seed(0)
    theirs = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    path = tmp_path / "torch.safetensors"
    safetensors.torch.save_file(theirs.state_dict(), str(path), metadata={"format": "pt"})
    state = gm.load(path)
    assert sorted(state) == sorted(theirs.state_dict())
    model = _mlp()
    model.load_state_dict(state)
    for (name, p), q in zip(model.named_parameters(), theirs.parameters()):
        assert np.array_equal(p.detach().numpy(), q.detach().numpy()), name
    # Integer and 0-d tensors keep their dtype and shape.
    safetensors.torch.save_file({"n": torch.tensor(7), "i": torch.arange(3)}, str(path))
    state = gm.load(path)
    assert state["n"].shape == () and state["n"].item() == 7 and state["i"].dtype is gm.int64


def test_a_loaded_optimizer_state_resumes_training_bitwise():
    model = _mlp()
    opt = gm.optim.Adam(model.parameters(), lr=0.01)
    _train(model, opt, 3, 0)
    buf = io.BytesIO()
    gm.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    _train(model, opt, 3, 3)  # the uninterrupted run

    resumed = gm.nn.Sequential(gm.nn.Linear(3, 4), gm.nn.ReLU(), gm.nn.Linear(4, 2))
    ckpt = gm.load(io.BytesIO(buf.getvalue()))
    resumed.load_state_dict(ckpt["model"])
    resumed_opt = gm.optim.Adam(resumed.parameters(), lr=0.01)
    resumed_opt.load_state_dict(ckpt["opt"])
    _train(resumed, resumed_opt, 3, 3)
    for (name, p), q in zip(model.named_parameters(), resumed.parameters()):
        assert np.array_equal(p.detach().numpy(), q.detach().numpy()), name


def test_files_of_the_earlier_npz_format_still_load():
    buf = io.BytesIO()
    structure = {"dict": [[{"value": "w"}, {"tensor": "t0", "requires_grad": True}]]}
    np.savez(
        buf,
        __structure__=np.frombuffer(json.dumps(structure).encode(), np.uint8),
        t0=np.arange(3, dtype=np.float32),
    )
    buf.seek(0)
    loaded = gm.load(buf)
    assert loaded["w"].requires_grad and loaded["w"].tolist() == [0.0, 1.0, 2.0]


def test_a_bad_or_truncated_file_gives_a_clear_error(tmp_path):
    buf = io.BytesIO()
    gm.save({"w": gm.ones(100)}, buf)
    data = buf.getvalue()
    for bad, match in [
        (b"", "too short"),
        (data[:20], "truncated"),
        (data[:-8], "not a readable safetensors file"),
        (struct.pack("<Q", 5) + b"{oops", "header is not JSON"),
    ]:
        with pytest.raises(ValueError, match=match):
            gm.load(io.BytesIO(bad))
    path = tmp_path / "fp8.safetensors"
    safetensors.torch.save_file({"w": torch.ones(2, dtype=torch.float8_e4m3fn)}, str(path))
    with pytest.raises(ValueError, match="tensor 'w' has dtype F8_E4M3, which NumPy"):
        gm.load(path)
    safetensors.torch.save_file({"q": torch.ones(2, dtype=torch.uint8)}, str(path))
    with pytest.raises(ValueError, match="tensor 'q': arrays of dtype uint8 are not supported"):
        gm.load(path)
    path = tmp_path / "cut.safetensors"
    path.write_bytes(data[:30])
    with pytest.raises(ValueError, match="cut.safetensors"):
        gm.load(path)
