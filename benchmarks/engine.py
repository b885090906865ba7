"""Engine benchmark: one training step (forward, backward, SGD) of three MLPs.

Three implementations of the same step, timed in the same run and interleaved
(round-robin per repetition, so that load from other processes hits them alike):

* ``gradmesh``: ``gradmesh.core.nn`` + ``gradmesh.core.optim.SGD``, written as a PyTorch
  user would write it;
* ``torch``: PyTorch eager on the CPU, thread count left at its default;
* ``numpy``: the step written by hand (explicit forward, backward, in-place SGD): the
  floor any engine over NumPy can reach.

Run ``python benchmarks/engine.py`` (about 3 minutes), ``--quick`` for a short run,
``--json PATH`` to write the results. ``--device cuda`` runs the same three on a GPU:
gradmesh over CuPy, PyTorch on CUDA, and the hand-written step over CuPy (still labelled
``numpy``); every timed step then ends with the loss read back, which waits for the GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

LR = 0.01


@dataclass(frozen=True)
class Model:
    name: str
    sizes: tuple  # layer widths, input first
    batch: int
    loss: str  # "ce" (class labels) or "mse" (regression targets)
    reps: int  # repetitions of the round-robin (full run)
    steps: int  # timed steps per implementation per repetition


MODELS = (
    Model("small", (64, 128, 10), 64, "ce", reps=100, steps=50),
    Model("medium", (784, 512, 512, 10), 128, "ce", reps=80, steps=8),
    Model("large", (1024, 4096, 4096, 1024), 256, "mse", reps=20, steps=1),
)


def init_params(m: Model, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """nn.Linear's default init (uniform in +-1/sqrt(fan_in)), (out, in) weights, float32."""
    rng = np.random.default_rng(seed)
    params = []
    for fan_in, fan_out in zip(m.sizes[:-1], m.sizes[1:]):
        bound = 1.0 / np.sqrt(fan_in)
        w = rng.uniform(-bound, bound, (fan_out, fan_in)).astype(np.float32)
        b = rng.uniform(-bound, bound, (fan_out,)).astype(np.float32)
        params.append((w, b))
    return params


def make_batch(m: Model, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((m.batch, m.sizes[0])).astype(np.float32)
    if m.loss == "ce":
        y = rng.integers(0, m.sizes[-1], m.batch).astype(np.int64)
    else:
        y = rng.standard_normal((m.batch, m.sizes[-1])).astype(np.float32)
    return x, y


# ---------------------------------------------------------------- gradmesh and torch ------


def library_step(lib, m: Model, params, x, y, device: str = "cpu") -> Callable[[], object]:
    """The step as a PyTorch user writes it; ``lib`` is ``gradmesh.core`` or ``torch``, the
    same code for both (which is the point of gradmesh's API)."""
    layers = []
    for i, (w, b) in enumerate(params):
        lin = lib.nn.Linear(w.shape[1], w.shape[0])
        with lib.no_grad():
            lin.weight.copy_(lib.from_numpy(w))
            lin.bias.copy_(lib.from_numpy(b))
        layers.append(lin)
        if i < len(params) - 1:
            layers.append(lib.nn.ReLU())
    model = lib.nn.Sequential(*layers).to(device)
    opt = lib.optim.SGD(model.parameters(), lr=LR)
    xt, yt = lib.from_numpy(x).to(device), lib.from_numpy(y).to(device)
    F = lib.nn.functional
    loss_fn = F.cross_entropy if m.loss == "ce" else F.mse_loss

    def step():
        opt.zero_grad()
        loss = loss_fn(model(xt), yt)
        loss.backward()
        opt.step()
        return loss

    return step


def gradmesh_step(m: Model, params, x, y, device: str) -> Callable[[], object]:
    import gradmesh.core as gm

    return library_step(gm, m, params, x, y, device)


def torch_step(m: Model, params, x, y, device: str) -> Callable[[], object]:
    import torch

    return library_step(torch, m, params, x, y, device)


# ------------------------------------------------------------------- hand-written ------


def numpy_step(m: Model, params, x, y, device: str) -> Callable[[], float]:
    """Forward, backward and SGD written out by hand, in float32, updating in place; over
    CuPy on ``cuda``."""
    if device == "cuda":
        import cupy as xp
    else:
        xp = np
    ws = [xp.array(w) for w, _ in params]
    bs = [xp.array(b) for _, b in params]
    x, y = xp.asarray(x), xp.asarray(y)
    n = len(ws)
    rows = xp.arange(m.batch)

    def step() -> float:
        acts = [x]
        h = x
        for i in range(n):
            h = h @ ws[i].T
            h += bs[i]
            if i < n - 1:
                xp.maximum(h, 0, out=h)
            acts.append(h)
        out = acts[-1]
        if m.loss == "ce":
            z = out - out.max(axis=1, keepdims=True)
            ez = xp.exp(z)
            s = ez.sum(axis=1, keepdims=True)
            loss = float(xp.log(s[:, 0]).mean() - z[rows, y].mean())
            g = ez / s
            g[rows, y] -= 1
            g *= np.float32(1.0 / m.batch)
        else:
            d = out - y
            loss = float(xp.mean(d * d))
            g = d * np.float32(2.0 / d.size)
        for i in reversed(range(n)):
            a = acts[i]
            gw = g.T @ a
            gb = g.sum(axis=0)
            if i > 0:
                g = g @ ws[i]
                g *= acts[i] > 0  # relu's gradient, from its output
            ws[i] -= np.float32(LR) * gw
            bs[i] -= np.float32(LR) * gb
        return loss

    return step


IMPLEMENTATIONS = {"gradmesh": gradmesh_step, "torch": torch_step, "numpy": numpy_step}


# ----------------------------------------------------------------------------- run ------


def _as_float(loss) -> float:
    return float(loss.item()) if hasattr(loss, "item") else float(loss)


def check_agreement(m: Model, device: str) -> dict[str, float]:
    """First-step losses and second-step losses of each implementation: all must agree."""
    params, (x, y) = init_params(m), make_batch(m)
    out = {}
    for name, make in IMPLEMENTATIONS.items():
        step = make(m, params, x, y, device)
        first, second = _as_float(step()), _as_float(step())
        out[name] = (first, second)
    ref = out["torch"]
    for name, (first, second) in out.items():
        if not (np.isclose(first, ref[0], rtol=1e-4) and np.isclose(second, ref[1], rtol=1e-3)):
            raise SystemExit(
                f"{m.name}: {name} disagrees with torch: losses {first}, {second} "
                f"vs {ref[0]}, {ref[1]}"
            )
    return {name: v[1] for name, v in out.items()}


def bench(m: Model, reps: int, steps: int, device: str = "cpu") -> dict[str, float]:
    """Median milliseconds per step of each implementation, interleaved round-robin."""
    # Each step is timed on its own and the median taken: the machine may be shared, and
    # a median ignores the steps that a neighbour's burst (or a GC pass) lands on.
    params, (x, y) = init_params(m), make_batch(m)
    steps_of = {name: make(m, params, x, y, device) for name, make in IMPLEMENTATIONS.items()}
    if device == "cuda":  # a GPU step is done when its loss can be read back
        steps_of = {name: (lambda step=step: _as_float(step())) for name, step in steps_of.items()}
    for step in steps_of.values():  # warm-up: allocator, BLAS threads, caches
        for _ in range(max(1, steps // 2)):
            step()
    times: dict[str, list[float]] = {name: [] for name in steps_of}
    clock = time.perf_counter
    for _ in range(reps):
        for name, step in steps_of.items():
            for _ in range(steps):
                t0 = clock()
                step()
                times[name].append(clock() - t0)
    return {name: 1e3 * statistics.median(ts) for name, ts in times.items()}


def header(device: str = "cpu") -> dict:
    import threadpoolctl
    import torch

    blas = [
        {
            k: info.get(k)
            for k in ("internal_api", "version", "num_threads", "threading_layer", "architecture")
        }
        for info in threadpoolctl.threadpool_info()
        if info.get("user_api") == "blas"
    ]
    return {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch": torch.__version__,
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_blas": "mkl" if torch.backends.mkl.is_available() else "other",
        "numpy_blas": blas,
        "env": {
            k: os.environ.get(k)
            for k in (
                "OPENBLAS_CORETYPE",
                "OPENBLAS_L2_SIZE",
                "OPENBLAS_NUM_THREADS",
                "OMP_NUM_THREADS",
            )
        },
        **(_gpu() if device == "cuda" else {}),
    }


def _gpu() -> dict:
    import cupy

    props = cupy.cuda.runtime.getDeviceProperties(0)
    return {"gpu": props["name"].decode(), "cupy": cupy.__version__}


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a short run (about 20 s)")
    ap.add_argument("--json", metavar="PATH", help="write the results as JSON")
    ap.add_argument(
        "--models",
        default="small,medium,large",
        help="comma-separated subset of small,medium,large",
    )
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    args = ap.parse_args(argv)

    if args.device == "cuda":
        import gradmesh.core as gm

        if not gm.cuda_available():
            raise SystemExit("--device cuda needs CuPy and a CUDA device")
    info = header(args.device)
    print(
        f"cpu: {info['cpu']} ({info['cores']} cores); python {info['python']}, "
        f"numpy {info['numpy']}, torch {info['torch']} ({info['torch_threads']} threads, "
        f"{info['torch_blas']})"
    )
    for b in info["numpy_blas"]:
        print(
            f"numpy BLAS: {b['internal_api']} {b['version']}, {b['num_threads']} threads, "
            f"{b['threading_layer']}, {b['architecture']}"
        )
    print("env: " + ", ".join(f"{k}={v}" for k, v in info["env"].items()))
    if args.device == "cuda":
        print(
            f"gpu: {info['gpu']}, cupy {info['cupy']}; 'numpy' is the hand-written step over CuPy"
        )

    wanted = args.models.split(",")
    rows = []
    for m in MODELS:
        if m.name not in wanted:
            continue
        check_agreement(m, args.device)
        reps = max(4, m.reps // 8) if args.quick else m.reps
        ms = bench(m, reps, m.steps, args.device)
        rows.append(
            {
                "model": m.name,
                "device": args.device,
                "sizes": list(m.sizes),
                "batch": m.batch,
                "loss": m.loss,
                "steps_timed": reps * m.steps,
                **{f"{k}_ms": v for k, v in ms.items()},
                "gradmesh_over_torch": ms["gradmesh"] / ms["torch"],
                "gradmesh_over_numpy": ms["gradmesh"] / ms["numpy"],
                "numpy_over_torch": ms["numpy"] / ms["torch"],
            }
        )

    print()
    print(
        f"{'model':<8}{'shape':<24}{'batch':>6}{'gradmesh ms':>13}{'torch ms':>10}"
        f"{'numpy ms':>10}{'gm/torch':>10}{'gm/numpy':>10}{'np/torch':>10}"
    )
    for r in rows:
        shape = "-".join(map(str, r["sizes"]))
        print(
            f"{r['model']:<8}{shape:<24}{r['batch']:>6}{r['gradmesh_ms']:>13.3f}"
            f"{r['torch_ms']:>10.3f}{r['numpy_ms']:>10.3f}{r['gradmesh_over_torch']:>10.2f}"
            f"{r['gradmesh_over_numpy']:>10.2f}{r['numpy_over_torch']:>10.2f}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": info, "quick": args.quick, "results": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
