"""Which worker serves a request of this mount, and failover when it does not answer.

The ring itself (membership -> ring, the cluster's page size) is built by the shared rule
in dorafs/routing.py, so a load job puts every page where a mount will ask for it; this
module is the mount's use of that ring: the order workers are tried in, and who is
skipped.

Subtleties:
- The ring key of a file's pages and status is its full UFS URI, and of a listing the
  directory's URI, so one worker owns all of a file. `candidates` gives up to
  `MAX_CANDIDATES` workers in ring order; `route` tries them in turn.
- Only a worker that fails to *answer* (connection error, timeout, corrupt page:
  `Unavailable`) is skipped, for `SUSPECT_SECONDS`, and the next candidate serves (a
  failover). An error *answer* (not found, changed object, UFS failure) is authoritative
  and raised, never retried elsewhere. When no candidate answers, `route` raises
  `Unavailable` and the caller reads the UFS itself.
- A worker that keeps failing is skipped for longer each time (doubling up to
  `MAX_SUSPECT_SECONDS`), so a stopped worker that accepts connections but never answers
  costs one `worker_timeout` stall per period, not one per request. Requests that were in
  flight together fail together and count as one period. A success clears it, and so
  does the worker (re)joining the membership: its keys come back at once.
- Short-circuit: the pages of a worker on loopback are read from its page files by this
  process (`reads_files_of`), unless they proved unreadable here (`not_readable_here`),
  after which that worker's pages come over HTTP.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

import trio

from dorafs.client.local import is_loopback
from dorafs.config import MountConfig
from dorafs.errors import Unavailable
from dorafs.membership import Membership
from dorafs.ring import HashRing
from dorafs.routing import build_routing

log = logging.getLogger(__name__)

T = TypeVar("T")
SUSPECT_SECONDS = 5.0  # how long a failed worker is skipped before it is tried again
MAX_SUSPECT_SECONDS = 30.0  # the skip doubles while the worker keeps failing, up to this
MAX_CANDIDATES = 3  # workers tried for one request before the UFS


class Router:
    """The mount's ring over the membership, and the workers it skips for now."""

    def __init__(self, membership: Membership, config: MountConfig, stats):
        self.membership = membership
        self.config = config
        self.page_size = config.page_size  # the cluster's, once workers are known (see `_rebuild`)
        self.page_size_followers: list[Callable[[int], None]] = []  # told when page_size changes
        self.ring = HashRing()
        self.stats = stats  # the client's ClientStats: failovers and answers by worker
        self._suspect_until: dict[str, float] = {}
        self._suspect_for: dict[str, float] = {}  # current skip period of a failing worker
        self._ring_addresses: set[str] = set()
        self._remote: set[str] = set()  # loopback workers whose page files this process cannot read
        membership.add_listener(self._rebuild)

    def _rebuild(self) -> None:
        workers = self.membership.workers
        joined = {w.address for w in workers.values()} - self._ring_addresses
        for address in joined:  # a worker that (re)joins is trusted again at once
            self._suspect_until.pop(address, None)
            self._suspect_for.pop(address, None)
        self._ring_addresses = {w.address for w in workers.values()}
        routing = build_routing(workers)  # the scheduler routes loads the same way
        if routing.page_size is not None and routing.page_size != self.page_size:
            self.page_size = routing.page_size
            for follow in self.page_size_followers:
                follow(routing.page_size)
        if routing.left_out:
            log.error("workers %s use a page size other than %d and are left off the ring",
                      routing.left_out, self.page_size)
        self.ring = routing.ring
        log.info("ring rebuilt: %d workers (membership version %s)", len(self.ring), self.membership.version)

    def candidates(self, key: str) -> list[str]:
        """Worker addresses for a key, in the order they will be tried."""
        workers = self.membership.workers
        found = []
        for wid in self.ring.candidates(key, MAX_CANDIDATES):
            info = workers.get(wid)
            if info is not None:
                found.append(info.address)
        return found

    async def route(self, key: str, call: Callable[[str], Awaitable[T]]) -> T:
        """`call(address)` on the first candidate for `key` that answers; `Unavailable`
        when none does."""
        now = trio.current_time()
        tried = 0
        for address in self.candidates(key):
            if self._suspect_until.get(address, 0) > now:
                continue
            tried += 1
            try:
                result = await call(address)
            except Unavailable as exc:
                self._suspect(address, exc)
                self.stats.failovers += 1
                continue
            self._suspect_for.pop(address, None)
            if self._suspect_until.pop(address, None) is not None:
                log.info("worker %s answers again", address)
            self.stats.by_worker[address] += 1
            return result
        raise Unavailable(f"no worker answered for {key} ({tried} tried)")

    def _suspect(self, address: str, exc: Exception) -> None:
        now = trio.current_time()
        if self._suspect_until.get(address, 0) > now:
            return  # requests that were in flight together fail together: one period
        period = self._suspect_for.get(address)
        period = SUSPECT_SECONDS if period is None else min(period * 2, MAX_SUSPECT_SECONDS)
        if address not in self._suspect_until:
            log.warning("worker %s failed (%s); using the next candidate for %gs", address, exc, period)
        self._suspect_until[address] = now + period
        self._suspect_for[address] = period

    def suspected(self, address: str) -> bool:
        """Is `address` skipped for now?"""
        return self._suspect_until.get(address, 0) > trio.current_time()

    def reads_files_of(self, address: str) -> bool:
        """Are the pages of the worker at `address` read from its files (short-circuit)?"""
        return bool(self.config.short_circuit) and address not in self._remote and is_loopback(address)

    def is_local(self, address: str) -> bool:
        """A worker on this machine whose files this process can read."""
        return address not in self._remote and is_loopback(address)

    def not_readable_here(self, address: str) -> None:
        """The worker's page files proved unreadable by this process: its pages come over HTTP."""
        self._remote.add(address)
