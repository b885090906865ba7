"""Message-size limits agree (issue "Reliability and security 2", item 10): a worker's
stream chunk fits its own message limit (derived from it, or refused at start-up naming
both flags), and the SDK learns the worker's limit from Capabilities, so requests over it
go over the stream in chunks the worker accepts instead of failing RESOURCE_EXHAUSTED."""

from __future__ import annotations

import numpy as np
import pytest

import gradmesh.core as gm
from gradmesh import cli
from gradmesh.client import WorkerClient
from gradmesh.server import runtime
from gradmesh.server import worker as worker_mod
from gradmesh.wire import stream


def _loss(params, x):
    return (gm.relu(x @ params["w"]) ** 2).sum()


def _problem(rows=600, cols=700):
    rng = np.random.default_rng(0)
    # 1.7 MB of parameters and gradients: over a 1 MB message limit both ways.
    return (
        {"w": rng.standard_normal((rows, cols)).astype(np.float32)},
        rng.standard_normal((4, rows)).astype(np.float32),
    )


@pytest.mark.parametrize("limit", [1_000_000, 2_000_000])
def test_sdk_streams_to_a_worker_with_a_small_message_limit(limit):
    params, x = _problem()
    with (
        worker_mod.start("cpu") as reference,
        WorkerClient(reference.address, shared_memory=False) as client,
    ):
        want = client.compute_gradients(_loss, params, x)
    with worker_mod.start("cpu", max_message_bytes=limit) as small:
        assert small.worker.limits.chunk_bytes + stream.FRAME_OVERHEAD_BYTES <= limit
        with WorkerClient(small.address, shared_memory=False) as client:
            got = client.compute_gradients(_loss, params, x)
            assert client.chunk_bytes + stream.FRAME_OVERHEAD_BYTES <= limit
    assert got.timings["streamed"] == 1.0
    assert float(got.loss) == float(want.loss)
    assert np.array_equal(got.gradients["w"], want.gradients["w"])


def test_worker_refuses_a_chunk_that_does_not_fit_its_message_limit(capsys):
    code = cli.main(
        ["worker", "--port", "0", "--max-message-bytes", "2000000", "--chunk-bytes", str(2 << 20)]
    )
    err = capsys.readouterr().err
    assert code == 2 and "--chunk-bytes" in err and "--max-message-bytes" in err
    assert "Traceback" not in err
    with pytest.raises(runtime.ConfigError, match="--max-message-bytes"):
        worker_mod.start(
            "cpu", max_message_bytes=2_000_000, limits=worker_mod.WorkerLimits(chunk_bytes=2 << 20)
        )
