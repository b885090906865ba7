"""Engine benchmark: one training step (forward, backward, optimizer) of three MLPs and of
the three models of examples/torch_scripts/ (a ResNet-style CNN with BatchNorm, a GPT-style
decoder, an LSTM classifier).

The implementations of a step are timed in the same run and interleaved (round-robin per
repetition, so that load from other processes hits them alike). For the MLPs:

* ``gradmesh``: ``gradmesh.core.nn`` + ``gradmesh.core.optim.SGD``, written as a PyTorch
  user would write it;
* ``torch``: PyTorch eager on the CPU, thread count left at its default;
* ``numpy``: the step written by hand (explicit forward, backward, in-place SGD): the
  floor any engine over NumPy can reach.

For ``cnn``, ``transformer`` and ``lstm``: gradmesh and torch, each running the model class
of its example script (the script loaded on gradmesh with its imports rewritten, and as
written on torch), from torch's initial weights and the same batch.

Run ``python benchmarks/engine.py`` (about 5 minutes), ``--quick`` for a short run,
``--models cnn,lstm`` for a subset, ``--json PATH`` to write the results. ``--alone
torch|gradmesh`` times one side only, in this process; ``--alone both`` runs each side in a
process of its own, one after the other, and combines them (NumPy's and torch's BLAS/OpenMP
threads spin for a while after a call, which slows whichever side runs next when they
take turns). ``--device cuda`` runs the same three on a GPU:
gradmesh over CuPy, PyTorch on CUDA, and the hand-written step over CuPy (still labelled
``numpy``); every timed step then ends with the loss read back, which waits for the GPU.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from gradmesh.core import allocator

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


# -------------------------------------------------------- the example scripts' models ------

SCRIPTS = Path(__file__).resolve().parents[1] / "examples" / "torch_scripts"


@dataclass(frozen=True)
class ScriptModel:
    name: str
    script: str  # examples/torch_scripts/<script>.py
    shape: str  # for the table
    batch: int
    reps: int
    steps: int


SCRIPT_MODELS = (
    ScriptModel("cnn", "resnet_onecycle", "ResNet-BN w16 3x32x32", 32, reps=20, steps=3),
    ScriptModel("transformer", "gpt_adamw_cosine", "GPT 2x128 h4 seq64", 16, reps=20, steps=3),
    ScriptModel("lstm", "lstm_classifier", "LSTM 2x128 seq32", 32, reps=20, steps=3),
)
VOCAB = 128  # the transformer's and the LSTM's


def load_script(name: str, lib_name: str):
    """The example script as a module, on gradmesh (imports rewritten) or on torch."""
    spec = importlib.util.spec_from_file_location("run_on_gradmesh", SCRIPTS / "run_on_gradmesh.py")
    assert spec is not None and spec.loader is not None
    runner = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(runner)
    return runner.load(SCRIPTS / f"{name}.py", on=lib_name)


def build_script_model(m: ScriptModel, module):
    """The model (as the benchmark sizes it), its optimizer class and keyword arguments,
    and its loss as ``loss(model, x, y)``."""
    torch_like, F = module.torch, module.F
    if m.name == "cnn":
        model = module.ResNet(num_classes=10, width=16)
        opt = (torch_like.optim.SGD, dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4))
        return model, opt, lambda model, x, y: F.cross_entropy(model(x), y)
    if m.name == "transformer":
        model = module.GPT(vocab=VOCAB, context=64, d_model=128, n_head=4, n_layer=2)
        opt = (torch_like.optim.AdamW, dict(lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1))
        return model, opt, lambda model, x, y: model(x, y)[1]
    model = module.LSTMClassifier(vocab=VOCAB, embed=64, hidden=128, num_layers=2, num_classes=10)
    opt = (torch_like.optim.Adam, dict(lr=1e-3))
    return model, opt, lambda model, x, y: F.cross_entropy(model(x), y)


def script_batch(m: ScriptModel, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    if m.name == "cnn":
        x = rng.standard_normal((m.batch, 3, 32, 32)).astype(np.float32)
        return x, rng.integers(0, 10, m.batch).astype(np.int64)
    if m.name == "transformer":
        tokens = rng.integers(0, VOCAB, (m.batch, 65)).astype(np.int64)
        return np.ascontiguousarray(tokens[:, :-1]), np.ascontiguousarray(tokens[:, 1:])
    x = rng.integers(0, VOCAB, (m.batch, 32)).astype(np.int64)
    return x, rng.integers(0, 10, m.batch).astype(np.int64)


def initial_state(m: ScriptModel) -> dict[str, np.ndarray] | None:
    """torch's initial weights (seed 0) as arrays; None when torch is not to be imported
    (``--alone gradmesh``: the timing does not depend on the values)."""
    import torch

    torch.manual_seed(0)
    model, _, _ = build_script_model(m, load_script(m.script, "torch"))
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def script_step(lib_name: str, m: ScriptModel, state, x, y, device: str):
    """zero_grad, forward, loss, backward, optimizer step: as the scripts do it."""
    module = load_script(m.script, lib_name)
    lib = module.torch
    model, (opt_class, opt_kwargs), loss_fn = build_script_model(m, module)
    if state is not None:
        model.load_state_dict({k: lib.from_numpy(v.copy()) for k, v in state.items()})
    model = model.to(device).train()
    opt = opt_class(model.parameters(), **opt_kwargs)
    xt, yt = lib.from_numpy(x).to(device), lib.from_numpy(y).to(device)

    def step():
        opt.zero_grad()
        loss = loss_fn(model, xt, yt)
        loss.backward()
        opt.step()
        return loss

    return step


def script_steps(m: ScriptModel, device: str, sides) -> dict[str, Callable[[], object]]:
    state = initial_state(m) if "torch" in sides else None
    x, y = script_batch(m)
    return {side: script_step(side, m, state, x, y, device) for side in sides}


# ----------------------------------------------------------------------------- run ------


def _as_float(loss) -> float:
    return float(loss.item()) if hasattr(loss, "item") else float(loss)


def mlp_steps(m: Model, device: str, sides) -> dict[str, Callable[[], object]]:
    params, (x, y) = init_params(m), make_batch(m)
    return {name: IMPLEMENTATIONS[name](m, params, x, y, device) for name in sides}


def check_agreement(name: str, steps_of: dict[str, Callable[[], object]]) -> None:
    """First-step losses and second-step losses of each implementation: all must agree."""
    out = {side: (_as_float(step()), _as_float(step())) for side, step in steps_of.items()}
    ref = out["torch"]
    for side, (first, second) in out.items():
        if not (np.isclose(first, ref[0], rtol=1e-4) and np.isclose(second, ref[1], rtol=1e-3)):
            raise SystemExit(
                f"{name}: {side} disagrees with torch: losses {first}, {second} "
                f"vs {ref[0]}, {ref[1]}"
            )


def bench(steps_of, reps: int, steps: int, device: str = "cpu") -> dict[str, float]:
    """Median milliseconds per step of each implementation, interleaved round-robin."""
    # Each step is timed on its own and the median taken: the machine may be shared, and
    # a median ignores the steps that a neighbour's burst (or a GC pass) lands on.
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


def run_model(m, args, sides) -> dict:
    """One model's row: agreement first (when torch and gradmesh both run), then timing."""
    is_mlp = isinstance(m, Model)

    def make():
        return mlp_steps(m, args.device, sides) if is_mlp else script_steps(m, args.device, sides)

    if "torch" in sides and len(sides) > 1:
        check_agreement(m.name, make())
    reps = max(4, m.reps // 8) if args.quick else m.reps
    ms = bench(make(), reps, m.steps, args.device)
    return {
        "model": m.name,
        "device": args.device,
        "shape": "-".join(map(str, m.sizes)) if is_mlp else m.shape,
        "batch": m.batch,
        "steps_timed": reps * m.steps,
        **{f"{k}_ms": v for k, v in ms.items()},
    }


def with_ratios(row: dict) -> dict:
    pairs = (("gradmesh", "torch"), ("gradmesh", "numpy"), ("numpy", "torch"))
    for a, b in pairs:
        if f"{a}_ms" in row and f"{b}_ms" in row:
            row[f"{a}_over_{b}"] = row[f"{a}_ms"] / row[f"{b}_ms"]
    return row


def print_table(rows: list[dict]) -> None:
    def cell(row, key, fmt):
        return format(row[key], fmt) if key in row else "-"

    print(
        f"{'model':<12}{'shape':<24}{'batch':>6}{'gradmesh ms':>13}{'torch ms':>10}"
        f"{'numpy ms':>10}{'gm/torch':>10}{'gm/numpy':>10}{'np/torch':>10}"
    )
    for r in rows:
        print(
            f"{r['model']:<12}{r['shape']:<24}{r['batch']:>6}"
            f"{cell(r, 'gradmesh_ms', '.3f'):>13}{cell(r, 'torch_ms', '.3f'):>10}"
            f"{cell(r, 'numpy_ms', '.3f'):>10}{cell(r, 'gradmesh_over_torch', '.2f'):>10}"
            f"{cell(r, 'gradmesh_over_numpy', '.2f'):>10}{cell(r, 'numpy_over_torch', '.2f'):>10}"
        )


def run_alone_both(argv: list[str], args) -> list[dict]:
    """``--alone torch``, then ``--alone gradmesh``, each in a fresh process; rows combined."""
    rest, skip = [], False
    for a in argv:  # drop --alone/--json and their values
        if skip:
            skip = False
        elif a in ("--alone", "--json"):
            skip = True
        elif not a.startswith(("--alone=", "--json=")):
            rest.append(a)
    by_side = {}
    with tempfile.TemporaryDirectory() as tmp:
        for side in ("torch", "gradmesh"):
            out = Path(tmp) / f"{side}.json"
            cmd = [sys.executable, __file__, *rest, "--alone", side, "--json", str(out)]
            subprocess.run(cmd, check=True)
            by_side[side] = {r["model"]: r for r in json.loads(out.read_text())["results"]}
    rows = []
    for name, row in by_side["gradmesh"].items():
        rows.append(with_ratios({**by_side["torch"][name], **row}))
    return rows


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
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a short run (about a minute)")
    ap.add_argument("--json", metavar="PATH", help="write the results as JSON")
    names = [m.name for m in MODELS + SCRIPT_MODELS]
    ap.add_argument(
        "--models", default=",".join(names), help=f"comma-separated subset of {','.join(names)}"
    )
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument(
        "--alone",
        choices=("torch", "gradmesh", "both"),
        help="one side only, in this process; both: each side in a process of its own",
    )
    ap.add_argument(
        "--threads",
        type=int,
        help="BLAS threads of NumPy and torch (threadpoolctl, torch.set_num_threads); "
        "default: each library's own",
    )
    args = ap.parse_args(argv)
    # Both libraries under the allocator settings that importing gradmesh applies (a steady
    # heap): with glibc's defaults torch faults in fresh pages too, so an --alone torch
    # process would otherwise run under other rules than gradmesh's.
    allocator.steady_heap()
    if args.threads:
        set_threads(args.threads)
    wanted = args.models.split(",")
    unknown = sorted(set(wanted) - set(names))
    if unknown:
        ap.error(f"--models: unknown {', '.join(unknown)}; choose from {', '.join(names)}")

    if args.device == "cuda":
        import gradmesh.core as gm

        if not gm.cuda_available():
            raise SystemExit("--device cuda needs CuPy and a CUDA device")
    info = header(args.device)
    print_header(info, args.device)
    if args.alone == "both":
        rows = run_alone_both(argv, args)
    else:
        rows = []
        for m in MODELS + SCRIPT_MODELS:
            if m.name in wanted:
                sides = list(IMPLEMENTATIONS) if isinstance(m, Model) else ["gradmesh", "torch"]
                sides = [args.alone] if args.alone else sides
                rows.append(with_ratios(run_model(m, args, sides)))
    print()
    print_table(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"machine": info, "quick": args.quick, "alone": args.alone, "results": rows},
                f,
                indent=2,
            )
    return 0


def set_threads(n: int) -> None:
    import threadpoolctl
    import torch

    threadpoolctl.threadpool_limits(n)
    torch.set_num_threads(n)


def print_header(info: dict, device: str) -> None:
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
    if device == "cuda":
        print(
            f"gpu: {info['gpu']}, cupy {info['cupy']}; 'numpy' is the hand-written step over CuPy"
        )


if __name__ == "__main__":
    sys.exit(main())
