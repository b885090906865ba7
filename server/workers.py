"""The coordinator's workers: one handle per worker, and the pool they form.

A :class:`WorkerHandle` knows what the coordinator knows of a worker (state, build
fingerprint, graphs it has, parameters it keeps) and makes its ComputeGradients calls,
with the transport policy of :class:`~gradmesh.wire.worker.WorkerTransport` (the SDK's
too). The :class:`WorkerPool` holds the static and registered workers, all usable ones of
one build fingerprint (DESIGN §6: results are bitwise identical only within one build).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from typing import Any, Sequence

import grpc
import numpy as np

from gradmesh.server.runtime import ServiceError
from gradmesh.v1 import worker_pb2
from gradmesh.wire import sharedmem
from gradmesh.wire.channel import call_metadata, channel, metadata
from gradmesh.wire.errors import GradmeshError, bad_request_field, from_rpc_error
from gradmesh.wire.frames import encode_tensor_field, field_number
from gradmesh.wire.stream import MAX_CHUNK_BYTES
from gradmesh.wire.worker import SHARED, Reply, WorkerTransport, shared_request

log = logging.getLogger("gradmesh.coordinator")

__all__ = ["WorkerHandle", "WorkerPool", "ParamSet", "HEARTBEAT_SECONDS"]

INVALID = grpc.StatusCode.INVALID_ARGUMENT
FAILED = grpc.StatusCode.FAILED_PRECONDITION
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
HEARTBEAT_SECONDS = 5.0
# Worker calls above this many bytes are streamed even when the unary limit would allow
# them: one huge unary message measured 3x slower than 4 MiB chunks (100 MB, loopback).
UNARY_MAX_BYTES = 8 << 20
# Encoded shared-memory parts of requests a worker handle keeps (a few segment names
# repeat: the pool hands the same segments back).
SHARED_REQUESTS_KEPT = 16
BYTES = "bytes"  # a call's tensors in its messages: unary when they fit, else streamed
_PARAMETERS = field_number(worker_pb2.ComputeGradientsRequest, "parameters")
_DATA = field_number(worker_pb2.ComputeGradientsRequest, "data")


class WorkerHandle(WorkerTransport):
    """One worker: its channel, what the coordinator knows of it, and the call itself
    (the transport policy is :class:`~gradmesh.wire.worker.WorkerTransport`'s, as the
    SDK's)."""

    def __init__(
        self,
        address: str,
        source: str,
        timeout: float,
        token: str | None,
        max_message_bytes: int,
        tls: Any = None,
        segments: Any = None,
    ):
        self.address = address
        self.source = source
        self.timeout = timeout
        self.state = "unknown"  # unknown -> ready | unreachable | refused
        self.reason = ""
        self.fingerprint = ""
        self.backend = ""
        self.completed = 0
        self.failures = 0
        self.worker_id = ""
        self.last_seen = time.monotonic()
        self.retry_at = 0.0
        self.max_message_bytes = max_message_bytes
        self.graphs: set[str] = set()  # graph ids this worker has
        # Bytes of parameters the worker keeps between calls, and the (job, version) it
        # was last sent: a second micro-batch of a step then goes without them.
        self.parameter_cache_bytes = 0
        self.kept: tuple | None = None
        self._metadata = metadata(token)
        self._channel = channel(address, tls=tls, max_message_bytes=max_message_bytes)
        # Shared memory when the worker is on this host and takes it; ``segments`` is the
        # coordinator's pool (None: never).
        super().__init__(self._channel, address, segments=segments, chunk_bytes=MAX_CHUNK_BYTES)
        self._shared = False  # until Capabilities says
        self._shared_requests: dict[tuple, bytes] = {}  # see _shared_fields

    def probe(self) -> None:
        """Ask for Capabilities; sets state, fingerprint and backend."""
        try:
            caps = self.stub.Capabilities(
                worker_pb2.CapabilitiesRequest(),
                timeout=5.0,
                metadata=call_metadata(self._metadata),
            )
        except grpc.RpcError as e:
            self.state, self.reason = "unreachable", f"{e.code().name}: {e.details()}"
            self.retry_at = time.monotonic() + 1.0
            return
        self.fingerprint = caps.build_fingerprint
        self.backend = caps.backend
        self._shared = self.segments is not None and caps.shared_memory
        self.parameter_cache_bytes = caps.limits.parameter_cache_bytes
        # Unary requests and stream chunks within the worker's message limit too.
        self.fit_limits(caps.limits)
        if caps.limits.max_message_bytes:
            self.max_message_bytes = min(self.max_message_bytes, int(caps.limits.max_message_bytes))
        self.kept = None
        self.state, self.reason = "ready", ""

    def compute(
        self,
        graph,
        graph_id: str,
        params: "ParamSet",
        data: dict[str, np.ndarray],
        scale: float,
        seed: int,
        outputs: Sequence[str],
        compression: worker_pb2.WorkerCompression | None = None,
    ) -> Reply:
        """One ComputeGradients call (the graph inline until the worker has it); raises
        ``GradmeshError`` for a failed call. ``compression``: the reply's gradients
        compressed by the worker (bytes only: no shared memory then)."""
        unary_max = min(self.max_message_bytes // 2, UNARY_MAX_BYTES)
        data_bytes = sum(a.nbytes for a in data.values())
        shared = self._shared and data_bytes + (1 << 20) < unary_max and compression is None

        def send(mode: str) -> Reply:
            req = worker_pb2.ComputeGradientsRequest(
                loss_scale=scale, seed=seed, outputs=list(outputs), compression=compression
            )
            if graph_id in self.graphs:
                req.graph_id = graph_id
            else:
                req.graph.CopyFrom(graph)
            try:
                if mode == SHARED:
                    reply = self._compute_shared(req, params, data)
                else:
                    reply = self._compute_bytes(req, params, data, unary_max)
            except grpc.RpcError as e:
                raise from_rpc_error(e, "ComputeGradients") from None
            self.graphs.add(graph_id)
            return reply

        mode = SHARED if shared else BYTES
        reply, used = self._transport(send, mode, BYTES, lambda: self.graphs.discard(graph_id))
        if used != mode:
            log.warning("worker %s: no shared memory; sending bytes", self.address)
        return reply

    def _compute_bytes(self, req, params: "ParamSet", data: dict, unary_max: int) -> Reply:
        """The call with every tensor as bytes, the parameters left out when the worker
        keeps them from an earlier call of this version."""
        key = (params.key, params.version)
        if params.nbytes > self.parameter_cache_bytes:
            return self._send_bytes(req, params, data, True, unary_max)
        req.parameter_set, req.parameter_version = key
        if self.kept == key:
            try:
                return self._send_bytes(req, params, data, False, unary_max)
            except grpc.RpcError as e:
                if (
                    e.code() != grpc.StatusCode.FAILED_PRECONDITION
                    or bad_request_field(e) != "parameters"
                ):
                    raise
                # The worker restarted or evicted them: send them again.
        self.kept = None
        result = self._send_bytes(req, params, data, True, unary_max)
        self.kept = key
        return result

    def _send_bytes(
        self, req, params: "ParamSet", data: dict, with_params: bool, unary_max: int
    ) -> Reply:
        """Unary when it fits, streamed otherwise (the parameters only ``with_params``)."""
        size = (
            (params.nbytes if with_params else 0) + (1 << 20) + sum(a.nbytes for a in data.values())
        )
        kw = {"timeout": self.timeout, "metadata": call_metadata(self._metadata)}
        if size >= unary_max:
            fresh = type(req)()
            fresh.CopyFrom(req)  # a retry without the kept parameters starts over
            return self._send_stream(
                fresh,
                params.arrays.items() if with_params else (),
                data.items(),
                lambda message: GradmeshError(
                    grpc.StatusCode.INTERNAL, message, None, "ComputeGradientsStream"
                ),
                **kw,
            )
        # Protobuf parses concatenated encodings as one message, so the parameters'
        # bytes, encoded once per version, are joined to the rest instead of copied into
        # every worker's request and serialized again.
        pieces = [req.SerializeToString()]
        if with_params:
            pieces.append(params.unary_bytes())
        for name, a in data.items():
            pieces.extend(encode_tensor_field(_DATA, a, name))
        return self._send_unary(b"".join(pieces), **kw)

    def _compute_shared(self, req, params: "ParamSet", data: dict) -> Reply:
        """A unary call with parameters, data and gradients in shared memory; the result's
        gradients are views of a segment that goes back to the pool when they are freed
        (after the step applied them, or dropped them). The data's segment goes back when
        the call returns; a failed call's is dropped (a worker past its deadline may still
        read it)."""
        pool = self.segments
        assert pool is not None  # only called for a worker on this host (compute)
        segment, offsets = params.shared(pool)
        dseg, doffsets = sharedmem.place(pool, data)
        done = False
        try:
            gseg, goffsets = sharedmem.place(
                pool, {n: params.arrays[n] for n in params.gradients}, write=False
            )
            try:
                where = self._shared_fields(
                    params, (segment, offsets), data, (dseg, doffsets), (gseg, goffsets)
                )
            except BaseException:
                gseg.close()
                raise
            reply = self._send_shared(  # closes gseg when the call fails
                req.SerializeToString() + where,
                gseg,
                goffsets,
                timeout=self.timeout,
                metadata=call_metadata(self._metadata),
            )
            done = True
            return reply
        finally:
            pool.release(dseg) if done else dseg.close()

    def _shared_fields(
        self, params: "ParamSet", placed: tuple, data: dict, data_placed: tuple, grads_placed: tuple
    ) -> bytes:
        """The request's tensor headers and ``shared_memory``, encoded: the same bytes
        whenever the pool hands back the same segments (they follow from the job's
        parameters, the data's signature and the segments' names), so kept."""
        (segment, offsets), (dseg, doffsets), (gseg, goffsets) = placed, data_placed, grads_placed
        key = (
            params.key,
            segment.name,
            dseg.name,
            gseg.name,
            tuple((n, a.dtype.str, a.shape) for n, a in data.items()),
        )
        encoded = self._shared_requests.get(key)
        if encoded is None:
            encoded = shared_request(
                params.arrays,
                dseg,
                offsets,
                gseg,
                goffsets,
                data,
                doffsets,
                parameter_segment=segment.name,
            ).SerializeToString()
            if len(self._shared_requests) >= SHARED_REQUESTS_KEPT:
                self._shared_requests.clear()
            self._shared_requests[key] = encoded
        return encoded

    def close(self) -> None:
        self._channel.close()


class WorkerPool:
    """Static and registered workers; all usable ones share one build fingerprint."""

    def __init__(
        self,
        static: Sequence[str] = (),
        timeout: float = 300.0,
        token: str | None = None,
        max_message_bytes: int = 64 << 20,
        tls: Any = None,
        shared_memory: bool = True,
    ):
        self.timeout = timeout
        # Segments for workers on this host (see WorkerHandle).
        self.segments = sharedmem.Pool(keep=8) if shared_memory and sharedmem.available() else None
        self.token = token
        self.tls = tls  # how workers are dialled (wire/channel.py)
        self.max_message_bytes = max_message_bytes
        self.fingerprint: str | None = None
        self._lock = threading.Lock()
        self.workers: dict[str, WorkerHandle] = {}
        for address in static:
            self.workers[address] = self._handle(address, "static")

    def _handle(self, address: str, source: str) -> WorkerHandle:
        return WorkerHandle(
            address,
            source,
            self.timeout,
            self.token,
            self.max_message_bytes,
            self.tls,
            self.segments,
        )

    def _check(self, w: WorkerHandle) -> None:
        """Probe ``w`` and apply the fingerprint rule (the first ready worker fixes it)."""
        w.probe()
        if w.state != "ready":
            return
        with self._lock:
            if self.fingerprint is None:
                self.fingerprint = w.fingerprint
            elif w.fingerprint != self.fingerprint:
                w.state = "refused"
                w.reason = (
                    f"build fingerprint {w.fingerprint!r} differs from the pool's "
                    f"{self.fingerprint!r}: results would not be bitwise identical"
                )

    def register(self, address: str) -> WorkerHandle:
        if not address or ":" not in address:
            raise ServiceError(INVALID, f"address {address!r} must be host:port", "address")
        with self._lock:
            w = self.workers.get(address)
        if w is None:
            w = self._handle(address, "registered")
        self._check(w)
        if w.state == "unreachable":
            raise ServiceError(
                UNAVAILABLE, f"cannot reach the worker at {address}: {w.reason}", "address"
            )
        if w.state == "refused":
            raise ServiceError(FAILED, w.reason, "address")
        with self._lock:
            w.worker_id = w.worker_id or uuid.uuid4().hex
            w.last_seen = time.monotonic()
            self.workers[address] = w
        return w

    def heartbeat(self, worker_id: str) -> bool:
        with self._lock:
            for w in self.workers.values():
                if w.worker_id and w.worker_id == worker_id:
                    w.last_seen = time.monotonic()
                    return True
        return False

    def deregister(self, worker_id: str) -> bool:
        """Forget the registered worker ``worker_id`` now (it is shutting down); False
        when no worker has that id. Calls already sent to it finish on their own."""
        with self._lock:
            for address, w in list(self.workers.items()):
                if w.source == "registered" and w.worker_id and w.worker_id == worker_id:
                    del self.workers[address]
                    break
            else:
                return False
        w.close()
        return True

    def usable(self) -> list[WorkerHandle]:
        """Workers to use now: ready ones, plus unreachable/unknown ones that answer again."""
        now = time.monotonic()
        with self._lock:
            # Registered workers that stopped heartbeating are forgotten.
            for address, w in list(self.workers.items()):
                if w.source == "registered" and now - w.last_seen > 3 * HEARTBEAT_SECONDS:
                    del self.workers[address]
                    w.close()
            candidates = list(self.workers.values())
        for w in candidates:
            if w.state == "unknown" or (w.state == "unreachable" and now >= w.retry_at):
                self._check(w)
        return [w for w in candidates if w.state == "ready"]

    def unusable_reasons(self) -> str:
        """``": ADDRESS STATE (REASON); ..."`` of the known workers that are not ready."""
        with self._lock:
            down = [w for w in self.workers.values() if w.state != "ready"]
        return "".join(
            (": " if i == 0 else "; ")
            + f"{w.address} {w.state}"
            + (f" ({w.reason})" if w.reason else "")
            for i, w in enumerate(down)
        )

    def failed(self, w: WorkerHandle, error: GradmeshError) -> None:
        w.failures += 1
        if error.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            w.state, w.reason = "unreachable", f"{error.code.name}: {error.message}"
            w.retry_at = time.monotonic() + 1.0

    def close(self) -> None:
        for w in self.workers.values():
            w.close()
        if self.segments is not None:
            self.segments.close()


class ParamSet:
    """A job's parameters at one version, as the workers get them.

    Embedded shards hand out their live arrays: they are only read until the step's
    ``apply``, which waits for every micro-batch. Streamed requests send their bytes
    straight from the arrays; the unary encoding (one copy) is made on first use and kept.
    """

    def __init__(
        self,
        version: int,
        arrays: dict[str, np.ndarray],
        key: str = "",
        gradients: list[str] | None = None,
    ):
        self.version = version
        self.key = key  # the job id: with version, names them on the workers
        self.arrays = arrays  # the parameters, and the buffers that travel with them
        # The parameters whose gradients come back (None: every array's).
        self.gradients = list(arrays) if gradients is None else list(gradients)
        self.nbytes = sum(int(a.nbytes) for a in arrays.values())
        self._lock = threading.Lock()
        self._unary: bytes | None = None
        self._shared: tuple | None = None
        self._pool: Any = None

    def unary_bytes(self) -> bytes:
        """The ``parameters`` field of a ComputeGradientsRequest, every array with its
        data, as protobuf encodes it: made once per version, joined to each request."""
        with self._lock:
            if self._unary is None:
                self._unary = b"".join(
                    piece
                    for n, a in self.arrays.items()
                    for piece in encode_tensor_field(_PARAMETERS, a, n)
                )
            return self._unary

    def shared(self, pool) -> tuple:
        """``(segment, offsets)``: the parameters copied into shared memory, once per
        version."""
        with self._lock:
            if self._shared is None:
                self._shared, self._pool = sharedmem.place(pool, self.arrays), pool
            return self._shared

    def encodings(self) -> tuple:
        """``(unary, pool)``: whether the unary bytes were made, and the pool of the shared
        segment (None: none), for :meth:`encode` of the next version."""
        with self._lock:
            return self._unary is not None, self._pool if self._shared is not None else None

    def encode(self, unary: bool, pool=None) -> None:
        """Make the unary bytes (``unary``) and the shared segment (``pool``) now."""
        if unary:
            self.unary_bytes()
        if pool is not None:
            self.shared(pool)

    def release(self) -> None:
        """Give the shared segment back (the next version reuses it). A late duplicate
        call may still read it; its result is dropped anyway (the step is done)."""
        with self._lock:
            if self._shared is not None:
                self._pool.release(self._shared[0])
                self._shared = None
