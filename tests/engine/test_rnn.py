"""nn.RNN and nn.RNNCell against torch's, with the same weights: outputs, h_n and the
gradients of the input, h0 and every parameter (float64 and float32), unbatched inputs, a
few SGD steps, errors, and the traced graph's compiled plan against local ``backward()``."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import gradmesh.core as gm
from gradmesh.core.graph import trace, validate
from gradmesh.core.plan import compile_plan

torch.set_num_threads(1)

TOL = {"float64": 1e-10, "float32": 2e-5}


def pair(cls: str, dtype: str, *args, **kw):
    """The torch module (seeded) and the gradmesh one with its weights, both in ``dtype``."""
    torch.manual_seed(0)
    theirs = getattr(torch.nn, cls)(*args, **kw).to(getattr(torch, dtype))
    ours = getattr(gm.nn, cls)(*args, **kw).to(getattr(gm, dtype))
    ours.load_state_dict({k: gm.tensor(v.detach().numpy()) for k, v in theirs.state_dict().items()})
    return ours, theirs


def inputs(dtype: str, *shapes):
    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal(s).astype(dtype) for s in shapes]
    return (
        [gm.tensor(a, requires_grad=True) for a in arrays],
        [torch.tensor(a, requires_grad=True) for a in arrays],
    )


def close(ours, theirs, dtype):
    tol = TOL[dtype]
    np.testing.assert_allclose(ours.detach().numpy(), theirs.detach().numpy(), rtol=tol, atol=tol)


def check_outputs_and_grads(ours, theirs, outs, wants, xs, ts, dtype):
    """Every output close, then the gradients of ``sum_i sum(out_i * w_i)`` for the inputs
    and every parameter (by name)."""
    rng = np.random.default_rng(1)
    loss, want_loss = 0, 0
    for out, want in zip(outs, wants):
        assert out.dtype is getattr(gm, dtype)
        close(out, want, dtype)
        w = rng.standard_normal(tuple(out.shape)).astype(dtype)
        loss = loss + (out * gm.tensor(w)).sum()
        want_loss = want_loss + (want * torch.tensor(w)).sum()
    loss.backward()
    want_loss.backward()
    for x, t in zip(xs, ts):
        close(x.grad, t.grad, dtype)
    theirs_params = dict(theirs.named_parameters())
    names = [n for n, _ in ours.named_parameters()]
    assert names == list(theirs_params)
    for name, p in ours.named_parameters():
        close(p.grad, theirs_params[name].grad, dtype)


# ------------------------------------------------------------------------------ RNN ----

CASES = [
    dict(),
    dict(nonlinearity="relu"),
    dict(num_layers=2),
    dict(num_layers=2, nonlinearity="relu", bias=False),
    dict(bidirectional=True),
    dict(num_layers=2, bidirectional=True, batch_first=True),
    dict(num_layers=2, bidirectional=True, nonlinearity="relu", batch_first=True),
]


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("kw", CASES, ids=str)
@pytest.mark.parametrize("initial", [False, True])
def test_rnn_matches_torch(dtype, kw, initial):
    ours, theirs = pair("RNN", dtype, 3, 4, **kw)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert repr(ours) == repr(theirs)
    n, length = 2, 5
    states = kw.get("num_layers", 1) * (2 if kw.get("bidirectional") else 1)
    shapes = [(n, length, 3) if kw.get("batch_first") else (length, n, 3)]
    shapes += [(states, n, 4)] if initial else []
    xs, ts = inputs(dtype, *shapes)
    outs = ours(*xs)
    wants = theirs(*ts)
    check_outputs_and_grads(ours, theirs, outs, wants, xs, ts, dtype)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("initial", [False, True])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_rnn_unbatched_matches_torch(dtype, initial, bidirectional):
    ours, theirs = pair("RNN", dtype, 3, 4, 2, "relu", bidirectional=bidirectional)
    states = 4 if bidirectional else 2
    xs, ts = inputs(dtype, (5, 3), *([(states, 4)] if initial else []))
    outs, wants = ours(*xs), theirs(*ts)
    assert outs[0].shape == (5, 4 * (2 if bidirectional else 1)) and outs[1].shape == (states, 4)
    check_outputs_and_grads(ours, theirs, outs, wants, xs, ts, dtype)


def test_rnn_parameters_follow_torch_initialisation():
    gm.manual_seed(0)
    rnn = gm.nn.RNN(3, 16, num_layers=2, bidirectional=True)
    bound = 1 / math.sqrt(16)
    values = np.concatenate([p.detach().numpy().ravel() for p in rnn.parameters()])
    assert np.abs(values).max() <= bound and np.abs(values).max() > 0.99 * bound
    assert abs(values.mean()) < 0.05 * bound
    assert abs(values.std() / (bound / math.sqrt(3)) - 1) < 0.05  # U(-b, b) has std b/sqrt(3)
    assert rnn.weight_ih_l1_reverse.shape == (16, 32)
    assert rnn.weight_hh_l0.shape == (16, 16) and rnn.bias_hh_l1.shape == (16,)


def test_rnn_of_one_step_gives_weight_hh_a_zero_gradient():
    rnn = gm.nn.RNN(3, 4)
    rnn(gm.randn(1, 2, 3))[0].sum().backward()
    assert rnn.weight_hh_l0.grad is not None and not rnn.weight_hh_l0.grad.numpy().any()


def test_rnn_dropout_between_layers_only_in_training():
    gm.manual_seed(0)
    rnn = gm.nn.RNN(3, 4, num_layers=2, dropout=0.5).double()
    x = gm.randn(5, 2, 3, dtype=gm.float64)
    assert not gm.equal(rnn(x)[0], rnn(x)[0])
    rnn.eval()
    assert gm.equal(rnn(x)[0], rnn(x)[0])


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_sgd_steps_follow_torchs_trajectory(dtype):
    ours, theirs = pair("RNN", dtype, 3, 4, 2, "tanh", batch_first=True)
    head = torch.nn.Linear(4, 1).to(getattr(torch, dtype))
    our_head = gm.nn.Linear(4, 1).to(getattr(gm, dtype))
    our_head.load_state_dict(
        {k: gm.tensor(v.detach().numpy()) for k, v in head.state_dict().items()}
    )
    opt = torch.optim.SGD([*theirs.parameters(), *head.parameters()], lr=0.1, momentum=0.9)
    our_opt = gm.optim.SGD([*ours.parameters(), *our_head.parameters()], lr=0.1, momentum=0.9)
    rng = np.random.default_rng(3)
    for _ in range(5):
        x = rng.standard_normal((4, 6, 3)).astype(dtype)
        y = rng.standard_normal((4, 1)).astype(dtype)
        for rnn, lin, optim, lib in ((theirs, head, opt, torch), (ours, our_head, our_opt, gm)):
            optim.zero_grad()
            out, h = rnn(lib.tensor(x))
            loss = ((lin(out[:, -1]) - lib.tensor(y)) ** 2).mean() + h.pow(2).mean()
            loss.backward()
            optim.step()
    for name, p in theirs.named_parameters():
        close(getattr(ours, name), p, dtype)


# -------------------------------------------------------------------------- RNNCell ----


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("initial", [True, False])
def test_rnn_cell_matches_torch(dtype, nonlinearity, batched, initial):
    ours, theirs = pair("RNNCell", dtype, 3, 4, batched, nonlinearity)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert repr(ours) == repr(theirs)
    lead = (2,) if batched else ()
    xs, ts = inputs(dtype, lead + (3,), *([lead + (4,)] if initial else []))
    out, want = ours(*xs), theirs(*ts)
    assert out.shape == want.shape
    check_outputs_and_grads(ours, theirs, [out], [want], xs, ts, dtype)


# --------------------------------------------------------------------------- errors ----


def test_errors_follow_torch():
    with pytest.raises(ValueError, match="Unknown nonlinearity 'sigmoid'. Select from"):
        gm.nn.RNN(3, 4, 1, "sigmoid")
    cell = gm.nn.RNNCell(3, 4, nonlinearity="sigmoid")  # torch refuses it only in forward
    with pytest.raises(RuntimeError, match="Unknown nonlinearity: sigmoid"):
        cell(gm.zeros(2, 3))
    with pytest.warns(UserWarning, match="non-zero dropout expects num_layers greater than 1"):
        gm.nn.RNN(3, 4, dropout=0.5)
    rnn = gm.nn.RNN(3, 4, num_layers=2)
    with pytest.raises(RuntimeError, match=r"expected input of shape \(L, N, 3\).*got \(5, 2, 4\)"):
        rnn(gm.zeros(5, 2, 4))
    with pytest.raises(RuntimeError, match=r"hidden state of shape \(2, 2, 4\), got \(1, 2, 4\)"):
        rnn(gm.zeros(5, 2, 3), gm.zeros(1, 2, 4))
    with pytest.raises(ValueError, match=r"RNNCell: expected input of shape \(N, 3\)"):
        gm.nn.RNNCell(3, 4)(gm.zeros(1, 2, 3))
    with pytest.raises(ValueError, match=r"RNNCell: expected hidden state of shape \(2, 4\)"):
        gm.nn.RNNCell(3, 4)(gm.zeros(2, 3), gm.zeros(3, 4))


# ---------------------------------------------------------------------- traced graph ----


class _Regressor(gm.nn.Module):
    """A bidirectional two-layer RNN over 3 steps of 2 features and an RNNCell on its last
    output, into a linear head."""

    def __init__(self):
        super().__init__()
        self.rnn = gm.nn.RNN(
            2, 4, num_layers=2, nonlinearity="relu", batch_first=True, bidirectional=True
        )
        self.cell = gm.nn.RNNCell(8, 3)
        self.head = gm.nn.Linear(3, 1)

    def forward(self, x):
        out, h = self.rnn(x.reshape(-1, 3, 2))
        return (self.head(self.cell(out[:, -1])) ** 2).mean() + h.mean()


def test_rnn_traces_and_the_plan_equals_local_backward():
    gm.manual_seed(0)
    model = _Regressor().double()
    vg = validate(trace(lambda m, x: m(x), model, np.ones((4, 6))))
    params = {k: p.detach().numpy() for k, p in model.named_parameters()}
    for n in (4, 7):
        x = np.random.default_rng(n).standard_normal((n, 6))
        result = compile_plan(vg, {"x0": x.shape}).run(params, {"x0": x})
        model.zero_grad()
        loss = model(gm.tensor(x))
        loss.backward()
        assert np.array_equal(result.loss, loss.detach().numpy())
        for name, p in model.named_parameters():
            assert np.array_equal(result.grads[name], p.grad.numpy()), (name, n)
