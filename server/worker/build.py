"""A worker's build identity: library versions, BLAS threads, and a fingerprint over
everything that can change results bit for bit (the coordinator refuses workers whose
fingerprint differs from the others', to keep training bitwise deterministic)."""

from __future__ import annotations

import hashlib
import os
import platform
import sys

import grpc
import numpy as np

from gradmesh._version import __version__
from gradmesh.core import backend as core_backend
from gradmesh.core import cost as core_cost


def library_versions(backend: str) -> dict[str, str]:
    versions = {
        "gradmesh": __version__,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "grpcio": grpc.__version__,
    }
    if backend == "cuda":
        cp = core_backend.cupy()
        versions["cupy"] = cp.__version__
        try:
            versions["cuda_runtime"] = str(cp.cuda.runtime.runtimeGetVersion())
            versions["gpu"] = cp.cuda.runtime.getDeviceProperties(0)["name"].decode()
        except Exception:  # noqa: BLE001  (informational only)
            pass
    return versions


def _blas_info() -> list[dict]:
    try:
        # Imported here: a worker without threadpoolctl still runs, reading env vars.
        from threadpoolctl import threadpool_info
    except ImportError:
        return []
    return [i for i in threadpool_info() if i.get("user_api") == "blas"]


def blas_threads() -> int:
    """Threads of NumPy's BLAS (threadpoolctl if installed, else the usual env vars)."""
    info = _blas_info()
    if info:
        return int(info[0].get("num_threads") or 0)
    for var in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "OMP_NUM_THREADS"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return os.cpu_count() or 1


def build_fingerprint(backend: str, versions: dict[str, str], threads: int) -> str:
    """SHA-256 over everything that can change results bit for bit."""
    blas = [(i.get("internal_api"), i.get("version"), i.get("architecture")) for i in _blas_info()]
    # The blocks large products always run in (core/cost.py) decide their bits too.
    blocks = (core_cost.TARGET_BLOCK_FLOPS, core_cost.MIN_ROWS, core_cost.ROW_STEP)
    parts = [backend, sorted(versions.items()), blas, threads, platform.machine(), sys.byteorder]
    parts.append(blocks)
    return hashlib.sha256(repr(parts).encode()).hexdigest()
