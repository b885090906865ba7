"""Opt-in compressed-gradient mode (docs/training.md, "Compressed gradients"): the
compression with error feedback itself, a job in that mode on a real coordinator (status,
refusals, reproducible whatever the number of workers), and convergence on the demo's
digits task against the synchronous mode in the same test."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from digits_jobs import train_digits

from gradmesh.client import demo
from gradmesh.client.coordinator import CoordinatorClient
from gradmesh.server import compression
from gradmesh.server import coordinator as coordinator_mod
from gradmesh.server.runtime import ServerConfig
from gradmesh.server.shard import serve_shard
from gradmesh.server.shard_store import ShardStore
from gradmesh.v1 import shard_pb2
from gradmesh.wire import compression as wire_compression
from gradmesh.wire.errors import GradmeshError, from_rpc_error
from gradmesh.wire.frames import serialize_message
from gradmesh.wire.shard import RemoteShard, named_headers, shard_frames

TOPK = {"kind": "topk", "ratio": 0.01}
SIGN = {"kind": "sign"}


# -- the compression, as plain functions ---------------------------------------------------
def test_topk_keeps_the_largest_magnitudes_and_sign_keeps_the_l1_norm():
    p = np.array([[0.5, -3.0, 0.1], [2.0, -0.2, 0.0]], np.float32)
    kept = compression.compress({"kind": "topk", "ratio": 0.3}, p)  # ceil(0.3 * 6) = 2
    np.testing.assert_array_equal(kept, [[0, -3.0, 0], [2.0, 0, 0]])
    ties = compression.compress({"kind": "topk", "ratio": 0.5}, np.array([1, -2, 1, 1], np.float32))
    np.testing.assert_array_equal(ties, [1, -2, 0, 0])  # ties at the threshold: lowest first
    signs = compression.compress(SIGN, p)
    scale = np.float32(np.abs(p).mean())
    np.testing.assert_array_equal(signs, np.where(p >= 0, scale, -scale))
    assert compression.encoded_bytes({"kind": "topk", "ratio": 0.3}, p) == 2 * (4 + 4)
    assert compression.encoded_bytes(SIGN, p) == 8  # 1 byte of bits, 4 of scale, padded


@pytest.mark.parametrize("spec", [TOPK, SIGN], ids=["topk", "sign"])
def test_error_feedback_loses_nothing_only_delays_it(spec):
    """Over steps, what went on plus what is still held is what came in (float64 sums)."""
    rng = np.random.default_rng(0)
    residuals = compression.Residuals(spec)
    came, went = np.zeros(300), np.zeros(300)
    for _ in range(20):
        g = rng.standard_normal(300)
        staged = residuals.stage()
        went += staged.apply(0, {"w": g})["w"]
        came += g
        staged.commit()
    np.testing.assert_allclose(went + residuals.kept[(0, "w")], came, rtol=1e-12, atol=1e-12)
    assert residuals.sent_bytes < residuals.dense_bytes / 8


def test_an_attempt_not_committed_leaves_the_residuals_as_they_were():
    residuals = compression.Residuals(TOPK)
    residuals.stage().apply(0, {"w": np.arange(10.0)})
    assert residuals.kept == {} and residuals.sent_bytes == 0
    staged = residuals.stage()
    for _ in range(2):  # a micro-batch given twice in one attempt (recomputed) counts once
        staged.apply(0, {"w": np.arange(10.0)})
    staged.commit()
    assert (residuals.dense_bytes, residuals.sent_bytes) == (80, 12)


@pytest.mark.parametrize("spec", [{"kind": "topk", "ratio": 0.05}, SIGN], ids=["topk", "sign"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
def test_the_wire_encoding_decodes_to_the_compressed_values_bit_for_bit(spec, dtype):
    rng = np.random.default_rng(1)
    for shape in [(7, 13), (1,), (3, 0)]:
        c = compression.compress(spec, rng.standard_normal(shape).astype(dtype))
        words = wire_compression.encode(spec["kind"], c)
        assert words.dtype == np.int32 and words.nbytes == compression.encoded_bytes(spec, c)
        back = wire_compression.decode(spec["kind"], words, np.dtype(dtype), shape)
        assert back.dtype == dtype and np.array_equal(back.view(np.uint8), c.view(np.uint8))


@pytest.mark.parametrize(
    "spec, field",
    [
        ({"kind": "gzip"}, "compression.kind"),
        ({"kind": "topk", "ratio": 0.0}, "compression.ratio"),
        ({"kind": "topk", "ratio": 1.5}, "compression.ratio"),
        ({"kind": "sign", "ratio": 0.1}, "compression.ratio"),
    ],
)
def test_bad_compression_is_refused_naming_the_field(spec, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        compression.validate(spec)


# -- jobs on a real coordinator ------------------------------------------------------------


@pytest.fixture(scope="module")
def digits():
    return demo.load_data(0)


def _coordinator(addresses):
    # No shared memory: the bytes path that remote workers use.
    server = coordinator_mod.start(workers=addresses, shared_memory=False)
    return server, CoordinatorClient(server.address, retry_seconds=0.0)


@pytest.fixture(scope="module")
def coordinator(workers):
    server, client = _coordinator(workers)
    yield client
    client.close()
    server.stop(0)
    server.coordinator.close()


def test_status_says_the_mode_and_bad_values_are_invalid_argument(coordinator, digits):
    x, y = digits[0][:8], digits[1][:8]
    model = demo.make_model(0)
    sync = coordinator.create_job(
        model, demo.loss_fn, {"name": "sgd", "lr": 0.1}, 4, example_batch=(x, y), job_id="m-sync"
    )
    status = sync.status()
    assert (status.mode, status.deterministic, status.HasField("compression")) == (
        "synchronous",
        True,
        False,
    )
    job = coordinator.create_job(
        model,
        demo.loss_fn,
        {"name": "sgd", "lr": 0.1},
        4,
        example_batch=(x, y),
        job_id="m-topk",
        compression=TOPK,
    )
    job.step(x, y)
    status = job.status()
    assert (status.mode, status.deterministic) == ("compressed", False)
    assert (status.compression.kind, status.compression.ratio) == ("topk", 0.01)
    dense = sum(a.numpy().nbytes for a in model.state_dict().values()) * 2  # 2 micro-batches
    assert status.gradient_bytes == dense
    assert 0 < status.compressed_bytes < dense / 10
    with pytest.raises(GradmeshError) as e:  # same id, another mode
        coordinator.create_job(
            model, demo.loss_fn, {"name": "sgd", "lr": 0.1}, 4, example_batch=(x, y),
            job_id="m-topk", compression=SIGN,
        )  # fmt: skip
    assert e.value.code == grpc.StatusCode.ALREADY_EXISTS and "compression" in e.value.message
    with pytest.raises(GradmeshError) as e:
        coordinator.create_job(
            model, demo.loss_fn, {"name": "sgd", "lr": 0.1}, 4, example_batch=(x, y),
            compression={"kind": "topk", "ratio": 2.0},
        )  # fmt: skip
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "compression.ratio" in e.value.message


def test_the_mode_is_part_of_the_job_and_survives_a_coordinator_restart(workers, tmp_path):
    x, y = demo.load_data(0)[:2]
    model = demo.make_model(0)
    server = coordinator_mod.start(workers=workers, state_dir=str(tmp_path))
    client = CoordinatorClient(server.address, retry_seconds=0.0)
    try:
        args = (model, demo.loss_fn, {"name": "sgd", "lr": 0.1}, 4)
        sync = client.create_job(*args, example_batch=(x[:8], y[:8]))
        job = client.create_job(*args, example_batch=(x[:8], y[:8]), compression=SIGN)
        assert job.job_id != sync.job_id  # the default id digests the mode too
        job.step(x[:8], y[:8])
    finally:
        client.close()
        server.stop(0)
        server.coordinator.close()
    server = coordinator_mod.start(workers=workers, state_dir=str(tmp_path))
    client = CoordinatorClient(server.address, retry_seconds=0.0)
    try:
        status = client.job(job.job_id).status()
        assert (status.mode, status.compression.kind, status.version) == ("compressed", "sign", 1)
        assert client.job(sync.job_id).status().mode == "synchronous"
    finally:
        client.close()
        server.stop(0)
        server.coordinator.close()


def test_the_compressed_mode_is_reproducible_whatever_the_number_of_workers(
    coordinator, workers, digits
):
    """Residuals are per micro-batch index, not per worker: 1 and 2 workers agree bitwise."""
    one_server, one = _coordinator(workers[:1])
    try:
        runs = [train_digits(c, digits, 1, SIGN, job_id="m-repro")[0] for c in (coordinator, one)]
    finally:
        one.close()
        one_server.stop(0)
        one_server.coordinator.close()
    for name, a in runs[0].state_dict().items():
        assert np.array_equal(a.numpy(), runs[1].state_dict()[name].numpy()), name


@pytest.fixture
def remote_shards():
    running = [serve_shard(ServerConfig(port=0), ShardStore()) for _ in range(2)]
    yield [r.address for r in running]
    for r in running:
        r.stop(0)


def test_remote_shards_get_the_encoding_and_apply_the_same_values(
    coordinator, workers, digits, remote_shards
):
    """Over the wire (2 shard servers) the compressed gradients arrive encoded and decode
    to the values an embedded shard sums: the same parameters, bit for bit."""
    server = coordinator_mod.start(workers=workers, shards=remote_shards, shared_memory=False)
    client = CoordinatorClient(server.address, retry_seconds=0.0)
    try:
        remote, _, status = train_digits(client, digits, 1, TOPK, job_id="m-remote")
    finally:
        client.close()
        server.stop(0)
        server.coordinator.close()
    assert status.shards == 2 and status.compressed_bytes < status.gradient_bytes / 10
    embedded = train_digits(coordinator, digits, 1, TOPK, job_id="m-embedded")[0]
    for name, a in embedded.state_dict().items():
        assert np.array_equal(a.numpy(), remote.state_dict()[name].numpy()), name


def _push(address, kind, words):
    """A raw PushGradients with one compressed gradient of ``w``: the error, decoded."""
    header = shard_pb2.PushGradientsRequest(
        job_id="bad-push", step_id=1, micro_batches=1, compression=kind
    )
    values = named_headers(header.compressed_gradients, {"w": words})
    with grpc.insecure_channel(address) as channel:
        push = channel.stream_unary(
            "/gradmesh.v1.ParameterShard/PushGradients", request_serializer=serialize_message
        )
        with pytest.raises(grpc.RpcError) as e:
            push(shard_frames("push", header, values), timeout=10)
    return from_rpc_error(e.value)


def test_a_malformed_compressed_push_is_invalid_argument_naming_it(remote_shards):
    shard = RemoteShard(remote_shards[0])
    try:
        shard.load("bad-push", {"w": np.zeros((4, 4), np.float32)}, {"name": "sgd", "lr": 0.1})
    finally:
        shard.close()
    bad = [
        ("topk", np.arange(3, dtype=np.int32), "compressed_gradients[w]"),  # not k + k
        ("topk", np.array([99, 0], np.int32), "compressed_gradients[w]"),  # index 99 of 16
        ("sign", np.zeros(1, np.int32), "compressed_gradients[w]"),  # 16 bits + scale: 2 words
        ("topk", np.zeros(100, np.float32), "compressed_gradients[w]"),  # not int32 words
        ("gzip", np.zeros(2, np.int32), "compression"),
    ]
    for kind, words, field in bad:
        err = _push(remote_shards[0], kind, words)
        assert (err.code, err.field) == (grpc.StatusCode.INVALID_ARGUMENT, field), err.message


EPOCHS = 6  # the synchronous mode's budget (72 steps); the compressed modes get EXTRA more
EXTRA = 2  # epochs of 12 steps: at most 24 extra steps
TOLERANCE = 0.01  # test accuracy within 1 point of the synchronous mode's


@pytest.fixture(scope="module")
def synchronous_accuracy(coordinator, digits):
    accuracy = train_digits(coordinator, digits, EPOCHS)[1][-1]
    assert accuracy > 0.95  # the reference learned the task (the demo's 15 epochs: ~97.8%)
    return accuracy


# Top-k at 1% needs far more steps on this small model (benchmarks/README.md, "Modes"):
# the test holds 10%, measured to reach the bound in 7 epochs (sign: 6).
@pytest.mark.parametrize("spec", [{"kind": "topk", "ratio": 0.1}, SIGN], ids=["topk-10%", "sign"])
def test_the_compressed_mode_converges_to_the_synchronous_accuracy(
    coordinator, digits, synchronous_accuracy, spec
):
    target = synchronous_accuracy - TOLERANCE
    _, accuracies, status = train_digits(coordinator, digits, EPOCHS + EXTRA, spec, until=target)
    assert status.mode == "compressed"
    assert accuracies[-1] >= target, (
        f"synchronous {synchronous_accuracy:.3f} after {EPOCHS} epochs; compressed by "
        f"epoch: {accuracies}"
    )


def test_the_stale_mode_converges_to_the_synchronous_accuracy(
    coordinator, digits, synchronous_accuracy
):
    """Bounded staleness 4, steps pipelined by fit: within 1 point of the synchronous
    mode's accuracy within EXTRA more epochs (measured: at the same epoch,
    benchmarks/README.md "Modes")."""
    target = synchronous_accuracy - TOLERANCE
    _, accuracies, status = train_digits(
        coordinator, digits, EPOCHS + EXTRA, until=target, staleness=4
    )
    assert status.mode == "stale" and status.max_staleness <= 4
    assert accuracies[-1] >= target, (
        f"synchronous {synchronous_accuracy:.3f} after {EPOCHS} epochs; stale by epoch: "
        f"{accuracies}"
    )
