"""The gRPC servicer: each method decodes its request (:mod:`.decoding`), calls the plain
:class:`~.logic.GradientWorker`, and encodes the reply (:mod:`.replies`)."""

from __future__ import annotations

import time
from typing import Callable

import grpc

from gradmesh.server import runtime
from gradmesh.server.runtime import ServiceError
from gradmesh.server.worker import decoding, replies
from gradmesh.server.worker.checks import INVALID
from gradmesh.server.worker.logic import GradientWorker
from gradmesh.v1 import worker_pb2, worker_pb2_grpc
from gradmesh.wire import frames, stream

SERVICE_NAME = worker_pb2.DESCRIPTOR.services_by_name["Worker"].full_name
# Idle receive buffers a worker keeps for the next streamed request: filling fresh pages
# costs the kernel more than the bytes cost gRPC (stream.BufferPool).
RECEIVE_POOL_BYTES = 1 << 30


def same_host(peer: str) -> bool:
    """Whether a gRPC peer string ("ipv4:127.0.0.1:5123", "unix:...") is on this host."""
    return peer.startswith(("ipv4:127.", "ipv6:[::1]:", "ipv6:[::ffff:127.", "unix:"))


def deadline_check(context: grpc.ServicerContext) -> Callable[[], None]:
    """A check that raises once the call's deadline passed or it was cancelled.

    The deadline is read once, at the start of the call, and kept on the monotonic clock:
    ``context.time_remaining()`` compares a wall-clock instant with ``time.time()``, so
    asked again later it would jump with the wall clock (a clock set forward by an hour
    would abandon every computation in progress)."""
    remaining = context.time_remaining()
    end = None if remaining is None else time.monotonic() + remaining

    def passed() -> bool:
        return end is not None and time.monotonic() >= end

    def check() -> None:
        if not context.is_active():
            if passed():
                raise ServiceError(
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    "the call's deadline passed; computation abandoned",
                )
            raise ServiceError(
                grpc.StatusCode.CANCELLED, "the call was cancelled; computation abandoned"
            )
        if passed():
            raise ServiceError(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                "the call's deadline passed; computation abandoned",
            )

    return check


class WorkerService(worker_pb2_grpc.WorkerServicer):
    """gRPC adapter over a :class:`GradientWorker`."""

    def __init__(self, worker: GradientWorker):
        self.worker = worker
        # Streamed requests' tensors land in memory reused from call to call.
        self.receive_buffers = stream.BufferPool(RECEIVE_POOL_BYTES)

    def RegisterGraph(self, request, context):
        if not request.HasField("graph"):
            raise ServiceError(INVALID, "graph is missing", "graph")
        return worker_pb2.RegisterGraphResponse(graph_id=self.worker.register(request.graph))

    def Capabilities(self, request, context):
        return replies.capabilities_message(self.worker.capabilities())

    def ComputeGradients(self, request, context):
        check = deadline_check(context)
        t0 = time.perf_counter()
        call = decoding.gradient_request(request)
        prepared, params, data, views = self.worker.unary(
            call, same_host=call.shared_memory is not None and same_host(context.peer())
        )
        runtime.metric("transport", "unary" if prepared.shared is None else "shared_memory")
        decode_seconds = time.perf_counter() - t0
        if views is not None:
            computed = self.worker.compute(
                prepared, params, data, check, on_grad=replies.gradient_writer(views)
            )
            return replies.shared_memory_reply(prepared, computed, decode_seconds)
        computed = self.worker.compute(prepared, params, data, check)
        return replies.unary_reply(
            prepared, computed, decode_seconds, self.worker.limits.max_message_bytes
        )

    def ComputeGradientsStream(self, request_iterator, context):
        check = deadline_check(context)
        worker = self.worker
        t0 = time.perf_counter()
        header = decoding.stream_header(request_iterator)
        call = decoding.gradient_request(header)
        prepared = worker.prepare(call, header_only=True)
        runtime.metric("transport", "stream")
        params, data = decoding.stream_tensors(
            header, request_iterator, prepared, worker.limits, self.receive_buffers
        )
        worker.keep(prepared, call, params)
        decode_seconds = time.perf_counter() - t0
        chunk_bytes = worker.limits.chunk_bytes
        # A compressed reply goes in the classic order: a gradient is compressed once final.
        if call.stream_gradients_early and call.compression is None:
            plan, _ = worker.plan_for(prepared, data)
            yield from replies.early_stream(
                worker.compute, plan, prepared, params, data, check, decode_seconds, chunk_bytes
            )
            return
        computed = worker.compute(prepared, params, data, check)
        yield from replies.stream_reply(prepared, computed, decode_seconds, chunk_bytes)


def add_to_server(servicer: WorkerService, server: grpc.Server) -> None:
    """``add_WorkerServicer_to_server`` with gradmesh's codec for tensor bytes: the same
    bytes on the wire, fewer copies (see the wire codec in ``gradmesh.core.serialize``)."""
    handlers = {
        "RegisterGraph": grpc.unary_unary_rpc_method_handler(
            servicer.RegisterGraph,
            request_deserializer=worker_pb2.RegisterGraphRequest.FromString,
            response_serializer=worker_pb2.RegisterGraphResponse.SerializeToString,
        ),
        "ComputeGradients": grpc.unary_unary_rpc_method_handler(
            servicer.ComputeGradients,
            request_deserializer=worker_pb2.ComputeGradientsRequest.FromString,
            response_serializer=frames.serialize_message,
        ),
        "ComputeGradientsStream": grpc.stream_stream_rpc_method_handler(
            servicer.ComputeGradientsStream,
            request_deserializer=decoding.decode_request_frame,
            response_serializer=frames.serialize_message,
        ),
        "Capabilities": grpc.unary_unary_rpc_method_handler(
            servicer.Capabilities,
            request_deserializer=worker_pb2.CapabilitiesRequest.FromString,
            response_serializer=worker_pb2.CapabilitiesResponse.SerializeToString,
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)
