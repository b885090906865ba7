"""The ``gradmesh`` console script: subcommands, their help, exit codes, and server logs."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import subprocess
import sys

import grpc
import numpy as np
import pytest
from conftest import free_port

from gradmesh import cli
from gradmesh.cli import COMMANDS, main
from gradmesh.server import runtime
from gradmesh.v1 import worker_pb2, worker_pb2_grpc


def test_top_level_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert name in out


@pytest.mark.parametrize(
    "command, flag",
    [
        ("worker", "--backend"),
        ("shard", "--state-dir"),
        ("coordinator", "--workers"),
        ("demo", "--epochs"),
        ("train", "--config"),
    ],
)
def test_command_help_shows_the_command_flags(capsys, command, flag):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    assert flag in capsys.readouterr().out


def test_no_command_prints_usage_and_fails(capsys):
    assert main([]) == 2
    assert "COMMAND" in capsys.readouterr().out


def test_unknown_flag_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["worker", "--no-such-flag"])
    assert exit_.value.code == 2
    assert "--no-such-flag" in capsys.readouterr().err


def test_a_negative_parameter_cache_is_refused(capsys):
    assert main(["worker", "--port", "0", "--parameter-cache-bytes", "-1"]) == 2
    assert "--parameter-cache-bytes" in capsys.readouterr().err


@pytest.mark.parametrize(
    "extra, applied", [({}, "True"), ({"MALLOC_TRIM_THRESHOLD_": "1"}, "False")]
)
def test_server_processes_get_a_steady_heap_unless_the_user_set_one(extra, applied):
    """The server roles keep freed memory for reuse (glibc's mallopt); allocator variables
    the user set win. Checked in a child process: it changes the whole process."""
    if not sys.platform.startswith("linux"):
        pytest.skip("glibc's mallopt")
    env = {k: v for k, v in os.environ.items() if k not in runtime._ALLOCATOR_VARIABLES}
    out = subprocess.run(
        [sys.executable, "-c", "from gradmesh.server import runtime; print(runtime.steady_heap())"],
        env={**env, **extra},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (out.returncode, out.stdout.strip()) == (0, applied), out.stderr


def test_server_logs_follow_stderr_when_it_is_swapped(capsys):
    """Logging set up while one stream was stderr keeps working after it was replaced and
    closed (pytest swaps stderr per test; servers outlive the test that configured logs)."""
    first = io.StringIO()
    saved, sys.stderr = sys.stderr, first
    try:
        runtime.configure_logging(runtime.ServerConfig(log_format="text"))
        first.close()
        second = io.StringIO()
        sys.stderr = second
        logging.getLogger("gradmesh.test").warning("after the swap")
        out = second.getvalue()
        assert "WARNING gradmesh.test after the swap" in out and "Logging error" not in out
    finally:
        sys.stderr = saved
        logger = logging.getLogger("gradmesh")
        for h in [h for h in logger.handlers if getattr(h, "_gradmesh", False)]:
            logger.removeHandler(h)


def _text_fields(line: str) -> dict:
    """The ``key=value`` fields after the message of a text log line: values bare, or
    JSON (a quoted string, a list, a number, true/false)."""
    fields = {}
    for key, value in re.findall(r' (\w+)=("(?:[^"\\]|\\.)*"|\S+)', line):
        try:
            fields[key] = json.loads(value)
        except ValueError:
            fields[key] = value
    return fields


def test_server_logs_carry_the_same_fields_as_text_and_as_json(start_worker, capsys):
    """docs/worker.md: one line per request with method, code, duration_ms and peer, in
    either format; a failed call's line also has the error message the client got.
    Each text line carries exactly the fields of its JSON twin."""
    lines, errors = {}, {}
    try:
        for fmt in ("json", "text"):
            runtime.configure_logging(runtime.ServerConfig(log_format=fmt))
            capsys.readouterr()
            running = start_worker()
            with grpc.insecure_channel(running.address) as channel:
                stub = worker_pb2_grpc.WorkerStub(channel)
                stub.Capabilities(worker_pb2.CapabilitiesRequest(), timeout=30)
                with pytest.raises(grpc.RpcError) as e:
                    stub.ComputeGradients(
                        worker_pb2.ComputeGradientsRequest(graph_id="0" * 64), timeout=30
                    )
            lines[fmt] = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
            errors[fmt] = e.value.details()
    finally:
        logger = logging.getLogger("gradmesh")
        for h in [h for h in logger.handlers if getattr(h, "_gradmesh", False)]:
            logger.removeHandler(h)
    records = [json.loads(ln) for ln in lines["json"]]
    assert [r["msg"] for r in records] == ["serving", "rpc", "rpc"], lines["json"]
    ok, failed = records[1], records[2]
    assert (ok["method"], ok["code"]) == ("/gradmesh.v1.Worker/Capabilities", "OK")
    assert "error" not in ok and isinstance(ok["duration_ms"], float) and ok["peer"]
    assert (failed["method"], failed["code"], failed["error"]) == (
        "/gradmesh.v1.Worker/ComputeGradients",
        "NOT_FOUND",
        errors["json"],
    )
    assert len(lines["text"]) == len(records), lines["text"]
    for line, record in zip(lines["text"], records):
        assert line.split()[2:5] == [record["level"], record["logger"], record["msg"]], line
        fields = _text_fields(line)
        assert set(fields) == set(record) - {"time", "level", "logger", "msg"}, line
        for key in set(fields) - {"address", "peer", "duration_ms", "request_id"}:  # per call
            assert fields[key] == record[key], (key, line)
        assert all(isinstance(fields[k], float) for k in ("duration_ms",) if k in fields)
    assert _text_fields(lines["text"][2])["error"] == errors["text"]
    # Every line of a call carries its request id, the one the client got back.
    assert all(r["request_id"] for r in records[1:]) and "request_id" not in records[0]
    assert all(_text_fields(ln)["request_id"] for ln in lines["text"][1:])


# ============================================ operator-facing errors (item 11) =========


def _gradmesh(*argv, env=None, timeout=60):
    """Run ``gradmesh *argv`` in a process; (exit code, stderr)."""
    import os
    import subprocess
    import sys

    run_env = dict(os.environ, **(env or {}))
    run_env.pop("GRADMESH_DEBUG", None)
    r = subprocess.run(
        [sys.executable, "-m", "gradmesh.cli", *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=run_env,
    )
    return r.returncode, r.stderr


@pytest.mark.parametrize("port", ["-1", "70000"])
def test_port_out_of_range_is_refused(port):
    code, err = _gradmesh("worker", "--port", port)
    assert code == 2 and "--port" in err and "0..65535" in err and "Traceback" not in err


def test_port_in_use_says_so():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        code, err = _gradmesh("worker", "--port", str(port))
    line = [ln for ln in err.splitlines() if ln.startswith("error:")]  # not gRPC's log
    assert code == 2 and "in use" in line[0] and f"127.0.0.1:{port}" in line[0], err
    assert "Traceback" not in err


def test_missing_and_empty_files_name_the_flag_and_path(tmp_path):
    empty = tmp_path / "token"
    empty.write_text("\n")
    missing = str(tmp_path / "nope.key")
    cert = tmp_path / "cert.pem"
    cert.write_text("x")
    for argv, flag, path in (
        (["--token-file", missing], "--token-file", missing),
        (["--token-file", str(empty)], "--token-file", str(empty)),
        (["--tls-cert", str(cert), "--tls-key", missing], "--tls-key", missing),
        (["--peer-token-file", missing], "--peer-token-file", missing),
    ):
        code, err = _gradmesh("worker", "--port", "0", *argv)
        assert code == 2 and flag in err and path in err, (argv, err)
        assert "Traceback" not in err
    code, err = _gradmesh("worker", "--port", "0", "--token-file", str(empty))
    assert "empty" in err


def test_coordinator_flag_errors_name_the_flag():
    for argv, flag in (
        (["--workers", "nohost"], "--workers"),
        (["--shards", "h:99999"], "--shards"),
        (["--worker-timeout", "-1"], "--worker-timeout"),
        (["--embedded-shards", "0"], "--embedded-shards"),
        (["--micro-batch-deadline", "0"], "--micro-batch-deadline"),
    ):
        code, err = _gradmesh("coordinator", "--port", "0", *argv)
        assert code == 2 and flag in err and "Traceback" not in err, (argv, err)
        assert err.count("--") == 1, err  # only the flag at fault is named


def test_help_shows_no_markup():
    out = subprocess_help()
    assert "``" not in out and ":class:" not in out and "gradmesh" in out


def subprocess_help() -> str:
    import subprocess
    import sys

    return subprocess.run(
        [sys.executable, "-m", "gradmesh.cli", "--help"], capture_output=True, text=True, timeout=60
    ).stdout


def test_train_without_a_coordinator_fails_fast(tmp_path):
    import time

    np.savez(tmp_path / "d.npz", x=np.zeros((4, 2), np.float32), y=np.zeros(4, np.int64))
    port = free_port()
    (tmp_path / "job.toml").write_text(
        '[model]\nlayers = [{ type = "linear", in = 2, out = 2 }]\n'
        f'[data]\ntrain = "{tmp_path / "d.npz"}"\n[optimizer]\nname = "sgd"\nlr = 0.1\n'
        f'[cluster]\naddress = "127.0.0.1:{port}"\n'
    )
    start = time.monotonic()
    code, err = _gradmesh("train", "--config", str(tmp_path / "job.toml"), "--connect-timeout", "1")
    assert time.monotonic() - start < 30
    assert code == 1 and "cannot reach the coordinator" in err and f":{port}" in err
    assert "Traceback" not in err


def test_unexpected_errors_print_one_line_and_debug_shows_the_traceback(monkeypatch, capsys):
    from gradmesh.server import worker as worker_cmd

    def boom(args):
        raise RuntimeError("kaboom")

    monkeypatch.setattr(worker_cmd, "run", boom)
    monkeypatch.delenv("GRADMESH_DEBUG", raising=False)
    assert cli.main(["worker", "--port", "0"]) == 1
    err = capsys.readouterr().err
    assert "kaboom" in err and "--debug" in err and "Traceback" not in err
    assert cli.main(["--debug", "worker", "--port", "0"]) == 1
    assert "Traceback" in capsys.readouterr().err
    monkeypatch.setenv("GRADMESH_DEBUG", "1")
    assert cli.main(["worker", "--port", "0"]) == 1
    assert "Traceback" in capsys.readouterr().err
