"""Per-thread hooks of the op dispatcher: a graph tracer (``gradmesh.core.graph``) sees
every op the dispatcher runs, and the in-place changes and new tensors of the Tensor API."""

from __future__ import annotations

import threading
from typing import Callable


class _Dispatch(threading.local):
    tracer = None  # a class default, so that reading it never fails (see autograd._State)


_dispatch = _Dispatch()


def graph_tracer():
    """The active graph tracer, which also records in-place changes and the tensors the
    traced function makes; None without one (or for a tracer that only watches
    dispatched ops)."""
    tracer = _dispatch.tracer
    return tracer if tracer is not None and hasattr(tracer, "inplace") else None


def untraced(tracer, fn: Callable, *args) -> Callable[[], None]:
    """A call of ``fn(*args)`` with the tracer off: the eager half of an op it records."""

    def run() -> None:
        _dispatch.tracer = None
        try:
            fn(*args)
        finally:
            _dispatch.tracer = tracer

    return run
