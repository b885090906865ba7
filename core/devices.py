"""``gradmesh.core.device``: a device name, as ``torch.device``.

A ``device`` is a ``str`` ("cpu", "cuda", "cuda:1"), so it is accepted wherever a
``device=`` argument is, and compares equal to its name.

>>> import gradmesh.core as gm
>>> d = gm.device("cuda", 1)
>>> d, d.type, d.index, d == "cuda:1"
(device(type='cuda', index=1), 'cuda', 1, True)
"""

from __future__ import annotations


class device(str):
    """``device("cpu")``, ``device("cuda")``, ``device("cuda:1")`` or ``device("cuda", 1)``."""

    type: str
    index: int | None

    def __new__(cls, spec: "str | device", index: int | None = None):
        if isinstance(spec, device) and index is None:
            return spec
        kind, _, number = str(spec).partition(":")
        if kind not in ("cpu", "cuda"):
            raise RuntimeError(
                f"Expected one of cpu, cuda device type at start of device string: {spec}"
            )
        if number:
            if index is not None:
                raise ValueError(f"device {spec!r} already names an index; got index={index}")
            if not number.isdigit():
                raise RuntimeError(f"Invalid device string: '{spec}'")
            index = int(number)
        if index is not None and (not isinstance(index, int) or index < 0):
            raise RuntimeError(f"Device index must not be negative, got {index}")
        self = super().__new__(cls, kind if index is None else f"{kind}:{index}")
        self.type, self.index = kind, index
        return self

    def __repr__(self) -> str:
        index = "" if self.index is None else f", index={self.index}"
        return f"device(type='{self.type}'{index})"

    __hash__ = str.__hash__
