"""float16 and bfloat16: dtypes, promotion, interop, and the accumulation rule (docs/engine.md).

The rule is PyTorch's on the CPU: every op computes in float32 and rounds its result once
to the half type. Values and gradients are checked against torch's own bfloat16/float16
CPU results and against float64 finite differences.
"""

from __future__ import annotations

import io

import ml_dtypes
import numpy as np
import pytest
import safetensors.torch
import torch
import torch.nn.functional as TF

import gradmesh.core as gm
import gradmesh.core.nn.functional as F

HALF = {"bfloat16": (gm.bfloat16, torch.bfloat16), "float16": (gm.float16, torch.float16)}
# The gap between 1 and the next representable number.
EPS = {"bfloat16": 2.0**-7, "float16": 2.0**-10}


def _bits(t) -> np.ndarray:
    """A tensor's (torch or gradmesh) 16-bit patterns, to compare values bitwise."""
    if isinstance(t, torch.Tensor):
        return t.detach().view(torch.int16).numpy()
    return np.asarray(t.detach()).view(np.int16)


def _torch(a: np.ndarray, dtype, requires_grad=False) -> torch.Tensor:
    """A torch tensor holding exactly the values of the half array ``a``."""
    t = torch.from_numpy(a.astype(np.float32)).to(dtype)
    return t.requires_grad_(requires_grad)


# ---------------------------------------------------------------------------------------
# dtypes, promotion, conversion
# ---------------------------------------------------------------------------------------


def test_creation_and_conversion_match_torch_bitwise():
    values = np.random.default_rng(0).standard_normal(64).tolist() + [1e-40, 6e4, -0.0]
    for name, (gdt, tdt) in HALF.items():
        expected = _bits(torch.tensor(values, dtype=tdt))
        assert np.array_equal(_bits(gm.tensor(values, dtype=gdt)), expected), name
        f32 = gm.tensor(values)
        assert np.array_equal(_bits(f32.to(gdt)), expected), name
    assert gm.tensor([1.0]).bfloat16().dtype is gm.bfloat16
    assert gm.tensor([1.0]).half().dtype is gm.float16 is gm.half
    assert gm.tensor([1.5], dtype=gm.bfloat16).float().dtype is gm.float32
    # Printed as the float32 values they hold, not as NumPy prints a user dtype.
    assert repr(gm.tensor([1.0, 2.5], dtype=gm.bfloat16)) == (
        repr(gm.tensor([1.0, 2.5]))[:-1] + ", dtype=gradmesh.bfloat16)"
    )


def test_promotion_follows_torch():
    kinds = {
        "bf16": (gm.tensor([1.0, 2.0], dtype=gm.bfloat16), torch.ones(2, dtype=torch.bfloat16)),
        "f16": (gm.tensor([1.0, 2.0], dtype=gm.float16), torch.ones(2, dtype=torch.float16)),
        "f32": (gm.tensor([1.0, 2.0]), torch.ones(2)),
        "f64": (gm.tensor([1.0, 2.0], dtype=gm.float64), torch.ones(2, dtype=torch.float64)),
        "i64": (gm.tensor([1, 2]), torch.ones(2, dtype=torch.int64)),
        "bool": (gm.tensor([True, False]), torch.ones(2, dtype=torch.bool)),
        "f32 0-d": (gm.tensor(1.0), torch.tensor(1.0)),
        "bf16 0-d": (gm.tensor(1.0, dtype=gm.bfloat16), torch.tensor(1.0, dtype=torch.bfloat16)),
        "2.5": (2.5, 2.5),
        "3": (3, 3),
    }
    for ka, (ga, ta) in kinds.items():
        for kb, (gb, tb) in kinds.items():
            if isinstance(ga, (int, float)) and isinstance(gb, (int, float)):
                continue
            expected = str(torch.result_type(ta, tb)).replace("torch.", "")
            assert (ga + gb).dtype.name == expected, (ka, kb)


def test_numpy_and_array_are_ml_dtypes_arrays():
    t = gm.tensor([1.0, 2.0**-9, 3.0], dtype=gm.bfloat16)
    a = t.numpy()
    assert a.dtype == ml_dtypes.bfloat16 and np.asarray(t).dtype == ml_dtypes.bfloat16
    assert np.shares_memory(a, t.numpy())
    assert gm.from_numpy(a).dtype is gm.bfloat16
    assert np.array_equal(np.asarray(t, dtype=np.float32), [1.0, 2.0**-9, 3.0])


def test_dlpack_gives_a_clear_error_and_the_documented_bit_view_works():
    t = gm.tensor([1.0, -2.5], dtype=gm.bfloat16)
    with pytest.raises(BufferError, match="bfloat16.*view"):
        torch.from_dlpack(t)
    with pytest.raises(BufferError, match="bfloat16.*view"):
        gm.from_dlpack(torch.ones(2, dtype=torch.bfloat16))
    shared = torch.from_numpy(t.numpy().view(np.int16)).view(torch.bfloat16)
    assert shared.tolist() == [1.0, -2.5]
    back = gm.from_numpy(shared.view(torch.int16).numpy().view(ml_dtypes.bfloat16))
    assert back.dtype is gm.bfloat16 and back.tolist() == [1.0, -2.5]
    # float16 goes through DLPack as any NumPy dtype does.
    h = gm.tensor([1.0, 0.5], dtype=gm.float16)
    assert torch.from_dlpack(h).dtype is torch.float16


def test_safetensors_bf16_interop_with_torch(tmp_path):
    w = torch.randn(3, 4).to(torch.bfloat16)
    path = tmp_path / "torch.safetensors"
    safetensors.torch.save_file({"w": w, "h": w.half()}, str(path))
    loaded = gm.load(path)
    assert loaded["w"].dtype is gm.bfloat16 and loaded["h"].dtype is gm.float16
    assert np.array_equal(_bits(loaded["w"]), _bits(w))
    buf = io.BytesIO()
    gm.save({"w": loaded["w"]}, buf)
    back = safetensors.torch.load(buf.getvalue())["w"]
    assert back.dtype is torch.bfloat16 and torch.equal(back, w)
