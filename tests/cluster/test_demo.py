"""``gradmesh demo`` end to end (separate processes), and ``gradmesh train`` configs."""

from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import pytest

from gradmesh import cli
from gradmesh.client.train import ConfigError, load_config


def test_demo_trains_digits_to_95_percent_and_writes_a_loss_curve(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "gradmesh.cli",
            "demo",
            "--no-progress",
            "--output-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    accuracy = float(re.search(r"test accuracy: ([\d.]+)%", out.stdout).group(1))
    assert accuracy >= 95.0
    assert re.search(r"throughput: \d+ samples/s", out.stdout)
    png = tmp_path / "loss.png"
    assert f"loss curve: {png}" in out.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_transformer_demo_shortened_loss_falls_and_text_is_sampled(tmp_path):
    pytest.importorskip("torch")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "gradmesh.cli",
            "demo",
            "--model",
            "transformer",
            "--shards",
            "0",
            "--steps",
            "12",
            "--lr",
            "0.01",
            "--samples",
            "2",
            "--sample-length",
            "30",
            "--no-progress",
            "--output-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    before, after = map(
        float, re.search(r"validation loss: ([\d.]+) before, ([\d.]+) after", out.stdout).groups()
    )
    first, last = map(float, re.search(r"training loss ([\d.]+) -> ([\d.]+)", out.stdout).groups())
    assert after < before - 0.3 and last < first - 0.3, out.stdout
    samples = out.stdout.split("sampled text")[1].split("total time")[0]
    starts = [line for line in samples.splitlines() if line.startswith("  ...")]
    assert len(starts) == 2, samples
    continuations = samples.split("|")[1:]
    assert "".join(continuations).strip(), samples
    png = tmp_path / "transformer-loss.png"
    assert f"loss curve: {png}" in out.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_transformer_demo_without_torch_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch raises ImportError
    with pytest.raises(SystemExit, match=re.escape("pip install 'gradmesh[demo,torch]'")):
        cli.main(["demo", "--model", "transformer", "--steps", "1"])


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--steps", "5"], "--steps does not apply to --model digits"),
        (["--model", "transformer", "--epochs", "2"], "--epochs does not apply"),
        (["--model", "transformer", "--steps", "0"], "--steps"),
        (["--model", "transformer", "--lr", "-1"], "--lr must be > 0"),
    ],
)
def test_demo_flags_of_the_other_model_or_out_of_range_exit_2(flags, message, capsys):
    if "transformer" in flags:
        pytest.importorskip("torch")
    assert cli.main(["demo", *flags]) == 2
    assert message in capsys.readouterr().err


@pytest.fixture
def data_files(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((60, 4)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64)
    np.savez(tmp_path / "train.npz", x=x[:48], y=y[:48])
    np.save(tmp_path / "tx.npy", x[48:])
    np.save(tmp_path / "ty.npy", y[48:])
    return tmp_path


CONFIG = """
[model]
layers = [{{ type = "linear", in = 4, out = 8 }}, {{ type = "tanh" }},
          {{ type = "linear", in = 8, out = 2 }}]
[data]
train = "train.npz"
test = {{ x = "tx.npy", y = "ty.npy" }}
[optimizer]
name = "sgd"
lr = 0.2
momentum = 0.9
[training]
epochs = 3
batch_size = 16
micro_batch_size = 8
[cluster]
{cluster}
[output]
parameters = "out.npz"
"""


def test_train_runs_a_config_against_a_coordinator(data_files, capsys, monkeypatch):
    from gradmesh.server import coordinator as coordinator_mod
    from gradmesh.server import worker as worker_mod

    worker = worker_mod.start("cpu")
    server = coordinator_mod.start(workers=[worker.address])
    try:
        path = data_files / "job.toml"
        path.write_text(CONFIG.format(cluster=f'address = "{server.address}"'))
        monkeypatch.chdir(data_files)
        assert cli.main(["train", "--config", str(path), "--no-progress"]) == 0
    finally:
        server.stop(0)
        server.coordinator.close()
        worker.stop(0)
    out = capsys.readouterr().out
    assert "trained 9 steps" in out and "test accuracy:" in out
    with np.load(data_files / "out.npz") as z:
        assert sorted(z.files) == ["0.bias", "0.weight", "2.bias", "2.weight"]


@pytest.mark.parametrize(
    "edit,key",
    [
        (
            lambda c: c.replace('out = 8 }}, {{ type = "tanh"', 'out = -3 }}, {{ type = "tanh"'),
            "model.layers[0].out",
        ),
        (lambda c: c.replace('type = "tanh"', 'type = "swish"'), "model.layers[1].type"),
        (lambda c: c.replace('type = "tanh"', 'type = "tanh", size = 2'), "model.layers[1].size"),
        (lambda c: c.replace('train = "train.npz"', 'train = "missing.npz"'), "data.train"),
        (lambda c: c.replace('name = "sgd"', 'name = "lbfgs"'), "optimizer"),
        (lambda c: c.replace("lr = 0.2", "lr = -1.0"), "optimizer"),
        (lambda c: c.replace("epochs = 3", "epochs = 0"), "training.epochs"),
        (lambda c: c.replace("batch_size = 16", 'batch_size = "16"'), "training.batch_size"),
        (lambda c: c.replace("[training]", "[training]\nsteps = 3"), "training.steps"),
        (lambda c: c.replace("{cluster}", "local = {{ workers = 0 }}"), "cluster.local.workers"),
        (lambda c: c.replace("{cluster}", 'address = "a:1"\nlocal = {{}}'), "cluster"),
        (lambda c: c + "[extra]\n", "config.extra"),
        (lambda c: re.sub(r"layers = \[.*?\]\n", "layers = []\n", c, flags=re.S), "model.layers"),
    ],
)
def test_bad_configs_name_the_key(data_files, edit, key):
    path = data_files / "job.toml"
    path.write_text(edit(CONFIG).format(cluster='address = "127.0.0.1:1"'))
    with pytest.raises(ConfigError) as e:
        load_config(str(path))
    assert str(e.value).startswith(key + ":"), str(e.value)


def test_a_bad_config_exits_with_code_2_and_says_why(data_files, capsys):
    path = data_files / "job.toml"
    path.write_text("[model\n")
    assert cli.main(["train", "--config", str(path)]) == 2
    assert "not valid TOML" in capsys.readouterr().err
