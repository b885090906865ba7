"""Tensors that live in shared memory: segments, sealed memory files named by capability.

``Tensor.share_memory_()`` (and ``Module.share_memory()``) copies tensors into a segment
(:func:`share`); a worker on this host can then read them where they are, and the client
names the segment and each tensor's offset (:func:`locate`) instead of sending bytes. How
requests use segments (the client's pool, the worker's mappings) is the transport's side:
``gradmesh.wire.sharedmem``.

Rules every user of a segment keeps (docs/worker.md, "Same-host transport", has the
threat model):

* A segment is an anonymous memory file (``memfd_create``), never a file in ``/dev/shm``:
  nobody can list it, and it goes away with its creator's last descriptor and mapping (a
  crashed client leaves nothing behind).
* The creator reserves every byte up front (``posix_fallocate``: out of memory fails at
  creation with ``ENOSPC``, never later as ``SIGBUS``), then seals the size
  (``F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL``): nobody, the creator included, can
  truncate or grow it afterwards, so a worker's mapping can never lose pages under it.
* The first :data:`HEADER` bytes hold :data:`MAGIC` and 16 random bytes, the segment's
  secret; tensors start after them.
* The segment's name is a capability: ``gradmesh-<pid>-<fd>-<32 hex digits>``, the
  creator's process id, the descriptor it keeps open, and the secret. A worker running as
  the same user opens ``/proc/<pid>/fd/<fd>`` and uses the segment only if it is sealed
  and its header holds the name's secret, so only a caller the creator told the name can
  make a worker touch it; another user cannot even open that path.
* Offsets are multiples of :data:`ALIGN` (64 bytes), at least :data:`HEADER`.
"""

from __future__ import annotations

import hmac
import mmap
import os
import re
import secrets
import sys
import weakref
from typing import Hashable, Iterable, TypeVar

import numpy as np

try:
    import fcntl
except ImportError:  # not on Windows
    fcntl = None  # type: ignore[assignment]

K = TypeVar("K", bound=Hashable)  # what layout() and place() key offsets by
PREFIX = "gradmesh-"
ALIGN = 64
HEADER = ALIGN  # the header: MAGIC, the secret, zeros
MAGIC = b"gradmesh-seg-v1\0"
SECRET_BYTES = 16
# pid, descriptor, secret. Names are capabilities: error messages never repeat them.
NAME = re.compile(r"gradmesh-([0-9]{1,10})-([0-9]{1,10})-([0-9a-f]{32})\Z")
# The /dev/shm names of earlier versions (gradmesh-<pid>-<32 hex digits>): well formed but
# no longer taken (the worker answers FAILED_PRECONDITION, and such a client sends bytes).
LEGACY_NAME = re.compile(r"gradmesh-[0-9]{1,10}-[0-9a-f]{32}\Z")
POPULATE = getattr(mmap, "MAP_POPULATE", 0)  # fault every page in once, at map time
# Byte orders of NumPy dtypes whose bytes are already little-endian ("|": one byte).
WIRE_ORDER = ("<", "|", "=") if sys.byteorder == "little" else ("<", "|")
# What a segment must be sealed with before a worker maps it: then its size cannot change.
REQUIRED_SEALS = (
    fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
    if fcntl is not None and hasattr(fcntl, "F_SEAL_SHRINK")
    else 0
)
MEMFD_NAME = "gradmesh"  # shows as /proc/<pid>/fd/<fd> -> "/memfd:gradmesh (deleted)"


class SegmentError(Exception):
    """A segment cannot be created, opened or read as asked (``str`` says why)."""


def supported() -> bool:
    """Whether this host has what segments need: Linux's memfd_create with file sealing,
    and /proc (for a worker to open a caller's segment)."""
    return (
        sys.platform.startswith("linux")
        and hasattr(os, "memfd_create")
        and hasattr(os, "MFD_ALLOW_SEALING")
        and hasattr(os, "posix_fallocate")
        and fcntl is not None
        and hasattr(fcntl, "F_ADD_SEALS")
        and os.path.isdir(f"/proc/{os.getpid()}/fd")
    )


def layout(sizes: Iterable[tuple[K, int]]) -> tuple[dict[K, int], int]:
    """Offsets (each aligned to :data:`ALIGN`, the first after the :data:`HEADER`) for
    ``(name, nbytes)`` pairs, and the total size the segment needs."""
    offsets: dict[K, int] = {}
    end = HEADER
    for name, nbytes in sizes:
        offsets[name] = end
        end += -(-int(nbytes) // ALIGN) * ALIGN
    return offsets, end


def view(buf, offset: int, dtype: np.dtype, shape: tuple) -> np.ndarray:
    """The array at ``offset`` of a mapped segment (no copy)."""
    count = 1
    for d in shape:
        count *= int(d)
    return np.frombuffer(buf, dtype=dtype, count=count, offset=offset).reshape(shape)


class Segment:
    """A segment this process created: a sealed memory file of ``size`` bytes (header
    included; at least :data:`HEADER`) whose descriptor it keeps open until :meth:`close`
    (arrays viewing it stay valid until they are freed: the memory goes when the last
    mapping and descriptor do)."""

    def __init__(self, size: int):
        if not supported():
            raise SegmentError(
                "shared memory needs Linux with memfd_create, file sealing and /proc"
            )
        self.size = max(int(size), HEADER)
        self.fd = -1
        try:
            fd = os.memfd_create(MEMFD_NAME, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        except OSError as e:
            raise SegmentError(f"cannot create a memory file: {e.strerror}") from None
        try:
            os.posix_fallocate(fd, 0, self.size)
            fcntl.fcntl(
                fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
            )
            self.buf = mmap.mmap(fd, self.size, flags=mmap.MAP_SHARED | POPULATE)
        except OSError as e:
            os.close(fd)
            raise SegmentError(
                f"cannot reserve {self.size} bytes of shared memory: {e.strerror}"
            ) from None
        secret = secrets.token_bytes(SECRET_BYTES)
        self.buf[: len(MAGIC) + SECRET_BYTES] = MAGIC + secret
        self.fd = fd
        self.name = f"{PREFIX}{os.getpid()}-{fd}-{secret.hex()}"

    def view(self, offset: int, dtype, shape) -> np.ndarray:
        return view(self.buf, offset, np.dtype(dtype), tuple(shape))

    def close(self) -> None:
        """Close the descriptor: workers can no longer open the segment (those that mapped
        it drop it at their next check)."""
        fd, self.fd = getattr(self, "fd", -1), -1
        if fd >= 0:
            try:
                os.close(fd)
            except OSError:
                pass
        self.buf = None  # the mapping closes when the last array viewing it is freed

    @property
    def closed(self) -> bool:
        return self.fd < 0

    def __del__(self) -> None:
        if getattr(self, "fd", -1) >= 0:
            self.close()


def header_matches(header: bytes, secret_hex: str) -> bool:
    """Whether a segment's first bytes are :data:`MAGIC` and the secret of its name
    (compared in constant time)."""
    try:
        want = MAGIC + bytes.fromhex(secret_hex)
    except ValueError:
        return False
    return hmac.compare_digest(bytes(header[: len(want)]), want)


def share(arrays: list[np.ndarray]) -> list[np.ndarray]:
    """Copies of ``arrays`` laid out in one new segment, for tensors that live in shared
    memory for good (``Tensor.share_memory_()``, ``Module.share_memory()``): a worker on
    this host then reads them where they are, without a copy per call. The segment is
    closed when the last of the copies (or a view of one) is freed."""
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
        copy = raw[offsets[i] : offsets[i] + a.nbytes].view(dtype).reshape(a.shape)
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
    if offset % ALIGN or not HEADER <= offset <= size - a.nbytes:
        return None
    return name, offset


# The memory of share()'s segments: id of the array over it -> (name, address, size),
# while that array lives.
_shared: dict[int, tuple[str, int, int]] = {}


def _unshare(key: int, seg: Segment) -> None:
    _shared.pop(key, None)
    seg.close()
