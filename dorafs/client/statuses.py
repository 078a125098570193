"""Statuses a mount keeps between asking its workers.

Every `open` pins a version, so it needs the object's status; asking the owning worker
costs a loopback HTTP round trip, more than the rest of opening and reading a 128 KiB
file. A mount keeps each status it was given for as long as two bounds allow, and asks
again after:

- the mount's `status_ttl`, counted from when the status was read from the UFS (the
  worker says how old it is), so a change in the UFS is seen exactly as late as promised
  without this memo;
- the mount's `attr_timeout`, counted from when the mount got it: the kernel trusts the
  attributes made from it that long anyway, so `open` pins the version `stat` shows.

A change made through this mount forgets the statuses it touches (`forget`); a page
read that finds the object changed or gone forgets its status, so the next `open` asks.
Missing paths are not kept here: the kernel keeps negative entries for `negative_ttl`.
"""

from __future__ import annotations

import math
from collections import OrderedDict

from dorafs.ufs import FileStatus

MAX_STATUSES = 65536  # about 300 bytes each: 20 MiB at most


class StatusMemo:
    def __init__(self, status_ttl: float, attr_timeout: float | None, max_entries: int = MAX_STATUSES):
        attr = status_ttl if attr_timeout is None else attr_timeout
        self._ttl = math.inf if status_ttl < 0 else status_ttl
        self._attr = math.inf if attr < 0 else attr
        self.max_entries = max_entries
        self._held: OrderedDict[str, tuple[float, FileStatus]] = OrderedDict()
        self.hits = 0

    def __len__(self) -> int:
        return len(self._held)

    def get(self, uri: str, now: float) -> FileStatus | None:
        held = self._held.get(uri)
        if held is None:
            return None
        if held[0] <= now:
            del self._held[uri]
            return None
        self._held.move_to_end(uri)
        self.hits += 1
        return held[1]

    def put(self, uri: str, status: FileStatus, age: float | None, now: float) -> None:
        """Keep `status`, read from the UFS `age` seconds ago (None: unknown, not kept)."""
        if age is None:
            return
        life = min(self._ttl - age, self._attr)
        if life <= 0:
            self._held.pop(uri, None)
            return
        self._held[uri] = (now + life, status)
        self._held.move_to_end(uri)
        while len(self._held) > self.max_entries:
            self._held.popitem(last=False)

    def forget(self, uri: str, *, recursive: bool = False) -> None:
        self._held.pop(uri, None)
        if recursive:
            under = uri.rstrip("/") + "/"
            for key in [k for k in self._held if k.startswith(under)]:
                del self._held[key]
