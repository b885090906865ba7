"""Distributed training throughput: samples/s with 1 and 2 workers vs one local process.

For the medium (784-512-512-10, batch 128, cross-entropy) and large (1024-4096-4096-1024,
batch 256, MSE) MLPs, in the same run:

* ``local``: ``gradmesh.core`` training in this process (forward, backward, SGD);
* ``1 worker`` / ``2 workers``: a :class:`~gradmesh.client.cluster.LocalCluster` (workers
  as separate processes, shards embedded in the coordinator), the global batch cut into
  one micro-batch per worker. Workers share the machine's cores (``threads_per_worker``
  = cores / workers), so on a 2-core machine 2 workers cannot beat 1: the number to read
  is the overhead of the distributed path.

Each step's time is broken down with the coordinator's StepTimings: pull (parameters for
the workers), compute (dispatch to last result: transfer + worker compute), of which the
workers' own forward+backward, push (gradients to the shards), apply (tree sum and SGD on
the shards), coordinator overhead (the rest of its step) and client round trip.

Run ``python benchmarks/cluster.py`` (a few minutes on 2 cores), ``--quick`` for fewer
steps, ``--models medium`` for one model, ``--json PATH`` to write the results.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import numpy as np

MODELS = {
    "medium": ((784, 512, 512, 10), 128, "ce"),
    "large": ((1024, 4096, 4096, 1024), 256, "mse"),
}
LR = 0.01


def _model(sizes):
    import gradmesh.core as gm
    gm.manual_seed(0)
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(gm.nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(gm.nn.ReLU())
    return gm.nn.Sequential(*layers)


def _loss_fn(kind):
    import gradmesh.core.nn.functional as F

    def loss_fn(model, x, y):
        out = model(x)
        return F.cross_entropy(out, y) if kind == "ce" else F.mse_loss(out, y)
    return loss_fn


def _batch(sizes, batch, kind, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, sizes[0])).astype(np.float32)
    y = (rng.integers(0, sizes[-1], batch).astype(np.int64) if kind == "ce"
         else rng.standard_normal((batch, sizes[-1])).astype(np.float32))
    return x, y


def run_local(name: str, steps: int) -> dict:
    import gradmesh.core as gm
    sizes, batch, kind = MODELS[name]
    model, loss_fn = _model(sizes), _loss_fn(kind)
    opt = gm.optim.SGD(model.parameters(), lr=LR)
    x, y = (gm.from_numpy(a) for a in _batch(sizes, batch, kind))
    times = []
    for i in range(steps + 1):               # the first step warms up
        t = time.perf_counter()
        opt.zero_grad()
        loss_fn(model, x, y).backward()
        opt.step()
        if i:
            times.append(time.perf_counter() - t)
    step = statistics.median(times)
    return {"step_seconds": step, "samples_per_second": batch / step}


def run_distributed(name: str, workers: int, steps: int) -> dict:
    import gradmesh.core as gm
    from gradmesh.client.cluster import LocalCluster
    sizes, batch, kind = MODELS[name]
    model, loss_fn = _model(sizes), _loss_fn(kind)
    x, y = _batch(sizes, batch, kind)
    cores = os.cpu_count() or 1
    with LocalCluster(workers=workers, shards=0, checkpoint_every=0,
                      threads_per_worker=max(1, cores // workers)) as cluster:
        client = cluster.client()
        job = client.create_job(model, loss_fn, gm.optim.SGD(model.parameters(), lr=LR),
                                micro_batch_size=-(-batch // workers),
                                example_batch=(x[:4], y[:4]), data_names=["x", "y"])
        rows = []
        for i in range(steps + 1):
            t = time.perf_counter()
            r = job.step(x, y)
            wall = time.perf_counter() - t
            if i:
                rows.append((wall, r.timings))
    med = lambda key: statistics.median(t[key] for _, t in rows)  # noqa: E731
    wall = statistics.median(w for w, _ in rows)
    total = med("total")
    parts = {"pull": med("pull"), "compute": med("compute"),
             "worker_compute": med("worker_compute"), "push": med("push"),
             "apply": med("apply")}
    parts["coordinator_other"] = max(0.0, total - parts["pull"] - parts["compute"]
                                     - parts["apply"])
    parts["client_round_trip"] = max(0.0, wall - total)
    return {"step_seconds": wall, "samples_per_second": batch / wall, "breakdown": parts}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="medium,large")
    p.add_argument("--steps", type=int, default=None, help="timed steps per configuration")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    results = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                           "numpy": np.__version__, "platform": platform.platform()},
               "models": {}}
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        if name not in MODELS:
            p.error(f"unknown model {name!r}; expected {sorted(MODELS)}")
        steps = args.steps or (3 if args.quick else (20 if name == "medium" else 6))
        r = {"local": run_local(name, steps)}
        for workers in (1, 2):
            r[f"{workers}_worker"] = run_distributed(name, workers, steps)
        local = r["local"]["samples_per_second"]
        for key in ("1_worker", "2_worker"):
            r[key]["vs_local"] = r[key]["samples_per_second"] / local
        results["models"][name] = r
        sizes, batch, _ = MODELS[name]
        print(f"\n{name} MLP {'-'.join(map(str, sizes))}, batch {batch}")
        print(f"  {'':10} {'samples/s':>10} {'step ms':>8} {'vs local':>8}")
        for key, label in (("local", "local"), ("1_worker", "1 worker"),
                           ("2_worker", "2 workers")):
            v = r[key]
            ratio = f"{v['vs_local']:.2f}" if "vs_local" in v else ""
            print(f"  {label:10} {v['samples_per_second']:10.0f} {v['step_seconds'] * 1e3:8.1f} "
                  f"{ratio:>8}")
        for key in ("1_worker", "2_worker"):
            b = r[key]["breakdown"]
            print(f"  {key} breakdown (ms): " + ", ".join(
                f"{k} {v * 1e3:.1f}" for k, v in b.items()))
        sys.stdout.flush()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
