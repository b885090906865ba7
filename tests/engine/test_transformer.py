"""Attention and transformer layers against torch's, with the same weights: outputs,
attention weights and gradients (float64), state_dict keys, masks, dropout, and the
traced graph's compiled plan against local ``backward()``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import gradmesh.core as gm
import gradmesh.core.nn.functional as F
from gradmesh.core.graph import trace, validate
from gradmesh.core.plan import compile_plan

torch.set_num_threads(1)


def copy_from_torch(ours: gm.nn.Module, theirs: torch.nn.Module) -> None:
    """Load a torch module's state_dict into the gradmesh module, by key (strict)."""
    ours.load_state_dict({k: gm.tensor(v.detach().numpy()) for k, v in theirs.state_dict().items()})


def pair(cls: str, *args, **kw):
    """The torch module (float64, seeded) and the gradmesh one with its weights."""
    torch.manual_seed(0)
    theirs = getattr(torch.nn, cls)(*args, **kw).double()
    ours = getattr(gm.nn, cls)(*args, **kw).double()
    copy_from_torch(ours, theirs)
    return ours, theirs


def inputs(*shapes, seed=0):
    rng = np.random.default_rng(seed)
    arrays = [rng.standard_normal(s) for s in shapes]
    return (
        [gm.tensor(a, requires_grad=True) for a in arrays],
        [torch.tensor(a, requires_grad=True) for a in arrays],
    )


def close(a, b, tol=1e-10):
    a = a.detach().numpy() if hasattr(a, "detach") else a
    np.testing.assert_allclose(a, b.detach().numpy(), rtol=tol, atol=tol)


def check_grads(ours, theirs, out, want, xs, ts):
    """Outputs, then the gradients of ``sum(out * w)`` for inputs and parameters."""
    close(out, want)
    w = np.random.default_rng(1).standard_normal(tuple(out.shape))
    (out * gm.tensor(w)).sum().backward()
    (want * torch.tensor(w)).sum().backward()
    for x, t in zip(xs, ts):
        close(x.grad, t.grad)
    theirs_params = dict(theirs.named_parameters())
    for name, p in ours.named_parameters():
        close(p.grad, theirs_params[name].grad)


# ----------------------------------------------------------------- MultiheadAttention ----


def test_mha_parameters_and_state_dict_keys_match_torch():
    ours, theirs = pair("MultiheadAttention", 8, 2)
    assert (
        list(ours.state_dict())
        == list(theirs.state_dict())
        == ["in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias"]
    )
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]
    fresh = gm.nn.MultiheadAttention(8, 2, bias=False)
    assert list(fresh.state_dict()) == ["in_proj_weight", "out_proj.weight"]
    bias = gm.nn.MultiheadAttention(8, 2).in_proj_bias.detach().numpy()
    assert not bias.any()


def _masks(kind, n, h, L, S):
    rng = np.random.default_rng(2)
    pad = rng.random((n, S)) < 0.3
    pad[:, 0] = False  # every query keeps a key
    if kind == "bool":
        return np.triu(np.ones((L, S), bool), 1), pad
    return rng.standard_normal((n * h, L, S)), rng.standard_normal((n, S))


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("need_weights,average", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("masks", [None, "bool", "float"])
def test_mha_matches_torch(batch_first, need_weights, average, masks):
    ours, theirs = pair("MultiheadAttention", 8, 2, batch_first=batch_first)
    n, L, S = 3, 4, 5
    xs, ts = inputs(*[(n, s, 8) if batch_first else (s, n, 8) for s in (L, S, S)])
    kw_gm, kw_t = {}, {}
    if masks:
        attn, pad = _masks(masks, n, 2, L, S)
        kw_gm = {"attn_mask": gm.tensor(attn), "key_padding_mask": gm.tensor(pad)}
        kw_t = {"attn_mask": torch.tensor(attn), "key_padding_mask": torch.tensor(pad)}
    out, w = ours(*xs, need_weights=need_weights, average_attn_weights=average, **kw_gm)
    want, want_w = theirs(*ts, need_weights=need_weights, average_attn_weights=average, **kw_t)
    if need_weights:
        close(w, want_w)
    else:
        assert w is None and want_w is None
    check_grads(ours, theirs, out, want, xs, ts)


@pytest.mark.filterwarnings("ignore:invalid value")
@pytest.mark.parametrize("need_weights", [True, False])
def test_mha_query_that_sees_no_key_as_torch(need_weights):
    """NaN with need_weights (torch's softmax path), zeros without (torch's SDPA path)."""
    ours, theirs = pair("MultiheadAttention", 4, 2, batch_first=True)
    x = np.random.default_rng(0).standard_normal((2, 3, 4))
    mask = np.zeros((3, 3), bool)
    mask[1] = True
    out = ours(*[gm.tensor(x)] * 3, attn_mask=gm.tensor(mask), need_weights=need_weights)[0]
    want = theirs(*[torch.tensor(x)] * 3, attn_mask=torch.tensor(mask), need_weights=need_weights)[
        0
    ]
    np.testing.assert_allclose(out.detach().numpy(), want.detach().numpy(), atol=1e-12)
    assert np.isnan(out.detach().numpy()[:, 1]).all() == need_weights


def test_mha_with_kdim_and_vdim_matches_torch():
    ours, theirs = pair("MultiheadAttention", 8, 2, kdim=5, vdim=3)
    assert (
        list(ours.state_dict())
        == list(theirs.state_dict())
        == [
            "q_proj_weight",
            "k_proj_weight",
            "v_proj_weight",
            "in_proj_bias",
            "out_proj.weight",
            "out_proj.bias",
        ]
    )
    xs, ts = inputs((4, 2, 8), (6, 2, 5), (6, 2, 3))
    out, w = ours(*xs)
    want, want_w = theirs(*ts)
    close(w, want_w)
    check_grads(ours, theirs, out, want, xs, ts)


def test_mha_unbatched_and_self_attention():
    ours, theirs = pair("MultiheadAttention", 6, 3)
    (x,), (t,) = inputs((4, 6))
    out, w = ours(x, x, x)
    want, want_w = theirs(t, t, t)
    close(w, want_w)
    check_grads(ours, theirs, out, want, [x], [t])


def test_mha_errors_name_the_shapes():
    mha = gm.nn.MultiheadAttention(8, 2)
    x = gm.randn(4, 3, 8)
    with pytest.raises(gm.OpError, match=r"attn_mask of shape \(2, 2\) must be \(4, 4\)"):
        mha(x, x, x, attn_mask=gm.zeros(2, 2))
    with pytest.raises(gm.OpError, match=r"key_padding_mask of shape \(4, 4\) must be"):
        mha(x, x, x, key_padding_mask=gm.zeros(4, 4, dtype=gm.bool))
    with pytest.raises(ValueError, match="divisible"):
        gm.nn.MultiheadAttention(8, 3)
    with pytest.raises(NotImplementedError, match="add_bias_kv"):
        gm.nn.MultiheadAttention(8, 2, add_bias_kv=True)
    with pytest.raises(gm.OpError, match=r"key \(N, S, 8\)"):
        mha(x, gm.randn(4, 3, 5), x)


def test_sdpa_errors_name_the_shapes():
    q = gm.zeros(2, 4, 8)
    with pytest.raises(gm.OpError, match=r"attention: shapes \(3, 4\) and \(2, 4, 4\) cannot"):
        F.scaled_dot_product_attention(q, q, q, attn_mask=gm.zeros(3, 4))
    with pytest.raises(
        gm.OpError,
        match=r"attn_mask of shape \(3, 2, 4, 4\) must broadcast "
        r"to the scores' shape \(2, 4, 4\)",
    ):
        F.scaled_dot_product_attention(q, q, q, attn_mask=gm.zeros(3, 2, 4, 4))
    with pytest.raises(gm.OpError, match="either attn_mask or is_causal"):
        F.scaled_dot_product_attention(q, q, q, attn_mask=gm.zeros(4, 4), is_causal=True)
    with pytest.raises(gm.OpError, match=r"query \(\.\.\., L, E\)"):
        F.scaled_dot_product_attention(q, gm.zeros(2, 4, 5), q)


# ------------------------------------------------------------------ transformer layers ----

LAYER_CASES = [
    dict(norm_first=False, activation="relu", batch_first=False),
    dict(norm_first=True, activation="gelu", batch_first=True),
]


@pytest.mark.filterwarnings("ignore:Support for mismatched")  # a float and a bool mask
@pytest.mark.parametrize("kw", LAYER_CASES)
@pytest.mark.parametrize("train", [False, True])
def test_encoder_layer_matches_torch(kw, train):
    ours, theirs = pair(
        "TransformerEncoderLayer", 8, 2, dim_feedforward=16, dropout=0.0 if train else 0.3, **kw
    )
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.train(train), theirs.train(train)
    n, L = 3, 5
    (x,), (t,) = inputs((n, L, 8) if kw["batch_first"] else (L, n, 8))
    causal = np.triu(np.full((L, L), -np.inf), 1)
    pad = np.zeros((n, L), bool)
    pad[1, 3:] = True
    out = ours(x, src_mask=gm.tensor(causal), src_key_padding_mask=gm.tensor(pad), is_causal=True)
    want = theirs(
        t, src_mask=torch.tensor(causal), src_key_padding_mask=torch.tensor(pad), is_causal=True
    )
    check_grads(ours, theirs, out, want, [x], [t])


@pytest.mark.parametrize("kw", LAYER_CASES)
@pytest.mark.parametrize("train", [False, True])
def test_decoder_layer_matches_torch(kw, train):
    ours, theirs = pair(
        "TransformerDecoderLayer", 8, 2, dim_feedforward=16, dropout=0.0 if train else 0.3, **kw
    )
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.train(train), theirs.train(train)
    n, L, S = 2, 4, 6
    xs, ts = inputs(*[(n, s, 8) if kw["batch_first"] else (s, n, 8) for s in (L, S)])
    causal = np.triu(np.ones((L, L), bool), 1)
    pad = np.zeros((n, S), bool)
    pad[0, 4:] = True
    out = ours(*xs, tgt_mask=gm.tensor(causal), memory_key_padding_mask=gm.tensor(pad))
    want = theirs(*ts, tgt_mask=torch.tensor(causal), memory_key_padding_mask=torch.tensor(pad))
    check_grads(ours, theirs, out, want, xs, ts)


@pytest.mark.parametrize("train", [False, True])
def test_encoder_and_decoder_stacks_match_torch(train):
    def build(lib):
        torch.manual_seed(0)
        kw = dict(dim_feedforward=16, dropout=0.0 if train else 0.3, batch_first=True)
        enc = lib.nn.TransformerEncoder(
            lib.nn.TransformerEncoderLayer(8, 2, **kw),
            2,
            norm=lib.nn.LayerNorm(8),
            enable_nested_tensor=False,
        )
        dec = lib.nn.TransformerDecoder(lib.nn.TransformerDecoderLayer(8, 2, **kw), 2)
        return lib.nn.ModuleList([enc, dec]).double().train(train)

    ours, theirs = build(gm), build(torch)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert "0.layers.1.self_attn.in_proj_weight" in ours.state_dict()
    copy_from_torch(ours, theirs)
    xs, ts = inputs((2, 5, 8), (2, 4, 8))
    causal = np.triu(np.ones((4, 4), bool), 1)

    def run(model, lib, src, tgt):
        memory = model[0](src)
        return model[1](tgt, memory, tgt_mask=lib.tensor(causal))

    check_grads(ours, theirs, run(ours, gm, *xs), run(theirs, torch, *ts), xs, ts)


def test_encoder_layer_activation_errors_and_callable():
    with pytest.raises(RuntimeError, match="relu/gelu"):
        gm.nn.TransformerEncoderLayer(8, 2, activation="swish")
    layer = gm.nn.TransformerEncoderLayer(8, 2, activation=gm.tanh)
    assert layer.activation is gm.tanh


# --------------------------------------------------- dropout and the traced graph ----


def _encoder_loss(model, x):
    return (model(x.reshape(-1, 3, 1) * gm.ones(1, 1, 8)) ** 2).mean()


def test_encoder_layer_traces_and_the_plan_equals_local_backward():
    gm.manual_seed(0)
    model = gm.nn.TransformerEncoderLayer(
        8, 2, dim_feedforward=16, dropout=0.0, batch_first=True
    ).double()
    vg = validate(trace(_encoder_loss, model, np.random.default_rng(4).standard_normal((4, 3))))
    for n in (4, 7):
        x = np.random.default_rng(n).standard_normal((n, 3))
        result = compile_plan(vg, {"x0": x.shape}).run(
            {k: p.detach().numpy() for k, p in model.named_parameters()}, {"x0": x}
        )
        model.zero_grad()
        loss = _encoder_loss(model, gm.tensor(x))
        loss.backward()
        assert np.array_equal(result.loss, loss.detach().numpy())
        for name, p in model.named_parameters():
            assert np.array_equal(result.grads[name], p.grad.numpy()), (name, n)


def test_attention_dropout_is_seeded_and_fixed_in_a_graph():
    q = gm.randn(2, 4, 8)
    gm.manual_seed(3)
    a = F.scaled_dot_product_attention(q, q, q, dropout_p=0.5)
    gm.manual_seed(3)
    b = F.scaled_dot_product_attention(q, q, q, dropout_p=0.5)
    assert gm.equal(a, b) and not gm.equal(a, F.scaled_dot_product_attention(q, q, q))
    model = gm.nn.TransformerEncoderLayer(
        8, 2, dim_feedforward=16, dropout=0.5, batch_first=True
    ).double()
    vg = validate(trace(_encoder_loss, model, np.ones((4, 3))))
    x = np.random.default_rng(0).standard_normal((5, 3))
    params = {k: p.detach().numpy() for k, p in model.named_parameters()}
    runs = [compile_plan(vg, {"x0": x.shape}).run(params, {"x0": x}).loss for _ in range(2)]
    assert np.array_equal(*runs)


# ------------------------------------------------------------------ baddbmm, einsum ----


def test_baddbmm_with_beta_zero_ignores_nan_input():
    a, b = gm.randn(2, 3, 4), gm.randn(2, 4, 5)
    out = gm.baddbmm(gm.full((2, 3, 5), float("nan")), a, b, beta=0)
    assert gm.allclose(out, gm.bmm(a, b))


@pytest.mark.parametrize(
    "equation,shapes,error,match",
    [
        ("ii->i", [(3, 3)], NotImplementedError, "repeated subscripts"),
        ("ij,jk->ik", [(2, 3), (4, 4)], gm.OpError, r"'j' .* size 3 and 4"),
        ("ij->k", [(2, 3)], gm.OpError, "output subscripts 'k'"),
        ("ij,jk", [(2, 3)], gm.OpError, "names 2 operands but 1"),
        ("ijk", [(2, 3)], gm.OpError, r"operand 0 has 2 dims \(shape \(2, 3\)\)"),
    ],
)
def test_einsum_errors(equation, shapes, error, match):
    with pytest.raises(error, match=match):
        gm.einsum(equation, *[gm.zeros(*s) for s in shapes])


# ------------------------------------------------------------------------- LSTM, GRU ----


def _flat(result):
    """``output, h`` or ``output, (h, c)`` as a list of tensors."""
    out, state = result
    return [out] + (list(state) if isinstance(state, tuple) else [state])


def check_all_grads(ours, theirs, outs, wants, xs, ts):
    """Every output close, then the gradients of ``sum_i sum(out_i * w_i)``."""
    rng = np.random.default_rng(1)
    loss, want_loss = 0, 0
    for out, want in zip(outs, wants):
        close(out, want)
        w = rng.standard_normal(tuple(out.shape))
        loss = loss + (out * gm.tensor(w)).sum()
        want_loss = want_loss + (want * torch.tensor(w)).sum()
    loss.backward()
    want_loss.backward()
    for x, t in zip(xs, ts):
        close(x.grad, t.grad)
    theirs_params = dict(theirs.named_parameters())
    for name, p in ours.named_parameters():
        close(p.grad, theirs_params[name].grad)


RNN_CASES = [
    dict(),
    dict(num_layers=2, bidirectional=True, batch_first=True),
    dict(num_layers=3, bias=False),
    dict(bidirectional=True),
]


@pytest.mark.parametrize("cls", ["LSTM", "GRU"])
@pytest.mark.parametrize("kw", RNN_CASES)
@pytest.mark.parametrize("initial", [False, True])
def test_rnn_matches_torch(cls, kw, initial):
    ours, theirs = pair(cls, 3, 4, **kw)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert repr(ours) == repr(theirs)
    n, L = 2, 5
    layers = kw.get("num_layers", 1) * (2 if kw.get("bidirectional") else 1)
    shapes = [(n, L, 3) if kw.get("batch_first") else (L, n, 3)]
    if initial:
        shapes += [(layers, n, 4)] * (2 if cls == "LSTM" else 1)
    xs, ts = inputs(*shapes)

    def state(s):
        return None if not initial else tuple(s[1:]) if cls == "LSTM" else s[1]

    outs = _flat(ours(xs[0], state(xs)))
    wants = _flat(theirs(ts[0], state(ts)))
    check_all_grads(ours, theirs, outs, wants, xs, ts)


@pytest.mark.parametrize("cls", ["LSTM", "GRU"])
def test_rnn_of_one_step_gives_weight_hh_a_zero_gradient(cls):
    """Not None: optimizers treat a None gradient as "skip" (no decay, no momentum)."""
    rnn = getattr(gm.nn, cls)(3, 4)
    rnn(gm.randn(1, 2, 3))[0].sum().backward()
    assert rnn.weight_hh_l0.grad is not None and not rnn.weight_hh_l0.grad.numpy().any()


@pytest.mark.parametrize("cls", ["LSTM", "GRU"])
def test_rnn_unbatched_matches_torch(cls):
    ours, theirs = pair(cls, 3, 4, num_layers=2)
    xs, ts = inputs((5, 3), (2, 4), (2, 4))
    state = (lambda s: (s[1], s[2])) if cls == "LSTM" else (lambda s: s[1])
    n_in = 3 if cls == "LSTM" else 2
    check_all_grads(
        ours,
        theirs,
        _flat(ours(xs[0], state(xs))),
        _flat(theirs(ts[0], state(ts))),
        xs[:n_in],
        ts[:n_in],
    )


@pytest.mark.parametrize("cls", ["LSTMCell", "GRUCell"])
@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("initial", [True, False])
def test_cells_match_torch(cls, batched, initial):
    ours, theirs = pair(cls, 3, 4, bias=batched)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert repr(ours) == repr(theirs)
    lead = (2,) if batched else ()
    states = (2 if cls == "LSTMCell" else 1) if initial else 0
    xs, ts = inputs(lead + (3,), *[lead + (4,)] * states)

    def run(module, args):
        hx = (tuple(args[1:]) if cls == "LSTMCell" else args[1]) if initial else None
        out = module(args[0], hx)
        return list(out) if isinstance(out, tuple) else [out]

    check_all_grads(ours, theirs, run(ours, xs), run(theirs, ts), xs, ts)


def test_rnn_errors_name_the_shapes():
    lstm = gm.nn.LSTM(3, 4, num_layers=2)
    with pytest.raises(gm.OpError, match=r"expected input of shape \(L, N, 3\).*got \(5, 2, 4\)"):
        lstm(gm.zeros(5, 2, 4))
    with pytest.raises(gm.OpError, match=r"hidden state of shape \(2, 2, 4\), got \(1, 2, 4\)"):
        lstm(gm.zeros(5, 2, 3), (gm.zeros(1, 2, 4), gm.zeros(2, 2, 4)))
    with pytest.raises(NotImplementedError, match="proj_size"):
        gm.nn.LSTM(3, 4, proj_size=2)


class _Classifier(gm.nn.Module):
    """An LSTM over 3 steps of 1 feature, its last output into a linear head (``h[-1]``
    would bake the batch size into a traced graph: the batch is not its first dim)."""

    def __init__(self, dropout=0.0):
        super().__init__()
        self.rnn = gm.nn.LSTM(1, 4, num_layers=2, batch_first=True, dropout=dropout)
        self.head = gm.nn.Linear(4, 2)

    def forward(self, x):
        out, (h, c) = self.rnn(x.reshape(-1, 3, 1))
        return (self.head(out[:, -1]) ** 2).mean() + c.mean()


def test_lstm_traces_with_a_fixed_length_and_the_plan_equals_local_backward():
    gm.manual_seed(0)
    model = _Classifier().double()
    vg = validate(trace(lambda m, x: m(x), model, np.ones((4, 3))))
    params = {k: p.detach().numpy() for k, p in model.named_parameters()}
    for n in (4, 7):
        x = np.random.default_rng(n).standard_normal((n, 3))
        result = compile_plan(vg, {"x0": x.shape}).run(params, {"x0": x})
        model.zero_grad()
        loss = model(gm.tensor(x))
        loss.backward()
        assert np.array_equal(result.loss, loss.detach().numpy())
        for name, p in model.named_parameters():
            assert np.array_equal(result.grads[name], p.grad.numpy()), (name, n)


def test_lstm_dropout_between_layers_only_in_training():
    gm.manual_seed(0)
    model = _Classifier(dropout=0.5).double()
    x = gm.tensor(np.random.default_rng(0).standard_normal((4, 3)))
    assert not gm.equal(model(x), model(x))
    model.eval()
    assert gm.equal(model(x), model(x))


@pytest.mark.parametrize(
    "cls,args",
    [
        ("TransformerEncoderLayer", (8, 2)),
        ("MultiheadAttention", (8, 2)),
        ("LSTM", (8, 4)),
        ("GRU", (8, 4)),
    ],
)
def test_float32_modules_match_torch(cls, args):
    """The default dtype end to end: no op promotes to float64 on the way."""
    torch.manual_seed(0)
    theirs = getattr(torch.nn, cls)(*args, batch_first=True).eval()
    ours = getattr(gm.nn, cls)(*args, batch_first=True).eval()
    copy_from_torch(ours, theirs)
    x = np.random.default_rng(0).standard_normal((2, 5, 8)).astype(np.float32)
    xs = (x, x, x) if cls == "MultiheadAttention" else (x,)
    out = ours(*[gm.tensor(a) for a in xs])
    with torch.no_grad():
        want = theirs(*[torch.tensor(a) for a in xs])
    out, want = (out[0], want[0]) if isinstance(out, tuple) else (out, want)
    assert out.dtype is gm.float32
    np.testing.assert_allclose(out.detach().numpy(), want.numpy(), rtol=1e-5, atol=1e-5)
