"""Opt-in compressed-gradient modes against the synchronous mode on the demo's digits task.

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

``python benchmarks/modes.py`` (15 epochs), ``--epochs N``, ``--quick`` (3 epochs),
``--shards N``, ``--json PATH`` (the curves too).
"""

from __future__ import annotations

import argparse
import json
import time

import gradmesh.core as gm
from gradmesh.client import demo
from gradmesh.client.coordinator import CoordinatorClient
from gradmesh.client.training import batches
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
    "topk 1% @workers": {"kind": "topk", "ratio": 0.01, "where": "worker"},
    "topk 10% @workers": {"kind": "topk", "ratio": 0.1, "where": "worker"},
    "sign @workers": {"kind": "sign", "where": "worker"},
}


def train(client, data, epochs: int, compression) -> dict:
    x_train, y_train, x_test, y_test = data
    model = demo.make_model(0)
    job = client.create_job(
        model,
        demo.loss_fn,
        gm.optim.Adam(model.parameters(), lr=3e-3),
        32,
        example_batch=(x_train[:8], y_train[:8]),
        data_names=["x", "y"],
        compression=compression,
    )
    curve, accuracies, seconds = [], [], 0.0
    for epoch in range(epochs):
        for x, y in batches(x_train, y_train, batch_size=128, seed=epoch):
            t = time.perf_counter()
            loss = job.step(x, y).loss
            seconds += time.perf_counter() - t  # step time only, not the evaluations
            curve.append((seconds, loss))
        model.load_state_dict(job.parameters())
        accuracies.append(demo.accuracy(model, x_test, y_test))
    status = job.status()
    return {
        "curve": curve,
        "accuracies": accuracies,
        "seconds": seconds,
        "gradient_bytes": status.gradient_bytes,
        "compressed_bytes": status.compressed_bytes,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--quick", action="store_true", help="3 epochs")
    parser.add_argument("--tolerance", type=float, default=0.01)
    parser.add_argument("--shards", type=int, default=0, help="shard servers (0: embedded)")
    parser.add_argument("--json", help="write the figures and curves here")
    args = parser.parse_args()
    epochs = 3 if args.quick else args.epochs
    data = demo.load_data(0)
    workers = [worker_mod.start("cpu") for _ in range(2)]
    shards = [serve_shard(ServerConfig(port=0), ShardStore()) for _ in range(args.shards)]
    server = coordinator_mod.start(
        workers=[w.address for w in workers],
        shards=[s.address for s in shards],
        shared_memory=False,
    )
    client = CoordinatorClient(server.address)
    try:
        results = {name: train(client, data, epochs, spec) for name, spec in MODES.items()}
    finally:
        client.close()
        server.stop(0)
        server.coordinator.close()
        for w in workers + shards:
            w.stop(0)
    target = results["synchronous"]["accuracies"][-1] - args.tolerance
    steps = len(results["synchronous"]["curve"]) // epochs
    print(
        f"{epochs} epochs of {steps} steps, {args.shards or 'embedded'} shards; target: "
        f"synchronous accuracy - {args.tolerance}"
    )
    print(
        "| mode | final accuracy | first epoch at target | step time (s) | loss at half time "
        "| final loss | gradient bytes per step | vs dense | worker hop |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    half = results["synchronous"]["seconds"] / 2
    for name, r in results.items():
        reached = next((e for e, a in enumerate(r["accuracies"], 1) if a >= target), None)
        at_half = next((loss for t, loss in r["curve"] if t >= half), r["curve"][-1][1])
        n, dense, sent = len(r["curve"]), r["gradient_bytes"], r["compressed_bytes"]
        wire = f"{sent / n:,.0f} | {sent / dense:.2%}" if dense else "dense | 100%"
        hop = "compressed" if MODES[name] and MODES[name].get("where") == "worker" else "dense"
        print(
            f"| {name} | {r['accuracies'][-1]:.1%} | {reached or 'not reached'} "
            f"| {r['seconds'] / n:.4f} | {at_half:.4f} | {r['curve'][-1][1]:.4f} | {wire} "
            f"| {hop} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"epochs": epochs, "target": target, "results": results}, f)


if __name__ == "__main__":
    main()
