"""Calls to the Coordinator service (coordinator.proto), and a worker's registration.

:class:`CoordinatorConnection` is the RPC level: one method per call, messages and arrays
in and out, transient failures of idempotent calls retried with backoff, failures raised
as :class:`~gradmesh.wire.errors.GradmeshError`. The SDK's ``CoordinatorClient`` builds
on it (tracing models, jobs, step results); :class:`WorkerRegistration` is what a worker
runs to join a coordinator.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from typing import Any, Callable, Sequence

import grpc
import numpy as np

from gradmesh.core.serialize import to_proto
from gradmesh.v1 import coordinator_pb2, coordinator_pb2_grpc

from .channel import call_metadata, channel, metadata
from .errors import NO_WORKERS, GradmeshError, from_rpc_error
from .frames import encode_tensor_field, field_number, serialize_message
from .shard import receive_frames, stream_frames

__all__ = ["CoordinatorConnection", "WorkerRegistration"]

log = logging.getLogger("gradmesh.worker")
client_log = logging.getLogger("gradmesh.client")

# Codes after which the same idempotent call may succeed.
_TRANSIENT = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}
_BATCH = field_number(coordinator_pb2.StepRequest, "batch")


class CoordinatorConnection:
    """A connection to a coordinator at ``target`` ("host:port").

    ``token``: bearer token; ``tls``: None (plaintext), True (system roots), a
    :class:`~gradmesh.wire.channel.TLS` (``TLS(ca=..., cert=..., key=...)`` for mTLS) or
    ``grpc.ChannelCredentials``. ``timeout`` is the deadline of each call in seconds (a
    step on a large model may need more); ``retry_seconds`` how long idempotent calls are
    retried on transient errors, each distinct error logged once as a warning (logger
    ``gradmesh.client``) so that no wait is silent. ``wait_for_workers``: how long a Step
    waits (within ``retry_seconds``) for a worker to register when the coordinator has
    none (reason ``NO_WORKERS``) before it raises ``Unavailable``; 0 raises at once.
    """

    def __init__(
        self,
        target: str,
        *,
        token: str | None = None,
        tls: Any = None,
        timeout: float = 600.0,
        retry_seconds: float = 60.0,
        max_message_bytes: int = 64 << 20,
        wait_for_workers: float = 30.0,
    ):
        self.target = target
        self.timeout = timeout
        self.retry_seconds = retry_seconds
        self.wait_for_workers = wait_for_workers
        self._channel = channel(target, tls=tls, max_message_bytes=max_message_bytes)
        self.stub = coordinator_pb2_grpc.CoordinatorStub(self._channel)
        # Step's request goes pre-encoded: the batch's bytes copied once, not into a
        # message and again by its serialization.
        self._step = self._channel.unary_unary(
            f"/{coordinator_pb2.DESCRIPTOR.services_by_name['Coordinator'].full_name}/Step",
            request_serializer=serialize_message,
            response_deserializer=coordinator_pb2.StepResponse.FromString,
            _registered_method=True,
        )
        self._metadata = metadata(token)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _call(
        self,
        method: str,
        make_request: Callable[[], Any],
        *,
        retry: bool,
        receive: Callable[[Any], Any] | None = None,
        fn: Callable | None = None,
    ):
        """Call ``method`` (through ``fn``, else the stub's); transient failures of
        idempotent calls are retried with backoff. ``receive``: reads a server stream's
        reply (its errors are retried the same way)."""
        fn = fn or getattr(self.stub, method)
        deadline = time.monotonic() + self.retry_seconds
        delay = 0.1
        logged = None
        no_workers_since: float | None = None  # when the coordinator first said so
        while True:
            try:
                reply = fn(
                    make_request(), timeout=self.timeout, metadata=call_metadata(self._metadata)
                )
                return receive(reply) if receive is not None else reply
            except grpc.RpcError as e:
                error = from_rpc_error(e, method)
                if not retry or error.code not in _TRANSIENT or time.monotonic() > deadline:
                    raise error from None
                until = deadline
                if error.reason == NO_WORKERS:
                    if no_workers_since is None:
                        no_workers_since = time.monotonic()
                    if self._stop_waiting_for_workers(error, no_workers_since):
                        raise error from None
                    until = min(deadline, no_workers_since + self.wait_for_workers)
                if error.message != logged:  # each distinct reason once (not per request id)
                    logged = error.message
                    client_log.warning(
                        "%s at %s: %s (retrying for up to %.1f s more)",
                        method,
                        self.target,
                        error.message,
                        max(0.0, until - time.monotonic()),
                    )
            time.sleep(delay)
            delay = min(delay * 2, 2.0)

    def _stop_waiting_for_workers(self, error: GradmeshError, since: float) -> bool:
        """Whether a call refused for want of workers ``since`` then has waited
        ``wait_for_workers``; if so, ``error`` says how long it waited."""
        waited = time.monotonic() - since
        if waited < self.wait_for_workers:
            return False
        error.message += (
            f" (waited {waited:.1f} s for a worker; CoordinatorClient(wait_for_workers=...) "
            f"sets how long)"
        )
        return True

    def create(
        self, header: coordinator_pb2.CreateJobRequest, params: "OrderedDict[str, np.ndarray]"
    ) -> coordinator_pb2.CreateJobResponse:
        """CreateJob with ``header`` (no parameters) and the parameters' values, streamed."""
        for n, a in params.items():
            header.parameters.add(name=n).tensor.CopyFrom(to_proto(a, data=False))
        return self._call(
            "CreateJob",
            lambda: stream_frames(
                coordinator_pb2.CoordinatorFrame, "create_job", header, params.values()
            ),
            retry=True,
        )

    def job_status(self, job_id: str) -> coordinator_pb2.JobStatusResponse:
        return self._call(
            "JobStatus", lambda: coordinator_pb2.JobStatusRequest(job_id=job_id), retry=True
        )

    def list_workers(self) -> list:
        """The coordinator's workers (address, source, state, fingerprint, counts)."""
        return list(
            self._call("ListWorkers", coordinator_pb2.ListWorkersRequest, retry=True).workers
        )

    def get_parameters(
        self, job_id: str, names: Sequence[str] = ()
    ) -> tuple[int, "OrderedDict[str, np.ndarray]"]:
        """``(version, {name: array})`` of a job's parameters (streamed)."""

        def receive(frames) -> tuple[int, "OrderedDict[str, np.ndarray]"]:
            header, arrays = receive_frames(iter(frames), "parameters", 1 << 40)
            return header.version, OrderedDict(arrays)

        return self._call(
            "GetParameters",
            lambda: coordinator_pb2.GetParametersRequest(job_id=job_id, names=list(names)),
            retry=True,
            receive=receive,
        )

    def step(
        self, job_id: str, step_id: int, batch: dict[str, Any]
    ) -> coordinator_pb2.StepResponse:
        """One raw Step call (retried with the same id on transient errors); ``batch``:
        name -> array or Tensor."""
        pieces = [coordinator_pb2.StepRequest(job_id=job_id, step_id=step_id).SerializeToString()]
        for name, value in batch.items():
            pieces.extend(encode_tensor_field(_BATCH, value, name))
        request = b"".join(pieces)
        return self._call("Step", lambda: request, retry=True, fn=self._step)

    def register_worker(self, address: str) -> coordinator_pb2.RegisterWorkerResponse:
        return self._call(
            "RegisterWorker",
            lambda: coordinator_pb2.RegisterWorkerRequest(address=address),
            retry=False,
        )

    def heartbeat(self, worker_id: str) -> coordinator_pb2.HeartbeatResponse:
        return self._call(
            "Heartbeat", lambda: coordinator_pb2.HeartbeatRequest(worker_id=worker_id), retry=False
        )

    def deregister_worker(self, worker_id: str) -> coordinator_pb2.DeregisterWorkerResponse:
        return self._call(
            "DeregisterWorker",
            lambda: coordinator_pb2.DeregisterWorkerRequest(worker_id=worker_id),
            retry=False,
        )


class WorkerRegistration:
    """Register a worker with a coordinator and keep it alive with heartbeats.

    >>> reg = WorkerRegistration("127.0.0.1:50053", "127.0.0.1:50051").start()  # doctest: +SKIP
    >>> reg.stop()                                                                # doctest: +SKIP

    Re-registers when the coordinator forgets the worker (it restarted). ``token`` and
    ``tls`` are those of :class:`CoordinatorConnection`.
    """

    def __init__(
        self, coordinator: str, worker_address: str, *, token: str | None = None, tls: Any = None
    ):
        self.client = CoordinatorConnection(
            coordinator, token=token, tls=tls, timeout=10.0, retry_seconds=0.0
        )
        self.address = worker_address
        self.worker_id: str | None = None
        self.interval = 5.0
        self.last_error: str | None = None  # why the last attempt failed (None: it didn't)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def register(self) -> str:
        try:
            r = self.client.register_worker(self.address)
        except GradmeshError as e:
            # Logged once per distinct reason: a TLS or token mismatch shows up in the log
            # instead of as a worker that silently never joins.
            if str(e) != self.last_error:
                log.warning(
                    "cannot register %s with the coordinator at %s (retrying): %s",
                    self.address,
                    self.client.target,
                    e,
                )
            self.last_error = str(e)
            raise
        self.worker_id, self.interval = r.worker_id, r.heartbeat_interval_seconds or 5.0
        self.last_error = None
        return self.worker_id

    def start(self) -> "WorkerRegistration":
        """Register now if the coordinator answers, else keep trying in the background
        (in a cluster, workers may well start before their coordinator)."""
        try:
            self.register()
        except GradmeshError:
            pass
        self._thread = threading.Thread(target=self._loop, daemon=True, name="gradmesh-heartbeat")
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.interval / 2 if self.worker_id else 1.0):
            try:
                if self.worker_id is None:
                    self.register()
                    continue
                if not self.client.heartbeat(self.worker_id or "").known:
                    self.register()
            except GradmeshError:
                continue  # the coordinator is down: keep trying

    def deregister(self) -> None:
        """Stop the heartbeats and leave the coordinator's pool now (a worker that is
        shutting down: no new micro-batches come to it while it drains)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.worker_id is None:
            return
        try:
            self.client.deregister_worker(self.worker_id)
        except GradmeshError as e:  # the coordinator drops it after missed heartbeats
            log.warning("cannot deregister %s from the coordinator: %s", self.address, e)
        self.worker_id = None

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.client.close()
