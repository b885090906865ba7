"""The same-host transport's threat model (docs/worker.md, "Same-host transport"):

* another local user can neither make a worker (running as the victim's user) read the
  victim's segments into a reply nor write gradients over them, nor open them itself;
* a client that truncates its own segment during a call cannot crash the worker;
* a worker restarted on the same address serves the job again on the shared-memory path.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import threading
import time

import grpc
import numpy as np
import pytest
from models import classification_batch, cross_entropy, mlp

import gradmesh.core as gm
from gradmesh.client import CoordinatorClient, WorkerClient
from gradmesh.core import graph as core_graph
from gradmesh.core import serialize, sharedmem
from gradmesh.server import coordinator as coordinator_mod
from gradmesh.server import worker as worker_mod
from gradmesh.v1 import worker_pb2
from gradmesh.wire import sharedmem as wire_sharedmem
from gradmesh.wire.worker import SERVICE_NAME, shared_request

pytestmark = pytest.mark.skipif(
    not wire_sharedmem.available(), reason="no memfd sealing and /proc here"
)

NOBODY = 65534


def _model():
    return mlp(20, 32, 10, seed=3)


_loss = cross_entropy


def _batch(n=16, seed=0):
    return classification_batch(n, 20, 10, seed)


def _params(model):
    return {n: p.detach().numpy() for n, p in model.named_parameters()}


def _data(req, x, y):
    req.data.add(name="x0").tensor.CopyFrom(serialize.to_proto(x))
    req.data.add(name="x1").tensor.CopyFrom(serialize.to_proto(y))


class _Victim:
    """A client's segments holding its parameters and (a sentinel pattern where) its
    gradients (go), and the requests that use them legitimately."""

    def __init__(self, model, graph_id, x, y):
        params = _params(model)
        self.pool = wire_sharedmem.Pool()
        self.pseg, self.poff = wire_sharedmem.place(self.pool, params)
        self.gseg, self.goff = wire_sharedmem.place(self.pool, params, write=False)
        self.gseg.buf[sharedmem.HEADER :] = b"\xa5" * (self.gseg.size - sharedmem.HEADER)
        self.before = (bytes(self.pseg.buf), bytes(self.gseg.buf))
        req = shared_request(params, self.pseg, self.poff, self.gseg, self.goff)
        req.graph_id = graph_id
        _data(req, x, y)
        self.request = req
        # What an attacker sends to read the parameters: the victim's segment and
        # offsets, gradients (functions of the parameters) back in the reply's bytes.
        read = worker_pb2.ComputeGradientsRequest()
        read.CopyFrom(req)
        read.shared_memory.ClearField("gradient_segment")
        read.shared_memory.ClearField("gradient_offsets")
        self.read = read
        # ... and to write: its own parameters in bytes, the gradients into the victim's
        # gradient segment.
        write = worker_pb2.ComputeGradientsRequest(graph_id=graph_id)
        for n, a in params.items():
            write.parameters.add(name=n).tensor.CopyFrom(serialize.to_proto(a * 7))
        _data(write, x, y)
        write.shared_memory.gradient_segment = self.gseg.name
        write.shared_memory.gradient_offsets.update(self.goff)
        self.write = write

    def unchanged(self) -> bool:
        return (bytes(self.pseg.buf), bytes(self.gseg.buf)) == self.before

    def close(self):
        self.pseg.close()
        self.gseg.close()
        self.pool.close()


def _pid_fd(name: str) -> tuple[int, int]:
    _, pid, fd, _ = name.split("-")
    return int(pid), int(fd)


# Runs as another local user: imports first (the interpreter's files may not be readable
# by that user), then drops root's ids, then tries.
_ATTACKER = r"""
import errno, json, os, secrets, sys
import grpc
from grpc import _channel  # grpc imports it on the first channel: after the ids drop
from gradmesh.v1 import worker_pb2
args = json.loads(sys.stdin.read())
os.setgroups([])
os.setgid(args["uid"])
os.setuid(args["uid"])
out = {"uid": os.getuid()}
for key, (pid, fd) in args["paths"].items():
    for mode in (os.O_RDONLY, os.O_RDWR, os.O_PATH):
        try:
            os.close(os.open(f"/proc/{pid}/fd/{fd}", mode))
            out[f"open {key} {mode}"] = "opened"
        except OSError as e:
            out[f"open {key} {mode}"] = errno.errorcode[e.errno]
channel = grpc.insecure_channel(args["address"])
call = channel.unary_unary(args["method"], request_serializer=lambda b: b,
                           response_deserializer=worker_pb2.ComputeGradientsResponse.FromString)
for key, (template, field, pid, fd, secret) in args["attacks"].items():
    names = {"a wrong secret": f"gradmesh-{pid}-{fd}-{secrets.token_hex(16)}",
             "the old name": f"gradmesh-{pid}-{secrets.token_hex(16)}",
             "another descriptor": f"gradmesh-{pid}-{fd + 1}-{secrets.token_hex(16)}"}
    if secret:
        names = {"the right name (control)": f"gradmesh-{pid}-{fd}-{secret}"}
    for how, name in names.items():
        req = worker_pb2.ComputeGradientsRequest.FromString(bytes.fromhex(template))
        setattr(req.shared_memory, field, name)
        try:
            resp = call(req.SerializeToString(), timeout=30)
            out[f"{key}, {how}"] = ["OK", resp.loss.data.hex()]
        except grpc.RpcError as e:
            out[f"{key}, {how}"] = [e.code().name, e.details()]
print(json.dumps(out))
"""


def _as_another_user(payload: dict) -> dict:
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", _ATTACKER],
        input=json.dumps(payload),
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() != 0, reason="changing to another user needs root"
)
def test_another_local_user_cannot_use_or_open_a_victims_segments(worker):
    """The worker runs as the victim (this process's user). A second local user knows the
    victim's process id and can guess its descriptors, but not the secret: naming the
    victim's segments with a wrong secret, another descriptor, or as the files in /dev/shm
    of earlier versions gets FAILED_PRECONDITION, and the victim's bytes are unchanged.
    The same request with the full name (the control) does reach the segment: the secret is
    what keeps the other user out. Opening /proc/<pid>/fd/<fd> itself is refused."""
    model = _model()
    x, y = _batch()
    graph_id = worker.worker.register(core_graph.trace(_loss, model, x, y))
    victim = _Victim(model, graph_id, x, y)
    decoy = _Victim(_model(), graph_id, x, y)  # for the control, with the secret told
    try:
        # The victim's own requests work, and give the reference loss.
        mine = worker_pb2.ComputeGradientsResponse.FromString(
            _call(worker, victim.read.SerializeToString())
        )
        victim.gseg.buf[sharedmem.HEADER :] = b"\xa5" * (victim.gseg.size - sharedmem.HEADER)
        assert victim.unchanged()

        def attack(req, field, seg, told=False):
            pid, fd = _pid_fd(seg.name)
            return [
                req.SerializeToString().hex(),
                field,
                pid,
                fd,
                seg.name.rsplit("-", 1)[1] if told else "",
            ]

        out = _as_another_user(
            {
                "uid": NOBODY,
                "address": worker.address,
                "method": f"/{SERVICE_NAME}/ComputeGradients",
                "paths": {
                    "parameters": _pid_fd(victim.pseg.name),
                    "gradients": _pid_fd(victim.gseg.name),
                },
                "attacks": {
                    "read": attack(victim.read, "segment", victim.pseg),
                    "read kept": _kept(victim, graph_id, attack),
                    "write": attack(victim.write, "gradient_segment", victim.gseg),
                    "control read": attack(decoy.read, "segment", decoy.pseg, told=True),
                    "control write": attack(decoy.write, "gradient_segment", decoy.gseg, told=True),
                },
            }
        )
    finally:
        victim_unchanged = victim.unchanged()
        decoy_written = bytes(decoy.gseg.buf) != decoy.before[1]
        victim.close()
        decoy.close()
    assert out["uid"] == NOBODY
    opens = {k: v for k, v in out.items() if k.startswith("open")}
    assert len(opens) == 6 and set(opens.values()) == {"EACCES"}, opens
    attacks = {k: v for k, v in out.items() if not k.startswith(("open", "uid", "control"))}
    assert len(attacks) == 9
    for key, (code, details) in attacks.items():
        assert code == "FAILED_PRECONDITION", (key, code, details)
        assert victim.pseg.name.rsplit("-", 1)[1] not in details
    # One message for every segment refused whatever the reason (the old names get their
    # own: they are refused before any file is looked at).
    assert len({d for k, (c, d) in attacks.items() if "old name" not in k}) == 1
    assert victim_unchanged
    assert out["control read, the right name (control)"][0] == "OK"
    assert out["control write, the right name (control)"][0] == "OK"
    assert decoy_written  # the control did write
    assert mine.loss.data  # (the victim's own call)


def _kept(victim, graph_id, attack):
    """A read of the victim's parameters as a parameter_segment (Module.share_memory())."""
    req = worker_pb2.ComputeGradientsRequest()
    req.CopyFrom(victim.read)
    shm = req.shared_memory
    shm.parameter_segment = victim.pseg.name
    shm.segment = ""
    return attack(req, "parameter_segment", victim.pseg)


def _call(worker, message: bytes) -> bytes:
    channel = grpc.insecure_channel(worker.address)
    try:
        return channel.unary_unary(f"/{SERVICE_NAME}/ComputeGradients")(message, timeout=30)
    finally:
        channel.close()


# ------------------------------------------------------------------ SIGBUS ---------------

_WORKER = (
    "import sys; from gradmesh.server import worker; w = worker.start('cpu'); "
    "print(w.address, flush=True); sys.stdin.read()"
)


@pytest.fixture
def worker_process():
    """A worker in a process of its own: a crash would end it, not the tests."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _WORKER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    address = proc.stdout.readline().strip()
    yield proc, address
    proc.stdin.close()
    proc.wait(30)


def test_a_client_truncating_its_segments_cannot_crash_the_worker(worker_process):
    """Segments are sealed: truncating one fails (EPERM), for its creator too, so calls
    during truncation attempts all succeed. A hand-made memory file with the right header
    and secret but no seals (one a client could truncate under the worker's mapping, which
    would be SIGBUS) is refused before it is mapped. The worker answers throughout."""
    proc, address = worker_process
    model = _model()
    x, y = _batch()
    with WorkerClient(address, shared_memory_min_bytes=0) as client:
        graph, graph_id = client.trace(_loss, model, x, y)
        client.register_graph(graph)
    mine = _Victim(model, graph_id, x, y)
    errors, stop = [], threading.Event()

    def truncate():
        while not stop.is_set():
            for seg in (mine.pseg, mine.gseg):
                for size in (0, sharedmem.HEADER, seg.size * 2):
                    try:
                        os.ftruncate(seg.fd, size)
                        errors.append("truncated")
                    except PermissionError:
                        errors.append("EPERM")
            time.sleep(0.001)

    channel = grpc.insecure_channel(address)
    call = channel.unary_unary(
        f"/{SERVICE_NAME}/ComputeGradients",
        response_deserializer=worker_pb2.ComputeGradientsResponse.FromString,
    )
    hammer = threading.Thread(target=truncate)
    hammer.start()
    try:
        for _ in range(20):
            assert call(mine.request.SerializeToString(), timeout=30).gradients_in_shared_memory
    finally:
        stop.set()
        hammer.join()
    assert errors and set(errors) == {"EPERM"}
    assert os.fstat(mine.pseg.fd).st_size == mine.pseg.size

    # An unsealed memory file dressed as a segment: the right header, the right secret.
    params = _params(model)
    offsets, size = sharedmem.layout((n, a.nbytes) for n, a in params.items())
    secret = secrets.token_bytes(16)
    fd = os.memfd_create("gradmesh", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size)
        os.pwrite(fd, sharedmem.MAGIC + secret, 0)
        for n, a in params.items():
            os.pwrite(fd, a.tobytes(), offsets[n])
        req = worker_pb2.ComputeGradientsRequest()
        req.CopyFrom(mine.read)
        req.shared_memory.segment = f"gradmesh-{os.getpid()}-{fd}-{secret.hex()}"
        req.shared_memory.parameter_offsets.update(offsets)
        stop.clear()

        def shrink_and_grow():
            while not stop.is_set():
                os.ftruncate(fd, 0)
                os.ftruncate(fd, size)
                os.pwrite(fd, sharedmem.MAGIC + secret, 0)

        churn = threading.Thread(target=shrink_and_grow)
        churn.start()
        try:
            for _ in range(20):
                with pytest.raises(grpc.RpcError) as e:
                    call(req.SerializeToString(), timeout=30)
                assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        finally:
            stop.set()
            churn.join()
    finally:
        os.close(fd)
    assert call(mine.request.SerializeToString(), timeout=30).gradients_in_shared_memory
    channel.close()
    mine.close()
    assert proc.poll() is None  # alive


# ------------------------------------------------------------------ restarts -------------


def test_a_worker_restarted_on_the_same_port_serves_a_client_again():
    """The restarted worker knows no graph: the client's next shared-memory call gets
    NOT_FOUND, registers the graph again, and goes on through shared memory."""
    model = _model()
    x, y = _batch(32)
    w = worker_mod.start("cpu")
    port = w.port
    try:
        with WorkerClient(w.address, shared_memory_min_bytes=0) as client:
            first = client.compute_gradients(_loss, model, x, y)
            assert first.timings["shared_memory"] == 1.0
            first = {n: g.copy() for n, g in first.gradients.items()}
            for _ in range(2):
                w.stop(0)
                w = worker_mod.start("cpu", port=port)
                assert len(w.worker.segments) == 0
                again = client.compute_gradients(_loss, model, x, y)
                assert again.timings["shared_memory"] == 1.0
                assert len(w.worker.segments) == 2
                for n, g in first.items():
                    assert np.array_equal(again.gradients[n], g), n
    finally:
        w.stop(0)


def _train(workers, restart=None, steps=4):
    server = coordinator_mod.start(workers=[w.address for w in workers])
    try:
        with CoordinatorClient(server.address) as client:
            model = _model()
            job = client.create_job(
                model,
                _loss,
                gm.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
                micro_batch_size=8,
                example_batch=_batch(20),
            )
            for s in range(steps):
                if restart is not None and s in (1, 3):
                    restart()
                job.step(*_batch(20, seed=s))
            return job.parameters()
    finally:
        server.stop(0)


def test_a_worker_restarted_on_the_same_port_serves_a_coordinators_job_again():
    """A coordinator's job over shared memory survives its worker restarting on the same
    address between steps (twice), with the same bits as without the restarts, and the
    restarted worker is reached through shared memory again."""
    reference = worker_mod.start("cpu")
    try:
        plain = _train([reference])
    finally:
        reference.stop(0)
    workers = [worker_mod.start("cpu")]
    port = workers[0].port
    mapped = []

    def restart():
        workers[0].stop(0)
        workers[0] = worker_mod.start("cpu", port=port)

    try:
        restarted = _train(workers, restart)
        mapped.append(len(workers[0].worker.segments))
    finally:
        workers[0].stop(0)
    assert mapped[0] > 0  # shared memory, after restarts
    for name in plain:
        assert np.array_equal(restarted[name], plain[name]), name
