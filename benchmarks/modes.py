"""Opt-in compressed-gradient and bounded-staleness modes against the synchronous mode on
the demo's digits task.

Each mode trains the demo's MLP (64-256-10, Adam lr 0.003, batch 128, micro-batches of
32, 12 steps an epoch) through an in-process coordinator with 2 in-process CPU workers
on the bytes path (no shared memory) and ``--shards`` shard servers (0: the coordinator's
embedded shard; with shard servers the compressed gradients cross the wire encoded), from
the same initial weights and batches. Per mode:
the training loss against wall time (every step), the test accuracy after each epoch, the
first epoch at the synchronous mode's final accuracy (minus ``--tolerance``), and the
micro-batch gradients' bytes dense and in the compressed encoding (JobStatus). The
"@workers" modes compress on the workers (``"where": "worker"``): their encoding crosses
the worker-to-coordinator hop too, where the other modes send dense gradients.

The bounded-staleness mode (``stale s=N``) runs its steps pipelined by ``fit``. With
``--slow SECONDS`` one of the two workers takes that much longer per micro-batch (one at
a time, like a slower device), in every mode: the synchronous mode then waits for it at
every step, the stale mode does not.

``python benchmarks/modes.py`` (15 epochs), ``--epochs N``, ``--quick`` (3 epochs),
``--shards N``, ``--slow SECONDS``, ``--modes NAME,NAME``, ``--json PATH`` (the curves too).
"""

from __future__ import annotations

import argparse
import json
import threading
import time

import gradmesh.core as gm
from gradmesh.client import demo
from gradmesh.client.coordinator import CoordinatorClient
from gradmesh.client.training import batches, fit
from gradmesh.server import coordinator as coordinator_mod
from gradmesh.server import worker as worker_mod
from gradmesh.server.runtime import ServerConfig
from gradmesh.server.shard import serve_shard
from gradmesh.server.shard_store import ShardStore

MODES = {
    "synchronous": None,
    "topk 1%": {"kind": "topk", "ratio": 0.01},
    "topk 10%": {"kind": "topk", "ratio": 0.1},
    "sign": {"kind": "sign"},
    "stale s=2": {"staleness": 2},
    "stale s=8": {"staleness": 8},
    "topk 1% @workers": {"kind": "topk", "ratio": 0.01, "where": "worker"},
    "topk 10% @workers": {"kind": "topk", "ratio": 0.1, "where": "worker"},
    "sign @workers": {"kind": "sign", "where": "worker"},
}


def slowed(worker, seconds: float) -> None:
    """``worker`` (in this process) takes ``seconds`` more per micro-batch, one at a time."""
    compute, lock = worker.worker.compute, threading.Lock()

    def slow(*args, **kwargs):
        with lock:
            time.sleep(seconds)
            return compute(*args, **kwargs)

    worker.worker.compute = slow


def train(client, data, epochs: int, mode) -> dict:
    x_train, y_train, x_test, y_test = data
    model = demo.make_model(0)
    job = client.create_job(
        model,
        demo.loss_fn,
        gm.optim.Adam(model.parameters(), lr=3e-3),
        32,
        example_batch=(x_train[:8], y_train[:8]),
        data_names=["x", "y"],
        compression=mode if mode and "kind" in mode else None,
        staleness=mode.get("staleness") if mode else None,
    )
    curve, accuracies, seconds, epoch_seconds = [], [], 0.0, []
    for epoch in range(epochs):
        # fit: one step at a time, or pipelined in the stale mode; step time only, not the
        # evaluations, with each step's loss at the time its result came
        t = time.perf_counter()
        history = fit(
            job,
            list(batches(x_train, y_train, batch_size=128, seed=epoch)),
            progress=False,
            on_step=lambda _, r: curve.append((seconds + time.perf_counter() - t, r.loss)),
        )
        seconds += history.seconds
        epoch_seconds.append(seconds)
        model.load_state_dict(job.parameters())
        accuracies.append(demo.accuracy(model, x_test, y_test))
    status = job.status()
    return {
        "curve": curve,
        "accuracies": accuracies,
        "seconds": seconds,
        "epoch_seconds": epoch_seconds,
        "gradient_bytes": status.gradient_bytes,
        "compressed_bytes": status.compressed_bytes,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--quick", action="store_true", help="3 epochs")
    parser.add_argument("--tolerance", type=float, default=0.01)
    parser.add_argument("--shards", type=int, default=0, help="shard servers (0: embedded)")
    parser.add_argument("--slow", type=float, default=0.0, help="extra seconds per micro-batch")
    parser.add_argument("--modes", help="comma-separated mode names (default: all)")
    parser.add_argument("--json", help="write the figures and curves here")
    args = parser.parse_args()
    epochs = 3 if args.quick else args.epochs
    modes = {"synchronous": None}
    for name in args.modes.split(",") if args.modes else MODES:
        modes[name] = MODES[name]
    data = demo.load_data(0)
    workers = [worker_mod.start("cpu") for _ in range(2)]
    if args.slow:
        slowed(workers[1], args.slow)
    shards = [serve_shard(ServerConfig(port=0), ShardStore()) for _ in range(args.shards)]
    server = coordinator_mod.start(
        workers=[w.address for w in workers],
        shards=[s.address for s in shards],
        shared_memory=False,
    )
    client = CoordinatorClient(server.address)
    try:
        results = {name: train(client, data, epochs, spec) for name, spec in modes.items()}
    finally:
        client.close()
        server.stop(0)
        server.coordinator.close()
        for w in workers + shards:
            w.stop(0)
    target = results["synchronous"]["accuracies"][-1] - args.tolerance
    steps = len(results["synchronous"]["curve"]) // epochs
    print(
        f"{epochs} epochs of {steps} steps, {args.shards or 'embedded'} shards, one worker "
        f"{args.slow} s slower per micro-batch; target: synchronous accuracy - {args.tolerance}"
    )
    print(
        "| mode | final accuracy | first epoch at target | time to target (s) | step time (s) "
        "| loss at half time | final loss | gradient bytes per step | vs dense | worker hop |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    half = results["synchronous"]["seconds"] / 2
    for name, r in results.items():
        reached = next((e for e, a in enumerate(r["accuracies"], 1) if a >= target), None)
        at_half = next((loss for t, loss in r["curve"] if t >= half), r["curve"][-1][1])
        n, dense, sent = len(r["curve"]), r["gradient_bytes"], r["compressed_bytes"]
        wire = f"{sent / n:,.0f} | {sent / dense:.2%}" if dense else "dense | 100%"
        to_target = f"{r['epoch_seconds'][reached - 1]:.1f}" if reached else "-"
        mode = MODES.get(name) or {}
        hop = "compressed" if mode.get("where") == "worker" else "dense"
        print(
            f"| {name} | {r['accuracies'][-1]:.1%} | {reached or 'not reached'} | {to_target} "
            f"| {r['seconds'] / n:.4f} | {at_half:.4f} | {r['curve'][-1][1]:.4f} | {wire} "
            f"| {hop} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"epochs": epochs, "target": target, "results": results}, f)


if __name__ == "__main__":
    main()
