"""examples/node: the Node.js client, written from the .proto files alone, against a real
worker (`gradmesh worker` in a child process on a free 127.0.0.1 port).

Skips when `node` or `npm` is missing, or when `npm ci` cannot reach a registry (no
network). node_modules is kept between runs and reinstalled only when package-lock.json
changed (a stamp in node_modules holds the lockfile's SHA-256).
"""

from __future__ import annotations

import hashlib
import os
import re
import selectors
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "node"
STAMP = EXAMPLE / "node_modules" / ".gradmesh-lock-sha256"
NETWORK_ERRORS = (
    "ENOTFOUND",
    "EAI_AGAIN",
    "ECONNREFUSED",
    "ECONNRESET",
    "ETIMEDOUT",
    "ENETUNREACH",
    "EHOSTUNREACH",
    "network",
    "ENOTCACHED",
    "proxy",
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        shutil.which("node") is None or shutil.which("npm") is None,
        reason="needs Node.js (node and npm on PATH) for examples/node",
    ),
]


def _env() -> dict[str, str]:
    """The environment without GRADMESH_* settings (a token or worker address of the
    caller's must not leak into the worker or the client)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("GRADMESH_")}


@pytest.fixture(scope="module")
def node_modules() -> Path:
    version = subprocess.run(
        ["node", "--version"], capture_output=True, text=True, timeout=30
    ).stdout.strip()
    major = re.match(r"v(\d+)", version)
    if not major or int(major.group(1)) < 18:
        pytest.skip(f"examples/node needs Node.js 18 or later, found {version or 'none'}")
    lock = hashlib.sha256((EXAMPLE / "package-lock.json").read_bytes()).hexdigest()
    if STAMP.exists() and STAMP.read_text().strip() == lock:
        return EXAMPLE / "node_modules"
    try:
        done = subprocess.run(
            [
                "npm",
                "ci",
                "--prefer-offline",
                "--no-audit",
                "--no-fund",
                "--fetch-retries=1",
                "--fetch-retry-mintimeout=2000",
                "--fetch-retry-maxtimeout=10000",
            ],
            cwd=EXAMPLE,
            env=_env(),
            capture_output=True,
            text=True,
            timeout=300,
        )
    except subprocess.TimeoutExpired:
        pytest.skip("npm ci in examples/node took over 300 s (no network?)")
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip()[-1500:]
        network = [line for line in tail.splitlines() if any(e in line for e in NETWORK_ERRORS)]
        if network:
            pytest.skip(
                f"npm ci in examples/node could not fetch its packages (no network?): "
                f"{network[0][:300]}"
            )
        pytest.fail(f"npm ci in examples/node failed (rc {done.returncode}):\n{tail}")
    STAMP.write_text(lock + "\n")
    return EXAMPLE / "node_modules"


@pytest.fixture(scope="module")
def worker_address() -> Iterator[str]:
    """`gradmesh worker --port 0` in a child process; its address from the banner."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gradmesh.cli",
            "worker",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--blas-threads",
            "1",
            "--log-level",
            "WARNING",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
    )
    try:
        address = None
        seen = []
        deadline = time.monotonic() + 60
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            while address is None and time.monotonic() < deadline and proc.poll() is None:
                if sel.select(timeout=1):
                    line = proc.stdout.readline()
                    seen.append(line)
                    match = re.search(r'listening on ([^\s"]+)', line)  # text or JSON
                    address = match.group(1) if match else None
        if address is None:
            proc.kill()
            _, err = proc.communicate(timeout=10)
            pytest.fail(
                f"the worker did not report its address within 60 s; stdout "
                f"{''.join(seen)!r}, stderr {err[-2000:]!r}"
            )
        yield address
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        for stream in (proc.stdout, proc.stderr):
            stream.close()


def test_node_client_against_a_worker(node_modules: Path, worker_address: str) -> None:
    env = _env() | {"GRADMESH_WORKER": worker_address, "GRADMESH_TIMEOUT": "60"}
    done = subprocess.run(
        ["node", "client.js"], cwd=EXAMPLE, env=env, capture_output=True, text=True, timeout=180
    )
    out = done.stdout
    assert done.returncode == 0, f"node client.js failed:\n{out}\n{done.stderr}"
    lines = {line.split(":", 1)[0]: line for line in out.splitlines() if ":" in line}

    # The graph built in JS has the id the worker computes: the canonical bytes agree.
    assert re.search(
        r"^register: graph_id=[0-9a-f]{64} equals local SHA-256 OK$", lines["register"]
    ), out
    # A graph spelling out defaults: the id by graph.proto's steps, with the defaults from
    # Capabilities.op_schemas, is the worker's.
    assert re.search(
        r"^canonical: graph_id=[0-9a-f]{64} .* equals the worker's OK$", lines["canonical"]
    ), out
    # Gradients over raw bytes match the closed form to 1e-5.
    assert lines["gradients"].endswith("matched OK"), out
    # The wide layer went up in chunks and its gradient came back in chunks, exactly.
    stream = re.search(
        r"^stream: sent (\d+) bytes in (\d+) chunks, received loss and dw "
        r"\[4,262144\] in (\d+) chunks .* bitwise equal; round trip OK$",
        lines["stream"],
    )
    assert stream, out
    assert int(stream.group(1)) > 8 << 20 and int(stream.group(2)) >= 5
    assert int(stream.group(3)) >= 2
    # The error's details decoded from grpc-status-details-bin name the field.
    assert "error: field path parameters[w].data OK" in out, out
    assert "INVALID_ARGUMENT" in out, out
    assert out.rstrip().endswith("ALL OK"), out
