"""wire/coordinator.py: how the SDK's coordinator connection retries transient failures,
for unary calls and for GetParameters' server stream alike."""

from __future__ import annotations

import logging
import socket

import pytest

from gradmesh.wire.coordinator import CoordinatorConnection
from gradmesh.wire.errors import GradmeshError


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again: nothing listens there


@pytest.mark.parametrize("call", ["get_parameters", "job_status"])
def test_a_retried_call_says_so_once_then_fails_unavailable(call, caplog):
    conn = CoordinatorConnection(f"127.0.0.1:{_closed_port()}", timeout=2.0, retry_seconds=0.6)
    with conn, caplog.at_level(logging.WARNING, logger="gradmesh.client"):
        with pytest.raises(GradmeshError) as e:
            getattr(conn, call)("job-1")
    assert e.value.code.name == "UNAVAILABLE"
    warnings = [r.getMessage() for r in caplog.records if r.name == "gradmesh.client"]
    assert len(warnings) == 1, warnings
    assert "retrying for up to" in warnings[0]
