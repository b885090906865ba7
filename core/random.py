"""Seeded random numbers, like torch.manual_seed / torch.Generator.

Numbers are drawn on the CPU with NumPy's PCG64 and then moved to the device, so a seed
gives the same values on every backend (the determinism promise needs that).

Permutations (``randperm``, a shuffling ``DataLoader``, ``random_split``) come from a
second stream, torch's own: the MT19937 that a torch CPU generator seeds with the same
seed, and torch's algorithm over it. A script that shuffles with
``Generator().manual_seed(s)`` then sees its batches in the same order on both.
"""

from __future__ import annotations

from typing import cast

import numpy as np


def _fresh_seed() -> int:
    """A seed from the operating system's entropy, as torch's ``seed()`` draws one."""
    entropy = cast(int, np.random.SeedSequence().entropy)  # drawn without one: an int
    return entropy % (2**63)


def _torch_mt19937(seed: int) -> np.random.MT19937:
    """torch's CPU generator: MT19937 initialised (init_genrand) with the seed's low 32 bits."""
    mt = np.random.MT19937()
    mt._legacy_seeding(seed & 0xFFFFFFFF)
    return mt


class Generator:
    """A source of random numbers; ``manual_seed`` makes it reproducible."""

    def __init__(self, device: str = "cpu"):
        self.device = device
        self.manual_seed(_fresh_seed())

    def manual_seed(self, seed: int) -> "Generator":
        self._seed = int(seed)
        self._rng = np.random.Generator(np.random.PCG64(self._seed))
        self._mt = _torch_mt19937(self._seed)
        return self

    def initial_seed(self) -> int:
        return self._seed

    def seed(self) -> int:
        return self.manual_seed(_fresh_seed()).initial_seed()

    def get_state(self) -> dict:
        return {"pcg64": dict(self._rng.bit_generator.state), "mt19937": self._mt.state}

    def set_state(self, state: dict) -> "Generator":
        self._rng.bit_generator.state = state["pcg64"]
        self._mt.state = state["mt19937"]
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


def torch_draws(generator: Generator | None, count: int) -> np.ndarray:
    """``count`` 32-bit words of the generator's torch stream (uint64 array)."""
    return (generator or default_generator)._mt.random_raw(count)


def permutation(n: int, generator: Generator | None = None) -> np.ndarray:
    """``torch.randperm(n, generator=...)`` on the CPU, value for value: a Fisher-Yates
    shuffle from the front, position i swapped with i + (draw % (n - i))."""
    offsets = torch_draws(generator, max(n - 1, 0)) % np.arange(n, 1, -1, dtype=np.uint64)
    order = list(range(n))
    for i, offset in enumerate(offsets.tolist()):
        j = i + offset
        order[i], order[j] = order[j], order[i]
    return np.array(order, dtype=np.int64)
