"""Starting a worker: :func:`start` in this process (tests, embedding), and the
``gradmesh worker`` command (:func:`add_arguments`, :func:`run`)."""

from __future__ import annotations

import argparse
import dataclasses
import sys

from gradmesh.server import runtime
from gradmesh.server.worker.calls import WorkerLimits
from gradmesh.server.worker.logic import BACKENDS, GradientWorker
from gradmesh.server.worker.service import SERVICE_NAME, WorkerService, add_to_server
from gradmesh.wire import stream
from gradmesh.wire.coordinator import WorkerRegistration

DEFAULT_PORT = 50051

_WORKER_KEYS = {
    "limits",
    "graph_cache_size",
    "plan_cache_size",
    "shared_memory",
    "parameter_cache_bytes",
    "residual_bytes",
}


def start(
    backend: str = "cpu", *, config: runtime.ServerConfig | None = None, **kw
) -> runtime.RunningServer:
    """Start a worker in this process (default 127.0.0.1, a free port).

    Keyword arguments set :class:`~gradmesh.server.runtime.ServerConfig` fields, or the
    worker's ``limits`` (:class:`WorkerLimits`), ``graph_cache_size``, ``plan_cache_size``,
    ``shared_memory``, ``parameter_cache_bytes``, ``residual_bytes``.
    The returned server has ``.address`` and ``.worker`` (the :class:`GradientWorker`).
    """
    worker_kw = {k: kw.pop(k) for k in list(kw) if k in _WORKER_KEYS}
    config = config or runtime.ServerConfig(**kw)
    given = worker_kw.pop("limits", None)
    limits = dataclasses.replace(
        given or WorkerLimits(),
        max_message_bytes=config.max_message_bytes,
        max_concurrent_requests=config.max_concurrent_requests,
    )
    if given is None or given.chunk_bytes is None:
        # Not chosen: the largest default chunk whose messages fit the message limit.
        limits = dataclasses.replace(
            limits,
            chunk_bytes=stream.chunk_for(config.max_message_bytes, WorkerLimits().chunk_bytes),
        )
    worker = GradientWorker(backend, limits, **worker_kw)
    running = runtime.serve(config, [(add_to_server, WorkerService(worker), SERVICE_NAME)])
    running.worker = worker
    return running


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``gradmesh worker`` (each also settable as GRADMESH_<FLAG>)."""
    runtime.add_server_arguments(parser, DEFAULT_PORT)
    d = runtime.env_default
    dl = WorkerLimits()
    g = parser.add_argument_group("worker")
    g.add_argument(
        "--backend",
        choices=BACKENDS,
        default=d("backend", "cpu"),
        help="cpu (NumPy) or cuda (CuPy)",
    )
    g.add_argument("--max-graph-nodes", type=int, default=d("max-graph-nodes", dl.max_graph_nodes))
    g.add_argument(
        "--max-tensor-elements", type=int, default=d("max-tensor-elements", dl.max_tensor_elements)
    )
    g.add_argument(
        "--max-stream-bytes", type=int, default=d("max-stream-bytes", dl.max_stream_bytes)
    )
    g.add_argument(
        "--max-request-bytes",
        type=int,
        default=d("max-request-bytes", dl.max_request_bytes),
        help="per-request memory budget from shape inference (0: none)",
    )
    g.add_argument(
        "--max-request-flops",
        type=float,
        default=d("max-request-flops", dl.max_request_flops),
        help="per-request compute budget from shape inference (0: none)",
    )
    g.add_argument(
        "--chunk-bytes",
        type=int,
        default=d("chunk-bytes", None),
        help=f"chunk size of streamed responses, at most 4 MiB and 4 KiB under "
        f"--max-message-bytes (default {dl.chunk_bytes}, or less to fit "
        f"--max-message-bytes)",
    )
    g.add_argument("--graph-cache-size", type=int, default=d("graph-cache-size", 256))
    g.add_argument("--plan-cache-size", type=int, default=d("plan-cache-size", 64))
    g.add_argument(
        "--shared-memory",
        choices=("on", "off"),
        default=d("shared-memory", "on"),
        help="take tensors in shared memory (sealed memory segments) from "
        "callers on this host; off: bytes in messages only "
        "(docs/worker.md)",
    )
    g.add_argument(
        "--parameter-cache-bytes",
        type=int,
        default=d("parameter-cache-bytes", 1 << 30),
        help="bytes of parameters kept for requests that name a parameter_set "
        "(a coordinator sending several micro-batches; default 1 GiB)",
    )
    g.add_argument(
        "--residual-bytes",
        type=int,
        default=d("residual-bytes", 1 << 30),
        help="bytes of error-feedback residuals kept for compressed replies (least "
        "recently used out first; 0 keeps none; default 1 GiB)",
    )
    g.add_argument(
        "--blas-threads",
        type=int,
        default=d("blas-threads", None),
        help="fix NumPy's BLAS thread count (workers of a job must agree)",
    )
    g.add_argument(
        "--coordinator",
        default=d("coordinator", None),
        help="register with this coordinator (host:port) and send heartbeats, "
        "instead of being named in its --workers list",
    )
    g.add_argument(
        "--advertise",
        default=d("advertise", None),
        help="the address the coordinator should dial (default: the bound "
        "address; in Kubernetes, $(POD_IP):PORT)",
    )
    runtime.add_peer_arguments(parser, "the coordinator (--coordinator)")


def _limit_blas_threads(threads: int) -> None:
    try:
        # Imported here: threadpoolctl is needed only for --blas-threads.
        from threadpoolctl import threadpool_limits

        threadpool_limits(threads, user_api="blas")
    except ImportError:
        print(
            "warning: --blas-threads needs threadpoolctl; set OPENBLAS_NUM_THREADS instead",
            file=sys.stderr,
        )


def _register_with_coordinator(args: argparse.Namespace, address: str, peer: runtime.PeerConfig):
    """Register with ``--coordinator`` and send heartbeats (``.stop()`` ends them)."""
    return WorkerRegistration(
        args.coordinator, args.advertise or address, token=peer.token, tls=peer.tls
    ).start()


def run(args: argparse.Namespace) -> int:
    """``gradmesh worker``: serve until SIGTERM/SIGINT."""
    config = runtime.config_from_args(args)
    runtime.configure_logging(config)
    if args.blas_threads:
        _limit_blas_threads(args.blas_threads)
    if args.parameter_cache_bytes < 0:
        print(
            "error: --parameter-cache-bytes must be >= 0 (0 keeps no parameters)", file=sys.stderr
        )
        return 2
    if args.residual_bytes < 0:
        print("error: --residual-bytes must be >= 0 (0 keeps no residuals)", file=sys.stderr)
        return 2
    limits = WorkerLimits(
        max_graph_nodes=args.max_graph_nodes,
        max_tensor_elements=args.max_tensor_elements,
        max_stream_bytes=args.max_stream_bytes,
        chunk_bytes=args.chunk_bytes,  # None: fit to the message limit
        max_request_bytes=args.max_request_bytes,
        max_request_flops=int(args.max_request_flops),
    )
    try:
        for flag, address in (("--coordinator", args.coordinator), ("--advertise", args.advertise)):
            if address:
                runtime.check_address(flag, address)
        peer = runtime.peer_config_from_args(args, config)
        running = start(
            args.backend,
            config=config,
            limits=limits,
            graph_cache_size=args.graph_cache_size,
            plan_cache_size=args.plan_cache_size,
            shared_memory=args.shared_memory == "on",
            parameter_cache_bytes=args.parameter_cache_bytes,
            residual_bytes=args.residual_bytes,
        )
    except runtime.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    runtime.announce(config, f"gradmesh worker ({args.backend})", running.address)
    registration = None
    if args.coordinator:
        registration = _register_with_coordinator(args, running.address, peer)
        # On SIGTERM: out of the coordinator's pool first, then drain.
        running.before_stop.append(registration.deregister)
    try:
        running.wait()
    finally:
        if registration is not None:
            registration.stop()
    return 0
