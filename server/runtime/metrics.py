"""Prometheus metrics of a server process.

Module-level: prometheus-client forbids registering a name twice per process, and every
server in a process (tests start many) counts into the same ones.
"""
from __future__ import annotations

import threading
from typing import Any

from prometheus_client import Counter, Gauge, Histogram

_metrics_lock = threading.Lock()
_metrics: dict[str, Any] = {}
_children: dict[tuple[str, str], Any] = {}


def get_metrics() -> dict[str, Any]:
    """The process's metrics by short name, registered on first use."""
    with _metrics_lock:
        if not _metrics:
            _metrics["requests"] = Counter(
                "gradmesh_requests", "RPCs handled, by method and status code",
                ["method", "code"])
            _metrics["latency"] = Histogram(
                "gradmesh_request_seconds", "RPC latency in seconds, by method", ["method"],
                buckets=(.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5,
                         10, 30, 60, float("inf")))
            _metrics["in_flight"] = Gauge("gradmesh_requests_in_flight",
                                          "RPCs being served now")
            # The worker's: how its gradient calls moved their tensors (unary bytes,
            # stream, shared memory), and whether kept parameters were found.
            _metrics["transport"] = Counter(
                "gradmesh_worker_calls", "Gradient calls by how their tensors traveled",
                ["transport"])
            _metrics["kept"] = Counter(
                "gradmesh_worker_kept_parameters", "Requests naming kept parameters, by "
                "outcome (hit: found; miss: the caller must send them)", ["outcome"])
        return _metrics


def metric(name: str, label: str) -> None:
    """Count one event of a labelled counter of :func:`get_metrics`."""
    child = _children.get((name, label))
    if child is None:       # found once: labels() takes locks and builds a key every call
        child = _children[name, label] = get_metrics()[name].labels(label)
    child.inc()
