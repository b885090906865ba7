"""Seeded random numbers, like torch.manual_seed / torch.Generator.

Numbers are drawn on the CPU with NumPy's PCG64 and then moved to the device, so a seed
gives the same values on every backend (the determinism promise needs that).
"""

from __future__ import annotations

from typing import cast

import numpy as np


def _fresh_seed() -> int:
    """A seed from the operating system's entropy, as torch's ``seed()`` draws one."""
    entropy = cast(int, np.random.SeedSequence().entropy)  # drawn without one: an int
    return entropy % (2**63)


class Generator:
    """A source of random numbers; ``manual_seed`` makes it reproducible."""

    def __init__(self, device: str = "cpu"):
        self.device = device
        self._seed = _fresh_seed()
        self._rng = np.random.Generator(np.random.PCG64(self._seed))

    def manual_seed(self, seed: int) -> "Generator":
        self._seed = int(seed)
        self._rng = np.random.Generator(np.random.PCG64(self._seed))
        return self

    def initial_seed(self) -> int:
        return self._seed

    def seed(self) -> int:
        return self.manual_seed(_fresh_seed()).initial_seed()

    def get_state(self) -> dict:
        return dict(self._rng.bit_generator.state)

    def set_state(self, state: dict) -> "Generator":
        self._rng.bit_generator.state = state
        return self

    @property
    def numpy(self) -> np.random.Generator:
        return self._rng


default_generator = Generator()


def manual_seed(seed: int) -> Generator:
    """Seed the default generator (weights, dropout masks, ``randn``) and return it."""
    return default_generator.manual_seed(seed)


def initial_seed() -> int:
    return default_generator.initial_seed()


def rng(generator: Generator | None) -> np.random.Generator:
    return (generator or default_generator).numpy
