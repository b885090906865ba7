"""The parameter shard: its logic (ShardStore), checkpoints, and the gRPC service."""

from __future__ import annotations

import grpc
import ml_dtypes
import numpy as np
import pytest

from gradmesh.core import optim
from gradmesh.server.aggregate import tree_sum
from gradmesh.server.runtime import ServerConfig, ServiceError
from gradmesh.server.shard import serve_shard
from gradmesh.server.shard_store import ShardJob, ShardStore
from gradmesh.wire.shard import RemoteShard

SGD = {"name": "sgd", "lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01}


def _params(seed=0, big=False):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((1024, 1100)) if big else rng.standard_normal((3, 4))
    return {"w": w.astype(np.float32), "b": rng.standard_normal(4).astype(np.float32)}


def _grads(params, seed):
    rng = np.random.default_rng(seed)
    return {n: rng.standard_normal(p.shape).astype(p.dtype) for n, p in params.items()}


def _reference(params, steps, optimizer, micro=3):
    """Single-process: tree-sum each step's micro-batch gradients, then the pure update."""
    params = {n: p.copy() for n, p in params.items()}
    state = {n: {} for n in params}
    d = optim.validate(optimizer)
    rule = optim.UPDATE_RULES[d.pop("name")]
    for s in range(1, steps + 1):
        gs = [_grads(params, 100 * s + m) for m in range(micro)]
        for n in sorted(params):
            rule(np, params[n], tree_sum([g[n].copy() for g in gs]), state[n], **d)
    return params


def _train(store, job, steps, micro=3, order=None, first=1):
    for s in range(first, first + steps):
        version = store.jobs[job].version
        shapes = {n: p for n, p in store.jobs[job].params.items()}
        for m in order or range(micro):
            store.push(job, s, m, micro, version, _grads(shapes, 100 * s + m))
        store.apply(job, s, micro, version)


def test_steps_equal_the_single_process_reference_whatever_the_push_order():
    params = _params()
    a, b = ShardStore(), ShardStore()
    a.load("j", params, SGD)
    b.load("j", params, SGD)
    _train(a, "j", 4)
    _train(b, "j", 4, order=[2, 0, 1])
    ref = _reference(params, 4, SGD)
    for n in params:
        assert np.array_equal(a.jobs["j"].params[n], ref[n])
        assert np.array_equal(b.jobs["j"].params[n], ref[n])
    assert a.jobs["j"].version == 4 and a.jobs["j"].last_step_id == 4


def test_duplicate_and_late_pushes_are_ignored_and_apply_is_idempotent():
    store = ShardStore()
    params = _params()
    store.load("j", params, SGD)
    g = _grads(params, 1)
    assert store.push("j", 1, 0, 2, 0, g) == (False, 1)
    assert store.push("j", 1, 0, 2, 0, _grads(params, 99)) == (True, 1)
    with pytest.raises(ServiceError) as e:
        store.apply("j", 1, 2, 0)
    assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION and "[1]" in e.value.message
    store.push("j", 1, 1, 2, 0, g)
    assert store.apply("j", 1, 2, 0)[:2] == (1, False)
    after = store.jobs["j"].params["w"].copy()
    assert store.apply("j", 1, 2, 0)[:2] == (1, True)  # retried commit: no-op
    assert store.push("j", 1, 1, 2, 0, g) == (True, 2)  # late result of step 1
    assert np.array_equal(store.jobs["j"].params["w"], after)


def test_a_new_attempt_discards_the_gradients_of_an_abandoned_one():
    store, ref = ShardStore(), ShardStore()
    params = _params()
    store.load("j", params, SGD)
    ref.load("j", params, SGD)
    store.push("j", 1, 0, 2, 0, _grads(params, 7), attempt=11)  # the failed attempt
    for m in range(2):
        assert store.push("j", 1, m, 2, 0, _grads(params, m), attempt=12) == (False, m + 1)
        ref.push("j", 1, m, 2, 0, _grads(params, m))
    with pytest.raises(ServiceError) as e:
        store.apply("j", 1, 2, 0, attempt=11)
    assert (e.value.code, e.value.field) == (grpc.StatusCode.FAILED_PRECONDITION, "attempt")
    store.apply("j", 1, 2, 0, attempt=12)
    ref.apply("j", 1, 2, 0)
    for n in params:
        assert np.array_equal(store.jobs["j"].params[n], ref.jobs["j"].params[n])


@pytest.mark.parametrize(
    "call,code,field",
    [
        (lambda s, p: s.push("j", 1, 0, 1, 5, p), "FAILED_PRECONDITION", "version"),
        (lambda s, p: s.push("j", 1, 2, 2, 0, p), "INVALID_ARGUMENT", "micro_batch"),
        (
            lambda s, p: s.push("j", 1, 0, 1, 0, {**p, "w": p["w"].T.copy()}),
            "INVALID_ARGUMENT",
            "gradients[w]",
        ),
        (lambda s, p: s.push("j", 1, 0, 1, 0, {"w": p["w"]}), "INVALID_ARGUMENT", "gradients"),
        (
            lambda s, p: s.push("j", 1, 0, 1, 0, {**p, "v": p["b"]}),
            "INVALID_ARGUMENT",
            "gradients[v]",
        ),
        (lambda s, p: s.pull("nope"), "NOT_FOUND", "job_id"),
        (lambda s, p: s.pull("../x"), "INVALID_ARGUMENT", "job_id"),
        (lambda s, p: s.pull("j", 3), "FAILED_PRECONDITION", "version"),
        (lambda s, p: s.apply("j", 1, 1, 0), "FAILED_PRECONDITION", "micro_batches"),
        (lambda s, p: s.load("j", {"w": p["w"]}, SGD), "ALREADY_EXISTS", "job_id"),
        (
            lambda s, p: s.load("k", {"i": np.zeros(2, np.int64)}, SGD),
            "INVALID_ARGUMENT",
            "parameters[i]",
        ),
        # Found by tests/services/test_fuzz.py: "$" matched before a trailing newline, so "j\n" (a
        # file name with a newline) was a valid job id.
        (lambda s, p: s.load("j\n", p, SGD), "INVALID_ARGUMENT", "job_id"),
        (lambda s, p: s.pull("j\n"), "INVALID_ARGUMENT", "job_id"),
        # Found by tests/services/test_fuzz.py: Apply listed every missing micro-batch index, so
        # micro_batches=2**32-1 allocated tens of GB (MemoryError, INTERNAL) or ran for minutes.
        (lambda s, p: s.apply("j", 1, 2**32 - 1, 0), "FAILED_PRECONDITION", "micro_batches"),
        (
            lambda s, p: (s.push("j", 1, 5, 2**32 - 1, 0, p), s.apply("j", 1, 2**32 - 1, 0)),
            "FAILED_PRECONDITION",
            "micro_batches",
        ),
        (lambda s, p: s.apply("j", 1, 0, 0), "INVALID_ARGUMENT", "micro_batches"),
    ],
)
def test_bad_requests_name_the_field(call, code, field):
    store = ShardStore()
    params = _params()
    store.load("j", params, SGD)
    with pytest.raises(ServiceError) as e:
        call(store, params)
    assert (e.value.code.name, e.value.field) == (code, field)


def test_checkpoint_restores_parameters_optimizer_state_and_version(tmp_path):
    params = _params()
    adam = {"name": "adam", "lr": 0.01, "amsgrad": True}
    store = ShardStore(str(tmp_path))
    store.load("j", params, adam)
    _train(store, "j", 2)
    store.checkpoint()
    restored = ShardStore(str(tmp_path))
    assert restored.jobs["j"].version == 2 and restored.jobs["j"].last_step_id == 2
    assert not list(tmp_path.glob(".tmp-*"))  # no temporary file left behind
    _train(store, "j", 2, first=3)
    _train(restored, "j", 2, first=3)
    for n in params:
        assert np.array_equal(restored.jobs["j"].params[n], store.jobs["j"].params[n])
    assert np.array_equal(store.jobs["j"].params["w"], _reference(params, 4, adam)["w"])


def test_checkpoint_every_n_versions(tmp_path):
    store = ShardStore(str(tmp_path), checkpoint_every=2)
    store.load("j", _params(), SGD)
    _train(store, "j", 3)
    # Taken when step 2 is applied, before it: version 1, steps 2 and 3 in the log.
    assert ShardJob.load(str(tmp_path / "j.npz")).version == 1
    assert ShardStore(str(tmp_path)).jobs["j"].version == 3
    store.drop("j")
    assert ShardStore(str(tmp_path)).jobs == {} and not list(tmp_path.iterdir())


def test_a_crash_loses_no_acknowledged_step_the_log_is_replayed(tmp_path):
    """SIGKILL keeps nothing in memory: a store rebuilt from the directory (checkpoint at
    version 2, then the log of steps 3-5) is where the dead one was, bit for bit."""
    params = _params()
    adam = {"name": "adam", "lr": 0.01}
    store = ShardStore(str(tmp_path), checkpoint_every=2)
    store.load("j", params, adam)
    _train(store, "j", 5)
    restarted = ShardStore(str(tmp_path), checkpoint_every=2)  # no checkpoint on exit
    job = restarted.jobs["j"]
    assert (job.version, job.last_step_id) == (5, 5)
    reference = _reference(params, 5, adam)
    assert all(np.array_equal(job.params[n], reference[n]) for n in params)
    # A retried Apply of the last step is answered as already applied, not redone.
    assert restarted.apply("j", 5, 3, 4)[:2] == (5, True)
    _train(restarted, "j", 2, first=6)
    assert np.array_equal(restarted.jobs["j"].params["w"], _reference(params, 7, adam)["w"])


def test_a_torn_log_record_is_cut_off(tmp_path):
    store = ShardStore(str(tmp_path))
    store.load("j", _params(), SGD)
    _train(store, "j", 2)
    log = tmp_path / "j.steps.log"
    size = log.stat().st_size
    with open(log, "ab") as f:  # a crash in the middle of an append
        f.write(b"GMLR\x10\x00")
    restarted = ShardStore(str(tmp_path))
    assert restarted.jobs["j"].version == 2 and log.stat().st_size == size
    _train(restarted, "j", 1, first=3)
    assert ShardStore(str(tmp_path)).jobs["j"].version == 3


def test_a_full_disk_applies_nothing_and_the_step_can_be_retried(tmp_path, monkeypatch):
    store = ShardStore(str(tmp_path))
    store.load("j", _params(), SGD)
    job = store.jobs["j"]
    for m in range(3):
        store.push("j", 1, m, 3, 0, _grads(job.params, 100 + m))
    before = {n: p.copy() for n, p in job.params.items()}
    real = job.log.append

    def full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(job.log, "append", full)
    with pytest.raises(ServiceError) as e:
        store.apply("j", 1, 3, 0)
    assert e.value.code == grpc.StatusCode.UNAVAILABLE and "No space left" in e.value.message
    assert job.version == 0 and all(np.array_equal(before[n], job.params[n]) for n in before)
    monkeypatch.setattr(job.log, "append", real)
    assert store.apply("j", 1, 3, 0)[:2] == (1, False)
    assert ShardStore(str(tmp_path)).jobs["j"].version == 1


def test_an_older_version_is_rebuilt_from_checkpoint_and_log(tmp_path):
    """After a crash between two shards' Applies the coordinator retries the step from the
    version before it: the shard that applied it can still serve that version."""
    params = _params()
    store = ShardStore(str(tmp_path))
    store.load("j", params, SGD)
    _train(store, "j", 3)
    version, old = store.pull("j", 2, copy=True)
    assert version == 2 and np.array_equal(old["w"], _reference(params, 2, SGD)["w"])
    # Also just after a checkpoint: the one taken when applying a step holds the version
    # before it.
    _train(store, "j", 1, first=4)
    for m in range(3):
        store.push("j", 5, m, 3, 4, _grads(store.jobs["j"].params, 500 + m))
    store.apply("j", 5, 3, 4, checkpoint_now=True)
    version, old = store.pull("j", 4, copy=True)
    assert version == 4 and np.array_equal(old["w"], _reference(params, 4, SGD)["w"])
    with pytest.raises(ServiceError):
        store.pull("j", 9)


@pytest.fixture(scope="module")
def shard_server():
    store = ShardStore()
    running = serve_shard(ServerConfig(port=0), store)
    yield running, store
    running.stop(0)


def test_remote_shard_streams_large_tensors_and_matches_the_reference(shard_server):
    running, store = shard_server
    params = _params(big=True)  # 4.5 MB: more than one chunk
    remote = RemoteShard(running.address)
    try:
        assert remote.load("big", params, SGD) == (0, 0)
        assert remote.load("big", params, SGD) == (0, 0)  # idempotent
        for s in (1, 2):
            version, current = remote.pull("big")
            for m in (1, 0, 2):
                dup, _ = remote.push("big", s, m, 3, version, _grads(current, 100 * s + m))
                assert not dup
            assert remote.push("big", s, 0, 3, version, _grads(current, 0))[0]
            assert remote.apply("big", s, 3, version)[:2] == (s, False)
        assert remote.apply("big", 2, 3, 1)[1]  # already applied
        version, pulled = remote.pull("big")
        ref = _reference(params, 2, SGD)
        assert version == 2
        assert all(np.array_equal(pulled[n], ref[n]) for n in params)
        assert remote.status("big") == (2, 2)
    finally:
        remote.close()


def test_remote_round_trips_give_the_embedded_shards_arrays_bit_for_bit(shard_server):
    """Load, Push, Apply and Pull through the frame codec give the same bytes as the same
    calls on an in-process store: every float dtype, several chunks, 0-d and empty."""
    from gradmesh.server.shard_store import EmbeddedShard

    running, _ = shard_server
    rng = np.random.default_rng(3)
    params = {
        "w": rng.standard_normal((700, 1500)),  # 8.4 MB: 5 chunks
        "h": rng.standard_normal((3, 5)).astype(np.float16),
        "bf": rng.standard_normal((4, 6)).astype(np.float32).astype(ml_dtypes.bfloat16),
        "s": np.array(1.5, np.float32),
        "e": np.zeros((0, 4), np.float32),
    }  # no bytes, no chunk
    shards = [EmbeddedShard(ShardStore()), RemoteShard(running.address)]

    def same(x, y):
        assert list(x) == list(y)
        for n in x:
            assert (x[n].dtype, x[n].shape, x[n].tobytes()) == (
                y[n].dtype,
                y[n].shape,
                y[n].tobytes(),
            ), n

    try:
        for shard in shards:
            assert shard.load("rt", params, SGD) == (0, 0)
        pulled = [shard.pull("rt", copy=True)[1] for shard in shards]
        same(pulled[1], params)
        for s in (1, 2):
            for shard in shards:
                for m in (1, 0):
                    assert shard.push("rt", s, m, 2, s - 1, _grads(params, 10 * s + m)) == (
                        False,
                        2 - m,
                    )
                assert shard.apply("rt", s, 2, s - 1)[:2] == (s, False)
        pulled = [shard.pull("rt", 2, copy=True) for shard in shards]
        assert pulled[0][0] == pulled[1][0] == 2
        same(pulled[1][1], pulled[0][1])
        assert not np.array_equal(pulled[1][1]["w"], params["w"])
        same(shards[1].pull("rt", names=["s", "w"])[1], {n: pulled[0][1][n] for n in ("s", "w")})
    finally:
        shards[1].close()


def test_pulls_and_pushes_reuse_memory_step_after_step():
    """Pulled parameters (client) and pushed gradients and Pull's copies (server) come from
    buffer pools: once a step's arrays are gone, the next step's use the same memory."""
    import gc

    from gradmesh.server import shard as shard_module
    from gradmesh.server.runtime import serve
    from gradmesh.wire import shard as wire_shard

    servicer = shard_module.ShardServicer(ShardStore())
    running = serve(
        ServerConfig(port=0), [(shard_module.add_to_server, servicer, shard_module.SERVICE_NAME)]
    )
    params = _params(big=True)  # w: 4.5 MB, pooled; b: 16 bytes, not
    nbytes = params["w"].nbytes
    client_pool, server_pool = wire_shard._pulled_buffers, servicer.buffers
    remote = RemoteShard(running.address)
    try:
        remote.load("pool", params, SGD)
        for s in (1, 2, 3):
            gc.collect()
            idle = client_pool.idle_bytes, server_pool.idle_bytes
            version, pulled = remote.pull("pool")
            assert pulled["w"].flags.writeable
            if s > 1:
                assert idle[0] - client_pool.idle_bytes >= nbytes
            del pulled
            idle = server_pool.idle_bytes
            remote.push("pool", s, 0, 2, version, _grads(params, s))
            if s > 1:  # held by the shard until applied
                assert idle - server_pool.idle_bytes >= nbytes
            remote.push("pool", s, 1, 2, version, _grads(params, s + 10))
            assert remote.apply("pool", s, 2, version)[:2] == (s, False)
    finally:
        remote.close()
        running.stop(0)


def test_remote_errors_carry_status_and_field(shard_server):
    from gradmesh.v1 import shard_pb2, shard_pb2_grpc
    from gradmesh.wire.errors import from_rpc_error

    running, _ = shard_server
    with grpc.insecure_channel(running.address) as channel:
        stub = shard_pb2_grpc.ParameterShardStub(channel)
        with pytest.raises(grpc.RpcError) as e:
            stub.Apply(shard_pb2.ApplyRequest(job_id="missing", step_id=1), timeout=10)
        err = from_rpc_error(e.value)
        assert (err.code, err.field) == (grpc.StatusCode.NOT_FOUND, "job_id")
        # A stream that starts with a chunk instead of the header.
        frames = [shard_pb2.ShardFrame(chunk={"tensor_index": 0, "data": b"x"})]
        with pytest.raises(grpc.RpcError) as e:
            stub.PushGradients(iter(frames), timeout=10)
        err = from_rpc_error(e.value)
        assert (err.code, err.field) == (grpc.StatusCode.INVALID_ARGUMENT, "push")
        # A header whose data length lies: rejected, and the server stays up.
        load = shard_pb2.LoadRequest(job_id="j2", optimizer={"name": "sgd"})
        t = load.parameters.add(name="w").tensor
        t.dtype, t.shape[:] = 1, [4]
        frames = [
            shard_pb2.ShardFrame(load=load),
            shard_pb2.ShardFrame(chunk={"tensor_index": 0, "data": b"abc"}),
        ]
        with pytest.raises(grpc.RpcError) as e:
            stub.Load(iter(frames), timeout=10)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        bad_opt = shard_pb2.LoadRequest(job_id="j3", optimizer={"name": "sgd", "beta1": 0.5})
        with pytest.raises(grpc.RpcError) as e:
            stub.Load(iter([shard_pb2.ShardFrame(load=bad_opt)]), timeout=10)
        err = from_rpc_error(e.value)
        assert (err.code, err.field) == (grpc.StatusCode.INVALID_ARGUMENT, "optimizer")
        assert stub.Status(shard_pb2.ShardStatusRequest(), timeout=10).jobs is not None


def test_push_headers_are_checked_against_the_job_before_allocating(shard_server):
    """A push header that promises 1 GiB for a 3 x 4 parameter is refused from the header
    (INVALID_ARGUMENT naming the gradient) before any byte is allocated for it. Found by
    tests/services/test_fuzz.py: the shard allocated what the header said (up to its 16 GiB
    stream limit) before comparing it with the job."""
    import tracemalloc

    from gradmesh.v1 import shard_pb2, shard_pb2_grpc, tensor_pb2

    running, store = shard_server
    store.load("pre", _params(), SGD)
    header = shard_pb2.PushGradientsRequest(job_id="pre", step_id=1, micro_batches=1)
    header.gradients.add(
        name="w", tensor=tensor_pb2.Tensor(dtype=tensor_pb2.FLOAT32, shape=[1 << 28])
    )
    with grpc.insecure_channel(running.address) as channel:
        stub = shard_pb2_grpc.ParameterShardStub(channel)
        tracemalloc.start()
        try:
            with pytest.raises(grpc.RpcError) as e:
                stub.PushGradients(iter([shard_pb2.ShardFrame(push=header)]), timeout=10)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "gradients[w]" in str(e.value.trailing_metadata()) or "shape" in e.value.details()
    assert peak < 64 << 20


def test_a_full_disk_at_a_checkpoint_still_applies_and_keeps_the_step(tmp_path, monkeypatch):
    from gradmesh.server import checkpoint

    params = _params()
    store = ShardStore(str(tmp_path), checkpoint_every=1)
    store.load("j", params, SGD)
    real = checkpoint.save

    def full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, "save", full)
    _train(store, "j", 3)  # every checkpoint fails
    monkeypatch.setattr(checkpoint, "save", real)
    restarted = ShardStore(str(tmp_path))
    assert restarted.jobs["j"].version == 3
    assert np.array_equal(restarted.jobs["j"].params["w"], _reference(params, 3, SGD)["w"])
