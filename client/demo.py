"""``gradmesh demo``: train a digit classifier on a local cluster, in well under a minute.

``gradmesh demo --model transformer`` trains a character-level GPT instead
(:mod:`gradmesh.client.demo_transformer`, which needs torch).

It starts a :class:`~gradmesh.client.cluster.LocalCluster` (coordinator, 2 shards and 2
workers, each its own process on 127.0.0.1), trains a small MLP on scikit-learn's
``load_digits`` (1,797 8x8 images that ship with scikit-learn: nothing is downloaded) with
data-parallel Adam, then prints the test accuracy, the samples per second and the path of
a loss-curve PNG.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import tempfile
import time

import numpy as np

import gradmesh.core as gm
import gradmesh.core.nn.functional as F
from gradmesh.client.cluster import LocalCluster
from gradmesh.client.training import batches, fit

__all__ = ["add_arguments", "run", "load_data", "make_model", "loss_fn", "accuracy"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``gradmesh demo``."""
    parser.add_argument(
        "--model",
        choices=("digits", "transformer"),
        default="digits",
        help="digits: an MLP on handwritten digits (default); transformer: a character-level "
        "GPT imported from PyTorch (needs gradmesh[demo,torch])",
    )
    parser.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument(
        "--shards",
        type=int,
        default=2,
        help="shard processes (default 2; 0: inside the coordinator)",
    )
    parser.add_argument("--epochs", type=int, help="digits: passes over the data (15)")
    parser.add_argument("--steps", type=int, help="transformer: training steps (1000)")
    parser.add_argument("--batch-size", type=int, help="global batch (digits 128, transformer 32)")
    parser.add_argument(
        "--micro-batch-size", type=int, help="rows per micro-batch (digits 32, transformer 16)"
    )
    parser.add_argument(
        "--lr",
        type=float,
        help="learning rate (digits: Adam 0.003; transformer: AdamW 0.006, cosine to a tenth)",
    )
    parser.add_argument("--seed", type=int, default=0, help="weights and shuffling seed")
    parser.add_argument(
        "--samples", type=int, default=3, help="transformer: lines of sampled text (3)"
    )
    parser.add_argument(
        "--sample-length", type=int, default=120, help="transformer: characters per sample (120)"
    )
    parser.add_argument(
        "--output-dir",
        default=os.path.join(tempfile.gettempdir(), "gradmesh-demo"),
        help="where the loss curve is written",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


# Per model: the flags it uses and their defaults; a flag of the other model is an error.
DEFAULTS = {
    "digits": {"epochs": 15, "batch_size": 128, "micro_batch_size": 32, "lr": 3e-3},
    "transformer": {"steps": 1000, "batch_size": 32, "micro_batch_size": 16, "lr": 6e-3},
}


def _apply_defaults(args: argparse.Namespace) -> str | None:
    """Fill the chosen model's defaults; the problem with the flags, or None."""
    own = DEFAULTS[args.model]
    for other in ("epochs", "steps"):
        if other not in own and getattr(args, other) is not None:
            return f"--{other} does not apply to --model {args.model}"
    for name, value in own.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return None


def _run_transformer(args: argparse.Namespace) -> int:
    # torch is in the torch extra, not in demo (it is large): say what to install.
    for module in ("torch", "matplotlib"):
        try:
            importlib.import_module(module)
        except ImportError:
            raise SystemExit(
                f"gradmesh demo --model transformer needs {module}: "
                "pip install 'gradmesh[demo,torch]'"
            ) from None
    from gradmesh.client import demo_transformer

    return demo_transformer.run(args)


def load_data(seed: int = 0):
    """Digits split 80/20 and standardised with the training split's statistics:
    (x_train, y_train, x_test, y_test)."""
    # Imported when used: `gradmesh worker` and the SDK need neither sklearn nor matplotlib.
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError:
        raise SystemExit(
            "gradmesh demo needs the demo extra: pip install 'gradmesh[demo]'"
        ) from None
    digits = load_digits()
    x = digits.data.astype(np.float32)
    y = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.2, random_state=seed, stratify=y
    )
    # Border pixels are almost always 0: the +0.1 keeps their scale finite.
    mean, std = x_train.mean(axis=0), x_train.std(axis=0) + 0.1
    return (
        ((x_train - mean) / std).astype(np.float32),
        y_train,
        ((x_test - mean) / std).astype(np.float32),
        y_test,
    )


def make_model(seed: int = 0):
    gm.manual_seed(seed)
    return gm.nn.Sequential(gm.nn.Linear(64, 256), gm.nn.ReLU(), gm.nn.Linear(256, 10))


def loss_fn(model, x, y):
    return F.cross_entropy(model(x), y)


def accuracy(model, x: np.ndarray, y: np.ndarray) -> float:
    with gm.no_grad():
        logits = model(gm.from_numpy(x)).numpy()
    return float((logits.argmax(axis=1) == y).mean())


def plot_losses(losses: list[float], path: str, title: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(range(1, len(losses) + 1), losses, lw=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def run(args: argparse.Namespace) -> int:
    """Train and report; exit code 0 when the test accuracy reaches 95% (digits) or the
    validation loss fell (transformer)."""
    problem = _apply_defaults(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    if args.model == "transformer":
        return _run_transformer(args)
    if (
        min(args.workers, args.epochs, args.batch_size, args.micro_batch_size) < 1
        or args.shards < 0
    ):
        print(
            "error: --workers, --epochs, --batch-size and --micro-batch-size must be >= 1, "
            "--shards >= 0",
            file=sys.stderr,
        )
        return 2
    x_train, y_train, x_test, y_test = load_data(args.seed)
    model = make_model(args.seed)
    optimizer = gm.optim.Adam(model.parameters(), lr=args.lr)
    cores = os.cpu_count() or 1
    print(
        f"gradmesh demo: {len(x_train)} training and {len(x_test)} test digits, MLP "
        f"64-256-10, {args.workers} workers, {args.shards or 'embedded'} shards",
        flush=True,
    )
    t0 = time.perf_counter()
    with LocalCluster(
        workers=args.workers, shards=args.shards, threads_per_worker=max(1, cores // args.workers)
    ) as cluster:
        started = time.perf_counter() - t0
        print(
            f"cluster up in {started:.1f} s: coordinator {cluster.coordinator_target}", flush=True
        )
        job = cluster.client().create_job(
            model,
            loss_fn,
            optimizer,
            args.micro_batch_size,
            example_batch=(x_train[:8], y_train[:8]),
            data_names=["x", "y"],
        )
        history = fit(
            job,
            lambda epoch: batches(
                x_train, y_train, batch_size=args.batch_size, seed=args.seed * 1000 + epoch
            ),
            epochs=args.epochs,
            progress=not args.no_progress,
            steps_per_epoch=-(-len(x_train) // args.batch_size),
        )
        model.load_state_dict(job.parameters())
    acc = accuracy(model, x_test, y_test)
    path = plot_losses(
        history.losses,
        os.path.join(args.output_dir, "loss.png"),
        f"gradmesh demo: {args.workers} workers, test accuracy {acc:.1%}",
    )
    print(
        f"test accuracy: {acc:.2%} ({len(history.losses)} steps, final loss "
        f"{history.losses[-1]:.4f})"
    )
    print(
        f"throughput: {history.samples_per_second:.0f} samples/s "
        f"({history.samples} samples in {history.seconds:.1f} s)"
    )
    print(f"loss curve: {path}")
    print(f"total time: {time.perf_counter() - t0:.1f} s")
    if acc < 0.95:
        print("warning: test accuracy below 95%", file=sys.stderr)
        return 1
    return 0
