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
import struct
import tempfile
import zlib
from typing import Any

import numpy as np

from gradmesh.core import dtypes

__all__ = ["save", "load", "atomic_write", "CheckpointError", "RecordLog"]

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


def _contiguous(a) -> np.ndarray:
    """``a`` C-contiguous, 0-d kept 0-d (``ascontiguousarray`` makes it shape (1,))."""
    a = np.asarray(a)
    return np.ascontiguousarray(a).reshape(a.shape)


# NumPy describes ml_dtypes' bfloat16 only as raw bytes ('<V2'), which read back as bytes:
# such arrays are stored as their bits, and their dtype by name ('bfloat16').
_NAMES = frozenset(d.name for d in dtypes.ALL)


def _dtype_label(dt: np.dtype) -> str:
    """How a record names ``dt``: NumPy's ``dt.str`` ('<f4'), or the gradmesh name of a
    dtype that NumPy knows only as bytes."""
    return dtypes.from_numpy(dt).name if dt.kind == "V" else dt.str


def _dtype_of_label(label: str) -> np.dtype:
    """The inverse of ``_dtype_label``; labels of files written before names were used
    are ``dt.str`` too."""
    if label in _NAMES:
        return np.dtype(dtypes.by_name(label).np)
    return np.dtype(label)


def save(path: str, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
    """Save named arrays and JSON-able ``meta`` to one ``.npz`` file, atomically.

    Array names are kept in the metadata and the arrays stored as ``a0, a1, ...``, so any
    name (dots, slashes) round-trips. A bfloat16 array is stored as its bits, its dtype
    named in the header's ``"dtypes"``.
    """
    names = list(arrays)
    payload, named = {}, {}
    for i, n in enumerate(names):
        a = _contiguous(arrays[n])
        if a.dtype.kind == "V":
            named[n] = _dtype_label(a.dtype)
            a = a.view(f"<u{a.dtype.itemsize}")
        payload[f"a{i}"] = a
    head = {"names": names, "meta": meta, **({"dtypes": named} if named else {})}
    header = json.dumps(head, sort_keys=True).encode()
    payload[_META] = np.frombuffer(header, dtype=np.uint8)
    buf = io.BytesIO()
    np.savez(buf, **payload)  # type: ignore[arg-type]  # the stubs: allow_pickle
    atomic_write(path, buf.getvalue())


def load(path: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Read a checkpoint written by :func:`save`: ``(arrays, meta)``."""
    try:
        with np.load(path, allow_pickle=False) as z:
            header = json.loads(bytes(z[_META]).decode())
            arrays = {name: z[f"a{i}"] for i, name in enumerate(header["names"])}
            for name, label in header.get("dtypes", {}).items():
                arrays[name] = arrays[name].view(_dtype_of_label(label))
    except FileNotFoundError:
        raise
    except Exception as e:  # noqa: BLE001  (any decoding failure means a bad file)
        raise CheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from e
    return arrays, header["meta"]


# ------------------------------------------------------------------ write-ahead logs -----

_MAGIC = b"GMLR"
_HEAD = struct.Struct("<4sIQI")  # magic, header bytes, payload bytes, CRC-32


class RecordLog:
    """An append-only file of records (JSON metadata plus raw arrays), each fsynced before
    :meth:`append` returns, so what a server acknowledged after appending survives SIGKILL
    and power loss. A torn last record (a crash mid-append, never acknowledged) is cut off
    when the log is opened. No pickle: JSON and little-endian raw bytes, with a CRC-32.

    >>> import tempfile, numpy as np, os
    >>> log = RecordLog(os.path.join(tempfile.mkdtemp(), "j.log"))
    >>> log.append({"step": 1}, {"w": np.ones(2, np.float32)})
    >>> [(m, a["w"].tolist()) for m, a in log.records()]
    [({'step': 1}, [1.0, 1.0])]
    """

    def __init__(self, path: str, sync: bool = True):
        self.path = path
        self.sync = sync  # False: flushed, not fsynced (survives SIGKILL,
        self.bytes_written = 0  # not a power cut)
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        good = 0
        if os.path.exists(path):
            for _, _, end in self._scan():
                good = end
            if good != os.path.getsize(path):
                with open(path, "r+b") as f:
                    f.truncate(good)
                    f.flush()
                    os.fsync(f.fileno())
        self._file = open(path, "ab")

    def _scan(self):
        with open(self.path, "rb") as f:
            data = f.read()
        pos = 0
        while pos + _HEAD.size <= len(data):
            magic, hlen, plen, crc = _HEAD.unpack_from(data, pos)
            start = pos + _HEAD.size
            end = start + hlen + plen
            if magic != _MAGIC or end > len(data):
                return
            body = data[start:end]
            if zlib.crc32(body) != crc:
                return
            try:
                header = json.loads(body[:hlen].decode())
                arrays = {}
                for name, dtype, shape, offset, nbytes in header["arrays"]:
                    raw = body[hlen + offset : hlen + offset + nbytes]
                    arrays[name] = np.frombuffer(raw, _dtype_of_label(dtype)).reshape(shape).copy()
            except (ValueError, KeyError, TypeError):
                return
            yield header["meta"], arrays, end
            pos = end

    def records(self):
        """``(meta, arrays)`` of every complete record, oldest first."""
        for meta, arrays, _ in self._scan():
            yield meta, arrays

    def append(self, meta: dict[str, Any], arrays: dict[str, np.ndarray] | None = None) -> None:
        """Append one record and fsync it (raises OSError, e.g. ENOSPC: nothing appended
        that a reader would take; the caller must not acknowledge)."""
        entries, parts, offset = [], [], 0
        for name, a in (arrays or {}).items():
            a = _contiguous(a)
            dt = a.dtype.newbyteorder("<") if a.dtype.byteorder == ">" else a.dtype
            raw = a.astype(dt, copy=False).tobytes()
            entries.append([name, _dtype_label(dt), list(a.shape), offset, len(raw)])
            parts.append(raw)
            offset += len(raw)
        header = json.dumps({"meta": meta, "arrays": entries}, sort_keys=True).encode()
        crc = zlib.crc32(header)
        for p in parts:
            crc = zlib.crc32(p, crc)
        start = self._file.tell()
        try:
            self._file.write(_HEAD.pack(_MAGIC, len(header), offset, crc))
            self._file.write(header)
            for p in parts:
                self._file.write(p)
            self._file.flush()
            if self.sync:
                os.fsync(self._file.fileno())
        except BaseException:
            # Cut a partial record off, so the next append follows a valid prefix.
            try:
                self._file.close()
                with open(self.path, "r+b") as f:
                    f.truncate(start)
            finally:
                self._file = open(self.path, "ab")
            raise
        self.bytes_written += _HEAD.size + len(header) + offset

    def truncate(self) -> None:
        """Empty the log (after a checkpoint made its records redundant)."""
        self._file.close()
        with open(self.path, "r+b") as f:
            f.truncate(0)
            f.flush()
            os.fsync(f.fileno())
        self._file = open(self.path, "ab")

    def close(self) -> None:
        self._file.close()
