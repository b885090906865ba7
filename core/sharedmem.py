"""Same-host tensor transport: tensor bytes in shared memory instead of gRPC messages.

Moving 100 MB through gRPC in Python costs about 100 ms of CPU per direction on a small
machine; copying it into shared memory costs about 18 ms. A client on the worker's host
(the coordinator of a ``LocalCluster``, a ``WorkerClient`` on 127.0.0.1) therefore writes
the parameters into a *segment*, a file in ``/dev/shm``, and names the segment and each
tensor's offset in the request; it names a second segment for the worker to write the
gradients into. Only names, shapes and offsets travel over gRPC (``SharedMemory`` in
worker.proto).

Rules both sides keep:

* Segment names are ``gradmesh-<pid>-<32 hex digits>``: the creator's process id (so a
  segment left behind by a killed process can be recognised and removed) and 128 random
  bits (so nobody guesses the name of a segment they were not told).
* The creator reserves every byte up front (``posix_fallocate``): a full ``/dev/shm``
  fails at creation with ``ENOSPC``, never later as ``SIGBUS`` on a write.
* Files are created ``0600`` with ``O_EXCL``; the worker opens only regular files owned by
  its own user, without following links.
* Offsets are multiples of :data:`ALIGN` (64 bytes).

The worker keeps segments it has opened mapped (:class:`Attached`), so a client that
reuses its segments call after call pays for page mapping once.
"""
from __future__ import annotations

import atexit
import collections
import mmap
import os
import re
import secrets
import stat
import sys
import threading
import weakref
from collections import OrderedDict
from typing import Iterable

import numpy as np

DIR = "/dev/shm"
PREFIX = "gradmesh-"
ALIGN = 64
NAME = re.compile(r"gradmesh-([0-9]{1,10})-[0-9a-f]{32}\Z")
_POPULATE = getattr(mmap, "MAP_POPULATE", 0)     # fault every page in once, at map time
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
MAPPED_SEGMENTS = 16        # segments a worker keeps mapped (Attached)
# Byte orders of NumPy dtypes whose bytes are already little-endian ("|": one byte).
_WIRE_ORDER = ("<", "|", "=") if sys.byteorder == "little" else ("<", "|")


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


def available() -> bool:
    """Whether this host can create segments (Linux with a writable ``/dev/shm``)."""
    return (hasattr(os, "posix_fallocate") and os.path.isdir(DIR)
            and os.access(DIR, os.W_OK | os.X_OK))


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
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | _NOFOLLOW, 0o600)
        except OSError as e:
            raise SegmentError(f"cannot create {path}: {e.strerror}") from None
        try:
            os.posix_fallocate(fd, 0, self.size)
            self.buf = mmap.mmap(fd, self.size, flags=mmap.MAP_SHARED | _POPULATE)
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


class Attached:
    """The worker's side: segments named by clients, opened once and kept mapped.

    ``get(name)`` returns the mapping; a segment that was removed or resized since it was
    mapped is mapped again. At most ``capacity`` segments stay mapped (least recently
    used go first).
    """

    def __init__(self, capacity: int = MAPPED_SEGMENTS):
        self.capacity = capacity
        self._maps: OrderedDict[str, tuple[int, int, int, mmap.mmap]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, name: str) -> mmap.mmap:
        if not NAME.match(name):
            raise SegmentError(f"{name!r} is not a gradmesh segment name "
                               f"(gradmesh-<pid>-<32 hex digits>)")
        path = os.path.join(DIR, name)
        try:
            fd = os.open(path, os.O_RDWR | _NOFOLLOW)
        except OSError as e:
            raise SegmentError(f"cannot open {path} on the worker's host: {e.strerror} "
                               f"(is the client on another host or in another container?)"
                               ) from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
                raise SegmentError(f"{path} is not a regular file of the worker's user")
            key = (st.st_dev, st.st_ino, st.st_size)
            with self._lock:
                hit = self._maps.get(name)
                if hit is not None and hit[:3] == key:
                    self._maps.move_to_end(name)
                    return hit[3]
            if st.st_size < ALIGN:
                raise SegmentError(f"{path} has {st.st_size} bytes")
            buf = mmap.mmap(fd, st.st_size, flags=mmap.MAP_SHARED | _POPULATE)
        finally:
            os.close(fd)
        self._prune()
        with self._lock:
            self._maps[name] = (*key, buf)
            self._maps.move_to_end(name)
            while len(self._maps) > self.capacity:
                self._maps.popitem(last=False)   # closed when no array views it any more
        return buf

    def _prune(self) -> None:
        """Unmap segments their creators removed (a mapping keeps the memory alive)."""
        with self._lock:
            cached = [(name, entry[:2]) for name, entry in self._maps.items()]
        for name, (dev, ino) in cached:
            try:
                st = os.stat(os.path.join(DIR, name), follow_symlinks=False)
                gone = (st.st_dev, st.st_ino) != (dev, ino)
            except OSError:
                gone = True
            if gone:
                with self._lock:
                    entry = self._maps.get(name)
                    if entry is not None and entry[:2] == (dev, ino):
                        del self._maps[name]

    def names(self) -> set[str]:
        """The segments mapped now."""
        with self._lock:
            return set(self._maps)

    def __len__(self) -> int:
        return len(self._maps)


def place(pool: "Pool", arrays: dict[str, np.ndarray], write: bool = True
          ) -> tuple[Segment, dict[str, int]]:
    """A segment from ``pool`` laid out for ``arrays`` (name -> array), and the offsets;
    with ``write`` the arrays' bytes are copied in (little-endian, C order)."""
    offsets, size = layout((n, a.nbytes) for n, a in arrays.items())
    seg = pool.acquire(size)
    if write:
        buf = seg.buf
        for name, a in arrays.items():
            offset = offsets[name]
            if a.flags.c_contiguous and a.dtype.byteorder in _WIRE_ORDER and a.size:
                # Already the wire's bytes: one memcpy, without an array over the segment.
                buf[offset:offset + a.nbytes] = memoryview(a).cast("B")
            else:
                seg.view(offset, a.dtype.newbyteorder("<"), a.shape)[...] = a
    return seg, offsets


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
    if hit is None or not a.flags.c_contiguous or a.dtype.byteorder not in _WIRE_ORDER:
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


class Pool:
    """A client's free segments, reused call after call (a segment the worker has mapped
    once costs nothing to map again). Thread-safe."""

    def __init__(self, keep: int = 4):
        self.keep = keep
        self._free: list[Segment] = []
        self._lock = threading.Lock()
        # Filled by lend()'s finalizers, which may run inside the garbage collector while
        # this thread holds the lock: they append here, and the lock holder collects.
        self._returned: collections.deque = collections.deque()
        self._closed = False

    def acquire(self, size: int) -> Segment:
        """A free segment of at least ``size`` bytes (the smallest that fits), or a new one."""
        with self._lock:
            self._collect()
            fits = [s for s in self._free if s.size >= size]
            if fits:
                seg = min(fits, key=lambda s: s.size)
                self._free.remove(seg)
                return seg
        return Segment(size)

    def release(self, seg: Segment) -> None:
        """Give back a segment nobody reads or writes any more."""
        self._returned.append(seg)
        if self._lock.acquire(blocking=False):
            try:
                self._collect()
            finally:
                self._lock.release()

    def lend(self, seg: Segment) -> np.ndarray:
        """A uint8 array over ``seg``'s memory, for results handed to a caller: the segment
        goes back to the pool when the last array viewing it is freed, so results stay
        valid as long as they are kept, and dropped ones cost no copy."""
        out = np.frombuffer(memoryview(seg.buf), np.uint8)
        # Every view of ``out`` leads to this memoryview (NumPy collapses view chains onto
        # the first non-array base), so it dies exactly when the last of them does.
        weakref.finalize(out.base, self.release, seg).atexit = False
        return out

    def _collect(self) -> None:
        """Returned segments to the free list, the smallest beyond ``keep`` removed (with
        the lock held)."""
        while self._returned:
            self._free.append(self._returned.popleft())
        while self._free and (self._closed or len(self._free) > self.keep):
            seg = min(self._free, key=lambda s: s.size)
            self._free.remove(seg)
            seg.close()

    def close(self) -> None:
        """Remove the free segments, and each lent one when it comes back."""
        with self._lock:
            self._closed = True
            self._collect()


def same_host_target(target: str) -> bool:
    """Whether a gRPC target ("127.0.0.1:50051", "localhost:1", "unix:/x") is this host."""
    if target.startswith(("unix:", "unix-abstract:")):
        return True
    host = target.rsplit(":", 1)[0] if not target.startswith("[") else target[1:].split("]")[0]
    host = host.removeprefix("ipv4:").removeprefix("dns:///").removeprefix("dns:")
    return host in ("localhost", "::1") or host.startswith("127.")
