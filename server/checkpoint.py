"""Atomic checkpoints: NumPy arrays plus JSON metadata in one ``.npz`` file, never pickle.

A checkpoint is written to a temporary file in the target's directory, flushed and
fsynced, renamed over the target (atomic on POSIX), and then the directory is fsynced so
the rename itself survives a power cut. A reader therefore sees either the previous
checkpoint or the new one, never a torn file.

>>> import tempfile, numpy as np, os
>>> d = tempfile.mkdtemp()
>>> save(os.path.join(d, "s.npz"), {"w": np.ones(2, np.float32)}, {"version": 3})
>>> arrays, meta = load(os.path.join(d, "s.npz"))
>>> meta["version"], arrays["w"].tolist()
(3, [1.0, 1.0])
"""
from __future__ import annotations

import io
import json
import os
import tempfile
from typing import Any

import numpy as np

__all__ = ["save", "load", "atomic_write", "CheckpointError"]

_META = "__meta__"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read (corrupt, wrong format); names the file."""


def atomic_write(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically and durably (tmp file, fsync, rename, fsync dir)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.basename(path), dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def save(path: str, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
    """Save named arrays and JSON-able ``meta`` to one ``.npz`` file, atomically.

    Array names are kept in the metadata and the arrays stored as ``a0, a1, ...``, so any
    name (dots, slashes) round-trips.
    """
    names = list(arrays)
    payload = {f"a{i}": np.ascontiguousarray(arrays[n]) for i, n in enumerate(names)}
    header = json.dumps({"names": names, "meta": meta}, sort_keys=True).encode()
    payload[_META] = np.frombuffer(header, dtype=np.uint8)
    buf = io.BytesIO()
    np.savez(buf, **payload)
    atomic_write(path, buf.getvalue())


def load(path: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Read a checkpoint written by :func:`save`: ``(arrays, meta)``."""
    try:
        with np.load(path, allow_pickle=False) as z:
            header = json.loads(bytes(z[_META]).decode())
            arrays = {name: z[f"a{i}"] for i, name in enumerate(header["names"])}
    except FileNotFoundError:
        raise
    except Exception as e:  # noqa: BLE001  (any decoding failure means a bad file)
        raise CheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from e
    return arrays, header["meta"]
