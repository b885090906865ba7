"""``gradmesh.from_torch``: a model zoo written once in plain PyTorch, imported, and compared
with PyTorch's own forward and ``backward()``: locally, through a real worker, and after
training, back in the torch module through ``to_torch_state_dict``."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn as tnn
import torch.nn.functional as TF
from torch_zoo import BATCH, WIDTH, ZOO
from torch_zoo import batch as _batch
from torch_zoo import torch_model as _torch_model

import gradmesh
import gradmesh.core as gm
from gradmesh.client import WorkerClient
from gradmesh.client.importers import UnsupportedModelError
from gradmesh.client.importers.torch import supported_ops


@pytest.fixture(scope="module")
def _imports() -> dict:
    return {}


@pytest.fixture
def imported(_imports):
    """name -> (a fresh torch model, a fresh copy of its import): each model is exported
    once per module (an export takes about a second), and each test gets its own weights."""

    def get(name: str):
        if name not in _imports:
            _imports[name] = gradmesh.from_torch(_torch_model(name), _batch(name, BATCH)[0])
        return _torch_model(name), copy.deepcopy(_imports[name])

    return get


# ================================================================== losses ==============


def torch_loss(model, x, y):
    logits = model(x)
    return TF.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def gm_loss(model, x, y):
    logits = model(x)
    return gm.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def _gm(t: torch.Tensor) -> gm.Tensor:
    return gm.tensor(t.numpy())


def _torch_grads(model, x, y):
    model.zero_grad()
    loss = torch_loss(model, x, y)
    loss.backward()
    return loss.item(), {n: p.grad.numpy().copy() for n, p in model.named_parameters()}


def _gm_grads(model, x, y):
    model.zero_grad()
    loss = gm_loss(model, _gm(x), _gm(y))
    loss.backward()
    return loss.item(), {n: p.grad.numpy().copy() for n, p in model.named_parameters()}


def _assert_grads_close(ours: dict, theirs: dict) -> None:
    assert list(ours) == list(theirs)
    scale = max(float(np.abs(g).max()) for g in theirs.values())
    for name, expected in theirs.items():
        # rtol 1e-5 on what is not tiny next to the tensor's largest gradient; a gradient
        # that is zero in exact arithmetic (a conv bias before BatchNorm) is float32 noise
        # next to the model's largest.
        atol = 1e-5 * float(np.abs(expected).max()) + 1e-6 * scale
        np.testing.assert_allclose(ours[name], expected, rtol=1e-5, atol=atol, err_msg=name)


# =============================================================== names and values =======


@pytest.mark.parametrize("name", list(ZOO))
def test_names_and_values_are_torchs(imported, name):
    torch_model, model = imported(name)
    assert isinstance(model, gm.nn.Module)
    assert [n for n, _ in model.named_parameters()] == [
        n for n, _ in torch_model.named_parameters()
    ]
    assert [n for n, _ in model.named_buffers()] == [n for n, _ in torch_model.named_buffers()]
    ours, theirs = model.state_dict(), torch_model.state_dict()
    assert list(ours) == list(theirs)
    for key, value in theirs.items():
        assert np.array_equal(ours[key].numpy(), value.numpy()), key


def test_tied_weights_stay_one_parameter(imported):
    torch_model, model = imported("gpt")
    assert model.tok.weight is model.lm_head.weight
    assert "lm_head.weight" in model.state_dict()
    assert "lm_head.weight" not in dict(model.named_parameters())  # torch lists it once too
    assert "lm_head.weight" not in dict(torch_model.named_parameters())


# ================================================================== gradients ===========


@pytest.mark.parametrize("name", list(ZOO))
def test_eval_loss_and_gradients_equal_torchs(imported, name):
    torch_model, model = imported(name)
    torch_model.eval()
    model.eval()
    x, y = _batch(name, BATCH, seed=1)
    loss, grads = _gm_grads(model, x, y)
    expected_loss, expected = _torch_grads(torch_model, x, y)
    assert loss == pytest.approx(expected_loss, rel=1e-5)
    _assert_grads_close(grads, expected)


@pytest.mark.parametrize("name", ["resnet", "gpt", "lstm"])
def test_train_loss_gradients_and_buffers_equal_torchs(imported, name):
    torch_model, model = imported(name)
    assert model.training and torch_model.training
    for seed in (1, 2):  # twice: BatchNorm's running statistics move each call
        x, y = _batch(name, BATCH, seed=seed)
        loss, grads = _gm_grads(model, x, y)
        expected_loss, expected = _torch_grads(torch_model, x, y)
        assert loss == pytest.approx(expected_loss, rel=1e-5)
        _assert_grads_close(grads, expected)
    for (key, ours), theirs in zip(model.named_buffers(), torch_model.buffers()):
        np.testing.assert_allclose(ours.numpy(), theirs.numpy(), rtol=1e-5, atol=1e-7, err_msg=key)


def test_dropout_follows_the_mode(imported):
    torch_model, model = imported("mlp")
    x = _batch("mlp", 64)[0]
    evaluated = model.eval()(_gm(x)).detach().numpy()
    np.testing.assert_allclose(evaluated, torch_model.eval()(x).detach().numpy(), rtol=1e-5)
    model.train()
    trained = [model(_gm(x)).detach().numpy() for _ in range(2)]
    assert not np.allclose(trained[0], evaluated)
    assert not np.array_equal(trained[0], trained[1])  # a fresh mask per call
    model.net.eval()  # a submodule's mode rules its dropout, as in torch
    assert model.training
    np.testing.assert_array_equal(model(_gm(x)).detach().numpy(), evaluated)
    torch_model.train().net.eval()  # and an import keeps each submodule's mode
    copied = gradmesh.from_torch(torch_model, x)
    assert (
        copied.training and not copied.net.training and not copied.get_submodule("net.2").training
    )


def test_gradients_match_finite_differences_in_float64(imported):
    _, model = imported("mlp")
    model.eval().double()
    x = gm.tensor(np.random.default_rng(0).standard_normal((4, 8)))

    def f() -> float:
        return float((model(x) ** 2).sum().item())

    (model(x) ** 2).sum().backward()
    eps = 1e-6
    for name, p in model.named_parameters():
        assert p.dtype == gm.float64
        flat = p.detach().numpy().reshape(-1)  # shares memory with the parameter
        numeric = np.empty_like(flat)
        for i in range(0, flat.size, 7):  # every 7th entry: enough, and fast
            saved = flat[i]
            flat[i] = saved + eps
            up = f()
            flat[i] = saved - eps
            down = f()
            flat[i] = saved
            numeric[i] = (up - down) / (2 * eps)
        np.testing.assert_allclose(
            p.grad.numpy().reshape(-1)[::7], numeric[::7], rtol=1e-5, atol=1e-7, err_msg=name
        )


def test_any_batch_size(imported):
    torch_model, model = imported("gpt")
    x = _batch("gpt", 7, seed=3)[0]  # imported at batch 4
    np.testing.assert_allclose(
        model.eval()(_gm(x)).detach().numpy(),
        torch_model.eval()(x).detach().numpy(),
        rtol=1e-5,
        atol=1e-6,
    )


# ============================================================ through a worker ==========


@pytest.mark.parametrize("name", list(ZOO))
def test_worker_gradients_equal_local_bitwise(imported, worker, name):
    torch_model, model = imported(name)
    model.eval()
    x, y = _batch(name, BATCH, seed=4)
    loss, grads = _gm_grads(model, x, y)
    with WorkerClient(worker.address) as client:
        result = client.compute_gradients(gm_loss, model, x.numpy(), y.numpy())
    assert np.array_equal(result.loss, np.float32(loss))
    assert list(result.gradients) == list(grads)
    for key, expected in grads.items():
        assert np.array_equal(result.gradients[key], expected), key
    _assert_grads_close(grads, _torch_grads(torch_model.eval(), x, y)[1])


def test_worker_batchnorm_in_train_mode_updates_the_buffers_as_torch(imported, worker):
    torch_model, model = imported("resnet")
    assert model.training
    x, y = _batch("resnet", BATCH, seed=5)
    before = {n: b.numpy().copy() for n, b in model.named_buffers()}
    loss, grads = _gm_grads(model, x, y)
    local = {n: b.numpy().copy() for n, b in model.named_buffers()}
    for name, b in model.named_buffers():
        b.numpy()[...] = before[name]
    with WorkerClient(worker.address) as client:
        result = client.compute_gradients(gm_loss, model, x.numpy(), y.numpy())
    assert np.array_equal(result.loss, np.float32(loss))
    for key, expected in grads.items():
        assert np.array_equal(result.gradients[key], expected), key
    # the worker's new running statistics, written back into the model's buffers
    for name, b in model.named_buffers():
        assert np.array_equal(b.numpy(), local[name]), name
    _torch_grads(torch_model, x, y)
    for name, b in torch_model.named_buffers():
        np.testing.assert_allclose(local[name], b.numpy(), rtol=1e-5, atol=1e-7, err_msg=name)


# ======================================================== weights back to torch =========


@pytest.mark.parametrize("name", list(ZOO))
def test_trained_state_dict_loads_into_torch(imported, name):
    torch_model, model = imported(name)
    model.eval()
    optimizer = gm.optim.SGD(model.parameters(), lr=0.1)
    for step in range(3):
        x, y = _batch(name, BATCH, seed=10 + step)
        optimizer.zero_grad()
        gm_loss(model, _gm(x), _gm(y)).backward()
        optimizer.step()
    state = gradmesh.to_torch_state_dict(model)
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    before = {k: v.clone() for k, v in torch_model.state_dict().items()}
    torch_model.load_state_dict(state, strict=True)
    after = torch_model.state_dict()
    assert all(torch.equal(after[k], state[k]) for k in state)
    assert not all(torch.equal(before[k], after[k]) for k in state)  # training moved them
    if name == "gpt":
        assert torch_model.lm_head.weight is torch_model.tok.weight
    x = _batch(name, BATCH, seed=20)[0]
    np.testing.assert_allclose(
        torch_model.eval()(x).detach().numpy(),
        model(_gm(x)).detach().numpy(),
        rtol=1e-5,
        atol=1e-6,
    )


# ==================================================================== refusals ===========


class _DataDependent(tnn.Module):
    def __init__(self):
        super().__init__()
        self.fc = tnn.Linear(3, 3)

    def forward(self, x):
        y = self.fc(x)
        if y.sum() > 0:
            return y * 2
        return y


def test_data_dependent_control_flow_is_one_clear_error():
    with pytest.raises(UnsupportedModelError) as caught:
        gradmesh.from_torch(_DataDependent(), torch.randn(4, 3))
    (problem,) = caught.value.unsupported
    assert problem.op == "data-dependent control flow"
    assert "test_from_torch.py" in problem.where and "y.sum() > 0" in problem.where
    assert "torch.where" in str(caught.value)


class _Cond(tnn.Module):
    def forward(self, x):
        return torch.cond(x.sum() > 0, lambda x: x.sin(), lambda x: x.cos(), (x,))


def test_torch_cond_is_refused_as_one_operator():
    with pytest.raises(UnsupportedModelError) as caught:
        gradmesh.from_torch(_Cond(), torch.randn(4, 3))
    (problem,) = caught.value.unsupported
    assert problem.op == "torch.cond" and "torch.where" in problem.reason


class _Bessel(tnn.Module):
    def forward(self, x):
        return torch.special.bessel_j0(x)


class _Inner(tnn.Module):
    def forward(self, x):
        return torch.cumprod(x, dim=1)


class _Outer(tnn.Module):
    def __init__(self):
        super().__init__()
        self.inner = _Inner()

    def forward(self, x):
        return self.inner(x)


class _TwoUnsupported(tnn.Module):
    def __init__(self):
        super().__init__()
        self.fc = tnn.Linear(3, 3)
        self.first = _Bessel()
        self.second = _Outer()

    def forward(self, x):
        return self.second(self.first(self.fc(x)))


def test_every_unsupported_op_is_listed_with_its_module_path():
    with pytest.raises(UnsupportedModelError) as caught:
        gradmesh.from_torch(_TwoUnsupported(), torch.randn(4, 3))
    found = {(u.op, u.where) for u in caught.value.unsupported}
    assert found == {
        ("aten.special_bessel_j0.default", "first"),
        ("aten.cumprod.default", "second.inner"),
    }
    message = str(caught.value)
    assert "aten.special_bessel_j0.default at first" in message
    assert "aten.cumprod.default at second.inner" in message


class _FixedBatch(tnn.Module):
    def forward(self, x):
        return x.reshape(4, -1)


def test_code_that_fixes_the_batch_size_is_refused_with_the_fix():
    with pytest.raises(UnsupportedModelError, match="dynamic_batch=False") as caught:
        gradmesh.from_torch(_FixedBatch(), torch.randn(4, 3))
    assert caught.value.unsupported[0].op == "batch-size-dependent code"
    fixed = gradmesh.from_torch(_FixedBatch(), torch.randn(4, 3), dynamic_batch=False)
    assert tuple(fixed(gm.ones(4, 3)).shape) == (4, 3)


def test_bad_arguments_are_named(imported):
    with pytest.raises(TypeError, match="torch.nn.Module"):
        gradmesh.from_torch(lambda x: x, torch.randn(2, 3))
    with pytest.raises(ValueError, match=r"example_inputs\[0\] has a batch size of 1"):
        gradmesh.from_torch(tnn.Linear(3, 2), torch.randn(1, 3))
    _, model = imported("mlp")
    with pytest.raises(TypeError, match="takes 1 tensor input"):
        model(gm.ones(2, 8), gm.ones(2, 8))


# ======================================================================== docs ===========


def test_docs_table_is_the_importers_table():
    from pathlib import Path

    text = (Path(__file__).parents[2] / "docs" / "import.md").read_text()
    rows = [
        tuple(cell.strip().strip("`") for cell in line.strip("|").split("|"))
        for line in text.splitlines()
        if line.startswith("| `aten.")
    ]
    assert rows == supported_ops()


class _Recurrences(tnn.Module):
    """A two-layer bidirectional GRU, then a time-major LSTM."""

    def __init__(self):
        super().__init__()
        self.gru = tnn.GRU(4, 5, num_layers=2, batch_first=True, bidirectional=True)
        self.lstm = tnn.LSTM(10, 3)

    def forward(self, x):
        out, _ = self.gru(x)
        out, _ = self.lstm(out.transpose(0, 1))
        return out.sum(0)


def test_gru_and_time_major_lstm_equal_torchs():
    torch.manual_seed(0)
    torch_model = _Recurrences()
    x = torch.randn(BATCH, 5, 4)
    model = gradmesh.from_torch(torch_model, x)
    torch_model.zero_grad()
    torch_model(x).square().sum().backward()
    gm.square(model(_gm(x))).sum().backward()
    _assert_grads_close(
        {n: p.grad.numpy() for n, p in model.named_parameters()},
        {n: p.grad.numpy() for n, p in torch_model.named_parameters()},
    )


class _ElmanRNNs(tnn.Module):
    """A two-layer bidirectional tanh RNN, then a time-major relu RNN from a given h0."""

    def __init__(self):
        super().__init__()
        self.tanh = tnn.RNN(4, 5, num_layers=2, batch_first=True, bidirectional=True)
        self.relu = tnn.RNN(10, 3, nonlinearity="relu")

    def forward(self, x, h0):
        out, _ = self.tanh(x)
        out, h = self.relu(out.transpose(0, 1), h0)
        return out.sum(0) + h[0]


def test_rnn_tanh_and_relu_equal_torchs():
    torch.manual_seed(0)
    torch_model = _ElmanRNNs()
    x, h0 = torch.randn(BATCH, 5, 4), torch.randn(1, BATCH, 3)
    model = gradmesh.from_torch(torch_model, x, h0, dynamic_batch=False)
    torch_model.zero_grad()
    torch_model(x, h0).square().sum().backward()
    out = model(_gm(x), _gm(h0))
    np.testing.assert_allclose(out.detach().numpy(), torch_model(x, h0).detach().numpy(), 1e-5)
    gm.square(out).sum().backward()
    _assert_grads_close(
        {n: p.grad.numpy() for n, p in model.named_parameters()},
        {n: p.grad.numpy() for n, p in torch_model.named_parameters()},
    )


class _ChannelDropouts(tnn.Module):
    """Every channel and alpha dropout module between convolutions."""

    def __init__(self):
        super().__init__()
        self.conv = tnn.Conv2d(2, 4, 3, padding=1)
        self.drop2d, self.drop3d = tnn.Dropout2d(0.5), tnn.Dropout3d(0.5)
        self.drop1d, self.alpha = tnn.Dropout1d(0.5), tnn.AlphaDropout(0.5)
        self.feature_alpha = tnn.FeatureAlphaDropout(0.5)

    def forward(self, x):
        h = self.drop3d(self.drop2d(self.conv(x)).unsqueeze(2))
        h = self.drop1d(h.flatten(2))
        return self.feature_alpha(self.alpha(h))


def test_channel_and_alpha_dropout_follow_the_mode():
    torch.manual_seed(0)
    torch_model = _ChannelDropouts()
    x = torch.randn(BATCH, 2, 5, 5)
    model = gradmesh.from_torch(torch_model, x)
    model.eval(), torch_model.eval()
    out = model(_gm(x))
    np.testing.assert_allclose(out.detach().numpy(), torch_model(x).detach().numpy(), 1e-5, 1e-6)
    gm.square(out).sum().backward()
    torch_model(x).square().sum().backward()
    _assert_grads_close(
        {n: p.grad.numpy() for n, p in model.named_parameters()},
        {n: p.grad.numpy() for n, p in torch_model.named_parameters()},
    )
    model.train()
    model.drop1d.eval(), model.alpha.eval(), model.feature_alpha.eval()
    trained = model(_gm(x)).detach().numpy()  # the convolution with whole channels dropped
    kept = trained.reshape(BATCH, 4, -1).any(-1)
    assert 0 < kept.mean() < 1
    evaluated = model.eval()(_gm(x)).detach().numpy().reshape(BATCH, 4, -1)
    np.testing.assert_allclose(trained.reshape(BATCH, 4, -1), evaluated * kept[..., None] * 4)


class _Encoder(tnn.Module):
    """torch's own attention modules: they work time-major inside (the batch in dim 1)."""

    def __init__(self):
        super().__init__()
        self.attn = tnn.MultiheadAttention(WIDTH, 2, batch_first=True)
        self.layer = tnn.TransformerEncoderLayer(WIDTH, 2, 32, dropout=0.0, batch_first=True)
        self.head = tnn.Linear(WIDTH, 3)

    def forward(self, x):
        y, _ = self.attn(x, x, x, need_weights=False)
        return self.head(self.layer(y).mean(1))


def test_multihead_attention_and_encoder_layer_through_a_worker(worker):
    torch.manual_seed(0)
    torch_model = _Encoder().eval()
    model = gradmesh.from_torch(torch_model, torch.randn(BATCH, 5, WIDTH))
    x, y = torch.randn(7, 5, WIDTH), torch.randint(0, 3, (7,))  # another batch size
    loss, grads = _gm_grads(model, x, y)
    expected_loss, expected = _torch_grads(torch_model, x, y)
    assert loss == pytest.approx(expected_loss, rel=1e-5)
    _assert_grads_close(grads, expected)
    with WorkerClient(worker.address) as client:
        result = client.compute_gradients(gm_loss, model, x.numpy(), y.numpy())
    for key, value in grads.items():
        assert np.array_equal(result.gradients[key], value), key


class _Odds(tnn.Module):
    """A non-persistent buffer, a frozen parameter, a constant made in forward, an in-place
    add on an intermediate value, and outputs in a dict and a tuple."""

    def __init__(self):
        super().__init__()
        self.fc = tnn.Linear(4, 4)
        self.register_buffer("mask", torch.tril(torch.ones(4, 4)), persistent=False)
        self.frozen = tnn.Parameter(torch.randn(4), requires_grad=False)

    def forward(self, x):
        y = self.fc(x) * self.mask[1] + self.frozen * torch.tensor([1.0, 2.0, 3.0, 4.0])
        y += 1  # runs in eval mode too (only a buffer's in-place update waits for training)
        return {"y": y, "pair": (y.sum(-1), y.mean())}


def test_non_persistent_buffers_frozen_parameters_constants_and_nested_outputs():
    torch.manual_seed(0)
    torch_model = _Odds()
    model = gradmesh.from_torch(torch_model, torch.randn(3, 4))
    assert (
        list(model.state_dict())
        == list(torch_model.state_dict())
        == [
            "frozen",
            "fc.weight",
            "fc.bias",
        ]
    )
    assert [n for n, _ in model.named_buffers()] == ["mask"]
    assert not model.frozen.requires_grad
    x = torch.randn(5, 4)
    ours, theirs = model.eval()(x), torch_model.eval()(x)
    assert set(ours) == {"y", "pair"} and len(ours["pair"]) == 2
    for a, b in ((ours["y"], theirs["y"]), *zip(ours["pair"], theirs["pair"])):
        np.testing.assert_allclose(a.detach().numpy(), b.detach().numpy(), rtol=1e-5, atol=1e-6)
    torch_model.load_state_dict(gradmesh.to_torch_state_dict(model), strict=True)


class _Activations(tnn.Module):
    """Every activation module of torch.nn that maps onto an aten op of its own, and erf."""

    def __init__(self):
        super().__init__()
        self.lin = tnn.Linear(4, 8)
        self.prelu, self.prelu_c = tnn.PReLU(), tnn.PReLU(8, 0.1)
        self.acts = tnn.ModuleList([
            tnn.ELU(0.7), tnn.SELU(), tnn.CELU(1.5), tnn.Hardtanh(-0.5, 0.8), tnn.ReLU6(),
            tnn.Hardsigmoid(), tnn.LogSigmoid(), tnn.Softsign(), tnn.Tanhshrink(),
            tnn.Threshold(0.1, -1.0), tnn.Hardshrink(0.3), tnn.Softshrink(0.2), tnn.Softmin(1),
            tnn.Softplus(2.0, 3.0),
        ])  # fmt: skip
        self.glu = tnn.GLU()
        self.softmax2d = tnn.Softmax2d()

    def forward(self, x):
        h = self.prelu_c(self.prelu(self.lin(x) * 3))
        y = sum(act(h) for act in self.acts) + torch.erf(h) + torch.erfc(h)
        y = y + torch.erfinv(torch.tanh(h)) + self.softmax2d(h.reshape(-1, 2, 2, 2)).flatten(1)
        return self.glu(y)


def test_activations_import_with_torchs_gradients():
    torch.manual_seed(0)
    torch_model = _Activations()
    x = torch.randn(BATCH, 4)
    model = gradmesh.from_torch(torch_model, x)
    for mode in ("train", "eval"):
        getattr(model, mode)(), getattr(torch_model, mode)()
        model.zero_grad(), torch_model.zero_grad()
        out, ref = model(_gm(x)), torch_model(x)
        np.testing.assert_allclose(out.detach().numpy(), ref.detach().numpy(), 1e-5, 1e-6)
        gm.square(out).sum().backward()
        ref.square().sum().backward()
        _assert_grads_close(
            {n: p.grad.numpy() for n, p in model.named_parameters()},
            {n: p.grad.numpy() for n, p in torch_model.named_parameters()},
        )


# ============================================================== in-place ops ============


def _assert_imports_as_torch(torch_model, x):
    """Outputs, input and parameter gradients of the import equal torch's, in both modes."""
    model = gradmesh.from_torch(torch_model, x)
    for mode in ("train", "eval"):
        getattr(model, mode)(), getattr(torch_model, mode)()
        model.zero_grad(), torch_model.zero_grad()
        xt, xg = x.clone().requires_grad_(), gm.tensor(x.numpy(), requires_grad=True)
        out, ref = model(xg), torch_model(xt)
        np.testing.assert_allclose(out.detach().numpy(), ref.detach().numpy(), 1e-5, 1e-6)
        gm.square(out).sum().backward()
        ref.square().sum().backward()
        np.testing.assert_allclose(xg.grad.numpy(), xt.grad.numpy(), 1e-5, 1e-6)
        _assert_grads_close(
            {n: p.grad.numpy() for n, p in model.named_parameters()},
            {n: p.grad.numpy() for n, p in torch_model.named_parameters()},
        )


@pytest.mark.parametrize(
    "activation",
    [
        tnn.ReLU(inplace=True),
        tnn.ReLU6(inplace=True),
        tnn.LeakyReLU(0.1, inplace=True),
        tnn.ELU(inplace=True),
        tnn.SELU(inplace=True),
        tnn.CELU(inplace=True),
        tnn.SiLU(inplace=True),
        tnn.Hardswish(inplace=True),
        tnn.Hardsigmoid(inplace=True),
        tnn.Mish(inplace=True),
        tnn.Threshold(0.1, 2.0, inplace=True),
        tnn.Dropout(0.0, inplace=True),
    ],
    ids=lambda m: type(m).__name__,
)
def test_inplace_activations_import_with_torchs_gradients(activation):
    torch.manual_seed(0)
    model = tnn.Sequential(tnn.Conv2d(3, 4, 3), activation, tnn.Conv2d(4, 2, 3))
    _assert_imports_as_torch(model, torch.randn(BATCH, 3, 7, 7))


class _InPlaceArithmetic(tnn.Module):
    """In-place ops on the results of in-place ops, after a reader of the original."""

    def __init__(self):
        super().__init__()
        self.lin = tnn.Linear(4, 6)

    def forward(self, x):
        h = self.lin(x)
        before = h * 3  # reads h before it changes
        h += 1
        h *= 2
        h.sub_(before)
        h.clamp_(-1.0, 2.0)
        h.masked_fill_(before > 2.5, 0.5)
        h.sigmoid_()
        return h * before


def test_inplace_arithmetic_chains_import_with_torchs_gradients():
    torch.manual_seed(0)
    _assert_imports_as_torch(_InPlaceArithmetic(), torch.randn(BATCH, 4))


class _ViewBefore(tnn.Module):
    def __init__(self):
        super().__init__()
        self.lin = tnn.Linear(4, 6)

    def forward(self, x):
        h = self.lin(x)
        first = h[:, :2]  # a view: torch's sees the ReLU below
        h.relu_()
        return first * 3 + h[:, 2:4]


class _OnAView(tnn.Module):
    def __init__(self):
        super().__init__()
        self.lin = tnn.Linear(4, 6)

    def forward(self, x):
        h = self.lin(x)
        h[:, :3].relu_()  # changes h through the view
        return h * 2


class _OnTheInput(tnn.Module):
    def forward(self, x):
        return TF.relu(x, inplace=True) * 2


@pytest.mark.parametrize(
    "torch_model, changed",
    [(_ViewBefore(), "linear"), (_OnAView(), "slice"), (_OnTheInput(), "x")],
    ids=["view-taken-before", "on-a-view", "on-the-input"],
)
def test_inplace_ops_that_others_would_see_are_refused_by_name(torch_model, changed):
    with pytest.raises(UnsupportedModelError) as e:
        gradmesh.from_torch(torch_model, torch.randn(BATCH, 4))
    [problem] = {(u.op, u.reason) for u in e.value.unsupported}
    assert problem[0] == "aten.relu_.default"
    assert f"it changes {changed}" in problem[1] and "inplace=False" in problem[1]
