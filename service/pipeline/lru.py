"""A bounded least-recently-used mapping, for the pipeline's small per-server caches (text and class
embeddings, vocabularies, exemplar embeddings). Used from the event loop only: no lock (``EmbeddingCache``, which
worker threads share, has its own)."""

from __future__ import annotations

import collections
from collections.abc import Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class LRU(Generic[K, V]):
    """At most ``entries`` items (0 keeps nothing); ``get`` refreshes an item, ``put`` drops the least recently
    used beyond the bound."""

    def __init__(self, entries: int) -> None:
        self.entries = entries
        self._items: collections.OrderedDict[K, V] = collections.OrderedDict()

    def get(self, key: K) -> V | None:
        value = self._items.get(key)
        if value is not None:
            self._items.move_to_end(key)
        return value

    def put(self, key: K, value: V) -> None:
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self.entries:
            self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)
