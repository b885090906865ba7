"""benchmarks/step_breakdown.py: a medium step followed from the client's call to the
worker's forward and backward, with each process's CPU and context switches (run as a
process of its own: it wraps the coordinator's functions to time them)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "step_breakdown.py"


def _ms(out: str, label: str) -> float:
    found = re.search(rf"^\s+{re.escape(label)}\s+([0-9.]+)$", out, re.M)
    assert found, f"{label!r} missing from:\n{out}"
    return float(found.group(1))


def test_breaks_a_step_down_from_the_client_to_the_worker():
    run = subprocess.run(
        [sys.executable, str(PATH), "--steps", "3", "--warmup", "1"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    out = run.stdout
    assert "medium MLP, 1 worker(s), 1 BLAS thread(s) each, 3 steps" in out
    # Nested calls take at least as long as what runs inside them.
    call = _ms(out, "client: Step call (round trip)")
    assert call >= _ms(out, "coordinator: step") >= _ms(out, "coordinator: dispatch")
    assert _ms(out, "coordinator: its gRPC call") >= _ms(out, "worker: forward") > 0
    assert _ms(out, "worker: backward") > 0 and _ms(out, "coordinator: apply (SGD)") > 0
    cpu = re.findall(r"^\s+(client \+ coordinator|worker 0)\s+CPU\s+([0-9.]+) ms", out, re.M)
    assert [name for name, _ in cpu] == ["client + coordinator", "worker 0"]
    assert all(float(ms) > 0 for _, ms in cpu)


def test_refuses_a_bad_count():
    run = subprocess.run(
        [sys.executable, str(PATH), "--workers", "0"], capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 2 and "--workers" in run.stderr
