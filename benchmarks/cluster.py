"""Distributed training throughput: samples/s with 1 and 2 workers vs one local process.

For the medium (784-512-512-10, batch 128, cross-entropy) and large (1024-4096-4096-1024,
batch 256, MSE) MLPs, in the same run:

* ``local``: ``gradmesh.core`` training in this process (forward, backward, SGD);
* ``1 worker`` / ``2 workers``: a :class:`~gradmesh.client.cluster.LocalCluster` (workers
  as separate processes, shards embedded in the coordinator), the global batch cut into
  one micro-batch per worker. Tensors go through shared memory (the default for workers on
  the coordinator's host);
* ``1 worker, bytes``: the same with ``--shared-memory off``, every tensor through gRPC,
  as with workers on other hosts.

The three run round-robin, one step each per round, so that load from other processes
hits them alike. Workers share the machine's cores (``threads_per_worker``
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


class LocalRunner:
    """Training in this process: forward, backward, SGD."""

    def __init__(self, name: str):
        import gradmesh.core as gm
        sizes, self.batch, kind = MODELS[name]
        self.model, self.loss_fn = _model(sizes), _loss_fn(kind)
        self.opt = gm.optim.SGD(self.model.parameters(), lr=LR)
        self.x, self.y = (gm.from_numpy(a) for a in _batch(sizes, self.batch, kind))

    def step(self) -> tuple[float, dict]:
        t = time.perf_counter()
        self.opt.zero_grad()
        self.loss_fn(self.model, self.x, self.y).backward()
        self.opt.step()
        return time.perf_counter() - t, {}


class ClusterRunner:
    """A LocalCluster of ``workers`` worker processes with embedded shards."""

    def __init__(self, name: str, workers: int, stack, shared: bool = True):
        import gradmesh.core as gm
        from gradmesh.client.cluster import LocalCluster
        sizes, self.batch, kind = MODELS[name]
        model, loss_fn = _model(sizes), _loss_fn(kind)
        self.x, self.y = _batch(sizes, self.batch, kind)
        cores = os.cpu_count() or 1
        cluster = stack.enter_context(LocalCluster(
            workers=workers, shards=0, checkpoint_every=0,
            threads_per_worker=max(1, cores // workers),
            coordinator_args=[] if shared else ["--shared-memory", "off"]))
        self.job = cluster.client().create_job(
            model, loss_fn, gm.optim.SGD(model.parameters(), lr=LR),
            micro_batch_size=-(-self.batch // workers), example_batch=(self.x[:4], self.y[:4]),
            data_names=["x", "y"])

    def step(self) -> tuple[float, dict]:
        t = time.perf_counter()
        r = self.job.step(self.x, self.y)
        return time.perf_counter() - t, r.timings


def measure(name: str, steps: int) -> dict:
    """Round-robin over local, 1 worker and 2 workers (one step each per round), so that
    load from other processes hits all three alike; medians of ``steps`` rounds after one
    warm-up round."""
    import contextlib
    with contextlib.ExitStack() as stack:
        runners = {"local": LocalRunner(name), "1_worker": ClusterRunner(name, 1, stack),
                   "1_worker_bytes": ClusterRunner(name, 1, stack, shared=False),
                   "2_worker": ClusterRunner(name, 2, stack)}
        rows: dict[str, list] = {k: [] for k in runners}
        for i in range(steps + 1):
            for key, runner in runners.items():
                wall, timings = runner.step()
                if i:
                    rows[key].append((wall, timings))
    batch = MODELS[name][1]
    out = {}
    for key, rs in rows.items():
        wall = statistics.median(w for w, _ in rs)
        out[key] = {"step_seconds": wall, "samples_per_second": batch / wall}
        if key == "local":
            continue
        med = lambda k: statistics.median(t[k] for _, t in rs)  # noqa: E731
        parts = {"pull": med("pull"), "compute": med("compute"),
                 "worker_compute": med("worker_compute"), "push": med("push"),
                 "apply": med("apply")}
        parts["coordinator_other"] = max(0.0, med("total") - parts["pull"] - parts["compute"]
                                         - parts["apply"])
        parts["client_round_trip"] = max(0.0, wall - med("total"))
        out[key]["breakdown"] = parts
    return out


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
        r = measure(name, steps)
        local = r["local"]["samples_per_second"]
        clustered = ("1_worker", "1_worker_bytes", "2_worker")
        for key in clustered:
            r[key]["vs_local"] = r[key]["samples_per_second"] / local
        results["models"][name] = r
        sizes, batch, _ = MODELS[name]
        print(f"\n{name} MLP {'-'.join(map(str, sizes))}, batch {batch}")
        print(f"  {'':10} {'samples/s':>10} {'step ms':>8} {'vs local':>8}")
        for key, label in (("local", "local"), ("1_worker", "1 worker"),
                           ("1_worker_bytes", "1 w, bytes"), ("2_worker", "2 workers")):
            v = r[key]
            ratio = f"{v['vs_local']:.2f}" if "vs_local" in v else ""
            print(f"  {label:10} {v['samples_per_second']:10.0f} {v['step_seconds'] * 1e3:8.1f} "
                  f"{ratio:>8}")
        for key in clustered:
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
