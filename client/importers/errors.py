"""The one error every importer raises for a model the registry cannot express."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Unsupported:
    """One thing an importer cannot map: ``op`` (an aten op such as ``aten.cumsum.default``,
    an ONNX op type, or a Python feature), ``where`` (the module path or ONNX node name) and
    an optional ``reason``."""

    op: str
    where: str
    reason: str = ""

    def __str__(self) -> str:
        text = f"{self.op} at {self.where or '<top level>'}"
        return f"{text}: {self.reason}" if self.reason else text


class UnsupportedModelError(ValueError):
    """The model uses ops or features gradmesh's registry cannot express; ``unsupported``
    lists every one of them (not only the first)."""

    def __init__(self, source: str, unsupported: list[Unsupported]):
        self.source = source
        self.unsupported = list(unsupported)
        lines = "\n".join(f"  - {u}" for u in self.unsupported)
        super().__init__(
            f"{source}: {len(self.unsupported)} unsupported op(s); gradmesh cannot import "
            f"this model:\n{lines}\nSee docs/import.md for what imports."
        )
