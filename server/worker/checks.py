"""Checks of a request's header against its graph, made before any tensor is decoded or
allocated: names, dtypes, shapes, batch sizes, element counts, byte lengths, and the
shared-memory fields that need no segment opened. Each failure names the request field."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import grpc
import numpy as np

from gradmesh.core import serialize, sharedmem
from gradmesh.server.runtime import ServiceError
from gradmesh.server.worker.calls import SharedMemoryRef, TensorRef, TensorSlot
from gradmesh.v1 import graph_pb2

INVALID = grpc.StatusCode.INVALID_ARGUMENT
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
FAILED = grpc.StatusCode.FAILED_PRECONDITION

# Wire dtype enum -> NumPy dtype (little-endian on the wire, see tensor.proto).
NP_OF_WIRE = {wire: d.np.newbyteorder("<") for wire, d in serialize.PROTO_TO_DTYPE.items()}


@dataclass(frozen=True)
class GraphInput:
    """A PARAM, BUFFER or DATA input of a graph, as requests are checked against it."""

    name: str
    wire: int  # the tensor.proto dtype enum
    dtype: np.dtype  # little-endian, as on the wire
    shape: tuple  # -1 first: any batch size
    field: str  # "parameters[w1]"
    role: str = ""  # "PARAM", "BUFFER", "DATA"


@dataclass(frozen=True)
class RegisteredGraph:
    """A validated graph and what every request against it reads (made once)."""

    validated: Any
    # The tensors of a request's ``parameters``: PARAM inputs, then BUFFER inputs (which
    # travel with them, worker.proto).
    params: tuple[GraphInput, ...]
    data: tuple[GraphInput, ...]
    output_names: tuple[str, ...]

    @classmethod
    def of(cls, validated) -> "RegisteredGraph":
        graph = validated.graph
        role = graph_pb2.Input

        def inputs(roles, kind):
            return tuple(
                GraphInput(
                    i.name,
                    i.dtype,
                    NP_OF_WIRE[i.dtype],
                    tuple(i.shape),
                    f"{kind}[{i.name}]",
                    role.Role.Name(i.role),
                )
                for r in roles
                for i in graph.inputs
                if i.role == r
            )

        return cls(
            validated,
            inputs((role.PARAM, role.BUFFER), "parameters"),
            inputs((role.DATA,), "data"),
            tuple(o.name for o in graph.outputs),
        )

    @property
    def param_names(self) -> list[str]:
        """The PARAM inputs: what gradients can be taken of."""
        return [i.name for i in self.params if i.role == "PARAM"]


def tensor_slots(
    kind: str,
    given: Sequence[TensorRef],
    inputs: Sequence[GraphInput],
    header_only: bool,
    offsets: Mapping[str, int],
    max_elements: int,
) -> list[TensorSlot]:
    """The ``kind`` ("parameters", "data") tensors of a request checked against the graph's
    inputs, in the graph's order; ``offsets``: where shared memory holds their bytes."""
    by_name = _by_name(kind, given, inputs)
    slots = []
    for inp in inputs:
        ref = by_name.get(inp.name)
        if ref is None:
            what = "buffer" if inp.role == "BUFFER" else _singular(kind)
            raise ServiceError(
                INVALID,
                f"missing {what} {inp.name!r} (a {what.upper()} input of the graph"
                + (", sent with the parameters)" if what == "buffer" else ")"),
                inp.field,
            )
        shape, nbytes = _check_header(kind, ref, inp, max_elements)
        offset = offsets.get(inp.name) if offsets else None
        data = ref.data
        _check_bytes(kind, data, inp.field, shape, nbytes, ref.dtype, offset, header_only)
        slots.append(
            TensorSlot(
                inp.field, inp.name, inp.dtype, shape, nbytes, offset, data if data else None
            )
        )
    return slots


def _by_name(
    kind: str, given: Sequence[TensorRef], inputs: Sequence[GraphInput]
) -> dict[str, TensorRef]:
    """``given`` by name: each given once, each one an input of the graph."""
    by_name = {}
    for ref in given:
        name = ref.name
        if name in by_name:
            raise ServiceError(INVALID, f"{kind} {name!r} is given twice", f"{kind}[{name}]")
        by_name[name] = ref
    if len(by_name) != len(inputs) or any(i.name not in by_name for i in inputs):
        expected = {i.name for i in inputs}
        for k, ref in enumerate(given):
            if ref.name not in expected:
                raise ServiceError(
                    INVALID,
                    f"the graph has no {_singular(kind)} input "
                    f"named {ref.name!r}; it takes "
                    f"{short(sorted(expected))}",
                    f"{kind}[{ref.name}]" if ref.name else f"{kind}[{k}].name",
                )
    return by_name


def _check_header(
    kind: str, ref: TensorRef, inp: GraphInput, max_elements: int
) -> tuple[tuple, int]:
    """A tensor's dtype, shape and size against its input; returns its shape and bytes."""
    field = inp.field
    if ref.dtype != inp.wire:
        raise ServiceError(
            INVALID,
            f"dtype {serialize.dtype_name(ref.dtype)} does not "
            f"match the graph's "
            f"{serialize.dtype_name(inp.wire)}",
            field + ".dtype",
        )
    shape = ref.shape
    want = inp.shape
    # Only a DATA input's first dimension may be -1 (any batch size, at least 0).
    if shape != want and not (
        kind == "data"
        and want[:1] == (-1,)
        and shape[1:] == want[1:]
        and len(shape) == len(want)
        and shape[0] >= 0
    ):
        raise ServiceError(
            INVALID,
            f"shape {list(shape)} does not match the graph's {list(want)}",
            field + ".shape",
        )
    n = math.prod(shape)
    if n > max_elements:
        raise ServiceError(EXHAUSTED, f"{n} elements is over the limit of {max_elements}", field)
    return shape, n * inp.dtype.itemsize


def _check_bytes(
    kind: str,
    data: bytes,
    field: str,
    shape: tuple,
    nbytes: int,
    wire: int,
    offset: int | None,
    header_only: bool,
) -> None:
    """A tensor's bytes are where the request says: in shared memory, in chunks after a
    stream's header, or in the message, exactly as many as its shape needs."""
    if offset is not None:
        if data:
            key = "parameter_offsets" if kind == "parameters" else "data_offsets"
            raise ServiceError(
                INVALID,
                f"its bytes are in shared memory (shared_memory.{key}): leave data empty",
                field + ".data",
            )
    elif header_only:
        if data:
            raise ServiceError(
                INVALID,
                "a streamed request's header carries no tensor bytes; send them as chunk frames",
                field + ".data",
            )
    elif len(data) != nbytes:
        raise ServiceError(
            INVALID,
            f"{len(data)} bytes for shape {list(shape)} of "
            f"{serialize.dtype_name(wire)}: expected {nbytes}",
            field + ".data",
        )


def kept_slots(kept: dict, inputs: Sequence[GraphInput]) -> list[TensorSlot]:
    """Slots of parameters kept from an earlier call, which must fit the graph."""
    slots = []
    for inp in inputs:
        a = kept.get(inp.name)
        if a is None or a.dtype != inp.dtype or a.shape != inp.shape:
            raise ServiceError(
                FAILED,
                f"the kept parameters do not fit this graph (parameter {inp.name!r}): send them",
                "parameters",
            )
        slots.append(TensorSlot(inp.field, inp.name, inp.dtype, a.shape, a.nbytes))
    return slots


def check_batch(data: list[TensorSlot], inputs: Sequence[GraphInput]) -> None:
    """Every DATA input of any batch size has the same batch size."""
    batch = None
    for slot, inp in zip(data, inputs):
        if inp.shape[:1] != (-1,):
            continue
        if batch is None:
            batch = (slot.shape[0], slot.name)
        elif slot.shape[0] != batch[0]:
            raise ServiceError(
                INVALID,
                f"batch size {slot.shape[0]} does not match {batch[0]} of data {batch[1]!r}",
                slot.field + ".shape",
            )


def check_requested(
    field: str, requested: Sequence[str], known: Sequence[str], unknown: str
) -> None:
    """Each requested name (a gradient, an output) is known and asked for once."""
    seen: set[str] = set()
    for k, name in enumerate(requested):
        if name in seen:
            raise ServiceError(
                INVALID, f"{field[:-1]} {name!r} is requested twice", f"{field}[{k}]"
            )
        if name not in known:
            raise ServiceError(INVALID, unknown.format(name, short(known)), f"{field}[{k}]")
        seen.add(name)


def check_loss_scale(loss_scale: float) -> float:
    """The loss scale to use (0 means 1); it must be finite."""
    scale = loss_scale or 1.0
    if not math.isfinite(scale):
        raise ServiceError(INVALID, f"loss_scale must be finite, got {scale}", "loss_scale")
    return scale


def check_shared_memory(
    shared: SharedMemoryRef,
    header_only: bool,
    same_host: bool,
    takes_shared: bool,
    param_names: set[str],
    data_names: set[str],
) -> None:
    """The parts of a request's shared memory that need no segment opened.
    ``takes_shared``: this worker takes shared memory at all."""
    field = "shared_memory.segment"
    if header_only:
        raise ServiceError(
            INVALID,
            "shared_memory is for ComputeGradients; a stream carries its tensors' bytes in chunks",
            field,
        )
    if not takes_shared:
        raise ServiceError(
            FAILED,
            "this worker does not take shared memory (started "
            "with --shared-memory off, or a host without memfd "
            "sealing); send "
            "the bytes in the request",
            field,
        )
    if not same_host:
        raise ServiceError(
            FAILED,
            "shared memory is only for callers on the worker's "
            "host (a loopback address or a Unix socket); send "
            "the bytes in the request",
            field,
        )
    param_key = "parameter_segment" if shared.parameter_segment else "segment"
    for key, names, seg_key, known in (
        ("parameter_offsets", shared.parameter_offsets, param_key, param_names),
        ("data_offsets", shared.data_offsets, "segment", data_names),
        ("gradient_offsets", shared.gradient_offsets, "gradient_segment", param_names),
    ):
        segment, seg_field = getattr(shared, seg_key), f"shared_memory.{seg_key}"
        # Names are capabilities (they hold the segment's secret): never repeated in an
        # error, which may be logged.
        if segment and not sharedmem.NAME.match(segment):
            if sharedmem.LEGACY_NAME.match(segment):
                raise ServiceError(
                    FAILED,
                    "this worker takes sealed memory segments "
                    "(gradmesh-<pid>-<fd>-<32 hex digits>), not "
                    "files in /dev/shm; send the bytes in the "
                    "request",
                    seg_field,
                )
            raise ServiceError(
                INVALID, "not a segment name (gradmesh-<pid>-<fd>-<32 hex digits>)", seg_field
            )
        if names and not segment:
            raise ServiceError(INVALID, f"{key} are given but no segment", seg_field)
        what = "data" if known is data_names else "parameter"
        _check_offsets(key, names, known, what)


def _check_offsets(key: str, offsets: Mapping[str, int], known: set[str], what: str) -> None:
    for name in sorted(offsets):
        f = f"shared_memory.{key}[{name}]"
        if name not in known:
            raise ServiceError(INVALID, f"the graph has no {what} input {name!r}", f)
        if offsets[name] % sharedmem.ALIGN:
            raise ServiceError(
                INVALID, f"offset {offsets[name]} is not a multiple of {sharedmem.ALIGN}", f
            )
        if offsets[name] < sharedmem.HEADER:
            raise ServiceError(
                INVALID,
                f"offset {offsets[name]} is inside the segment's {sharedmem.HEADER}-byte header",
                f,
            )


def check_gradient_offsets(shared: SharedMemoryRef, gradients: Sequence[str]) -> None:
    """A gradient segment gets exactly the requested gradients."""
    wanted, got = set(gradients), set(shared.gradient_offsets)
    if wanted != got:
        raise ServiceError(
            INVALID,
            f"gradient_offsets must name exactly the "
            f"requested gradients; missing "
            f"{short(sorted(wanted - got))}, not requested "
            f"{short(sorted(got - wanted))}",
            "shared_memory.gradient_offsets",
        )


def segment_view(buf, offset: int, slot: TensorSlot, field: str) -> np.ndarray:
    """``slot``'s array at ``offset`` of a mapped segment, checked to lie inside it."""
    if offset + slot.nbytes > len(buf):
        raise ServiceError(
            INVALID,
            f"{slot.nbytes} bytes at offset {offset} run past the segment's {len(buf)} bytes",
            field,
        )
    return sharedmem.view(buf, offset, slot.dtype, slot.shape)


def short(names: Sequence[str], n: int = 8) -> str:
    names = list(names)
    return str(names[:n])[:-1] + (f", ... ({len(names)} in all)]" if len(names) > n else "]")


def _singular(kind: str) -> str:
    return {"parameters": "param", "data": "data"}[kind]
