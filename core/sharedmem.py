"""Tensors that live in shared memory: segments, files in ``/dev/shm``.

``Tensor.share_memory_()`` (and ``Module.share_memory()``) copies tensors into a segment
(:func:`share`); a worker on this host can then read them where they are, and the client
names the segment and each tensor's offset (:func:`locate`) instead of sending bytes. How
requests use segments (the client's pool, the worker's mappings) is the transport's side:
``gradmesh.wire.sharedmem``.

Rules every user of a segment keeps:

* Segment names are ``gradmesh-<pid>-<32 hex digits>``: the creator's process id (so a
  segment left behind by a killed process can be recognised and removed) and 128 random
  bits (so nobody guesses the name of a segment they were not told).
* The creator reserves every byte up front (``posix_fallocate``): a full ``/dev/shm``
  fails at creation with ``ENOSPC``, never later as ``SIGBUS`` on a write.
* Files are created ``0600`` with ``O_EXCL``; the worker opens only regular files owned by
  its own user, without following links.
* Offsets are multiples of :data:`ALIGN` (64 bytes).
"""
from __future__ import annotations

import atexit
import mmap
import os
import re
import secrets
import sys
import weakref
from typing import Iterable

import numpy as np

DIR = "/dev/shm"
PREFIX = "gradmesh-"
ALIGN = 64
NAME = re.compile(r"gradmesh-([0-9]{1,10})-[0-9a-f]{32}\Z")
POPULATE = getattr(mmap, "MAP_POPULATE", 0)     # fault every page in once, at map time
NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
# Byte orders of NumPy dtypes whose bytes are already little-endian ("|": one byte).
WIRE_ORDER = ("<", "|", "=") if sys.byteorder == "little" else ("<", "|")


# Names of the segments this process created and has not removed yet: removed at exit.
_created: set[str] = set()


@atexit.register
def _remove_created() -> None:
    mine = f"{PREFIX}{os.getpid()}-"
    for name in list(_created):
        if not name.startswith(mine):
            continue            # a forked child's copy of its parent's list: not its own
        try:
            os.unlink(os.path.join(DIR, name))
        except OSError:
            pass


class SegmentError(Exception):
    """A segment cannot be created, opened or read as asked (``str`` says why)."""



def layout(sizes: Iterable[tuple[str, int]]) -> tuple[dict[str, int], int]:
    """Offsets (each aligned to :data:`ALIGN`) for ``(name, nbytes)`` pairs, and the
    total size they need."""
    offsets, end = {}, 0
    for name, nbytes in sizes:
        offsets[name] = end
        end += -(-int(nbytes) // ALIGN) * ALIGN
    return offsets, max(end, ALIGN)


def view(buf, offset: int, dtype: np.dtype, shape: tuple) -> np.ndarray:
    """The array at ``offset`` of a mapped segment (no copy)."""
    count = 1
    for d in shape:
        count *= int(d)
    return np.frombuffer(buf, dtype=dtype, count=count, offset=offset).reshape(shape)


class Segment:
    """A segment this process created; :meth:`close` removes it (arrays viewing it stay
    valid until they are freed: the memory goes when the last mapping does)."""

    def __init__(self, size: int):
        sweep_stale()
        self.size = max(int(size), ALIGN)
        self.name = f"{PREFIX}{os.getpid()}-{secrets.token_hex(16)}"
        path = os.path.join(DIR, self.name)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | NOFOLLOW, 0o600)
        except OSError as e:
            raise SegmentError(f"cannot create {path}: {e.strerror}") from None
        try:
            os.posix_fallocate(fd, 0, self.size)
            self.buf = mmap.mmap(fd, self.size, flags=mmap.MAP_SHARED | POPULATE)
        except OSError as e:
            os.unlink(path)
            raise SegmentError(f"cannot reserve {self.size} bytes in {DIR}: "
                               f"{e.strerror}") from None
        finally:
            os.close(fd)
        _created.add(self.name)

    def view(self, offset: int, dtype, shape) -> np.ndarray:
        return view(self.buf, offset, np.dtype(dtype), tuple(shape))

    def close(self) -> None:
        if self.name in _created:
            _created.discard(self.name)
            try:
                os.unlink(os.path.join(DIR, self.name))
            except FileNotFoundError:
                pass
        self.buf = None     # the mapping closes when the last array viewing it is freed

    def __del__(self) -> None:
        if getattr(self, "name", None) in _created:
            self.close()


def sweep_stale() -> int:
    """Remove this user's segments whose creating process is gone (a crash leaves them
    behind: /dev/shm is memory). Returns how many were removed."""
    removed = 0
    try:
        names = os.listdir(DIR)
    except OSError:
        return 0
    uid = os.geteuid()
    for name in names:
        m = NAME.match(name)
        if m is None:
            continue
        path = os.path.join(DIR, name)
        try:
            if os.lstat(path).st_uid != uid:
                continue
            os.kill(int(m.group(1)), 0)
        except ProcessLookupError:
            try:
                os.unlink(path)
                removed += 1
            except OSError:
                pass
        except OSError:     # not ours to signal (another user's pid), or already gone
            continue
    return removed


def share(arrays: list[np.ndarray]) -> list[np.ndarray]:
    """Copies of ``arrays`` laid out in one new segment, for tensors that live in shared
    memory for good (``Tensor.share_memory_()``, ``Module.share_memory()``): a worker on
    this host then reads them where they are, without a copy per call. The segment is
    removed when the last of the copies (or a view of one) is freed."""
    offsets, size = layout((i, a.nbytes) for i, a in enumerate(arrays))
    seg = Segment(size)
    raw = np.frombuffer(memoryview(seg.buf), np.uint8)
    # NumPy makes ``raw`` the base of every view of it, of the copies below and of views of
    # those (a chain of views collapses onto the first array whose base is no array).
    key = id(raw)
    _shared[key] = (seg.name, raw.ctypes.data, seg.size)
    weakref.finalize(raw, _unshare, key, seg).atexit = False
    out = []
    for i, a in enumerate(arrays):
        a = np.asarray(a)
        dtype = a.dtype.newbyteorder("<") if a.dtype.byteorder == ">" else a.dtype
        copy = raw[offsets[i]:offsets[i] + a.nbytes].view(dtype).reshape(a.shape)
        copy[...] = a
        out.append(copy)
    return out


def locate(a: np.ndarray) -> tuple[str, int] | None:
    """``(segment name, offset)`` of an array made by :func:`share` (or a view of one)
    whose bytes are as on the wire (C order, little-endian, at an aligned offset); None
    for any other array."""
    hit = _shared.get(id(a.base))
    if hit is None or not a.flags.c_contiguous or a.dtype.byteorder not in WIRE_ORDER:
        return None
    name, start, size = hit
    offset = a.ctypes.data - start
    if offset % ALIGN or not 0 <= offset <= size - a.nbytes:
        return None
    return name, offset


# The memory of share()'s segments: id of the array over it -> (name, address, size),
# while that array lives.
_shared: dict[int, tuple[str, int, int]] = {}


def _unshare(key: int, seg: Segment) -> None:
    _shared.pop(key, None)
    seg.close()
