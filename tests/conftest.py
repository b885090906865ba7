"""Shared fixtures: free ports and in-process servers on 127.0.0.1 that are always stopped."""

from __future__ import annotations

import shutil
import socket
import subprocess
from pathlib import Path
from typing import Callable, Iterator, Sequence

import pytest

needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for servers that need a number
    before they start; gRPC servers should rather bind port 0 and report the real one)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_certs(
    directory: Path, names: Sequence[str] = ("server", "client"), ca: str = "ca"
) -> Callable[[str], str]:
    """With the ``openssl`` CLI, in ``directory``: a CA (``{ca}.pem``/``{ca}.key``, made
    unless it exists) and, for each name, ``{name}.pem``/``{name}.key`` signed by it and
    valid for 127.0.0.1 and localhost, as a server and as a client. Returns
    ``path(filename) -> str``. Tests that call it need ``@needs_openssl``."""

    def ssl(*args):
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=directory)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    if not (directory / f"{ca}.pem").exists():
        ssl(
            "req",
            "-x509",
            *ec,
            "-keyout",
            f"{ca}.key",
            "-out",
            f"{ca}.pem",
            "-days",
            "1",
            "-subj",
            f"/CN=gradmesh-test-{ca}",
        )
    for name in names:
        ssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}")
        (directory / f"{name}.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
        ssl(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            f"{ca}.pem",
            "-CAkey",
            f"{ca}.key",
            "-CAcreateserial",
            "-out",
            f"{name}.pem",
            "-days",
            "1",
            "-extfile",
            f"{name}.ext",
        )
    return lambda filename: str(directory / filename)


@pytest.fixture(name="free_port")
def free_port_fixture() -> Callable[[], int]:
    return free_port


@pytest.fixture
def start_worker() -> Iterator[Callable[..., object]]:
    """Factory: ``start_worker(backend="cpu", **config)`` -> a running worker
    (``.address``, ``.port``, ``.worker`` the servicer's core); all stopped at teardown.

    Keyword arguments go to :class:`gradmesh.server.runtime.ServerConfig` (``token``,
    ``max_concurrent_requests``, ...) or, for ``limits``, ``graph_cache_size`` and
    ``plan_cache_size``, to the worker.
    """
    from gradmesh.server import worker as worker_mod

    started = []

    def start(backend: str = "cpu", **kw):
        running = worker_mod.start(backend=backend, **kw)
        started.append(running)
        return running

    yield start
    for running in started:
        running.stop(0)


@pytest.fixture(scope="module")
def workers(request) -> Iterator[list[str]]:
    """The addresses of CPU workers on 127.0.0.1 shared by a test module: as many as its
    ``WORKERS`` (default 2)."""
    from gradmesh.server import worker as worker_mod

    started = [worker_mod.start("cpu") for _ in range(getattr(request.module, "WORKERS", 2))]
    yield [w.address for w in started]
    for w in started:
        w.stop(0)


@pytest.fixture(scope="module")
def worker() -> Iterator[object]:
    """One CPU worker on 127.0.0.1 shared by a test module (no token, default limits)."""
    from gradmesh.server import worker as worker_mod

    running = worker_mod.start(backend="cpu")
    yield running
    running.stop(0)
