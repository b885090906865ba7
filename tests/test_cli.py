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
import pytest

from gradmesh.server import runtime
from gradmesh.server.cli import COMMANDS, main
from gradmesh.v1 import worker_pb2, worker_pb2_grpc


def test_top_level_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert name in out


@pytest.mark.parametrize("command, flag", [("worker", "--backend"), ("shard", "--state-dir"),
                                           ("coordinator", "--workers"), ("demo", "--epochs"),
                                           ("train", "--config")])
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


@pytest.mark.parametrize("extra, applied", [({}, "True"),
                                            ({"MALLOC_TRIM_THRESHOLD_": "1"}, "False")])
def test_server_processes_get_a_steady_heap_unless_the_user_set_one(extra, applied):
    """The server roles keep freed memory for reuse (glibc's mallopt); allocator variables
    the user set win. Checked in a child process: it changes the whole process."""
    if not sys.platform.startswith("linux"):
        pytest.skip("glibc's mallopt")
    env = {k: v for k, v in os.environ.items() if k not in runtime._ALLOCATOR_VARIABLES}
    out = subprocess.run([sys.executable, "-c", "from gradmesh.server import runtime; "
                                                "print(runtime.steady_heap())"],
                         env={**env, **extra}, capture_output=True, text=True, timeout=60)
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
                    stub.ComputeGradients(worker_pb2.ComputeGradientsRequest(graph_id="0" * 64),
                                          timeout=30)
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
    assert (failed["method"], failed["code"], failed["error"]) == \
        ("/gradmesh.v1.Worker/ComputeGradients", "NOT_FOUND", errors["json"])
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
