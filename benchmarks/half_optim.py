"""Optimizer updates of one half-precision parameter: gradmesh vs torch's CPU optimizer.

For each rule (SGD with momentum, Adam, AdamW, RMSprop, Adagrad, Adamax, NAdam) and each
dtype (bfloat16, float16; float32 for reference), one update of a parameter of ``--size``
elements is timed in gradmesh's update rule (``gradmesh.core.optim.UPDATE_RULES``, what an
``Optimizer`` and a parameter shard run) and in ``torch.optim`` (``foreach=False``, the
single-tensor path that gradmesh reproduces bit for bit), interleaved round-robin: the
ratio of each repetition is taken a moment apart, and the table gives medians.

    python benchmarks/half_optim.py            # 1M elements, 15 repetitions
    python benchmarks/half_optim.py --quick    # 3 repetitions
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np
import torch

import gradmesh.core as gm
from gradmesh.core import optim

RULES = {
    "sgd": ("SGD", dict(lr=0.05, momentum=0.9)),
    "adam": ("Adam", dict(lr=0.01)),
    "adamw": ("AdamW", dict(lr=0.01, weight_decay=0.1)),
    "rmsprop": ("RMSprop", dict(lr=0.01)),
    "adagrad": ("Adagrad", dict(lr=0.1)),
    "adamax": ("Adamax", dict(lr=0.01)),
    "nadam": ("NAdam", dict(lr=0.01)),
}
DTYPES = {
    "bfloat16": (gm.bfloat16, torch.bfloat16),
    "float16": (gm.float16, torch.float16),
    "float32": (gm.float32, torch.float32),
}


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _sides(rule: str, dtype_name: str, size: int):
    """One update of gradmesh's rule and one of torch's optimizer, each with a step done."""
    torch_name, hyper = RULES[rule]
    gdt, tdt = DTYPES[dtype_name]
    rng = np.random.default_rng(0)
    start = rng.standard_normal(size).astype(np.float32)
    grad = (rng.standard_normal(size) * 0.1).astype(np.float32)
    param, g, state = start.astype(gdt.np), grad.astype(gdt.np), {}
    tparam = torch.from_numpy(start).to(tdt).requires_grad_()
    tparam.grad = torch.from_numpy(grad).to(tdt)
    topt = getattr(torch.optim, torch_name)([tparam], foreach=False, **hyper)

    def ours() -> None:
        optim.UPDATE_RULES[rule](np, param, g, state, **hyper)

    ours(), topt.step()
    return ours, topt.step


def measure(size: int, repeats: int, rules, dtype_names) -> list[dict]:
    rows = []
    for rule in rules:
        for dtype_name in dtype_names:
            ours, theirs = _sides(rule, dtype_name, size)
            times = [(_time(ours), _time(theirs)) for _ in range(repeats)]
            rows.append(
                {
                    "rule": rule,
                    "dtype": dtype_name,
                    "gradmesh_ms": 1e3 * statistics.median(t[0] for t in times),
                    "torch_ms": 1e3 * statistics.median(t[1] for t in times),
                    "ratio": statistics.median(t[0] / t[1] for t in times),
                }
            )
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=1 << 20, help="parameter elements (1M)")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--quick", action="store_true", help="3 repetitions")
    ap.add_argument("--rules", default=",".join(RULES), help="comma-separated rules")
    ap.add_argument("--dtypes", default=",".join(DTYPES), help="comma-separated dtypes")
    ap.add_argument("--json", metavar="PATH", help="write the results as JSON")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    repeats = 3 if args.quick else args.repeats
    rows = measure(args.size, repeats, args.rules.split(","), args.dtypes.split(","))
    print(f"{args.size} elements, {repeats} repetitions, load {os.getloadavg()[0]:.1f}")
    print(f"{'rule':8} {'dtype':9} {'gradmesh ms':>12} {'torch ms':>9} {'ratio':>6}")
    for r in rows:
        print(
            f"{r['rule']:8} {r['dtype']:9} {r['gradmesh_ms']:12.2f} {r['torch_ms']:9.2f} "
            f"{r['ratio']:6.2f}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"size": args.size, "repeats": repeats, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
