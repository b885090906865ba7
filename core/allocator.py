"""A steady heap: freed memory stays in the process for reuse, so that megabyte arrays and
requests do not map and fault in fresh pages every time.

Importing ``gradmesh.core`` applies it (``GRADMESH_STEADY_HEAP=0`` opts out, and so does
setting any of glibc's allocator variables); the ``gradmesh`` command's server roles rely
on it too."""

from __future__ import annotations

import ctypes
import os

# glibc adapts its mmap threshold to what was last freed and returns free memory at the
# heap's top to the kernel: a server receiving megabyte messages then maps and faults in
# fresh pages (which the kernel zeroes) call after call. A worker receiving the medium
# MLP's 2.7 MB requests spent 4.5x a local step on a call; with a steady heap, 2.9x. An
# eager step of a small ResNet (batch 32, benchmarks/engine.py) faulted in 36 MB of fresh
# pages, 26 ms of system time in a 114 ms step; with a steady heap, none (77 ms).
STEADY_MMAP_THRESHOLD = 32 << 20  # glibc's own ceiling for the adaptive threshold
STEADY_TRIM_THRESHOLD = 256 << 20
ALLOCATOR_VARIABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")
OPT_OUT = "GRADMESH_STEADY_HEAP"


def steady_heap() -> bool:
    """Keep freed memory in this process for reuse, up to ``STEADY_TRIM_THRESHOLD`` idle
    (glibc's ``mallopt``). Not applied where the allocator is not glibc's, where its
    variables are set in the environment (the user's choice wins) or where
    ``GRADMESH_STEADY_HEAP=0``. Returns whether it was applied."""
    if os.environ.get(OPT_OUT) == "0" or any(name in os.environ for name in ALLOCATOR_VARIABLES):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # from glibc's malloc.h
    return bool(mallopt(m_mmap_threshold, STEADY_MMAP_THRESHOLD)) and bool(
        mallopt(m_trim_threshold, STEADY_TRIM_THRESHOLD)
    )
