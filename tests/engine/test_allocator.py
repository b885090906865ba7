"""Importing the engine keeps freed memory for reuse (core/allocator.py): arrays freed
together are not given back to the kernel and faulted in again. Checked in child
processes, since the setting is process-wide."""

import os
import subprocess
import sys

import pytest

from gradmesh.core import allocator

# Three 16 MiB arrays allocated and freed together, ten times: glibc's defaults return
# them to the kernel each time (a page fault per 4 KiB page when they come back).
COUNT_FAULTS = """
import resource, numpy as np
import gradmesh.core
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for i in range(20):
    if i == 10:
        start = faults()
    arrays = [np.ones(2 << 20) for _ in range(3)]
    del arrays
print(faults() - start)
"""


def _faults(**env) -> int:
    clean = {k: v for k, v in os.environ.items() if k not in allocator.ALLOCATOR_VARIABLES}
    clean.pop(allocator.OPT_OUT, None)
    out = subprocess.run(
        [sys.executable, "-c", COUNT_FAULTS],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    return int(out.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_importing_the_engine_keeps_freed_arrays_for_reuse():
    steady = _faults()
    glibc_defaults = _faults(GRADMESH_STEADY_HEAP="0")
    user_choice = _faults(MALLOC_TRIM_THRESHOLD_="0")
    pages = 10 * 3 * (16 << 20) // 4096
    assert steady < pages // 100, (steady, pages)
    assert glibc_defaults > pages // 20, (glibc_defaults, pages)
    assert user_choice > pages // 20, (user_choice, pages)
