"""Coordinator jobs that train the demo's digits MLP with the demo's settings, shared by
the tests of the training modes (synchronous, compressed, bounded staleness)."""

from __future__ import annotations

import gradmesh.core as gm
from gradmesh.client import demo
from gradmesh.client.training import batches, fit


def train_digits(
    client, digits, epochs, compress=None, job_id=None, until=None, staleness=None, steps=None
):
    """Train the demo's MLP through ``client``; (model, test accuracy after each epoch
    (the last one only without ``until``), job status). ``until``: stop after the first
    epoch at that test accuracy or above; ``steps``: stop after so many steps."""
    x_train, y_train, x_test, y_test = digits
    model = demo.make_model(0)
    job = client.create_job(
        model,
        demo.loss_fn,
        gm.optim.Adam(model.parameters(), lr=3e-3),
        32,
        example_batch=(x_train[:8], y_train[:8]),
        data_names=["x", "y"],
        compression=compress,
        job_id=job_id,
        staleness=staleness,
    )
    accuracies, done = [], 0
    for epoch in range(epochs):
        epoch_batches = list(batches(x_train, y_train, batch_size=128, seed=epoch))
        if steps is not None:
            epoch_batches = epoch_batches[: steps - done]
        # fit: steps pipelined as the job's mode allows (one at a time when synchronous)
        fit(job, epoch_batches, progress=False)
        done += len(epoch_batches)
        if done == steps:
            model.load_state_dict(job.parameters())
            return model, accuracies, job.status()
        if until is not None or epoch == epochs - 1:
            model.load_state_dict(job.parameters())
            accuracies.append(demo.accuracy(model, x_test, y_test))
            if until is not None and accuracies[-1] >= until:
                break
    return model, accuracies, job.status()
