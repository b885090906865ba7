"""Models, losses and batches that tests in several layers share (one place, so that a
test file says only which sizes and seeds it uses)."""

from __future__ import annotations

import numpy as np

import gradmesh.core as gm
from gradmesh.v1 import graph_pb2, tensor_pb2


def mlp(*sizes: int, seed: int = 0, activation=None, dropout: float | None = None):
    """A seeded ``Sequential`` of ``Linear`` layers through ``sizes``, ``activation``
    (default ``ReLU``) between them and, with ``dropout``, a ``Dropout`` after each
    hidden activation. Parameters are drawn in layer order after ``manual_seed(seed)``."""
    nn = gm.nn
    gm.manual_seed(seed)
    layers: list = []
    for i, (n_in, n_out) in enumerate(zip(sizes, sizes[1:])):
        layers.append(nn.Linear(n_in, n_out))
        if i < len(sizes) - 2:
            layers.append((activation or nn.ReLU)())
            if dropout:
                layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


def cross_entropy(model, x, y):
    """The usual loss function of a traced classification step."""
    return gm.nn.functional.cross_entropy(model(x), y)


def classification_batch(n: int, features: int, classes: int, seed: int = 0):
    """``n`` standard-normal float32 rows and uniformly drawn int64 labels."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, features)).astype(np.float32), rng.integers(0, classes, n)


def separable_steps(steps: int, batch: int, features: int, classes: int, seed: int):
    """``steps`` batches whose labels a linear map of the features decides (learnable)."""
    rng = np.random.default_rng(seed)
    proj = rng.standard_normal((features, classes))
    xs = [rng.standard_normal((batch, features)).astype(np.float32) for _ in range(steps)]
    return [(x, np.argmax(x @ proj, axis=1).astype(np.int64)) for x in xs]


def matmul_graph(m: int, k: int, n: int, op: str = "mm") -> graph_pb2.Graph:
    """loss = sum(expand(a, [m, k]) @ expand(b, [k, n])): tiny inputs, a large product."""
    ints = graph_pb2.Attribute
    return graph_pb2.Graph(
        version=1,
        inputs=[
            graph_pb2.Input(
                name="a", role=graph_pb2.Input.PARAM, dtype=tensor_pb2.FLOAT32, shape=[1, 1]
            ),
            graph_pb2.Input(
                name="b", role=graph_pb2.Input.DATA, dtype=tensor_pb2.FLOAT32, shape=[1, 1]
            ),
        ],
        nodes=[
            graph_pb2.Node(
                op="expand",
                inputs=[0],
                attrs=[ints(name="shape", ints=graph_pb2.Ints(values=[m, k]))],
            ),
            graph_pb2.Node(
                op="expand",
                inputs=[1],
                attrs=[ints(name="shape", ints=graph_pb2.Ints(values=[k, n]))],
            ),
            graph_pb2.Node(op=op, inputs=[2, 3]),
            graph_pb2.Node(op="sum", inputs=[4]),
        ],
        outputs=[graph_pb2.Output(name="loss", value=5)],
    )


def bn_cnn(seed: int = 0, channels: int = 4, classes: int = 3, momentum: float | None = 0.1):
    """A seeded small CNN with BatchNorm2d and BatchNorm1d (running statistics as
    buffers) for (N, 1, 6, 6) images: conv, BN, ReLU, conv, BN, ReLU, pool, linear, BN1d,
    linear."""
    nn = gm.nn
    gm.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, channels, 3, padding=1),
        nn.BatchNorm2d(channels, momentum=momentum),
        nn.ReLU(),
        nn.Conv2d(channels, channels, 3, padding=1),
        nn.BatchNorm2d(channels, momentum=momentum),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(channels, 8),
        nn.BatchNorm1d(8, momentum=momentum),
        nn.Linear(8, classes),
    )
