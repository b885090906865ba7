"""``gradmesh train --config job.toml``: train a model described in a TOML file.

A complete example (every key but ``model.layers``, ``data.train`` and ``optimizer.name``
has a default)::

    [model]
    layers = [
      { type = "linear", in = 64, out = 128 },
      { type = "relu" },
      { type = "dropout", p = 0.1 },
      { type = "linear", in = 128, out = 10 },
    ]
    loss = "cross_entropy"          # or "mse"
    seed = 0                        # initial weights

    [data]
    train = "train.npz"             # .npz with arrays x and y, or a table of two .npy:
    # train = { x = "x.npy", y = "y.npy" }
    test = "test.npz"               # optional: accuracy / loss reported at the end
    x = "x"                         # array names inside .npz files
    y = "y"

    [optimizer]
    name = "adam"                   # sgd adam adamw rmsprop adagrad adamax nadam; other keys:
                                    # its hyper-parameters
    lr = 0.001

    [training]
    epochs = 5
    batch_size = 128
    micro_batch_size = 32
    seed = 0                        # shuffling

    [cluster]
    address = "127.0.0.1:50053"     # a running coordinator, or a local cluster:
    # local = { workers = 2, shards = 0 }

    [output]
    parameters = "trained.npz"      # optional: the final parameters

Layer types: linear (in, out, bias), conv2d (in_channels, out_channels, kernel_size,
stride, padding), maxpool2d / avgpool2d (kernel_size, stride), flatten, relu, tanh,
sigmoid, gelu, leaky_relu (negative_slope), dropout (p). A bad config is reported with
the key that is wrong (``model.layers[2].out: expected a positive integer, got -3``).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from typing import Any

import numpy as np

import gradmesh.core as gm
import gradmesh.core.nn.functional as F
from gradmesh.client.cluster import LocalCluster
from gradmesh.client.coordinator import CoordinatorClient
from gradmesh.client.training import batches, fit
from gradmesh.core import optim
from gradmesh.wire.errors import GradmeshError

__all__ = ["ConfigError", "load_config", "build_model", "add_arguments", "run"]


class ConfigError(ValueError):
    """A bad training config; the message starts with the offending key."""


def _need(table: dict, key: str, where: str, kind, default: Any = ..., check=None):
    full = f"{where}.{key}" if where else key
    if key not in table:
        if default is ...:
            raise ConfigError(f"{full}: missing (required)")
        return default
    value = table[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds:
        ok = False
    else:
        ok = isinstance(value, kinds)
    if not ok:
        names = " or ".join(k.__name__ for k in kinds)
        raise ConfigError(f"{full}: expected {names}, got {value!r}")
    if check is not None:
        problem = check(value)
        if problem:
            raise ConfigError(f"{full}: {problem}, got {value!r}")
    return value


def _positive(v) -> str | None:
    return None if v >= 1 else "expected a positive integer"


def _non_negative(v) -> str | None:
    return None if v >= 0 else "expected a number >= 0"


def _unknown(table: dict, allowed: set[str], where: str) -> None:
    extra = sorted(set(table) - allowed)
    if extra:
        raise ConfigError(f"{where}.{extra[0]}: unknown key; expected one of {sorted(allowed)}")


_LAYER_KEYS: dict[str, dict[str, tuple[Any, Any]]] = {
    "linear": {"in": (int, ...), "out": (int, ...), "bias": (bool, True)},
    "conv2d": {
        "in_channels": (int, ...),
        "out_channels": (int, ...),
        "kernel_size": (int, ...),
        "stride": (int, 1),
        "padding": (int, 0),
    },
    "maxpool2d": {"kernel_size": (int, ...), "stride": (int, None)},
    "avgpool2d": {"kernel_size": (int, ...), "stride": (int, None)},
    "flatten": {},
    "relu": {},
    "tanh": {},
    "sigmoid": {},
    "gelu": {},
    "leaky_relu": {"negative_slope": ((int, float), 0.01)},
    "dropout": {"p": ((int, float), 0.5)},
}


def build_model(layers: list, seed: int = 0):
    """A ``Sequential`` from the layer list of ``[model]`` (validated, naming the key)."""
    nn = gm.nn
    if not isinstance(layers, list) or not layers:
        raise ConfigError(
            "model.layers: expected a non-empty list of tables like "
            '{ type = "linear", in = 64, out = 10 }'
        )
    gm.manual_seed(seed)
    modules: list[nn.Module] = []
    for i, layer in enumerate(layers):
        where = f"model.layers[{i}]"
        if not isinstance(layer, dict):
            raise ConfigError(f"{where}: expected a table, got {layer!r}")
        kind = _need(layer, "type", where, str)
        spec = _LAYER_KEYS.get(kind)
        if spec is None:
            raise ConfigError(
                f"{where}.type: unknown layer {kind!r}; expected one of {sorted(_LAYER_KEYS)}"
            )
        _unknown(layer, set(spec) | {"type"}, where)
        a = {}
        for key, (k, default) in spec.items():
            check = _positive if k is int and key not in ("padding",) else None
            if key == "padding":
                check = _non_negative
            if key == "p":
                check = lambda v: None if 0 <= v <= 1 else "expected a probability in [0, 1]"  # noqa: E731
            a[key] = _need(layer, key, where, k, default, check)
        if kind == "linear":
            modules.append(nn.Linear(a["in"], a["out"], bias=a["bias"]))
        elif kind == "conv2d":
            modules.append(
                nn.Conv2d(
                    a["in_channels"],
                    a["out_channels"],
                    a["kernel_size"],
                    stride=a["stride"],
                    padding=a["padding"],
                )
            )
        elif kind == "maxpool2d":
            modules.append(nn.MaxPool2d(a["kernel_size"], a["stride"]))
        elif kind == "avgpool2d":
            modules.append(nn.AvgPool2d(a["kernel_size"], a["stride"]))
        elif kind == "leaky_relu":
            modules.append(nn.LeakyReLU(float(a["negative_slope"])))
        elif kind == "dropout":
            modules.append(nn.Dropout(float(a["p"])))
        else:
            modules.append(
                {
                    "flatten": nn.Flatten,
                    "relu": nn.ReLU,
                    "tanh": nn.Tanh,
                    "sigmoid": nn.Sigmoid,
                    "gelu": nn.GELU,
                }[kind]()
            )
    return nn.Sequential(*modules)


def _load_arrays(spec, where: str, x_key: str, y_key: str, base: str):
    def path(p: str, key: str) -> str:
        full = p if os.path.isabs(p) else os.path.join(base, p)
        if not os.path.exists(full):
            raise ConfigError(f"{key}: file {full} does not exist")
        return full

    try:
        if isinstance(spec, str):
            full = path(spec, where)
            if not full.endswith(".npz"):
                raise ConfigError(
                    f'{where}: expected a .npz file or {{ x = "x.npy", y = "y.npy" }}, got {spec!r}'
                )
            with np.load(full, allow_pickle=False) as z:
                for k in (x_key, y_key):
                    if k not in z:
                        raise ConfigError(
                            f"{where}: {spec} has no array {k!r} (it has "
                            f"{sorted(z.files)}); set data.x / data.y"
                        )
                return z[x_key], z[y_key]
        if isinstance(spec, dict):
            _unknown(spec, {"x", "y"}, where)
            x = np.load(path(_need(spec, "x", where, str), f"{where}.x"), allow_pickle=False)
            y = np.load(path(_need(spec, "y", where, str), f"{where}.y"), allow_pickle=False)
            return x, y
    except (OSError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"{where}: cannot read: {e}") from None
    raise ConfigError(
        f"{where}: expected a .npz path or a table {{ x = ..., y = ... }}, got {spec!r}"
    )


def load_config(path: str) -> dict:
    """Read and check a config; returns a normalised dict (model, data arrays, ...)."""
    import tomllib  # Python 3.11+: only `gradmesh train` needs it (3.10 is supported)

    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"config: cannot read {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config: {path} is not valid TOML: {e}") from None
    _unknown(raw, {"model", "data", "optimizer", "training", "cluster", "output"}, "config")
    base = os.path.dirname(os.path.abspath(path))
    model_t = _need(raw, "model", "", dict)
    _unknown(model_t, {"layers", "loss", "seed"}, "model")
    loss = _need(
        model_t,
        "loss",
        "model",
        str,
        "cross_entropy",
        lambda v: None if v in ("cross_entropy", "mse") else 'expected "cross_entropy" or "mse"',
    )
    model_seed = _need(model_t, "seed", "model", int, 0)
    model = build_model(_need(model_t, "layers", "model", list), model_seed)

    data_t = _need(raw, "data", "", dict)
    _unknown(data_t, {"train", "test", "x", "y"}, "data")
    x_key = _need(data_t, "x", "data", str, "x")
    y_key = _need(data_t, "y", "data", str, "y")
    x, y = _load_arrays(
        _need(data_t, "train", "data", (str, dict)), "data.train", x_key, y_key, base
    )
    test = None
    if "test" in data_t:
        test = _load_arrays(data_t["test"], "data.test", x_key, y_key, base)
    for name, (a, b) in {"data.train": (x, y), **({"data.test": test} if test else {})}.items():
        if len(a) != len(b) or len(a) == 0:
            raise ConfigError(
                f"{name}: x has {len(a)} rows and y {len(b)}; they must agree and be non-empty"
            )
    x = x.astype(np.float32) if x.dtype == np.float64 else x
    y = y.astype(np.int64) if loss == "cross_entropy" else y.astype(np.float32)

    opt_t = _need(raw, "optimizer", "", dict)
    try:
        optimizer = optim.validate(dict(opt_t))
    except ValueError as e:
        raise ConfigError(f"optimizer: {e}") from None

    train_t = _need(raw, "training", "", dict, {})
    _unknown(train_t, {"epochs", "batch_size", "micro_batch_size", "seed"}, "training")
    epochs = _need(train_t, "epochs", "training", int, 1, _positive)
    batch_size = _need(train_t, "batch_size", "training", int, 64, _positive)
    micro = _need(train_t, "micro_batch_size", "training", int, min(batch_size, 32), _positive)
    shuffle_seed = _need(train_t, "seed", "training", int, 0)

    cluster_t = _need(raw, "cluster", "", dict, {"local": {}})
    _unknown(cluster_t, {"address", "local", "token"}, "cluster")
    if ("address" in cluster_t) == ("local" in cluster_t):
        raise ConfigError(
            'cluster: give exactly one of address = "host:port" or local = { workers = 2 }'
        )
    local = None
    if "local" in cluster_t:
        local_t = _need(cluster_t, "local", "cluster", dict)
        _unknown(local_t, {"workers", "shards"}, "cluster.local")
        local = {
            "workers": _need(local_t, "workers", "cluster.local", int, 2, _positive),
            "shards": _need(local_t, "shards", "cluster.local", int, 0, _non_negative),
        }
    address = _need(cluster_t, "address", "cluster", str, None)
    output_t = _need(raw, "output", "", dict, {})
    _unknown(output_t, {"parameters"}, "output")
    return {
        "model": model,
        "loss": loss,
        "x": x,
        "y": y,
        "test": test,
        "optimizer": optimizer,
        "epochs": epochs,
        "batch_size": batch_size,
        "micro_batch_size": micro,
        "seed": shuffle_seed,
        "address": address,
        "local": local,
        "token": cluster_t.get("token"),
        "parameters_path": _need(output_t, "parameters", "output", str, None),
    }


def _loss_fn(kind: str):
    def loss_fn(model, x, y):
        out = model(x)
        return F.cross_entropy(out, y) if kind == "cross_entropy" else F.mse_loss(out, y)

    return loss_fn


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``gradmesh train``."""
    parser.add_argument("--config", required=True, help="the job's TOML file")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--connect-timeout",
        type=float,
        default=10.0,
        help="seconds to wait for the coordinator (cluster.address) to "
        "answer before giving up (default 10)",
    )


def _reachable(client: CoordinatorClient, seconds: float) -> bool:
    """Whether the coordinator's channel connects within ``seconds``."""
    import grpc

    try:
        grpc.channel_ready_future(client._channel).result(timeout=seconds)
    except grpc.FutureTimeoutError:
        return False
    return True


def run(args: argparse.Namespace) -> int:
    """Train as the config says; exit code 2 for a bad config."""
    try:
        cfg = load_config(args.config)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    model, x, y = cfg["model"], cfg["x"], cfg["y"]
    loss_fn = _loss_fn(cfg["loss"])
    try:
        with contextlib.ExitStack() as stack:
            if cfg["local"] is not None:
                cluster = stack.enter_context(LocalCluster(**cfg["local"]))
                target = cluster.coordinator_target
            else:
                target = cfg["address"]
            client = stack.enter_context(CoordinatorClient(target, token=cfg["token"]))
            if not _reachable(client, args.connect_timeout):
                print(
                    f"error: cannot reach the coordinator at {target} within "
                    f"{args.connect_timeout:g} s (cluster.address in {args.config}): is "
                    f"it running, and is the address right? (--connect-timeout)",
                    file=sys.stderr,
                )
                return 1
            try:
                job = client.create_job(
                    model,
                    loss_fn,
                    cfg["optimizer"],
                    cfg["micro_batch_size"],
                    example_batch=(x[:2], y[:2]),
                    data_names=["x", "y"],
                )
            except (gm.OpError, ValueError, TypeError) as e:
                print(f"error: model: cannot run the layers on the data: {e}", file=sys.stderr)
                return 2
            bs = cfg["batch_size"]
            history = fit(
                job,
                lambda epoch: batches(x, y, batch_size=bs, seed=cfg["seed"] * 1000 + epoch),
                epochs=cfg["epochs"],
                progress=not args.no_progress,
                steps_per_epoch=-(-len(x) // bs),
            )
            model.load_state_dict(job.parameters())
    except GradmeshError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(
        f"trained {len(history.losses)} steps: final loss {history.losses[-1]:.4f}, "
        f"{history.samples_per_second:.0f} samples/s"
    )
    if cfg["test"] is not None:
        tx, ty = cfg["test"]
        with gm.no_grad():
            out = model(gm.from_numpy(np.asarray(tx, dtype=x.dtype)))
        if cfg["loss"] == "cross_entropy":
            print(f"test accuracy: {float((out.numpy().argmax(axis=1) == ty).mean()):.2%}")
        else:
            print(f"test mse: {float(((out.numpy() - ty) ** 2).mean()):.6f}")
    if cfg["parameters_path"]:
        np.savez(
            cfg["parameters_path"], **{n: t.detach().numpy() for n, t in model.state_dict().items()}
        )
        print(f"parameters: {cfg['parameters_path']}")
    return 0
