"""Replies, from plain values to gRPC messages: a unary reply's bytes (sized against the
message limit first), a reply whose gradients went to shared memory, and streamed replies,
classic or early (the plan on a thread of its own, each gradient sent as soon as it is
final)."""

from __future__ import annotations

import contextvars
import queue
import threading
import time
from typing import Callable, Iterator, Sequence

import grpc
import numpy as np

from gradmesh.core import opschema, serialize
from gradmesh.server.runtime import ServiceError
from gradmesh.server.worker.calls import Capabilities, Computed, Prepared, WorkerLimits
from gradmesh.server.worker.checks import EXHAUSTED
from gradmesh.v1 import graph_pb2, tensor_pb2, worker_pb2
from gradmesh.wire import frames

_REPLY = worker_pb2.ComputeGradientsResponse
_LOSS = frames.field_number(_REPLY, "loss")
_OUTPUTS = frames.field_number(_REPLY, "outputs")
_GRADIENTS = frames.field_number(_REPLY, "gradients")
_BUFFERS = frames.field_number(_REPLY, "buffers")
_COMPRESSED = frames.field_number(_REPLY, "compressed_gradients")


def limits_message(limits: WorkerLimits) -> worker_pb2.Limits:
    """The ``Limits`` message that ``Capabilities`` reports (core knows no messages)."""
    return worker_pb2.Limits(
        max_graph_nodes=limits.max_graph_nodes,
        max_tensor_elements=limits.max_tensor_elements,
        max_message_bytes=limits.max_message_bytes,
        max_stream_bytes=limits.max_stream_bytes,
        max_concurrent_requests=limits.max_concurrent_requests,
        chunk_bytes=limits.chunk_bytes,
    )


def _attribute(name: str, field: str, value) -> graph_pb2.Attribute:
    """An Attribute holding ``value`` in ``field`` (``none`` for None)."""
    a = graph_pb2.Attribute(name=name)
    if value is None:
        a.none = True
    elif field in ("ints", "floats"):
        getattr(a, field).SetInParent()  # set even when empty: [] is a value
        getattr(a, field).values.extend(value)
    else:
        setattr(a, field, value)
    return a


def op_schema_message(s: opschema.OpSchema) -> worker_pb2.OpSchema:
    return worker_pb2.OpSchema(
        name=s.name,
        inputs=[
            worker_pb2.OpInputSchema(
                name=i.name,
                variadic=i.variadic,
                optional=i.optional,
                differentiable=i.differentiable,
                broadcasts=i.broadcasts,
            )
            for i in s.inputs
        ],
        attributes=[
            worker_pb2.OpAttributeSchema(
                name=a.name,
                field=a.kind,
                nullable=a.nullable,
                default=_attribute(a.name, a.kind, a.default),
                allowed_values=list(a.choices),
            )
            for a in s.attrs
        ],
        output_dtype=worker_pb2.OutputDTypeRule(
            rule=s.dtype_rule, inputs=list(s.dtype_inputs), attr=s.dtype_attr
        ),
        broadcast=s.broadcast,
        differentiable=s.differentiable,
    )


_OP_SCHEMAS: list = []  # built once: the registry does not change while a worker runs


def op_schema_messages() -> list:
    if not _OP_SCHEMAS:
        _OP_SCHEMAS.extend(op_schema_message(s) for s in opschema.all_schemas())
    return _OP_SCHEMAS


def capabilities_message(caps: Capabilities) -> worker_pb2.CapabilitiesResponse:
    message = worker_pb2.CapabilitiesResponse(
        ops=caps.ops,
        dtypes=caps.dtypes,  # type: ignore[arg-type]  # DType enum numbers
        backend=caps.backend,
        limits=limits_message(caps.limits),
        versions=caps.versions,
        blas_threads=caps.blas_threads,
        build_fingerprint=caps.build_fingerprint,
        shared_memory=caps.shared_memory,
        op_schemas=op_schema_messages(),
    )
    message.limits.parameter_cache_bytes = caps.parameter_cache_bytes
    message.limits.residual_bytes = caps.residual_bytes
    message.compression_kinds.extend(caps.compression_kinds)
    return message


def set_timings(resp, computed: Computed, decode: float, encode: float) -> None:
    resp.timings.decode_seconds = decode
    resp.timings.forward_seconds = computed.forward_seconds
    resp.timings.backward_seconds = computed.backward_seconds
    resp.timings.encode_seconds = encode
    resp.timings.plan_cached = computed.plan_cached


def build_response(
    prepared: Prepared, computed: Computed, *, with_data: bool = True
) -> tuple[worker_pb2.ComputeGradientsResponse, list[np.ndarray]]:
    """The response message, and its tensors in the header's order (for streaming)."""

    def enc(array) -> tensor_pb2.Tensor:
        return serialize.to_proto(array, data=with_data)

    resp = worker_pb2.ComputeGradientsResponse(
        loss=enc(computed.loss),
        outputs=[tensor_pb2.NamedTensor(name=n, tensor=enc(a)) for n, a in computed.outputs],
        gradients=[tensor_pb2.NamedTensor(name=n, tensor=enc(a)) for n, a in computed.gradients],
        graph_id=prepared.graph_id,
        buffers=_named(computed.buffers, with_data),
        unused_parameters=computed.unused,
        compressed_gradients=_named(computed.compressed, with_data),
        compression=computed.compression,
    )
    return resp, computed.arrays()


def _named(pairs, with_data: bool = True) -> list[tensor_pb2.NamedTensor]:
    return [
        tensor_pb2.NamedTensor(name=n, tensor=serialize.to_proto(a, data=with_data))
        for n, a in pairs
    ]


def response_pieces(computed: Computed) -> list:
    """The loss, outputs and gradients fields of the ``ComputeGradientsResponse`` as pieces
    whose ``b"".join`` is what protobuf writes; the arrays' bytes are not copied yet.
    (The buffers, field 7, come after the timings: see ``unary_reply``.)"""
    pieces = frames.encode_tensor_field(_LOSS, computed.loss)
    for name, a in computed.outputs:
        pieces += frames.encode_tensor_field(_OUTPUTS, a, name)
    for name, a in computed.gradients:
        pieces += frames.encode_tensor_field(_GRADIENTS, a, name)
    return pieces


# ---------------------------------------------------------------------------------------
# Unary replies
# ---------------------------------------------------------------------------------------


def check_unary_size(computed: Computed, max_message_bytes: int) -> None:
    """RESOURCE_EXHAUSTED when the reply would be over the unary limit, known before
    anything is encoded."""
    # An upper bound: per tensor its bytes, its name and shape, and at most 32 bytes of
    # tags and lengths; 256 for the graph id and timings.
    named = computed.outputs + computed.gradients + computed.buffers + computed.compressed
    size = (
        256
        + sum(a.nbytes + 10 * a.ndim + 32 for a in computed.arrays())
        + sum(len(n.encode()) for n, _ in named)
    )
    if size > max_message_bytes:
        # Name what made it big: the extra outputs if any were asked for.
        field = (
            "outputs"
            if sum(a.nbytes for _, a in computed.outputs)
            > sum(a.nbytes for _, a in computed.gradients)
            else "gradients"
        )
        raise ServiceError(
            EXHAUSTED,
            f"the response is about {size} bytes, over the unary "
            f"limit of {max_message_bytes}; "
            f"use ComputeGradientsStream",
            field,
        )


def unary_reply(
    prepared: Prepared, computed: Computed, decode_seconds: float, max_message_bytes: int
) -> bytes:
    """The ``ComputeGradientsResponse`` as bytes, written straight from the arrays."""
    t2 = time.perf_counter()
    check_unary_size(computed, max_message_bytes)
    pieces = response_pieces(computed)
    tail = worker_pb2.ComputeGradientsResponse(
        graph_id=prepared.graph_id,
        unused_parameters=computed.unused,
        compression=computed.compression,
    )
    set_timings(tail, computed, decode_seconds, time.perf_counter() - t2)
    # Timings and graph id (fields 4, 5) after the tensors (fields 1-3), then the buffers
    # (field 7), as protobuf orders them; the join is the one copy of the tensors' bytes
    # before gRPC's.
    pieces.append(tail.SerializeToString())
    for name, a in computed.buffers:
        pieces += frames.encode_tensor_field(_BUFFERS, a, name)
    for name, a in computed.compressed:
        pieces += frames.encode_tensor_field(_COMPRESSED, a, name)
    return b"".join(pieces)


def gradient_writer(views: dict[str, np.ndarray]) -> Callable[[str, object], None]:
    """``Plan.run``'s ``on_grad`` that writes each gradient into the client's segment the
    moment backward has finished it (the copy overlaps the rest of backward)."""

    def on_grad(name, array) -> None:
        view = views[name]
        if (array.dtype, array.shape) != (view.dtype, view.shape):
            raise ServiceError(
                grpc.StatusCode.INTERNAL,
                f"gradient {name!r} came out "
                f"as {array.dtype} {list(array.shape)}, the parameter "
                f"is {view.dtype} {list(view.shape)}",
            )
        view[...] = array if isinstance(array, np.ndarray) else array.get()

    return on_grad


def shared_memory_reply(
    prepared: Prepared, computed: Computed, decode_seconds: float
) -> worker_pb2.ComputeGradientsResponse:
    """The reply of a call whose gradients are in the client's segment: the loss and the
    outputs, and each gradient's dtype and shape."""
    resp = worker_pb2.ComputeGradientsResponse(
        loss=serialize.to_proto(computed.loss),
        outputs=[
            tensor_pb2.NamedTensor(name=n, tensor=serialize.to_proto(a))
            for n, a in computed.outputs
        ],
        gradients=[
            tensor_pb2.NamedTensor(name=n, tensor=serialize.to_proto(a, data=False))
            for n, a in computed.gradients
        ],
        graph_id=prepared.graph_id,
        gradients_in_shared_memory=True,
        buffers=_named(computed.buffers),
        unused_parameters=computed.unused,
    )
    set_timings(resp, computed, decode_seconds, 0.0)
    return resp


# ---------------------------------------------------------------------------------------
# Streamed replies
# ---------------------------------------------------------------------------------------


def stream_reply(
    prepared: Prepared, computed: Computed, decode_seconds: float, chunk_bytes: int
) -> Iterator:
    """The classic streamed reply: a header frame with the timings, then every tensor's
    chunks, in the header's order."""
    resp, arrays = build_response(prepared, computed, with_data=False)
    set_timings(resp, computed, decode_seconds, 0.0)
    yield worker_pb2.StreamFrame(response=resp)
    yield from frames.chunk_frames(arrays, chunk_bytes)


def early_header(
    plan, prepared: Prepared, order: Sequence[str]
) -> worker_pb2.ComputeGradientsResponse:
    """The header of an early-streamed reply: every tensor's dtype and shape, from the
    compiled plan, before anything is computed; gradients in ``order``."""
    vg = plan.graph
    loss_name = vg.graph.outputs[0].name

    def header(spec) -> tensor_pb2.Tensor:
        return tensor_pb2.Tensor(
            dtype=serialize.DTYPE_TO_PROTO[spec.dtype],  # type: ignore[arg-type]  # enum number
            shape=[int(d) for d in spec.shape],
        )

    return worker_pb2.ComputeGradientsResponse(
        loss=header(plan.specs[vg.outputs[loss_name]]),
        outputs=[
            tensor_pb2.NamedTensor(name=n, tensor=header(plan.specs[vg.outputs[n]]))
            for n in prepared.outputs
        ],
        gradients=[
            tensor_pb2.NamedTensor(name=n, tensor=header(plan.specs[vg.input_index[n]]))
            for n in order
        ],
        graph_id=prepared.graph_id,
        buffers=[
            tensor_pb2.NamedTensor(name=n, tensor=header(plan.specs[v]))
            for n, v in vg.buffer_updates.items()
        ],
        unused_parameters=plan.unused_gradients(prepared.gradients, tuple(prepared.outputs)),
    )


class _Handover:
    """The plan's thread hands the reply's arrays to the call's gRPC thread: each list of
    arrays as it is ready, then the :class:`Computed` (or the exception that ended it)."""

    def __init__(self, outputs: Sequence[str], expected: dict[str, tuple]):
        self.items: queue.SimpleQueue = queue.SimpleQueue()
        self.stop = threading.Event()
        self._outputs = outputs
        self._expected = expected  # each gradient's dtype and shape, as the header says

    def stoppable(self, check: Callable[[], None]) -> Callable[[], None]:
        def stoppable_check() -> None:
            if self.stop.is_set():
                raise ServiceError(
                    grpc.StatusCode.CANCELLED, "the reply stream was closed; computation abandoned"
                )
            check()

        return stoppable_check

    def on_forward(self, loss, outputs: dict) -> None:
        self.items.put([loss] + [outputs[n] for n in self._outputs])

    def on_grad(self, name, array) -> None:
        expected = self._expected[name]
        if (array.dtype, array.shape) != expected:
            # The header promised these bytes; never send others under its name.
            raise ServiceError(
                grpc.StatusCode.INTERNAL,
                f"gradient {name!r} came out "
                f"as {array.dtype} {list(array.shape)}, the header said "
                f"{expected[0]} {list(expected[1])}",
            )
        self.items.put([array])

    def run(self, compute: Callable[..., Computed], *args, **kw) -> threading.Thread:
        """Start ``compute(*args, **kw)`` on a thread whose result or error is handed over."""

        def run() -> None:
            try:
                self.items.put(compute(*args, **kw))
            except BaseException as e:  # noqa: BLE001  (re-raised on the gRPC thread)
                self.items.put(e)

        # In the call's context, so that what the plan logs carries the call's request id.
        context = contextvars.copy_context()
        thread = threading.Thread(
            target=context.run, args=(run,), daemon=True, name="gradmesh-plan"
        )
        thread.start()
        return thread


def early_stream(
    compute: Callable[..., Computed],
    plan,
    prepared: Prepared,
    params: dict,
    data: dict,
    check: Callable[[], None],
    decode_seconds: float,
    chunk_bytes: int,
) -> Iterator:
    """The reply of a ``stream_gradients_early`` request (see worker.proto): the header
    from the plan (gradients in the order backward finishes them), then the chunks of
    the loss and outputs when forward ends and of each gradient as soon as it is final,
    then a frame with the timings.

    ``compute`` (``GradientWorker.compute``) runs on a thread of its own and hands arrays
    over through a queue, while this generator (gRPC's thread for the call) encodes and
    sends them: sending a gradient overlaps the backward of the layers before it.
    """
    order = plan.grad_order(prepared.gradients, tuple(prepared.outputs))
    header = early_header(plan, prepared, order)
    yield worker_pb2.StreamFrame(response=header)

    handover = _Handover(
        prepared.outputs,
        {
            nt.name: (serialize.PROTO_TO_DTYPE[nt.tensor.dtype].np, tuple(nt.tensor.shape))
            for nt in header.gradients
        },
    )
    handover.run(
        compute,
        prepared,
        params,
        data,
        handover.stoppable(check),
        on_forward=handover.on_forward,
        on_grad=handover.on_grad,
    )
    index = 0  # header index of the next tensor
    try:
        while True:
            item = handover.items.get()
            if isinstance(item, BaseException):
                raise item
            if isinstance(item, Computed):
                computed = item
                break
            yield from frames.chunk_frames(item, chunk_bytes, index)
            index += len(item)
        # The buffers' chunks last, as the header lists them (computed during forward).
        yield from frames.chunk_frames([a for _, a in computed.buffers], chunk_bytes, index)
        t2 = time.perf_counter()
        tail = worker_pb2.ComputeGradientsResponse(graph_id=prepared.graph_id)
        set_timings(tail, computed, decode_seconds, 0.0)
        tail.timings.encode_seconds = time.perf_counter() - t2  # only what is not overlapped
        yield worker_pb2.StreamFrame(response=tail)
    finally:
        handover.stop.set()  # the client went away or an error: the plan stops at its next check
