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

import numpy as np

from gradmesh.core.sharedmem import (
    ALIGN,
    DIR,
    NAME,
    NOFOLLOW,
    POPULATE,
    WIRE_ORDER,
    Segment,
    SegmentError,
    layout,
)

__all__ = ["Attached", "Pool", "place", "available", "same_host_target", "MAPPED_SEGMENTS"]

MAPPED_SEGMENTS = 16        # segments a worker keeps mapped (Attached)


def available() -> bool:
    """Whether this host can create segments (Linux with a writable ``/dev/shm``)."""
    return (hasattr(os, "posix_fallocate") and os.path.isdir(DIR)
            and os.access(DIR, os.W_OK | os.X_OK))


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
            fd = os.open(path, os.O_RDWR | NOFOLLOW)
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
            buf = mmap.mmap(fd, st.st_size, flags=mmap.MAP_SHARED | POPULATE)
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
            if a.flags.c_contiguous and a.dtype.byteorder in WIRE_ORDER and a.size:
                # Already the wire's bytes: one memcpy, without an array over the segment.
                buf[offset:offset + a.nbytes] = memoryview(a).cast("B")
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
