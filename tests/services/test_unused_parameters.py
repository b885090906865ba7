"""A parameter the loss does not use: PyTorch leaves its ``.grad`` None and its optimizers
skip it (no weight decay, no momentum, no Adam step). The worker lists such parameters in
ComputeGradientsResponse.unused_parameters, the SDK's ``backward`` leaves their ``.grad``
None, and a coordinator's shards do not update them; compared with torch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import gradmesh.core as gm
import gradmesh.core.nn.functional as F
from gradmesh.client import CoordinatorClient, WorkerClient
from gradmesh.server import coordinator as coordinator_mod


class TwoHeads(gm.nn.Module):
    """``a`` feeds the loss; ``b`` is computed and detached, or not used at all."""

    def __init__(self, detach: bool):
        super().__init__()
        self.a = gm.nn.Linear(4, 3)
        self.b = gm.nn.Linear(4, 3)
        self.detach = detach

    def forward(self, x):
        out = self.a(x)
        return out + self.b(x).detach() if self.detach else out


class TorchTwoHeads(torch.nn.Module):
    def __init__(self, model: TwoHeads):
        super().__init__()
        self.a, self.b, self.detach = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3), model.detach
        with torch.no_grad():
            for name, p in self.named_parameters():
                p.copy_(
                    torch.from_numpy(
                        np.array(dict(model.named_parameters())[name].detach().numpy())
                    )
                )

    def forward(self, x):
        out = self.a(x)
        return out + self.b(x).detach() if self.detach else out


def _loss(model, x, y):
    return F.cross_entropy(model(x), y)


def _batch(n=8, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, 4)).astype(np.float32), rng.integers(0, 3, n).astype(np.int64)


TRANSPORTS = {
    "unary": {"shared_memory": False},
    "stream": {"shared_memory": False, "stream_threshold": 1},
    "shared": {"shared_memory_min_bytes": 0},
}


@pytest.mark.parametrize("transport", sorted(TRANSPORTS))
@pytest.mark.parametrize("detach", [False, True], ids=["unused", "detached"])
def test_backward_leaves_grad_none_like_torch(worker, detach, transport):
    gm.manual_seed(0)
    model = TwoHeads(detach)
    reference = TorchTwoHeads(model)
    x, y = _batch()
    torch.nn.functional.cross_entropy(
        reference(torch.from_numpy(x)), torch.from_numpy(y)
    ).backward()
    with WorkerClient(worker.address, **TRANSPORTS[transport]) as client:
        result = client.compute_gradients(_loss, model, gm.tensor(x), gm.tensor(y))
        assert sorted(result.unused_parameters) == ["b.bias", "b.weight"]
        assert result.timings["streamed"] == (transport == "stream")
        assert result.timings["shared_memory"] == (transport == "shared")
        client.backward(model, _loss, gm.tensor(x), gm.tensor(y))
    for name, p in model.named_parameters():
        want = dict(reference.named_parameters())[name].grad
        if want is None:
            assert p.grad is None, name
        else:
            np.testing.assert_allclose(p.grad.numpy(), want.numpy(), rtol=1e-5, atol=1e-6)


def test_a_job_skips_unused_parameters_like_torch_optim(worker):
    gm.manual_seed(1)
    model = TwoHeads(detach=False)
    reference = TorchTwoHeads(model)
    hyper = {"lr": 0.05, "weight_decay": 0.1, "betas": (0.9, 0.999), "eps": 1e-8}
    opt = torch.optim.AdamW(reference.parameters(), **hyper)
    batches = [_batch(seed=s) for s in range(3)]
    server = coordinator_mod.start(workers=[worker.address])
    try:
        with CoordinatorClient(server.address, retry_seconds=0.0) as client:
            job = client.create_job(
                model, _loss, {"name": "adamw", **hyper}, 4, batches[0], data_names=["x", "y"]
            )
            for x, y in batches:
                job.step(x, y)
                opt.zero_grad(set_to_none=True)
                loss = torch.nn.functional.cross_entropy(
                    reference(torch.from_numpy(x)), torch.from_numpy(y)
                )
                loss.backward()
                opt.step()
            got = {n: t.numpy() for n, t in job.parameters().items()}
    finally:
        server.stop(0)
        server.coordinator.close()
    initial = {n: p.detach().numpy().copy() for n, p in model.named_parameters()}
    for name, p in reference.named_parameters():
        if name.startswith("b."):
            # torch skipped it (grad None): not even weight decay moved it.
            assert np.array_equal(p.detach().numpy(), initial[name])
            assert np.array_equal(got[name], initial[name]), name
        else:
            assert not np.array_equal(got[name], initial[name])
            np.testing.assert_allclose(got[name], p.detach().numpy(), rtol=1e-4, atol=1e-5)
    assert not any(id(p) in opt.state for p in reference.b.parameters())


def test_the_step_log_replays_the_skip(tmp_path):
    """A shard that crashed after acknowledging steps with an unused parameter rebuilds
    the same bits from its step log: the parameter and its optimizer state untouched. A
    parameter unused in only some micro-batches is updated (torch sums the others)."""
    from gradmesh.server.shard_store import ShardStore

    rng = np.random.default_rng(0)
    params = {n: rng.standard_normal((3, 2)).astype(np.float32) for n in ("used", "unused")}
    params["partly"] = rng.standard_normal(4).astype(np.float32)
    adamw = {"name": "adamw", "lr": 0.1, "weight_decay": 0.1}
    store = ShardStore(str(tmp_path))
    store.load("j", params, adamw)
    for step in (1, 2):
        for m in range(2):
            grads = {n: rng.standard_normal(p.shape).astype(np.float32) for n, p in params.items()}
            grads["unused"][...] = 0
            unused = ["unused"] + (["partly"] if m == 0 else [])
            store.push("j", step, m, 2, step - 1, grads, unused=unused)
        store.apply("j", step, 2, step - 1)
    job = store.jobs["j"]
    assert np.array_equal(job.params["unused"], params["unused"]) and job.state["unused"] == {}
    assert not np.array_equal(job.params["partly"], params["partly"])
    restarted = ShardStore(str(tmp_path)).jobs["j"]  # no checkpoint: the log is replayed
    assert restarted.version == 2
    for n in params:
        assert np.array_equal(restarted.params[n], job.params[n]), n
