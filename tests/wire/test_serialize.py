"""The tensor codec and the chunked streaming protocol (gradmesh.core.serialize)."""

from __future__ import annotations

import numpy as np
import pytest
from google.protobuf.message import DecodeError

import gradmesh.core as gm
from gradmesh.core import dtypes
from gradmesh.core.serialize import DTYPE_TO_PROTO, PROTO_TO_DTYPE, WireError, from_proto, to_proto
from gradmesh.v1 import coordinator_pb2, shard_pb2, tensor_pb2, worker_pb2
from gradmesh.wire.frames import (
    SHARD_FRAME_CHUNK_FIELD,
    STREAM_FRAME_CHUNK_FIELD,
    ChunkView,
    chunk_frames,
    decode_stream_frame,
    encode_chunk_frame,
    encode_tensor_field,
    frame_decoder,
)
from gradmesh.wire.stream import Assembler, chunks, split_for_stream, tensor_buffer

ALL_DTYPES = [d.np for d in dtypes.ALL]
SHAPES = [(), (0,), (3,), (2, 3), (2, 0, 4), (1, 1, 1, 5)]


def _sample(shape, dtype, seed=0):
    rng = np.random.default_rng(seed)
    if dtype.kind == "b":
        return rng.random(shape) < 0.5
    if dtypes.is_floating(dtype):
        return rng.standard_normal(shape).astype(dtype)
    return rng.integers(-(2**30), 2**30, size=shape).astype(dtype)


def test_dtype_maps_cover_every_dtype_both_ways():
    assert set(DTYPE_TO_PROTO) == set(dtypes.ALL)
    assert {PROTO_TO_DTYPE[v] for v in DTYPE_TO_PROTO.values()} == set(dtypes.ALL)
    assert tensor_pb2.DTYPE_UNSPECIFIED not in PROTO_TO_DTYPE


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_round_trip_every_dtype_and_shape(dtype, shape):
    a = _sample(shape, np.dtype(dtype))
    t = to_proto(a)
    assert list(t.shape) == list(shape)
    assert len(t.data) == a.size * a.itemsize
    b = from_proto(t)
    assert b.dtype == a.dtype and b.shape == a.shape
    assert np.array_equal(a, b)
    # Survives the wire, too.
    t2 = tensor_pb2.Tensor.FromString(t.SerializeToString())
    assert np.array_equal(from_proto(t2), a)


def test_layout_is_little_endian_c_order():
    a = np.arange(6, dtype=np.int32).reshape(2, 3)
    assert to_proto(a).data == a.astype("<i4").tobytes(order="C")
    # A transposed (Fortran-ordered) view and a big-endian array encode to the same bytes.
    assert to_proto(a.T).data == np.ascontiguousarray(a.T).astype("<i4").tobytes()
    big = a.astype(">i4")
    t = to_proto(big)
    assert t.dtype == tensor_pb2.INT32 and t.data == a.astype("<i4").tobytes()


def test_to_proto_accepts_gradmesh_tensors_and_headers_without_data():
    x = gm.tensor([[1.0, 2.0]], requires_grad=True)
    assert np.array_equal(from_proto(to_proto(x)), [[1.0, 2.0]])
    h = to_proto(np.zeros((4, 5), np.float64), data=False)
    assert h.dtype == tensor_pb2.FLOAT64 and list(h.shape) == [4, 5] and h.data == b""


def test_decode_is_zero_copy_and_read_only():
    t = to_proto(np.arange(1000, dtype=np.float32))
    a = from_proto(t)
    assert not a.flags.writeable  # a view of the message's bytes
    assert a.base is not None


def test_tensor_buffer_shares_memory_with_contiguous_arrays():
    a = np.arange(10, dtype=np.float64)
    mv = tensor_buffer(a)
    assert mv.nbytes == 80
    a[0] = 42.0
    assert np.frombuffer(mv, np.float64)[0] == 42.0


@pytest.mark.parametrize("delta", [-1, 1, -4])
def test_wrong_byte_length_is_rejected(delta):
    t = to_proto(np.ones((2, 3), np.float32))
    t.data = t.data[:delta] if delta < 0 else t.data + b"\0" * delta
    with pytest.raises(WireError) as e:
        from_proto(t, field="parameters[w1]")
    assert e.value.field == "parameters[w1].data"
    assert e.value.code == "INVALID_ARGUMENT"
    assert "24" in e.value.message


@pytest.mark.parametrize("dtype", [0, 8, 99])
def test_unknown_dtype_is_rejected(dtype):
    t = tensor_pb2.Tensor(dtype=dtype, shape=[1], data=b"\0\0\0\0")
    with pytest.raises(WireError) as e:
        from_proto(t, field="data[x]")
    assert e.value.field == "data[x].dtype" and e.value.code == "INVALID_ARGUMENT"


def test_negative_dimension_is_rejected():
    t = tensor_pb2.Tensor(dtype=tensor_pb2.FLOAT32, shape=[2, -3], data=b"")
    with pytest.raises(WireError) as e:
        from_proto(t, field="data[x]")
    assert e.value.field == "data[x].shape" and "dimension 1 is -3" in e.value.message


def test_element_limit_is_checked_before_allocation():
    # 2**62 elements: decoding would need exabytes; the limit must fire first, without
    # touching the (empty) data.
    t = tensor_pb2.Tensor(dtype=tensor_pb2.FLOAT64, shape=[2**31, 2**31], data=b"")
    with pytest.raises(WireError) as e:
        from_proto(t, field="parameters[big]", max_elements=10**6)
    assert e.value.code == "RESOURCE_EXHAUSTED"
    assert e.value.field == "parameters[big].shape"
    # Exactly at the limit is fine.
    ok = to_proto(np.zeros(6, np.float32))
    assert from_proto(ok, max_elements=6).shape == (6,)


def test_bool_bytes_must_be_zero_or_one():
    t = tensor_pb2.Tensor(dtype=tensor_pb2.BOOL, shape=[3], data=b"\x00\x01\x02")
    with pytest.raises(WireError, match="0 or 1"):
        from_proto(t)


# ---------------------------------------------------------------------------------------
# Streaming
# ---------------------------------------------------------------------------------------


def _request(arrays: dict, data: dict) -> worker_pb2.ComputeGradientsRequest:
    req = worker_pb2.ComputeGradientsRequest(
        graph_id="abc", gradients=["w"], loss_scale=0.5, seed=7, outputs=["logits"]
    )
    for name, a in arrays.items():
        req.parameters.add(name=name).tensor.CopyFrom(to_proto(a))
    for name, a in data.items():
        req.data.add(name=name).tensor.CopyFrom(to_proto(a))
    return req


def _stream(req, chunk_bytes, max_total=1 << 30):
    header, buffers = split_for_stream(req)
    asm = Assembler(header, max_total_bytes=max_total)
    for c in chunks(buffers, chunk_bytes):
        assert len(c.data) <= chunk_bytes
        asm.add(c)
    return header, asm


def test_stream_round_trip_keeps_every_field_and_order():
    params = {
        "w": _sample((3, 5), np.dtype(np.float32)),
        "empty": np.zeros((0, 2)),
        "s": np.float64(2.5),
    }
    data = {"x": _sample((7,), np.dtype(np.int64)), "m": _sample((4, 4), np.dtype(np.bool_))}
    req = _request(params, data)
    header, asm = _stream(req, chunk_bytes=16)
    # The header carries dtype and shape but no bytes; the other fields are untouched.
    assert all(not p.tensor.data for p in header.parameters)
    assert list(header.parameters[0].tensor.shape) == [3, 5]
    assert header.graph_id == "abc" and header.seed == 7 and list(header.outputs) == ["logits"]
    assert [s.path for s in asm.slots] == [
        "parameters[w]",
        "parameters[empty]",
        "parameters[s]",
        "data[x]",
        "data[m]",
    ]
    arrays = asm.finish()
    for a, expected in zip(arrays, list(params.values()) + list(data.values())):
        assert a.dtype == np.asarray(expected).dtype
        assert np.array_equal(a, expected)
    assert arrays[0].flags.writeable  # a buffer of its own, filled in place
    assert asm.finish_message() == req


def test_stream_response_with_a_singular_tensor_field():
    resp = worker_pb2.ComputeGradientsResponse(graph_id="g")
    resp.loss.CopyFrom(to_proto(np.float32(1.5)))
    resp.gradients.add(name="w").tensor.CopyFrom(to_proto(np.arange(9.0)))
    resp.timings.forward_seconds = 0.25
    header, asm = _stream(resp, chunk_bytes=8)
    assert [s.path for s in asm.slots] == ["loss", "gradients[w]"]
    assert header.timings.forward_seconds == 0.25
    assert asm.finish_message() == resp


def test_chunks_accept_arrays_and_skip_empty_tensors():
    pieces = list(chunks([np.arange(10, dtype=np.int32), b"", np.ones(3, np.bool_)], 16))
    assert [(c.tensor_index, c.offset, len(c.data)) for c in pieces] == [
        (0, 0, 16),
        (0, 16, 16),
        (0, 32, 8),
        (2, 0, 3),
    ]


@pytest.mark.parametrize("shape", [(0, 3), (2, 0, 4), (0,)])
def test_zero_size_tensors_have_an_empty_buffer_and_no_chunk(shape):
    # Found by tests/services/test_fuzz.py: memoryview.cast refused shapes with a zero, so a
    # streamed reply (or a shard Pull) holding a (0, 3) tensor failed with INTERNAL.
    a = np.zeros(shape, np.float32)
    assert tensor_buffer(a).nbytes == 0
    assert list(chunks([a, np.ones(2, np.float32)], 16))[0].tensor_index == 1
    assert list(chunk_frames([a], 16)) == []


def _two_tensor_stream():
    req = _request({"a": np.arange(8, dtype=np.float32), "b": np.arange(4, dtype=np.float32)}, {})
    header, buffers = split_for_stream(req)
    return header, list(chunks(buffers, 8))


def test_out_of_order_chunks_are_rejected():
    header, cs = _two_tensor_stream()
    asm = Assembler(header, 1 << 20)
    asm.add(cs[0])
    with pytest.raises(WireError) as e:
        asm.add(cs[2])  # skips bytes 8..16 of tensor 0
    assert e.value.field == "chunk.offset"
    asm2 = Assembler(header, 1 << 20)
    with pytest.raises(WireError) as e:
        asm2.add(cs[-1])  # tensor 1 before tensor 0
    assert e.value.field == "chunk.tensor_index" and "out of order" in e.value.message


def test_overflowing_and_unknown_chunks_are_rejected():
    header, cs = _two_tensor_stream()
    asm = Assembler(header, 1 << 20)
    for c in cs[:3]:
        asm.add(c)
    big = tensor_pb2.Chunk(tensor_index=0, offset=24, data=b"\0" * 16)  # 24 + 16 > 32
    with pytest.raises(WireError) as e:
        asm.add(big)
    assert e.value.field == "chunk.data" and "past the tensor" in e.value.message
    with pytest.raises(WireError) as e:
        asm.add(tensor_pb2.Chunk(tensor_index=5, offset=0, data=b"x"))
    assert e.value.field == "chunk.tensor_index"


def test_incomplete_stream_is_rejected_at_finish():
    header, cs = _two_tensor_stream()
    asm = Assembler(header, 1 << 20)
    for c in cs[:-1]:
        asm.add(c)
    with pytest.raises(WireError) as e:
        asm.finish()
    assert e.value.field == "parameters[b].data"


def test_assembler_checks_limits_before_allocating():
    req = worker_pb2.ComputeGradientsRequest()
    t = req.parameters.add(name="huge").tensor
    t.dtype = tensor_pb2.FLOAT32
    t.shape.extend([2**40])  # 4 TiB: must not be allocated
    with pytest.raises(WireError) as e:
        Assembler(req, max_total_bytes=1 << 30)
    assert e.value.code == "RESOURCE_EXHAUSTED" and e.value.field == "parameters[huge].shape"
    with pytest.raises(WireError) as e:
        Assembler(req, max_total_bytes=1 << 50, max_elements=1000)
    assert e.value.code == "RESOURCE_EXHAUSTED"


def test_assembler_answers_resource_exhausted_when_memory_runs_out(monkeypatch):
    # Within the limits but more than the process can get (found by tests/services/test_fuzz.py
    # under a memory limit: MemoryError became INTERNAL).
    import gradmesh.core.serialize as serialize_mod

    req = worker_pb2.ComputeGradientsRequest()
    req.parameters.add(name="big").tensor.CopyFrom(
        tensor_pb2.Tensor(dtype=tensor_pb2.FLOAT32, shape=[1 << 20])
    )

    def no_memory(*args, **kw):
        raise MemoryError("simulated")

    monkeypatch.setattr(serialize_mod.np, "empty", no_memory)
    with pytest.raises(WireError) as e:
        Assembler(req, max_total_bytes=1 << 30)
    assert (e.value.code, e.value.field) == ("RESOURCE_EXHAUSTED", "parameters[big].shape")


def test_assembler_rejects_headers_that_carry_data_or_bad_dtypes():
    req = _request({"w": np.ones(2, np.float32)}, {})
    with pytest.raises(WireError) as e:
        Assembler(req, 1 << 20)
    assert e.value.field == "parameters[w].data"
    header, _ = split_for_stream(req)
    header.parameters[0].tensor.dtype = 0
    with pytest.raises(WireError) as e:
        Assembler(header, 1 << 20)
    assert e.value.field == "parameters[w].dtype"


@pytest.mark.slow
def test_stream_round_trip_of_a_300_mb_array():
    a = np.arange(300 * 2**20 // 4, dtype=np.float32)
    req = worker_pb2.ComputeGradientsRequest()
    req.parameters.add(name="big").tensor.CopyFrom(to_proto(a, data=False))
    header, _ = split_for_stream(req)
    asm = Assembler(header, max_total_bytes=1 << 30)
    n = 0
    for c in chunks([tensor_buffer(a)], 4 << 20):  # straight from the array: no copy
        asm.add(c)
        n += 1
    assert n == 75
    (b,) = asm.finish()
    assert np.array_equal(a, b)


# --------------------------------------------------------------------- wire codec --------
# The hand-written encoders must write exactly protobuf's bytes, and the decoder must read
# every valid encoding as protobuf does.

# Every frame message with a chunk, its chunk's field number, and its deserializer.
FRAMES = {
    "StreamFrame": (worker_pb2.StreamFrame, STREAM_FRAME_CHUNK_FIELD, decode_stream_frame),
    "ShardFrame": (
        shard_pb2.ShardFrame,
        SHARD_FRAME_CHUNK_FIELD,
        frame_decoder(shard_pb2.ShardFrame, SHARD_FRAME_CHUNK_FIELD),
    ),
    "CoordinatorFrame": (
        coordinator_pb2.CoordinatorFrame,
        STREAM_FRAME_CHUNK_FIELD,
        frame_decoder(coordinator_pb2.CoordinatorFrame),
    ),
}


def test_chunk_field_numbers_are_the_protos():
    for frame_cls, field, _decode in FRAMES.values():
        assert frame_cls.DESCRIPTOR.fields_by_name["chunk"].number == field


@pytest.mark.parametrize("kind", FRAMES)
@pytest.mark.parametrize(
    "index,offset,size",
    [(0, 0, 0), (0, 0, 5), (3, 1 << 20, 1 << 20), (2**32 - 1, 2**64 - 1, 7), (1, 0, 130)],
)
def test_chunk_frame_codec_is_protobufs(kind, index, offset, size):
    frame_cls, field, decode = FRAMES[kind]
    data = bytes(range(256)) * (size // 256) + bytes(range(size % 256))
    frame = frame_cls()
    frame.chunk.tensor_index, frame.chunk.offset, frame.chunk.data = index, offset, data
    wire = encode_chunk_frame(index, offset, memoryview(data), field)
    assert wire == frame.SerializeToString()
    if field == STREAM_FRAME_CHUNK_FIELD:  # the default: the worker's frames
        assert encode_chunk_frame(index, offset, memoryview(data)) == wire
    fast = decode(wire)
    assert fast.WhichOneof("kind") == "chunk"
    assert isinstance(fast.chunk.data, memoryview)  # a view: no copy on receipt
    assert (fast.chunk.tensor_index, fast.chunk.offset, bytes(fast.chunk.data)) == (
        index,
        offset,
        data,
    )


def _other_encodings(kind: str) -> list[bytes]:
    frame_cls, field, _decode = FRAMES[kind]
    tag = bytes([field << 3 | 2])
    header = {
        "StreamFrame": {"request": worker_pb2.ComputeGradientsRequest(graph_id="g")},
        "ShardFrame": {"pulled": shard_pb2.PullResponse(version=3)},
        "CoordinatorFrame": {"create_job": coordinator_pb2.CreateJobRequest(job_id="j")},
    }
    return [
        # header frames
        frame_cls(**header[kind]).SerializeToString(),
        # two chunk fields in one frame: protobuf merges them
        encode_chunk_frame(1, 4, b"abcd", field) + encode_chunk_frame(0, 9, b"", field),
        # a field repeated inside the chunk: the last one wins
        tag + b"\x06\x08\x01\x08\x02\x1a\x00",
        # fields in another order than protobuf writes them
        tag + b"\x07\x1a\x01z\x10\x05\x08\x02",
        # an unknown field inside the chunk
        tag + b"\x06\x08\x01\x20\x07\x1a\x00",
        # data longer than the chunk claims to be
        tag + b"\x04\x1a\x05abc",
    ]


@pytest.mark.parametrize("case", range(6))
@pytest.mark.parametrize("kind", FRAMES)
def test_decoder_reads_any_encoding_as_protobuf_does(kind, case):
    frame_cls, _field, decode = FRAMES[kind]
    wire = _other_encodings(kind)[case]
    try:
        expected = frame_cls.FromString(wire)
    except Exception as e:  # noqa: BLE001  (protobuf's DecodeError)
        with pytest.raises(type(e)):
            decode(wire)
        return
    parsed = decode(wire)
    assert parsed.WhichOneof("kind") == expected.WhichOneof("kind")
    if expected.WhichOneof("kind") == "chunk":
        got = parsed.chunk
        assert (got.tensor_index, got.offset, bytes(got.data)) == (
            expected.chunk.tensor_index,
            expected.chunk.offset,
            expected.chunk.data,
        )
    else:
        assert parsed == expected


@pytest.mark.parametrize("field", [3, 5])
def test_a_shard_decoder_reads_other_fields_as_protobuf_does(field):
    """A chunk under another field number (3 is ShardFrame's `pulled`) is not a chunk."""
    decode = FRAMES["ShardFrame"][2]
    wire = encode_chunk_frame(1, 4, b"abcd", field)
    parsed = decode(wire)
    assert parsed == shard_pb2.ShardFrame.FromString(wire)
    assert parsed.WhichOneof("kind") != "chunk"


def test_frame_decoder_refuses_a_field_that_is_not_the_chunk():
    with pytest.raises(ValueError, match="not a oneof member"):
        frame_decoder(shard_pb2.ShardFrame, 3)  # `pulled`
    with pytest.raises(ValueError):
        frame_decoder(worker_pb2.StreamFrame, 4)  # no such field
    with pytest.raises(ValueError):
        list(chunk_frames([np.ones(3)], 16, field=0))


def test_frame_decoder_names_its_message_like_from_string():
    """servers/runtime.py names the message type of undecodable bytes from the
    deserializer's ``__self__.DESCRIPTOR``, as for protobuf's ``FromString``."""
    decode = FRAMES["ShardFrame"][2]
    assert decode.__self__.DESCRIPTOR.full_name == "gradmesh.v1.ShardFrame"
    with pytest.raises(DecodeError):
        decode(b"\xff\xff\xff")


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("name", [None, "", "0.weight", "poids-\u00e9"])
def test_tensor_field_encoding_is_protobufs(dtype, shape, name):
    a = _sample(shape, np.dtype(dtype))
    pieces = encode_tensor_field(3, a, name) if name is not None else encode_tensor_field(1, a)
    resp = worker_pb2.ComputeGradientsResponse()
    if name is None:
        resp.loss.CopyFrom(to_proto(a))
    else:
        resp.gradients.add(name=name).tensor.CopyFrom(to_proto(a))
    assert b"".join(pieces) == resp.SerializeToString(deterministic=True)


def test_tensor_field_encoding_reads_the_array_in_place():
    a = np.arange(1000, dtype=np.float32)
    pieces = encode_tensor_field(3, a, "w")
    assert any(isinstance(p, memoryview) and np.shares_memory(np.asarray(p), a) for p in pieces)
    # A big-endian or strided array is converted once, with the same wire bytes.
    odd = a[::2].astype(">f4")
    assert b"".join(encode_tensor_field(3, odd, "w")) == b"".join(
        encode_tensor_field(3, np.ascontiguousarray(a[::2]), "w")
    )


@pytest.mark.parametrize("kind", ["StreamFrame", "ShardFrame"])
def test_chunk_frames_into_the_assembler_round_trip(kind):
    frame_cls, field, decode = FRAMES[kind]
    arrays = [
        np.arange(10, dtype=np.int64),
        np.zeros(0, np.float32),
        _sample((3, 7), np.dtype("f8")),
    ]
    req = worker_pb2.ComputeGradientsRequest()
    for i, a in enumerate(arrays):
        req.parameters.add(name=f"p{i}").tensor.CopyFrom(to_proto(a, data=False))
    asm = Assembler(req, 1 << 20)
    frames = list(chunk_frames(arrays, 16, field=field))
    assert len(frames) == 5 + 0 + 11  # 80 bytes, none, 168 bytes
    # The frames protobuf writes for the chunks protobuf's way (serialize.chunks).
    assert frames == [
        frame_cls(chunk=c).SerializeToString()
        for c in chunks([tensor_buffer(a) for a in arrays], 16)
    ]
    for wire in frames:
        frame = decode(wire)
        assert isinstance(frame.chunk, ChunkView)
        asm.add(frame.chunk)
    out = asm.finish()
    assert all(np.array_equal(x, y) and x.dtype == y.dtype for x, y in zip(arrays, out))
    assert all(x.flags.writeable for x in out)


def test_assembler_never_exposes_unwritten_bytes():
    """Buffers are allocated uninitialised: a tensor is handed out only once every one of
    its bytes came in a chunk."""
    header, cs = _two_tensor_stream()
    asm = Assembler(header, 1 << 20)
    for c in cs[:-1]:
        asm.add(c)
    assert not asm.done
    with pytest.raises(WireError):
        asm.finish()
    asm.add(cs[-1])
    a, b = asm.finish()
    assert a.tolist() == list(range(8)) and b.tolist() == list(range(4))


def test_pooled_buffers_are_reused_only_after_every_view_is_gone():
    import gc

    from gradmesh.wire.stream import BufferPool

    pool = BufferPool(64 << 20)
    a = pool.allocate(4 << 20)
    view = a.view(np.float32).reshape(1024, 1024)[::2]
    view[...] = 7
    address = a.__array_interface__["data"][0]
    del a
    gc.collect()
    assert pool.idle_bytes == 0  # the view still reads it
    b = pool.allocate(4 << 20)
    assert b.__array_interface__["data"][0] != address and np.all(view == 7)
    del view
    gc.collect()
    assert pool.idle_bytes == 4 << 20
    c = pool.allocate((4 << 20) - 1000)  # up to a quarter smaller: reused
    assert c.__array_interface__["data"][0] == address and c.nbytes == (4 << 20) - 1000
    assert pool.allocate(1 << 20).__array_interface__["data"][0] != address
    del b, c
    gc.collect()
    small = BufferPool(6 << 20)  # idle memory is capped
    bufs = [small.allocate(4 << 20) for _ in range(2)]
    del bufs
    gc.collect()
    assert small.idle_bytes == 4 << 20


@pytest.mark.parametrize(
    "make",
    [
        lambda: np.broadcast_to(np.float32(2.5), (700, 900)),  # a broadcast scalar
        lambda: np.broadcast_to(np.arange(900, dtype=np.float64), (700, 900)),
        lambda: np.arange(2_000_000, dtype=np.int64)[::2],  # strided 1-D
        lambda: np.arange(600_000, dtype=">f4").reshape(600, 1000),  # big-endian
        lambda: np.arange(600_000, dtype=np.float32).reshape(1000, 600).T,  # transposed
    ],
    ids=["scalar", "row", "strided", "big-endian", "transposed"],
)
@pytest.mark.parametrize("chunk", [1 << 20, 3 << 20])
@pytest.mark.parametrize("field", [STREAM_FRAME_CHUNK_FIELD, SHARD_FRAME_CHUNK_FIELD])
def test_strided_arrays_give_the_frames_of_their_contiguous_copy(make, chunk, field):
    a = make()
    copy = np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<"))
    assert list(chunk_frames([a], chunk, 3, field)) == list(chunk_frames([copy], chunk, 3, field))
