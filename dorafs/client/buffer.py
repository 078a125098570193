"""The mount's in-process page buffer: a byte-bounded LRU of recently fetched pages.

The kernel asks in 128 KiB pieces while a page is 1 MiB, so one fetch must serve the
eight requests that follow it; readahead also lands here. Keys carry the object's
version, so a changed object never hits an old page.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable


class PageBuffer:
    def __init__(self, capacity: int):
        self.capacity = capacity
        self.used = 0
        self.hits = 0
        self.misses = 0
        self._pages: OrderedDict[Hashable, bytes | bytearray] = OrderedDict()

    def __contains__(self, key: Hashable) -> bool:
        return key in self._pages

    def get(self, key: Hashable) -> bytes | bytearray | None:
        data = self._pages.get(key)
        if data is None:
            self.misses += 1
            return None
        self.hits += 1
        self._pages.move_to_end(key)
        return data

    def put(self, key: Hashable, data: bytes | bytearray) -> None:
        if len(data) > self.capacity:
            return
        old = self._pages.pop(key, None)
        if old is not None:
            self.used -= len(old)
        self._pages[key] = data
        self.used += len(data)
        while self.used > self.capacity:
            _, evicted = self._pages.popitem(last=False)
            self.used -= len(evicted)

    def statistics(self) -> dict:
        return {"pages": len(self._pages), "bytes": self.used, "hits": self.hits, "misses": self.misses}
