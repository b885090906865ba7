"""The coordinator service with real in-process servers on 127.0.0.1: jobs, idempotent
steps, bad input, worker failures and deadlines, fingerprints, registration, restarts."""

from __future__ import annotations

import threading

import grpc
import numpy as np
import pytest
from models import mlp

import gradmesh.core as gm
from gradmesh.client.coordinator import CoordinatorClient
from gradmesh.core import graph as core_graph
from gradmesh.core import serialize
from gradmesh.server import coordinator as coordinator_mod
from gradmesh.server import worker as worker_mod
from gradmesh.server.runtime import ServiceError
from gradmesh.v1 import coordinator_pb2, coordinator_pb2_grpc, shard_pb2
from gradmesh.wire.coordinator import WorkerRegistration
from gradmesh.wire.errors import GradmeshError

SGD = {"name": "sgd", "lr": 0.1, "momentum": 0.9}


def _model():
    return mlp(5, 8, 3, seed=0)


def _loss(model, x, y):
    logits = model(x)
    acc = (logits.argmax(dim=1) == y).float().mean()
    return gm.nn.functional.cross_entropy(logits, y), {"accuracy": acc, "logits": logits}


def _data(steps=6, batch=20):
    rng = np.random.default_rng(5)
    return [
        (
            rng.standard_normal((batch, 5)).astype(np.float32),
            rng.integers(0, 3, batch).astype(np.int64),
        )
        for _ in range(steps)
    ]


@pytest.fixture(scope="module")
def workers():
    # The coordinator is these workers' only peer, and the hung-worker test's double never
    # frees the slots of the calls it holds: let that one peer use every slot.
    started = [worker_mod.start("cpu", max_requests_per_peer=8) for _ in range(2)]
    yield started
    for w in started:
        w.stop(0)


@pytest.fixture
def coordinator(workers, request):
    """Factory: start(**kw) -> (server, client); everything stopped at teardown."""
    started = []

    def start(**kw):
        kw.setdefault("workers", [w.address for w in workers])
        server = coordinator_mod.start(**kw)
        client = CoordinatorClient(server.address, retry_seconds=0.0)
        started.append((server, client))
        return server, client

    yield start
    for server, client in started:
        client.close()
        server.stop(0)
        server.coordinator.close()


def _job(client, job_id="j", micro=8):
    data = _data()
    return client.create_job(
        _model(), _loss, SGD, micro, data[0], job_id=job_id, data_names=["x", "y"]
    ), data


def _params(job):
    return {n: t.numpy() for n, t in job.parameters().items()}


def _reference_params(coordinator, steps=6):
    _, client = coordinator()
    job, data = _job(client, "reference")
    for x, y in data[:steps]:
        job.step(x, y)
    return _params(job)


def test_step_reports_loss_metrics_and_timings(coordinator):
    _, client = coordinator()
    job, data = _job(client)
    r = job.step(*data[0])
    assert (r.step_id, r.version, r.batch_size, r.micro_batches) == (1, 1, 20, 3)
    assert np.isfinite(r.loss) and not r.replayed
    assert set(r.metrics) == {"accuracy"} and 0.0 <= r.metrics["accuracy"] <= 1.0
    assert r.timings["total"] >= r.timings["compute"] > 0
    status = job.status()
    assert (status.version, status.next_step_id, status.samples) == (1, 2, 20)
    assert list(status.data_inputs) == ["x", "y"] and list(status.metrics) == ["accuracy"]


def test_a_step_id_sent_twice_is_applied_once(coordinator):
    _, client = coordinator()
    job, data = _job(client)
    first = job.step(*data[0])
    after_one = _params(job)
    again = job.step(*data[0], step_id=1)  # the same batch: a replay
    assert again.replayed and again.loss == first.loss and again.version == 1
    with pytest.raises(GradmeshError) as e:  # another batch: refused, not replayed
        job.step(*data[1], step_id=1)
    assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION and e.value.field == "step_id"
    assert "step_id 1" in str(e.value) and "another batch" in str(e.value)
    assert all(np.array_equal(a, after_one[n]) for n, a in _params(job).items())
    assert job.status().version == 1
    assert job.step(*data[1]).step_id == 2


def test_create_job_is_idempotent_and_refuses_different_content(coordinator):
    _, client = coordinator()
    job, data = _job(client)
    job.step(*data[0])
    again, _ = _job(client)  # same id, same content
    assert again.job_id == job.job_id and again.status().version == 1
    with pytest.raises(GradmeshError) as e:
        client.create_job(
            _model(),
            _loss,
            {"name": "sgd", "lr": 0.5},
            8,
            data[0],
            job_id="j",
            data_names=["x", "y"],
        )
    assert e.value.code == grpc.StatusCode.ALREADY_EXISTS and e.value.field == "job_id"
    assert "optimizer" in str(e.value) and "initial parameters" not in str(e.value)
    other = _model()
    with gm.no_grad():
        next(iter(other.parameters())).mul_(2.0)
    with pytest.raises(GradmeshError) as e:  # other initial values: refused
        client.create_job(other, _loss, SGD, 8, data[0], job_id="j", data_names=["x", "y"])
    assert e.value.code == grpc.StatusCode.ALREADY_EXISTS and e.value.field == "job_id"
    assert "initial parameters" in str(e.value) and "graph" not in str(e.value)


def _dropout_loss(model, x, y):
    return gm.nn.functional.cross_entropy(gm.nn.functional.dropout(model(x), 0.5), y)


def test_two_identical_runs_without_a_job_id_give_the_same_bits(coordinator):
    """Dropout masks derive from the job id; without one it is a digest of the job's
    content, so a second run on a fresh coordinator draws the same masks."""
    runs = []
    for _ in range(2):
        _, client = coordinator()
        job = client.create_job(_model(), _dropout_loss, SGD, 8, _data()[0], data_names=["x", "y"])
        for x, y in _data()[:3]:
            job.step(x, y)
        runs.append((job.job_id, _params(job)))
    (id1, p1), (id2, p2) = runs
    assert id1 == id2 and id1.startswith("job-")
    assert all(np.array_equal(p1[n], p2[n]) for n in p1)
    _, client = coordinator()
    other = client.create_job(
        _model(), _dropout_loss, {"name": "sgd", "lr": 0.2}, 8, _data()[0], data_names=["x", "y"]
    )
    assert other.job_id != id1


def _raw_step(client, job_id, step_id, batch):
    req = coordinator_pb2.StepRequest(job_id=job_id, step_id=step_id)
    for name, a in batch.items():
        req.batch.add(name=name).tensor.CopyFrom(serialize.to_proto(a))
    with pytest.raises(grpc.RpcError) as e:
        client.stub.Step(req, timeout=30)
    from gradmesh.wire.errors import from_rpc_error

    err = from_rpc_error(e.value)
    return err.code.name, err.field


def test_bad_steps_get_the_right_status_and_field(coordinator):
    _, client = coordinator()
    job, data = _job(client)
    x, y = data[0]
    cases = [
        ("nope", 1, {"x": x, "y": y}, ("NOT_FOUND", "job_id")),
        ("j", 2, {"x": x, "y": y}, ("FAILED_PRECONDITION", "step_id")),
        ("j", 0, {"x": x, "y": y}, ("INVALID_ARGUMENT", "step_id")),
        ("j", 1, {"x": x}, ("INVALID_ARGUMENT", "batch")),
        ("j", 1, {"x": x, "y": y, "z": y}, ("INVALID_ARGUMENT", "batch[z]")),
        ("j", 1, {"x": x.astype(np.float64), "y": y}, ("INVALID_ARGUMENT", "batch[x]")),
        ("j", 1, {"x": x[:, :4], "y": y}, ("INVALID_ARGUMENT", "batch[x]")),
        ("j", 1, {"x": x, "y": y[:5]}, ("INVALID_ARGUMENT", "batch[y]")),
        ("j", 1, {"x": x[:0], "y": y[:0]}, ("INVALID_ARGUMENT", "batch[x]")),
    ]
    for job_id, step_id, batch, expected in cases:
        assert _raw_step(client, job_id, step_id, batch) == expected, (job_id, batch.keys())
    # Nothing was applied, and the server still serves.
    assert job.status().version == 0 and job.step(x, y).version == 1


def test_a_batch_the_workers_refuse_names_the_batch(coordinator):
    """A label out of range is only seen by the worker (a data-dependent check): the step
    fails with INVALID_ARGUMENT naming the batch, applies nothing, and the next step runs.
    Found by tests/services/test_fuzz.py: the coordinator passed the code on without a field."""
    _, client = coordinator()
    job, data = _job(client)
    x, y = data[0]
    bad_y = y.copy()
    bad_y[-1] = 7  # 3 classes
    assert _raw_step(client, "j", 1, {"x": x, "y": bad_y}) == ("INVALID_ARGUMENT", "batch")
    assert job.status().version == 0
    assert job.step(x, y, step_id=1).version == 1


def test_create_job_headers_are_checked_before_allocating(coordinator):
    """A CreateJob header that promises 1 GiB for a 3 x 2 parameter is refused from the
    header, before anything is allocated for its bytes. Found by tests/services/test_fuzz.py: the
    coordinator allocated what the header said (up to 16 GiB) before checking the graph."""
    import tracemalloc

    from test_fuzz import hand_graph

    from gradmesh.wire.shard import stream_frames

    server, client = coordinator()
    header = coordinator_pb2.CreateJobRequest(
        job_id="big",
        graph=hand_graph(),
        micro_batch_size=1,
        optimizer=shard_pb2.Optimizer(name="sgd"),
    )
    header.parameters.add(name="w").tensor.CopyFrom(
        serialize.to_proto(np.zeros(0, np.float32), data=False)
    )
    header.parameters[0].tensor.shape[:] = [1 << 14, 1 << 14]
    tracemalloc.start()
    try:
        with pytest.raises(grpc.RpcError) as e:
            client.stub.CreateJob(
                stream_frames(coordinator_pb2.CoordinatorFrame, "create_job", header, []),
                timeout=30,
            )
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    from gradmesh.wire.errors import from_rpc_error

    err = from_rpc_error(e.value)
    assert (err.code, err.field) == (grpc.StatusCode.INVALID_ARGUMENT, "parameters[w]")
    assert peak < 64 << 20 and server.coordinator.jobs == {}


def test_a_failed_step_leaves_no_gradients_behind(coordinator):
    _, client = coordinator()
    job, data = _job(client)  # 20 rows, micro-batches of 8: 3
    x, y = data[0]
    bad_y = y.copy()
    bad_y[-1] = 7  # only the last micro-batch fails
    assert _raw_step(client, "j", 1, {"x": x, "y": bad_y}) == ("INVALID_ARGUMENT", "batch")
    job.step(*data[1], step_id=1)  # step 1 again, on another batch
    _, ref_client = coordinator()
    ref, _ = _job(ref_client, "ref")
    ref.step(*data[1])
    mine, theirs = _params(job), _params(ref)
    assert all(np.array_equal(mine[n], theirs[n]) for n in mine)


def test_bad_jobs_get_the_right_status_and_field(coordinator):
    server, client = coordinator()
    model, data = _model(), _data()
    graph = core_graph.trace(lambda m, x, y: _loss(m, x, y), model, *data[0], data_names=["x", "y"])
    params = {n: p.detach().numpy() for n, p in model.named_parameters()}
    fixed = core_graph.trace(
        lambda m, x, y: _loss(m, x, y), model, *data[0], data_names=["x", "y"], batch_dim=False
    )

    def create(graph=graph, params=params, optimizer=None, micro=4, job_id="k"):
        header = coordinator_pb2.CreateJobRequest(
            job_id=job_id, graph=graph, micro_batch_size=micro
        )
        header.optimizer.CopyFrom(optimizer or shard_pb2.Optimizer(name="sgd", lr=0.1))
        for n, a in params.items():
            header.parameters.add(name=n).tensor.CopyFrom(serialize.to_proto(a, data=False))
        from gradmesh.wire.shard import stream_frames

        frames = stream_frames(
            coordinator_pb2.CoordinatorFrame, "create_job", header, params.values()
        )
        with pytest.raises(grpc.RpcError) as e:
            client.stub.CreateJob(frames, timeout=30)
        from gradmesh.wire.errors import from_rpc_error

        err = from_rpc_error(e.value)
        return err.code.name, err.field

    assert create(micro=0) == ("INVALID_ARGUMENT", "micro_batch_size")
    assert create(job_id="a/b") == ("INVALID_ARGUMENT", "job_id")
    assert create(optimizer=shard_pb2.Optimizer(name="lbfgs")) == (
        "INVALID_ARGUMENT",
        "optimizer",
    )
    assert create(optimizer=shard_pb2.Optimizer(name="sgd", alpha=0.9)) == (
        "INVALID_ARGUMENT",
        "optimizer",
    )
    assert create(optimizer=shard_pb2.Optimizer(name="sgd", lr=-1.0)) == (
        "INVALID_ARGUMENT",
        "optimizer",
    )
    assert create(graph=fixed) == ("INVALID_ARGUMENT", "graph.inputs[4].shape")
    assert create(params={**params, "0.weight": params["0.weight"].T.copy()}) == (
        "INVALID_ARGUMENT",
        "parameters[0.weight]",
    )
    assert create(params={k: v for k, v in params.items() if k != "2.bias"}) == (
        "INVALID_ARGUMENT",
        "parameters",
    )
    broken = type(graph)()
    broken.CopyFrom(graph)
    broken.nodes[0].op = "no_such_op"
    assert create(graph=broken)[0] == "INVALID_ARGUMENT"
    assert create(graph=broken)[1].startswith("graph.nodes[0]")
    assert server.coordinator.jobs == {}


def test_get_parameters_by_name_and_errors(coordinator):
    _, client = coordinator(embedded_shards=2)
    job, data = _job(client)
    job.step(*data[0])
    version, some = client.get_parameters("j", ["2.bias"])
    assert version == 1 and list(some) == ["2.bias"] and some["2.bias"].shape == (3,)
    with pytest.raises(GradmeshError) as e:
        client.get_parameters("j", ["nope"])
    assert (e.value.code, e.value.field) == (grpc.StatusCode.INVALID_ARGUMENT, "names[0]")
    model = _model()
    model.load_state_dict(job.parameters())  # round-trips into a local model


class _Failing:
    """Wrap a worker's compute: fail (or hang) on chosen calls."""

    def __init__(self, worker, fail_calls=(), hang=False):
        self.inner = worker.worker.compute
        self.calls = 0
        self.fail_calls = set(fail_calls)
        self.hang = hang
        self.release = threading.Event()
        self.worker = worker
        worker.worker.compute = self

    def __call__(self, *args, **kw):
        self.calls += 1
        if self.hang:
            self.release.wait(60)
        if self.calls in self.fail_calls:
            raise ServiceError(grpc.StatusCode.UNAVAILABLE, "injected failure")
        return self.inner(*args, **kw)

    def restore(self):
        self.release.set()
        self.worker.worker.compute = self.inner


def test_failed_micro_batches_are_reassigned_bitwise_equal(coordinator, workers):
    reference = _reference_params(coordinator)
    flaky = _Failing(workers[0], fail_calls={1, 3, 4})
    try:
        _, client = coordinator()
        job, data = _job(client)
        reassigned = sum(job.step(x, y).timings["reassigned"] for x, y in data)
    finally:
        flaky.restore()
    assert reassigned >= 1
    assert all(np.array_equal(a, reference[n]) for n, a in _params(job).items())


def test_a_hung_worker_is_overtaken_after_the_deadline(coordinator, workers):
    reference = _reference_params(coordinator)
    hung = _Failing(workers[1], hang=True)
    try:
        _, client = coordinator(deadline=0.2)
        job, data = _job(client)
        reassigned = sum(job.step(x, y).timings["reassigned"] for x, y in data)
        params = _params(job)
    finally:
        hung.restore()
    assert reassigned >= 1
    assert all(np.array_equal(a, reference[n]) for n, a in params.items())


def test_no_worker_is_unavailable_and_changes_nothing(coordinator, workers):
    _, client = coordinator(workers=[])
    job, data = _job(client)
    with pytest.raises(GradmeshError) as e:
        job.step(*data[0])
    assert e.value.code == grpc.StatusCode.UNAVAILABLE
    assert job.status().version == 0
    # A worker that registers makes the retried step work.
    reg = WorkerRegistration(client.target, workers[0].address).start()
    try:
        assert job.step(*data[0], step_id=1).version == 1
        listed = client.list_workers()
        assert [(w.address, w.source, w.state) for w in listed] == [
            (workers[0].address, "registered", "ready")
        ]
    finally:
        reg.stop()
    stub = coordinator_pb2_grpc.CoordinatorStub(client._channel)
    assert not stub.Heartbeat(coordinator_pb2.HeartbeatRequest(worker_id="x"), timeout=10).known
    with pytest.raises(grpc.RpcError) as e:
        stub.RegisterWorker(coordinator_pb2.RegisterWorkerRequest(address="nohost"), timeout=10)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_a_worker_with_another_build_is_refused(coordinator, workers):
    odd = worker_mod.start("cpu")
    original = odd.worker.capabilities

    def capabilities():
        caps = original()
        caps.build_fingerprint = "some-other-build"
        return caps

    odd.worker.capabilities = capabilities
    try:
        _, client = coordinator(workers=[workers[0].address, odd.address])
        job, data = _job(client)
        job.step(*data[0])
        states = {w.address: (w.state, w.completed) for w in client.list_workers()}
        assert states[odd.address] == ("refused", 0)
        assert states[workers[0].address][0] == "ready"
        with pytest.raises(GradmeshError) as e:
            WorkerRegistration(client.target, odd.address).register()
        assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION
    finally:
        odd.stop(0)


def test_restart_continues_from_the_last_committed_step(coordinator, tmp_path):
    reference = _reference_params(coordinator)
    server, client = coordinator(state_dir=str(tmp_path), embedded_shards=2, checkpoint_every=100)
    job, data = _job(client)
    results = [job.step(x, y) for x, y in data[:3]]
    server.stop(0)
    server.coordinator.close()  # graceful: checkpoints everything
    server, client = coordinator(state_dir=str(tmp_path), embedded_shards=2, checkpoint_every=100)
    job = client.job("j")
    assert job.status().version == 3 and job.next_step_id == 4
    again = job.step(*data[2], step_id=3)  # a retry after the restart
    assert again.replayed and again.loss == results[2].loss
    for x, y in data[3:]:
        job.step(x, y)
    assert all(np.array_equal(a, reference[n]) for n, a in _params(job).items())


def test_a_crash_loses_no_acknowledged_step(coordinator, tmp_path):
    """Without a final checkpoint (a crash), the step logs of the coordinator and of its
    embedded shards bring back every step a client was told about, with its result."""
    reference = _reference_params(coordinator)
    server, client = coordinator(state_dir=str(tmp_path), checkpoint_every=2, embedded_shards=2)
    job, data = _job(client)
    results = [job.step(x, y) for x, y in data[:3]]
    server.stop(0)  # no close(): no final checkpoint
    server, client = coordinator(state_dir=str(tmp_path), checkpoint_every=2, embedded_shards=2)
    job = client.job("j")
    status = job.status()
    assert status.next_step_id == 4 and status.version == 3 and not status.error
    again = job.step(*data[2], step_id=3)
    assert again.replayed and again.loss == results[2].loss
    with pytest.raises(GradmeshError) as e:
        job.step(*data[4], step_id=5)
    assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION and "expects step 4" in str(e.value)
    for x, y in data[3:]:
        job.step(x, y)
    assert all(np.array_equal(a, reference[n]) for n, a in _params(job).items())


def test_streamed_worker_calls_give_the_same_bits(coordinator):
    reference = _reference_params(coordinator)
    # Under a 1 MiB message limit, without shared memory, every worker call goes over
    # ComputeGradientsStream.
    _, client = coordinator(max_message_bytes=1 << 20, shared_memory=False)
    job, data = _job(client)
    for x, y in data:
        job.step(x, y)
    assert all(np.array_equal(a, reference[n]) for n, a in _params(job).items())


class _FailAfterFirstGradient:
    """Wrap a worker's compute: on chosen calls, fail after the first gradient was handed to
    the early stream (the client has the header and some chunks when the error comes)."""

    def __init__(self, worker, fail_calls):
        self.inner = worker.worker.compute
        self.calls = 0
        self.fail_calls = set(fail_calls)
        self.worker = worker
        worker.worker.compute = self

    def __call__(self, *args, **kw):
        self.calls += 1
        on_grad = kw.get("on_grad")
        if self.calls in self.fail_calls and on_grad is not None:

            def failing(name, array):
                on_grad(name, array)
                raise ServiceError(grpc.StatusCode.UNAVAILABLE, "injected mid-stream failure")

            kw["on_grad"] = failing
        return self.inner(*args, **kw)

    def restore(self):
        self.worker.worker.compute = self.inner


def test_a_stream_that_fails_after_some_gradients_is_retried_bitwise_equal(coordinator, workers):
    reference = _reference_params(coordinator)
    flaky = _FailAfterFirstGradient(workers[0], fail_calls={1})
    try:
        # Every call streamed: a 1 MiB message limit, no shared memory.
        _, client = coordinator(max_message_bytes=1 << 20, shared_memory=False)
        job, data = _job(client)
        reassigned = sum(job.step(x, y).timings["reassigned"] for x, y in data)
    finally:
        flaky.restore()
    # The failed worker is set aside for a while; the other one takes its micro-batch.
    assert flaky.calls >= 1 and reassigned >= 1
    assert all(np.array_equal(a, reference[n]) for n, a in _params(job).items())


def test_streamed_calls_to_a_worker_without_early_gradients_give_the_same_bits(
    coordinator, workers, monkeypatch
):
    """A worker that predates stream_gradients_early ignores it and answers the classic way
    (header with timings first, gradients in the requested order, no trailing frame)."""
    reference = _reference_params(coordinator)
    seen = []
    inner = worker_mod.WorkerService.ComputeGradientsStream

    def classic(self, request_iterator, context):
        def frames():
            first = next(request_iterator)
            seen.append(first.request.stream_gradients_early)
            first.request.stream_gradients_early = False
            yield first
            yield from request_iterator

        return inner(self, frames(), context)

    monkeypatch.setattr(worker_mod.WorkerService, "ComputeGradientsStream", classic)
    old_worker = worker_mod.start("cpu")  # its handlers bind the patched method
    try:
        _, client = coordinator(
            max_message_bytes=1 << 20, workers=[old_worker.address], shared_memory=False
        )
        job, data = _job(client)
        timings = [job.step(x, y).timings for x, y in data]
        params = _params(job)
    finally:
        old_worker.stop(0)
    assert seen and all(seen)  # the coordinator asked for early gradients
    assert all(t["worker_compute"] > 0 for t in timings)
    assert all(np.array_equal(a, reference[n]) for n, a in params.items())


@pytest.mark.gpu
@pytest.mark.parametrize("shared_memory", [True, False])
def test_a_cuda_worker_trains_like_the_cpu_workers(coordinator, shared_memory):
    """Gradients computed on the device reach the shards through shared memory (copied from
    device arrays into the segment) or as bytes; either way training follows the CPU."""
    if not gm.cuda_available():
        pytest.skip("needs CuPy and a CUDA device")
    from gradmesh.server import runtime

    through_shm = runtime._get_metrics()["transport"].labels("shared_memory")
    reference = _reference_params(coordinator)
    cuda = worker_mod.start("cuda")
    try:
        _, client = coordinator(workers=[cuda.address], shared_memory=shared_memory)
        job, data = _job(client)
        before = through_shm._value.get()
        for x, y in data:
            job.step(x, y)
        assert (through_shm._value.get() > before) == shared_memory
        for n, a in _params(job).items():
            np.testing.assert_allclose(a, reference[n], rtol=1e-4, atol=1e-5, err_msg=n)
    finally:
        cuda.stop(0)


def _start_shard(state_dir, port=0):
    from gradmesh.server.runtime import ServerConfig
    from gradmesh.server.shard import serve_shard
    from gradmesh.server.shard_store import ShardStore

    running = serve_shard(ServerConfig(port=port), ShardStore(str(state_dir)))
    return running, running.address


def test_a_killed_shard_wedges_with_a_reason_and_recovers_when_it_is_back(coordinator, tmp_path):
    """A shard that dies (no checkpoint on the way out: its state is the last checkpoint
    plus its step log) fails steps with UNAVAILABLE and says why in JobStatus.error; back
    on the same address, then on another one, the job resumes where the client was told
    it is, bit for bit."""
    reference = _reference_params(coordinator)
    shards = [_start_shard(tmp_path / f"s{i}") for i in range(2)]
    addresses = [a for _, a in shards]
    kw = dict(state_dir=str(tmp_path / "c"), checkpoint_every=100)
    server, client = coordinator(shards=addresses, **kw)
    job, data = _job(client)
    for x, y in data[:3]:
        job.step(x, y)
    dead, _ = shards[1]
    dead.stop(0)  # a crash: nothing saved on the way out
    with pytest.raises(GradmeshError) as e:
        job.step(*data[3])
    assert e.value.code == grpc.StatusCode.UNAVAILABLE
    error = job.status().error
    assert addresses[1] in error and "shard 1" in error
    port = int(addresses[1].rsplit(":", 1)[1])
    back, _ = _start_shard(tmp_path / "s1", port)  # same address, state from its directory
    running = [shards[0][0], back]
    try:
        assert job.status().error == ""
        job.step(*data[3], step_id=4)
        # Another address: the coordinator is restarted with the new list.
        back.stop(0)
        moved, new_address = _start_shard(tmp_path / "s1")
        running.append(moved)
        server.stop(0)
        server.coordinator.close()
        server, client = coordinator(shards=[addresses[0], new_address], **kw)
        job = client.job("j")
        assert job.status().error == "" and job.next_step_id == 5
        for x, y in data[4:]:
            job.step(x, y)
        assert all(np.array_equal(a, reference[n]) for n, a in _params(job).items())
    finally:
        for r in running:
            r.stop(0)


def test_a_crash_between_the_shards_applies_completes_the_step_on_retry(coordinator, tmp_path):
    """The coordinator dies after shard 0 applied step 3 and before shard 1 did: after a
    restart step 3 is pinned to its batch (the log's intent record); shard 0 rebuilds
    version 2 from its checkpoint and log for the workers, and the retry applies step 3
    on shard 1 only."""
    reference = _reference_params(coordinator)
    kw = dict(state_dir=str(tmp_path), checkpoint_every=100, embedded_shards=2)
    server, client = coordinator(**kw)
    job, data = _job(client)
    for x, y in data[:2]:
        job.step(x, y)
    shard1 = server.coordinator.shards[1]

    def crash(*a, **k):
        raise ServiceError(grpc.StatusCode.UNAVAILABLE, "killed")

    shard1.apply = crash
    with pytest.raises(GradmeshError):
        job.step(*data[2])
    assert server.coordinator.shards[0].status("j") == (3, 3)
    assert shard1.status("j") == (2, 2)
    server.stop(0)  # no close(): a crash
    server, client = coordinator(**kw)
    job = client.job("j")
    assert job.next_step_id == 3 and job.status().error == ""
    with pytest.raises(GradmeshError) as e:  # not with another batch
        job.step(*data[3], step_id=3)
    assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION and e.value.field == "step_id"
    for x, y in data[2:]:
        job.step(x, y)
    assert all(np.array_equal(a, reference[n]) for n, a in _params(job).items())


def test_a_full_disk_at_a_checkpoint_loses_no_step(coordinator, tmp_path, monkeypatch):
    """Checkpoints that fail (ENOSPC) leave the previous one whole; the steps are in the
    step logs, so a crash afterwards still restores every acknowledged step."""
    from gradmesh.server import checkpoint

    reference = _reference_params(coordinator)
    kw = dict(state_dir=str(tmp_path), checkpoint_every=1, embedded_shards=2)
    server, client = coordinator(**kw)
    job, data = _job(client)
    job.step(*data[0])
    real = checkpoint.save

    def full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, "save", full)
    results = [job.step(x, y) for x, y in data[1:4]]
    assert [r.version for r in results] == [2, 3, 4]
    monkeypatch.setattr(checkpoint, "save", real)
    server.stop(0)  # a crash
    server, client = coordinator(**kw)
    job = client.job("j")
    assert job.status().version == 4 and job.step(*data[3], step_id=4).replayed
    for x, y in data[4:]:
        job.step(x, y)
    assert all(np.array_equal(a, reference[n]) for n, a in _params(job).items())


def test_a_shard_back_without_its_state_says_so(coordinator, tmp_path):
    shards = [_start_shard(tmp_path / f"s{i}") for i in range(2)]
    addresses = [a for _, a in shards]
    server, client = coordinator(shards=addresses, state_dir=str(tmp_path / "c"))
    job, data = _job(client)
    job.step(*data[0])
    shards[1][0].stop(0)
    port = int(addresses[1].rsplit(":", 1)[1])
    empty, _ = _start_shard(tmp_path / "empty", port)  # its state directory is lost
    try:
        with pytest.raises(GradmeshError) as e:
            job.step(*data[1])
        assert e.value.code == grpc.StatusCode.UNAVAILABLE
        error = job.status().error
        assert "shard 1" in error and "no state for the job" in error
    finally:
        empty.stop(0)
        shards[0][0].stop(0)


def test_a_full_disk_on_the_coordinators_step_log_applies_nothing(
    coordinator, tmp_path, monkeypatch
):
    reference = _reference_params(coordinator)
    server, client = coordinator(state_dir=str(tmp_path), checkpoint_every=100)
    job, data = _job(client)
    job.step(*data[0])
    log = server.coordinator.jobs["j"].log

    def full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(log, "append", full)
    with pytest.raises(GradmeshError) as e:  # the record before Apply fails
        job.step(*data[1], step_id=2)
    assert e.value.code == grpc.StatusCode.UNAVAILABLE and "step log" in str(e.value)
    assert job.status().version == 1
    monkeypatch.undo()
    for step_id, (x, y) in enumerate(data[1:], start=2):
        job.step(x, y, step_id=step_id)
    assert all(np.array_equal(a, reference[n]) for n, a in _params(job).items())


@pytest.mark.parametrize("disk_back", [True, False], ids=["disk-back", "crash-while-full"])
def test_a_full_disk_on_the_coordinators_step_log_after_apply_loses_no_step(
    coordinator, tmp_path, monkeypatch, disk_back
):
    """The step's result cannot be logged after the shards applied it: the client still
    gets its answer (the shards' logs hold the step), and the result is written before
    the next record. A crash while the disk is still full loses only that record: the
    step is pinned to its batch and the retried step id completes it, applied once."""
    reference = _reference_params(coordinator)
    kw = dict(state_dir=str(tmp_path), checkpoint_every=100, embedded_shards=2)
    server, client = coordinator(**kw)
    job, data = _job(client)
    job.step(*data[0])
    log = server.coordinator.jobs["j"].log
    real = log.append

    def full_after_apply(meta, arrays=None):
        if meta["kind"] == "done":
            raise OSError(28, "No space left on device")
        real(meta, arrays)

    monkeypatch.setattr(log, "append", full_after_apply)
    answered = job.step(*data[1])
    assert answered.version == 2 and not answered.replayed
    monkeypatch.undo()
    if disk_back:
        job.step(*data[2])  # writes step 2's result first, then step 3's records
    server.stop(0)  # a crash
    server, client = coordinator(**kw)
    job = client.job("j")
    again = job.step(*data[1], step_id=2)
    assert again.version == 2 and again.loss == answered.loss
    assert again.replayed == disk_back  # crashed while full: recomputed, applied once
    assert job.status().version == (3 if disk_back else 2)
    for x, y in data[(3 if disk_back else 2) :]:
        job.step(x, y)
    assert all(np.array_equal(a, reference[n]) for n, a in _params(job).items())
