"""A bounded LRU map whose entries expire after a per-entry TTL.

TTL semantics follow the mount options: a negative TTL never expires, zero means
"do not cache", a positive value is seconds. Time comes from trio's clock when called
inside trio (so tests can use an autojump clock), else from time.monotonic.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Hashable
from typing import Any

import trio

MISSING = object()


def _now() -> float:
    try:
        return trio.current_time()
    except RuntimeError:
        return time.monotonic()


class TtlCache:
    def __init__(self, max_entries: int):
        self.max_entries = max_entries
        self._data: OrderedDict[Hashable, tuple[float, Any]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._data)

    def get(self, key: Hashable) -> Any:
        item = self._data.get(key)
        if item is None:
            return MISSING
        expires, value = item
        if expires < _now():
            del self._data[key]
            return MISSING
        self._data.move_to_end(key)
        return value

    def put(self, key: Hashable, value: Any, ttl: float) -> None:
        if ttl == 0:
            self._data.pop(key, None)
            return
        expires = float("inf") if ttl < 0 else _now() + ttl
        self._data[key] = (expires, value)
        self._data.move_to_end(key)
        while len(self._data) > self.max_entries:
            self._data.popitem(last=False)

    def keys(self) -> list[Hashable]:
        return list(self._data)

    def pop(self, key: Hashable) -> None:
        self._data.pop(key, None)
