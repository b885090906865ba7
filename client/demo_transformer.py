"""``gradmesh demo --model transformer``: train a small character-level GPT on a local cluster.

The model is a plain PyTorch module (token and position embeddings, pre-LN blocks with
causal self-attention, a GELU MLP, a final LayerNorm and an LM head tied to the token
embedding), imported with :func:`gradmesh.from_torch`. It learns the text of Python's own
help topics (``pydoc_data.topics``, which ships with CPython: nothing is downloaded) with
data-parallel AdamW, a cosine learning-rate schedule and gradient clipping, all described
to the coordinator as data. At the end the trained parameters come back from the job and
the model, run locally by gradmesh, writes a few lines of text.

Needs ``torch`` (``pip install 'gradmesh[demo,torch]'``); ``gradmesh.client.demo`` checks
for it before importing this module.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as tnn
import torch.nn.functional as TF

import gradmesh.core as gm
from gradmesh.client.cluster import LocalCluster
from gradmesh.client.demo import plot_losses
from gradmesh.client.importers import from_torch
from gradmesh.client.training import fit

__all__ = [
    "GPTConfig",
    "GPT",
    "Corpus",
    "load_corpus",
    "make_model",
    "loss_fn",
    "sample_batch",
    "mean_loss",
    "sentence_start_prompts",
    "generate",
    "run",
]


@dataclass(frozen=True)
class GPTConfig:
    vocab: int
    context: int = 64
    width: int = 64
    heads: int = 4
    layers: int = 2


class CausalSelfAttention(tnn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.heads = cfg.heads
        self.qkv = tnn.Linear(cfg.width, 3 * cfg.width)
        self.proj = tnn.Linear(cfg.width, cfg.width)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = (
            z.view(b, t, self.heads, c // self.heads).transpose(1, 2)
            for z in self.qkv(x).split(c, dim=2)
        )
        y = TF.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).contiguous().view(b, t, c))


class Block(tnn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln1 = tnn.LayerNorm(cfg.width)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = tnn.LayerNorm(cfg.width)
        self.mlp = tnn.Sequential(
            tnn.Linear(cfg.width, 4 * cfg.width), tnn.GELU(), tnn.Linear(4 * cfg.width, cfg.width)
        )

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(tnn.Module):
    """A character-level GPT in plain PyTorch: (batch, context) token ids -> logits."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.tok = tnn.Embedding(cfg.vocab, cfg.width)
        self.pos = tnn.Embedding(cfg.context, cfg.width)
        self.blocks = tnn.Sequential(*(Block(cfg) for _ in range(cfg.layers)))
        self.ln_f = tnn.LayerNorm(cfg.width)
        self.lm_head = tnn.Linear(cfg.width, cfg.vocab, bias=False)
        self.lm_head.weight = self.tok.weight  # tied: one parameter, two names
        # GPT-2's initialisation: small embeddings keep the first logits near uniform.
        for p in (self.tok.weight, self.pos.weight):
            tnn.init.normal_(p, std=0.02)

    def forward(self, idx):
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1]))
        return self.lm_head(self.ln_f(self.blocks(x)))


@dataclass
class Corpus:
    """The help topics' text as token ids, split 90/10, and the character vocabulary."""

    chars: str
    train: np.ndarray
    valid: np.ndarray

    def decode(self, ids) -> str:
        return "".join(self.chars[int(i)] for i in ids)


def load_corpus() -> Corpus:
    from pydoc_data.topics import topics

    text = "\n".join(topics[name] for name in sorted(topics))
    chars = "".join(sorted(set(text)))
    index = {c: i for i, c in enumerate(chars)}
    ids = np.fromiter((index[c] for c in text), dtype=np.int64, count=len(text))
    split = int(len(ids) * 0.9)
    return Corpus(chars, ids[:split], ids[split:])


def make_model(cfg: GPTConfig, seed: int = 0):
    """The PyTorch GPT, seeded, and its gradmesh import (batch size dynamic)."""
    torch.manual_seed(seed)
    net = GPT(cfg)
    example = torch.zeros((2, cfg.context), dtype=torch.int64)
    return net, from_torch(net, example)


def loss_fn(model, x, y):
    logits = model(x)
    return gm.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def sample_batch(ids: np.ndarray, batch_size: int, context: int, rng: np.random.Generator):
    """``batch_size`` random windows of the text: inputs and the next characters."""
    starts = rng.integers(0, len(ids) - context - 1, size=batch_size)
    rows = starts[:, None] + np.arange(context)
    return ids[rows], ids[rows + 1]


def mean_loss(model, windows: tuple[np.ndarray, np.ndarray]) -> float:
    """The model's loss on fixed validation windows, without building a graph."""
    with gm.no_grad():
        return loss_fn(model, gm.tensor(windows[0]), gm.tensor(windows[1])).item()


def generate(
    model, corpus: Corpus, prompts: np.ndarray, length: int, temperature: float, seed: int
) -> list[str]:
    """Continue each prompt (a row of ``context`` token ids) by ``length`` characters,
    sampling at ``temperature`` with a seeded generator; the model runs locally in gradmesh."""
    rng = np.random.default_rng(seed)
    window = prompts.copy()
    out = np.empty((len(prompts), length), dtype=np.int64)
    model.eval()
    with gm.no_grad():
        for i in range(length):
            logits = model(gm.tensor(window)).numpy()[:, -1, :] / temperature
            probs = np.exp(logits - logits.max(axis=1, keepdims=True))
            probs /= probs.sum(axis=1, keepdims=True)
            out[:, i] = [rng.choice(len(p), p=p) for p in probs]
            # The context is fixed (learned positions): slide the window by one character.
            window = np.concatenate([window[:, 1:], out[:, i : i + 1]], axis=1)
    return [corpus.decode(row) for row in out]


def sentence_start_prompts(ids: np.ndarray, corpus: Corpus, count: int, context: int, seed: int):
    """``count`` windows of the text that end where a sentence of prose begins (after ". "
    with no table or code layout in the window), so the samples continue prose."""
    text = corpus.decode(ids)
    ends = [
        m.end()
        for m in re.finditer(r"\. (?=[A-Z])", text)
        if m.end() >= context
        and re.search(r"[|>]|  |\n\n", text[m.end() - context : m.end()]) is None
    ]
    picks = np.random.default_rng(seed).choice(ends, size=count, replace=len(ends) < count)
    return np.stack([ids[end - context : end] for end in picks])


def load_job_parameters(model, job) -> None:
    """The trained values into the local model; the job holds the tied weight once, under
    its first name, so its alias (``lm_head.weight``) is the only key it may lack."""
    keys = model.load_state_dict(job.parameters(), strict=False)
    if set(keys.missing_keys) - {"lm_head.weight"} or keys.unexpected_keys:
        raise RuntimeError(f"the job's parameters do not match the model: {keys}")


def print_samples(model, corpus: Corpus, cfg: GPTConfig, args: argparse.Namespace) -> None:
    prompts = sentence_start_prompts(corpus.valid, corpus, args.samples, cfg.context, args.seed)
    texts = generate(model, corpus, prompts, args.sample_length, 0.8, args.seed)
    print(
        "sampled text (temperature 0.8): the end of a sentence of the validation text, "
        "then | and the model's continuation:"
    )
    for prompt, text in zip(prompts, texts):
        tail = corpus.decode(prompt[-32:]).replace("\n", " ")
        print(f"  ...{tail}|" + text.replace("\n", "\n    "))


def _check(args: argparse.Namespace) -> str | None:
    if min(args.workers, args.steps, args.batch_size, args.micro_batch_size) < 1:
        return "--workers, --steps, --batch-size and --micro-batch-size must be >= 1"
    if args.shards < 0:
        return "--shards must be >= 0"
    if not args.lr > 0:
        return "--lr must be > 0"
    if args.samples < 0 or args.sample_length < 1:
        return "--samples must be >= 0 and --sample-length >= 1"
    return None


def run(args: argparse.Namespace) -> int:
    """Train, sample and report; exit code 0 when the validation loss fell."""
    problem = _check(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    corpus = load_corpus()
    cfg = GPTConfig(vocab=len(corpus.chars))
    t0 = time.perf_counter()
    _, model = make_model(cfg, args.seed)
    rng = np.random.default_rng(args.seed)
    valid = sample_batch(corpus.valid, 64, cfg.context, np.random.default_rng(args.seed + 1))
    loss_before = mean_loss(model, valid)
    optimizer = gm.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    # Cosine decay to a tenth; clipping at norm 1 keeps the early steps stable without warm-up.
    schedule = gm.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, T_max=args.steps, eta_min=args.lr / 10
    )
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"gradmesh demo: character-level GPT ({cfg.layers} layers, width {cfg.width}, "
        f"context {cfg.context}, {n_params:,} parameters, imported from PyTorch) on "
        f"{len(corpus.train):,} characters of Python's help topics; {args.workers} workers, "
        f"{args.shards or 'embedded'} shards",
        flush=True,
    )
    cores = os.cpu_count() or 1
    with LocalCluster(
        workers=args.workers, shards=args.shards, threads_per_worker=max(1, cores // args.workers)
    ) as cluster:
        print(f"cluster up: coordinator {cluster.coordinator_target}", flush=True)
        job = cluster.client().create_job(
            model,
            loss_fn,
            optimizer,
            args.micro_batch_size,
            example_batch=sample_batch(corpus.train, 2, cfg.context, rng),
            data_names=["x", "y"],
            scheduler=schedule,
            clip_grad_norm=1.0,
        )
        # Random windows of the text, one fresh batch per step: no epochs over 400k windows.
        windows = (
            sample_batch(corpus.train, args.batch_size, cfg.context, rng) for _ in range(args.steps)
        )
        history = fit(job, windows, progress=not args.no_progress, steps_per_epoch=args.steps)
        load_job_parameters(model, job)
    loss_after = mean_loss(model, valid)
    path = plot_losses(
        history.losses,
        os.path.join(args.output_dir, "transformer-loss.png"),
        f"gradmesh demo: GPT, {args.workers} workers, validation loss {loss_after:.2f}",
    )
    print(
        f"validation loss: {loss_before:.3f} before, {loss_after:.3f} after "
        f"({len(history.losses)} steps, training loss {history.losses[0]:.3f} -> "
        f"{history.losses[-1]:.3f})"
    )
    print(
        f"throughput: {history.samples_per_second:.0f} samples/s "
        f"({history.samples} samples of {cfg.context} characters in {history.seconds:.1f} s)"
    )
    print(f"loss curve: {path}")
    if args.samples:
        print_samples(model, corpus, cfg, args)
    print(f"total time: {time.perf_counter() - t0:.1f} s")
    if not loss_after < loss_before:
        print("warning: the validation loss did not fall", file=sys.stderr)
        return 1
    return 0
