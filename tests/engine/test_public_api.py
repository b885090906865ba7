"""The public API is written out where static tools read it, and the files are current.

``core/_api.py`` and the generated methods of ``core/tensor.py`` come from the ``@public``
declarations (``python core/gen_api.py``); a declaration added without
regenerating fails here.
"""

from __future__ import annotations

import gradmesh.core as gm
from gradmesh.core import functional, gen_api
from gradmesh.core.registry import PUBLIC


def test_generated_api_is_current():
    assert gen_api.API_FILE.read_text() == gen_api.render_api(), (
        "core/_api.py is stale: run `python core/gen_api.py`"
    )


def test_generated_tensor_methods_are_current():
    source = gen_api.TENSOR_FILE.read_text()
    assert gen_api.render_tensor(source) == source, (
        "the generated methods of core/tensor.py are stale: run `python core/gen_api.py`"
    )


def test_every_public_function_is_in_the_namespace():
    for name, fn in gen_api.public_functions().items():
        assert getattr(gm, name) is fn, name


def test_methods_call_their_function():
    x = gm.tensor([[1.0, -2.0], [3.0, 4.0]])
    for name in ("exp", "abs", "relu", "tanh"):
        assert getattr(x, name)().tolist() == PUBLIC[name].fn(x).tolist()
    assert x.sum(1, keepdim=True).tolist() == functional.sum(x, 1, True).tolist()
    assert x.reshape(4).shape == (4,) and x.reshape(1, 4).shape == (1, 4)
    assert x.var(0, correction=0).tolist() == functional.var(x, 0, correction=0).tolist()
    assert x.clip(0, 1).tolist() == functional.clamp(x, 0, 1).tolist()


def test_hand_written_methods_win():
    # Tensor.clone and friends are written in the class; the generator leaves them alone.
    names = gen_api.method_names(gen_api.TENSOR_FILE.read_text())
    assert "to" not in names and "T" not in names
