"""benchmarks/netns.py: workers in network namespaces behind rate-limited veth pairs.

Runs the benchmark's quick mode for one timed step per link where namespaces can be made
(root, iproute2), and checks that it skips in one line where they cannot.
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "netns.py"


@pytest.fixture(scope="module")
def netns():
    spec = importlib.util.spec_from_file_location("gradmesh_bench_netns", PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _namespaces() -> str:
    return subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout


def test_skips_in_one_line_without_root(netns, monkeypatch, capsys):
    monkeypatch.setattr(netns.os, "geteuid", lambda: 1000)
    assert netns.main(["--quick"]) == 0
    out = capsys.readouterr().out
    assert out == "netns.py: skipped: creating network namespaces needs root (CAP_NET_ADMIN)\n"


@pytest.mark.slow
def test_quick_run_shapes_the_links_and_removes_the_namespaces(netns, tmp_path, capsys):
    reason = netns.unavailable()
    if reason:
        pytest.skip(reason)
    out = tmp_path / "netns.json"
    assert netns.main(["--quick", "--steps", "1", "--json", str(out)]) == 0
    everything = json.loads(out.read_text())["rows"]
    rows = {r["link"]: r for r in everything if r["compression"] == "off"}
    assert set(rows) == {"unlimited", "1gbit"}
    compressed = {r["link"]: r for r in everything if r["compression"] == "topk"}
    assert set(compressed) == {"unlimited", "1gbit"}
    for r in compressed.values():  # top-k 1%: indices and values, under 3% of the bytes
        assert 0 < r["gradient_bytes"] < 0.03 * r["parameter_bytes"]
    for r in [*rows.values(), *compressed.values()]:
        assert r["model"] == "medium" and r["workers"] == 1 and r["steps"] == 1
        assert math.isfinite(r["loss_first"]) and r["step_ms"] > 0
    # A token bucket of 1 Gbit/s lets through at most its rate plus one burst (1 MiB of
    # the 32 MiB sent), however fast or loaded the machine.
    assert rows["1gbit"]["tcp_check_gbit"] < 1.1
    assert rows["1gbit"]["qdisc"].startswith("tbf rate 1gbit") or "netem" in rows["1gbit"]["qdisc"]
    assert "| topk |" in capsys.readouterr().out  # the compressed rows
    tag = f"gm{netns.os.getpid() % 100000}n"
    assert tag not in _namespaces()


def test_hosts_are_removed_after_an_error(netns):
    reason = netns.unavailable()
    if reason:
        pytest.skip(reason)
    with pytest.raises(RuntimeError, match="boom"):
        with netns.Hosts(2) as hosts:
            names = [h.namespace for h in hosts.hosts]
            assert all(n in _namespaces() for n in names)
            raise RuntimeError("boom")
    assert not any(n in _namespaces() for n in names)
