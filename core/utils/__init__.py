"""``gradmesh.core.utils``: data loading (``gradmesh.core.utils.data``), as ``torch.utils``."""

from . import data  # noqa: F401
