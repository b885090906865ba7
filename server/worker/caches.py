"""The worker's caches: graphs, plans and remembered requests (:class:`LRU`), and the
parameter sets kept between calls (:class:`ParameterCache`)."""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any, Callable


class LRU:
    """A small thread-safe LRU map."""

    def __init__(self, capacity: int):
        self.capacity = max(1, capacity)
        self._items: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key):
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key, value) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)

    def drop(self, unwanted: Callable[[Any], bool]) -> None:
        """Remove the entries whose value is ``unwanted``."""
        with self._lock:
            for key in [k for k, v in self._items.items() if unwanted(v)]:
                del self._items[key]

    def __len__(self) -> int:
        return len(self._items)


class ParameterCache:
    """Parameter sets kept for ``parameter_set`` requests (worker.proto): least recently
    used out first, within ``capacity`` bytes. Thread-safe."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._sets: OrderedDict[tuple, tuple[int, dict]] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0

    def get(self, key: tuple) -> dict | None:
        with self._lock:
            entry = self._sets.get(key)
            if entry is None:
                return None
            self._sets.move_to_end(key)
            self.hits += 1
            return entry[1]

    def put(self, key: tuple, arrays: dict) -> None:
        size = sum(a.nbytes for a in arrays.values())
        with self._lock:
            self._sets.pop(key, None)
            if size > self.capacity:
                return
            while self._sets and size + sum(n for n, _ in self._sets.values()) > self.capacity:
                self._sets.popitem(last=False)
            self._sets[key] = (size, arrays)

    def __len__(self) -> int:
        return len(self._sets)
