"""Same-host transport: a request's tensor bytes in shared memory instead of its message.

Moving 100 MB through gRPC in Python costs about 100 ms of CPU per direction on a small
machine; copying it into shared memory costs about 18 ms. A client on the worker's host
(the coordinator of a ``LocalCluster``, a ``WorkerClient`` on 127.0.0.1) therefore writes
the parameters into a segment (:mod:`gradmesh.core.sharedmem`, whose rules both sides
keep) taken from its :class:`Pool`, and names the segment and each tensor's offset in the
request; it names a second segment for the worker to write the gradients into. Only
names, shapes and offsets travel over gRPC (``SharedMemory`` in worker.proto).

The worker keeps segments it has opened mapped (:class:`Attached`), so a client that
reuses its segments call after call pays for page mapping once.
"""

from __future__ import annotations

import collections
import mmap
import os
import stat
import threading
import weakref
from collections import OrderedDict
from typing import Mapping

import numpy as np

from gradmesh.core.serialize import byte_view
from gradmesh.core.sharedmem import (
    HEADER,
    LEGACY_NAME,
    MEMFD_NAME,
    NAME,
    POPULATE,
    REQUIRED_SEALS,
    WIRE_ORDER,
    K,
    Segment,
    SegmentError,
    header_matches,
    layout,
    supported,
)

try:
    import fcntl
except ImportError:  # not on Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["Attached", "Pool", "place", "available", "same_host_target", "MAPPED_SEGMENTS"]

MAPPED_SEGMENTS = 16  # segments a worker keeps mapped (Attached)

# What the worker says about a segment it cannot use, whatever the reason (not a process
# it may open, no such descriptor, not a sealed gradmesh segment, the wrong secret): one
# message, so that a caller learns nothing about another user's processes from it.
REFUSED = (
    "the worker cannot use this segment: it is not a sealed gradmesh segment of a "
    "process of the worker's user holding the name's secret (is the client on "
    "another host, in another container, or another user?)"
)
_MEMFD_LINK = f"/memfd:{MEMFD_NAME}"


def available() -> bool:
    """Whether this host can create and open segments (Linux with memfd_create, file
    sealing and /proc)."""
    return supported()


def _open(pid: int, fd: int, secret: str) -> tuple[int, int, mmap.mmap]:
    """``(st_dev, st_ino, mapping)`` of the segment the creator ``pid`` holds as ``fd``,
    checked: a regular memory file of gradmesh's, sealed against shrinking and growing,
    whose header holds ``secret``. Raises ``SegmentError(REFUSED)`` otherwise."""
    try:
        # O_PATH opens nothing (no device is ever opened, whatever ``fd`` is) but pins the
        # inode; the checks and the real open below are of that inode, with no race.
        path = os.open(f"/proc/{pid}/fd/{fd}", os.O_PATH | os.O_CLOEXEC)
    except OSError:
        raise SegmentError(REFUSED) from None
    real = -1
    try:
        st = os.fstat(path)
        if not stat.S_ISREG(st.st_mode) or not os.readlink(f"/proc/self/fd/{path}").startswith(
            _MEMFD_LINK
        ):
            raise SegmentError(REFUSED)
        real = os.open(f"/proc/self/fd/{path}", os.O_RDWR | os.O_CLOEXEC)
        seals = fcntl.fcntl(real, fcntl.F_GET_SEALS)
        size = os.fstat(real).st_size  # final: the seals forbid any change
        if (
            (seals & REQUIRED_SEALS) != REQUIRED_SEALS
            or size < HEADER
            or not header_matches(os.pread(real, HEADER, 0), secret)
        ):
            raise SegmentError(REFUSED)
        buf = mmap.mmap(real, size, flags=mmap.MAP_SHARED | POPULATE)
        return st.st_dev, st.st_ino, buf
    except OSError:
        raise SegmentError(REFUSED) from None
    finally:
        os.close(path)
        if real >= 0:
            os.close(real)


def _parse(name: str) -> tuple[int, int, str]:
    m = NAME.match(name)
    if m is None:
        if LEGACY_NAME.match(name):
            raise SegmentError(
                "this worker takes sealed memory segments "
                "(gradmesh-<pid>-<fd>-<32 hex digits>), not files in "
                "/dev/shm: send the bytes, or upgrade the client"
            )
        raise SegmentError("not a gradmesh segment name (gradmesh-<pid>-<fd>-<32 hex digits>)")
    return int(m.group(1)), int(m.group(2)), m.group(3)


class Attached:
    """The worker's side: segments named by clients, opened once and kept mapped.

    ``get(name)`` returns the mapping of the segment a name designates, after checking it
    (:func:`_open`); later calls with the same name (which holds the secret, so only a
    caller that was told it can hit the cache) check only that the creator still holds
    the segment. At most ``capacity`` segments stay mapped (least recently used go first).
    """

    def __init__(self, capacity: int = MAPPED_SEGMENTS):
        self.capacity = capacity
        self._maps: OrderedDict[str, tuple[int, int, mmap.mmap]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, name: str) -> mmap.mmap:
        pid, fd, secret = _parse(name)
        with self._lock:
            hit = self._maps.get(name)
        if hit is not None:
            if _held(pid, fd, hit[:2]):
                with self._lock:
                    if name in self._maps:
                        self._maps.move_to_end(name)
                return hit[2]
            with self._lock:  # closed by its creator: never to be used again
                if self._maps.get(name) is hit:
                    del self._maps[name]
            raise SegmentError(REFUSED)
        dev, ino, buf = _open(pid, fd, secret)
        self._prune()
        with self._lock:
            self._maps[name] = (dev, ino, buf)
            self._maps.move_to_end(name)
            while len(self._maps) > self.capacity:
                self._maps.popitem(last=False)  # closed when no array views it any more
        return buf

    def _prune(self) -> None:
        """Unmap segments their creators closed (a mapping keeps the memory alive)."""
        with self._lock:
            cached = list(self._maps.items())
        for name, entry in cached:
            pid, fd, _ = _parse(name)
            if not _held(pid, fd, entry[:2]):
                with self._lock:
                    if self._maps.get(name) is entry:
                        del self._maps[name]

    def names(self) -> set[str]:
        """The segments mapped now."""
        with self._lock:
            return set(self._maps)

    def __len__(self) -> int:
        return len(self._maps)


def _held(pid: int, fd: int, inode: tuple[int, int]) -> bool:
    """Whether process ``pid`` still holds the memory file ``inode`` as ``fd``."""
    try:
        st = os.stat(f"/proc/{pid}/fd/{fd}")
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == inode


def place(
    pool: "Pool", arrays: Mapping[K, np.ndarray], write: bool = True
) -> tuple[Segment, dict[K, int]]:
    """A segment from ``pool`` laid out for ``arrays`` (name -> array), and the offsets;
    with ``write`` the arrays' bytes are copied in (little-endian, C order)."""
    offsets, size = layout((n, a.nbytes) for n, a in arrays.items())
    seg = pool.acquire(size)
    if write:
        buf = seg.buf
        for name, a in arrays.items():
            offset = offsets[name]
            if a.flags.c_contiguous and a.dtype.byteorder in WIRE_ORDER and a.size:
                # Already the wire's bytes: one memcpy, without an array over the segment.
                buf[offset : offset + a.nbytes] = byte_view(a)
            else:
                seg.view(offset, a.dtype.newbyteorder("<"), a.shape)[...] = a
    return seg, offsets


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
