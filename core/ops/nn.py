"""Neural-network primitives: convolution, pooling, normalisation, embedding, losses."""
from __future__ import annotations
