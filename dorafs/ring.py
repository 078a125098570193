"""Consistent-hash ring with virtual nodes.

Each worker owns `vnodes` points on a 64-bit ring; a key belongs to the first point at or
after its hash, and `candidates(key)` walks on from there to list every worker once, in a
stable order: the owner, then the fallback, and so on. Adding or removing one of N
workers moves about 1/N of the keys.
"""

from __future__ import annotations

import xxhash
from sortedcontainers import SortedDict

# Measured max/mean load with 160 points per worker: ~1.16 at 10 workers, ~1.23 at 100
# (tests/test_ring.py). Tighter balance needs more points or bounded loads.
DEFAULT_VNODES = 160


def _hash(text: str) -> int:
    return xxhash.xxh3_64_intdigest(text.encode())


class HashRing:
    def __init__(self, workers: list[str] = (), vnodes: int = DEFAULT_VNODES):
        self.vnodes = vnodes
        self._points: SortedDict = SortedDict()
        self._workers: set[str] = set()
        for worker in workers:
            self.add(worker)

    def __len__(self) -> int:
        return len(self._workers)

    @property
    def workers(self) -> frozenset[str]:
        return frozenset(self._workers)

    def add(self, worker: str) -> None:
        if worker in self._workers:
            return
        self._workers.add(worker)
        for i in range(self.vnodes):
            # Collisions are astronomically rare; the smaller id wins so all clients agree.
            point = _hash(f"{worker}#{i}")
            current = self._points.get(point)
            if current is None or worker < current:
                self._points[point] = worker

    def remove(self, worker: str) -> None:
        if worker not in self._workers:
            return
        self._workers.discard(worker)
        for i in range(self.vnodes):
            point = _hash(f"{worker}#{i}")
            if self._points.get(point) == worker:
                del self._points[point]

    def candidates(self, key: str, limit: int | None = None) -> list[str]:
        """Distinct workers in ring order from the key's position; the first owns it."""
        want = len(self._workers) if limit is None else min(limit, len(self._workers))
        if want == 0:
            return []
        found: list[str] = []
        seen: set[str] = set()
        keys = self._points.keys()
        values = self._points.values()
        start = self._points.bisect_left(_hash(key))
        n = len(keys)
        for step in range(n):
            worker = values[(start + step) % n]
            if worker not in seen:
                seen.add(worker)
                found.append(worker)
                if len(found) == want:
                    break
        return found

    def owner(self, key: str) -> str | None:
        found = self.candidates(key, 1)
        return found[0] if found else None
