"""Seeing a scan coming: stat misses in one directory, then its listing in one go.

A program that stats or opens every file of a directory by name (`find`, `ls -l` on
some systems, a data loader with a list of files) costs one status request per file.
One listing answers all of them: after misses of `after` different entries in one
directory, its listing is fetched in the background (while it runs, `listing` tells a
miss in that directory to wait for it), and the rest of the scan is answered from it. Workers use
this in front of the UFS; mounts in front of the workers.

Bounded: `at_once` listings at a time, and the counts are dropped wholesale when they
name too many directories. With `again_after`, a directory is listed ahead at most once
in that many seconds (a mount: its statuses are kept that long anyway).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable

import trio

log = logging.getLogger(__name__)


class ListingPrefetch:
    def __init__(self, fetch: Callable[[str], Awaitable[object]], *, after: int = 8, at_once: int = 2,
                 max_directories: int = 10_000, again_after: float | None = None):
        self._fetch = fetch
        self.after = after
        self.at_once = at_once
        self.max_directories = max_directories
        self.again_after = again_after
        self._misses: dict[str, set] = {}  # directory -> the entries missed in it (None: each miss its own)
        self._running: dict[str, trio.Event] = {}  # directory being listed -> set when its listing ends
        self._listed: dict[str, float] = {}  # directory -> when it was last listed ahead (again_after)
        self.started = 0

    def miss(self, directory: str, nursery: trio.Nursery | None, name: str | None = None) -> None:
        """Count a status miss under `directory` (of entry `name`: the same name missed
        again counts once); start its listing once there are enough."""
        misses = self._misses.get(directory)
        if misses is None:
            if len(self._misses) >= self.max_directories:
                self._misses.clear()
            misses = self._misses[directory] = set()
        misses.add(object() if name is None else name)
        if len(misses) < self.after:
            return
        self._misses.pop(directory, None)
        if nursery is None or directory in self._running or len(self._running) >= self.at_once:
            return
        if self.again_after is not None:
            now = trio.current_time()
            if now < self._listed.get(directory, -math.inf) + self.again_after:
                return
            if len(self._listed) >= self.max_directories:
                self._listed.clear()
            self._listed[directory] = now
        self._running[directory] = trio.Event()
        self.started += 1
        nursery.start_soon(self._run, directory)

    async def _run(self, directory: str) -> None:
        try:
            await self._fetch(directory)
        except Exception as exc:  # an optimisation: the status requests go on without it
            log.info("listing prefetch of %s failed: %s", directory, exc)
        finally:
            self._running.pop(directory).set()

    def listing(self, directory: str) -> trio.Event | None:
        """Set when the listing of `directory` fetched ahead now ends; None if none runs."""
        return self._running.get(directory)
