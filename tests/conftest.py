"""Shared fixtures: free ports and in-process servers on 127.0.0.1 that are always stopped."""
from __future__ import annotations

import socket
from typing import Callable, Iterator

import pytest


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for servers that need a number
    before they start; gRPC servers should rather bind port 0 and report the real one)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
def worker() -> Iterator[object]:
    """One CPU worker on 127.0.0.1 shared by a test module (no token, default limits)."""
    from gradmesh.server import worker as worker_mod
    running = worker_mod.start(backend="cpu")
    yield running
    running.stop(0)
