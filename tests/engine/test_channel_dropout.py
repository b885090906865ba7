"""Channel dropout (``dropout1d/2d/3d``, ``Dropout1d/2d/3d``) and alpha dropout
(``alpha_dropout``, ``feature_alpha_dropout`` and their modules). Masks cannot equal torch's
(another generator): the tests check the structure of the mask, its statistics, the values
torch can produce, the gradients (mask times scale), eval mode, p = 0 and p = 1, torch's
errors and warnings, and that a traced graph draws the same masks from the same seed."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

import gradmesh.core as gm
import gradmesh.core.nn.functional as F
from gradmesh.core.graph import trace, validate
from gradmesh.core.plan import compile_plan

SELU_SATURATION = 1.7580993408473766  # torch's alpha in its alpha dropout kernel

# name, a batched shape, an unbatched shape (None: the function has no unbatched form)
CHANNEL = [
    ("dropout1d", (8, 6, 5), (6, 5)),
    ("dropout2d", (8, 6, 4, 3), None),
    ("dropout3d", (8, 6, 2, 3, 2), (6, 2, 3, 2)),
]


def seeded(seed: int) -> gm.Generator:
    return gm.Generator().manual_seed(seed)


def rand(*shape, seed=0, dtype="float64", requires_grad=False):
    a = np.random.default_rng(seed).standard_normal(shape).astype(dtype)
    return gm.tensor(a, requires_grad=requires_grad)


# ------------------------------------------------------------------ channel dropout ----


@pytest.mark.parametrize("name,batched,unbatched", CHANNEL)
@pytest.mark.parametrize("p", [0.2, 0.5, 0.75])
def test_whole_channels_are_zeroed_or_scaled(name, batched, unbatched, p):
    for shape in [s for s in (batched, unbatched) if s is not None]:
        out = getattr(F, name)(gm.ones(*shape), p, generator=seeded(3)).numpy()
        assert out.shape == shape
        # one value per (sample, channel): the spatial dims share the draw
        lead = 1 if shape == unbatched else 2
        per_channel = out.reshape(out.shape[:lead] + (-1,))
        assert (per_channel == per_channel[..., :1]).all()
        assert set(np.unique(out)) <= {0.0, np.float32(1 / (1 - p))}


@pytest.mark.parametrize("name,batched,unbatched", CHANNEL)
def test_the_fraction_of_dropped_channels_is_p(name, batched, unbatched):
    p, n, c = 0.3, 200, 50
    shape = (n, c) + batched[2:]
    out = getattr(F, name)(gm.ones(*shape), p, generator=seeded(1)).numpy()
    dropped = (out.reshape(n, c, -1)[..., 0] == 0).mean()
    sigma = math.sqrt(p * (1 - p) / (n * c))  # binomial standard error
    assert abs(dropped - p) < 5 * sigma
    assert abs(out.mean() - 1.0) < 5 * sigma / (1 - p)  # the scaling keeps the mean


@pytest.mark.parametrize("name,batched,unbatched", CHANNEL)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_gradient_is_the_mask_times_the_scale(name, batched, unbatched, dtype):
    p = 0.4
    x = rand(*batched, dtype=dtype, requires_grad=True)
    g = rand(*batched, seed=1, dtype=dtype)
    out = getattr(F, name)(x, p, generator=seeded(7))
    out.backward(g)
    mask = getattr(F, name)(gm.ones(*batched, dtype=getattr(gm, dtype)), p, generator=seeded(7))
    assert out.dtype is x.grad.dtype is getattr(gm, dtype)
    assert np.array_equal(x.grad.numpy(), (g * mask).numpy())
    assert np.array_equal(out.detach().numpy(), (x * mask).detach().numpy())
    assert 0 < (mask.numpy() == 0).mean() < 1


@pytest.mark.parametrize("name,batched,unbatched", CHANNEL)
def test_eval_and_p_zero_are_the_identity_and_p_one_zeroes(name, batched, unbatched):
    x = rand(*batched)
    assert getattr(F, name)(x, 0.5, training=False) is x
    assert getattr(F, name)(x, 0.0) is x
    zeroed = getattr(F, name)(x, 1.0).numpy()
    assert not zeroed.any() and np.array_equal(np.signbit(zeroed), np.signbit(x.numpy()))
    module = getattr(gm.nn, name.capitalize())(0.5)
    assert module.eval()(x) is x


MODULE_INPUTS = {
    "Dropout1d": (4, 8, 3),
    "Dropout2d": (4, 8, 3, 3),
    "Dropout3d": (4, 8, 3, 3, 3),
    "AlphaDropout": (4, 8),
    "FeatureAlphaDropout": (4, 8, 3),
}


@pytest.mark.parametrize("cls,shape", MODULE_INPUTS.items())
def test_modules_match_torchs_and_draw_in_training_only(cls, shape):
    ours, theirs = getattr(gm.nn, cls)(0.3), getattr(torch.nn, cls)(0.3)
    assert repr(ours) == repr(theirs)
    assert repr(getattr(gm.nn, cls)()) == repr(getattr(torch.nn, cls)())
    with pytest.raises(ValueError, match="between 0 and 1, but got 1.5"):
        getattr(gm.nn, cls)(1.5)
    x = gm.ones(*shape)
    assert ours.training and not gm.equal(ours(x), x)
    assert ours.eval()(x) is x


def test_a_seed_gives_the_same_mask_and_another_seed_another():
    x = gm.ones(16, 16, 4, 4)
    a = F.dropout2d(x, 0.5, generator=seeded(5))
    assert gm.equal(a, F.dropout2d(x, 0.5, generator=seeded(5)))
    assert not gm.equal(a, F.dropout2d(x, 0.5, generator=seeded(6)))
    gm.manual_seed(2)
    b = F.dropout3d(x, 0.5)
    assert not gm.equal(b, F.dropout3d(x, 0.5))  # the global generator advanced
    gm.manual_seed(2)
    assert gm.equal(b, F.dropout3d(x, 0.5))


def test_values_are_the_ones_torch_can_give():
    torch.manual_seed(0)
    for p in (0.25, 0.6):
        theirs = torch.nn.functional.dropout2d(torch.ones(64, 32, 2, 2), p)
        ours = F.dropout2d(gm.ones(64, 32, 2, 2), p)
        assert set(np.unique(ours.numpy())) == set(np.unique(theirs.numpy()))


# ------------------------------------------------------------------- errors, warnings ----


def _outcome(fn, x, **kw):
    """(exception type and text or None, warning texts) of one call."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            out = fn(x, **kw)
            error = None
        except (RuntimeError, ValueError) as e:
            out, error = None, (type(e), str(e))
    shape = None if out is None else tuple(out.shape)
    return error, [str(w.message) for w in caught], shape


@pytest.mark.parametrize("name", ["dropout1d", "dropout2d", "dropout3d", "alpha_dropout"])
@pytest.mark.parametrize("ndim", [0, 1, 2, 3, 4, 5, 6])
@pytest.mark.parametrize("p", [0.5, 1.0, 1.5, -0.1])
def test_errors_and_warnings_are_torchs(name, ndim, p):
    shape = (2, 3, 2, 2, 1, 2)[:ndim]
    kw = dict(p=p, training=True)
    ours = _outcome(getattr(F, name), gm.ones(shape), **kw)
    theirs = _outcome(getattr(torch.nn.functional, name), torch.ones(shape), **kw)
    assert ours == theirs


def test_integer_input_is_refused_in_training_only():
    x = gm.ones(2, 3, 4, dtype=gm.int64)
    assert F.dropout1d(x, 0.5, training=False) is x
    with pytest.raises(RuntimeError, match="dropout"):
        F.dropout1d(x, 0.5)


# -------------------------------------------------------------------- alpha dropout ----


def _alpha_values(p):
    """What torch's kernel gives a kept element x (as a function) and a dropped one."""
    a = 1 / math.sqrt((SELU_SATURATION**2 * p + 1) * (1 - p))
    return (lambda x: x * a + SELU_SATURATION * a * p), SELU_SATURATION * a * (p - 1)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("feature", [False, True])
def test_alpha_dropout_is_torchs_affine_map_of_the_mask(dtype, feature):
    p = 0.3
    fn = F.feature_alpha_dropout if feature else F.alpha_dropout
    plain = F.dropout2d if feature else F.dropout
    x = rand(6, 5, 4, 4, dtype=dtype, requires_grad=True)
    out = fn(x, p, training=True, generator=seeded(4))
    keep = plain(gm.ones(*x.shape, dtype=x.dtype), p, generator=seeded(4)).numpy() > 0
    kept, dropped = _alpha_values(p)
    want = np.where(keep, kept(x.detach().numpy().astype(np.float64)), dropped)
    tol = 1e-6 if dtype == "float32" else 1e-14
    np.testing.assert_allclose(out.detach().numpy(), want, rtol=tol, atol=tol)
    g = rand(*x.shape, seed=2, dtype=dtype)
    out.backward(g)
    a = kept(1.0) - kept(0.0)
    np.testing.assert_allclose(x.grad.numpy(), g.numpy() * keep * a, rtol=tol, atol=tol)
    assert out.dtype is x.grad.dtype is getattr(gm, dtype)


def test_alpha_dropout_keeps_zero_mean_and_unit_variance_as_torchs():
    x = rand(400_000, dtype="float64")
    ours = F.alpha_dropout(x, 0.2, training=True, generator=seeded(0)).numpy()
    torch.manual_seed(0)
    theirs = torch.nn.functional.alpha_dropout(torch.tensor(x.numpy()), 0.2, training=True)
    assert abs(ours.mean()) < 0.01 and abs(ours.std() - 1) < 0.01
    assert abs(ours.mean() - theirs.mean().item()) < 0.01
    assert abs(ours.std() - theirs.std().item()) < 0.01


def test_alpha_dropout_defaults_to_eval_and_p_one_zeroes_as_torch():
    x = rand(3, 4)
    assert F.alpha_dropout(x, 0.5) is x  # torch's default is training=False
    assert F.feature_alpha_dropout(x, 0.5) is x
    assert F.alpha_dropout(x, 0.0, True) is x
    for fn in (F.alpha_dropout, F.feature_alpha_dropout):
        np.testing.assert_array_equal(fn(x, 1.0, True).numpy(), x.numpy() * 0.0)
    with pytest.raises(RuntimeError, match="Feature dropout requires at least 2 dimensions"):
        F.feature_alpha_dropout(gm.ones(5), 0.5, True)


# ------------------------------------------------------------------- traced graphs ----


class _Net(gm.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = gm.nn.Conv2d(2, 4, 3, padding=1)
        self.drop2d = gm.nn.Dropout2d(0.5)
        self.drop1d = gm.nn.Dropout1d(0.3)
        self.alpha = gm.nn.AlphaDropout(0.2)
        self.head = gm.nn.Linear(4 * 36, 1)

    def forward(self, x):
        h = self.drop2d(self.conv(x.reshape(-1, 2, 6, 6)))
        h = self.drop1d(h.reshape(-1, 4, 36))
        return self.head(self.alpha(h.reshape(-1, 4 * 36))).square().mean()


def _params(model):
    return {k: p.detach().numpy() for k, p in model.named_parameters()}


def test_a_traced_graph_draws_its_masks_from_the_call_seed():
    gm.manual_seed(0)
    model = _Net().double()
    vg = validate(trace(lambda m, x: m(x), model, np.ones((4, 72))))
    x = np.random.default_rng(0).standard_normal((5, 72))
    runs = [
        compile_plan(vg, {"x0": x.shape}).run(_params(model), {"x0": x}, seed=s)
        for s in (11, 11, 12)
    ]
    assert np.array_equal(runs[0].loss, runs[1].loss)
    for name in _params(model):
        assert np.array_equal(runs[0].grads[name], runs[1].grads[name]), name
    assert not np.array_equal(runs[0].grads["conv.weight"], runs[2].grads["conv.weight"])


def test_without_a_call_seed_the_graph_gives_the_eager_gradients():
    gm.manual_seed(0)
    model = _Net().double()
    x = np.random.default_rng(1).standard_normal((4, 72))
    gm.manual_seed(42)
    vg = validate(trace(lambda m, x: m(x), model, x))
    gm.manual_seed(42)
    loss = model(gm.tensor(x))
    loss.backward()
    result = compile_plan(vg, {"x0": x.shape}).run(_params(model), {"x0": x})
    assert np.array_equal(result.loss, loss.detach().numpy())
    for name, p in model.named_parameters():
        assert np.array_equal(result.grads[name], p.grad.numpy()), name
