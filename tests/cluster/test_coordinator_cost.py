"""benchmarks/coordinator_cost.py: a real coordinator stepping a job over stub workers
that answer at once (one gRPC server bound to one port per stub, in a child process)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "coordinator_cost.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("gradmesh_bench_coordinator_cost", PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_steps_over_stubs_and_reports_each_point(bench, tmp_path, capsys):
    out = tmp_path / "cost.json"
    argv = ["--stubs", "1,3", "--models", "tiny", "--steps", "2", "--warmup", "1"]
    assert bench.main([*argv, "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["model"], r["stubs"]) for r in rows] == [("tiny", 1), ("tiny", 3)]
    # 64*128 + 128 + 128*10 + 10 float32 parameters.
    assert {r["parameter_bytes"] for r in rows} == {4 * (64 * 128 + 128 + 128 * 10 + 10)}
    assert all(r["cpu_ms"] > 0 and r["step_ms"] > 0 for r in rows)
    assert "| tiny 64-128-10 (0.04 MB) | 3 |" in capsys.readouterr().out


def test_profile_lists_the_coordinator_functions(bench, capsys):
    assert bench.main(["--profile", "2", "--models", "tiny", "--steps", "1", "--top", "40"]) == 0
    out = capsys.readouterr().out
    assert "tiny, 2 stubs, 1 steps" in out
    assert "dispatch.py" in out and "workers.py" in out  # the lanes' threads are profiled


def test_bad_arguments_name_the_option(bench, capsys):
    with pytest.raises(SystemExit):
        bench.main(["--models", "huge"])
    assert "--models: expected some of tiny,small,medium" in capsys.readouterr().err
