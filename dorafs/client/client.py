"""DoraClient: the mount's client core, one object wiring its concerns together.

Each concern has its own module; this one only builds them and owns their background
tasks:
- client/router.py    Router: which worker serves a key (the ring), failover, short-circuit
- client/metadata.py  Metadata: statuses and listings, the UFS outage policy, invalidation
- client/reading.py   Reader: the read path of an open file's pinned version, page by page
- client/prefetch.py  Prefetcher: each open file's readahead, cancelled when it closes

Subtleties:
- `run` owns the background work of the client: membership updates, the sweep of kept
  page files, listings fetched ahead of a scan and every readahead run live in its
  nursery, and end with it. A run is also cancelled earlier by the prefetcher of its
  file (`close`, or a read far from it).
- `open_pinned` pins the version (and size) of a status for one open file; every read of
  it returns bytes of that version or fails with ESTALE; `close` ends its readahead.
  Pages it fetched stay in the buffer for other readers of that version.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import trio

from dorafs.client.buffer import PageBuffer
from dorafs.client.local import LocalPages
from dorafs.client.metadata import Metadata
from dorafs.client.reading import OpenFile, Reader
from dorafs.client.router import Router
from dorafs.client.statuses import StatusMemo
from dorafs.client.workers import WorkerClient
from dorafs.config import MountConfig
from dorafs.errors import DoraError
from dorafs.membership import Membership
from dorafs.ring import HashRing
from dorafs.scans import ListingPrefetch
from dorafs.security import Credentials
from dorafs.ufs import FileStatus, UfsSet

log = logging.getLogger(__name__)

__all__ = ["ClientStats", "DoraClient", "OpenFile"]


@dataclass
class ClientStats:
    worker_pages: int = 0
    short_circuit_pages: int = 0  # of worker_pages, read from a local worker's page file
    mapped_pages: int = 0  # of short_circuit_pages, mapped from the kernel's page cache, not copied
    worker_parts: int = 0  # parts of pages a random reader fetched instead of whole pages
    ufs_fallback_pages: int = 0
    ufs_fallback_metadata: int = 0
    failovers: int = 0
    by_worker: Counter = field(default_factory=Counter)


class DoraClient:
    def __init__(self, config: MountConfig, membership: Membership, ufs: UfsSet, *,
                 credentials: Credentials | None = None):
        self.config = config
        self.membership = membership
        self.ufs = ufs
        self.stats = ClientStats()
        self.workers = WorkerClient(timeout=config.worker_timeout, connect_timeout=config.connect_timeout,
                                    credentials=credentials)
        self.router = Router(membership, config, self.stats)
        self.metadata = Metadata(config, self.router, self.workers, ufs, self.stats)
        self.reader = Reader(config, self.router, self.workers, ufs, self.metadata.statuses, self.stats)
        self.buffer: PageBuffer = self.reader.buffer
        self.local: LocalPages = self.reader.local
        # `read(f, offset, length)`: bytes of an open file's pinned version, short only at
        # EOF. The read path's own method, so that a read costs no frame of the facade.
        self.read = self.reader.read

    # -- lifecycle --------------------------------------------------------------------

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Keep membership fresh and own the background tasks (listings fetched ahead,
        readahead runs), until cancelled."""
        try:
            async with trio.open_nursery() as nursery:
                self.metadata.nursery = self.reader.prefetches.nursery = nursery
                await nursery.start(self.membership.run)
                nursery.start_soon(self.local.sweep)
                task_status.started()
                await trio.sleep_forever()
        finally:
            self.metadata.nursery = self.reader.prefetches.nursery = None
            self.local.close()
            with trio.CancelScope(shield=True):
                await self.workers.aclose()

    # -- what other modules read ------------------------------------------------------

    @property
    def page_size(self) -> int:
        """The cluster's page size (the configured one until workers are known)."""
        return self.router.page_size

    @property
    def ring(self) -> HashRing:
        return self.router.ring

    @property
    def statuses(self) -> StatusMemo:
        return self.metadata.statuses

    @statuses.setter
    def statuses(self, memo: StatusMemo) -> None:  # a forked fsspec child starts with its parent's
        self.metadata.statuses = self.reader.statuses = memo

    @property
    def scans(self) -> ListingPrefetch:
        return self.metadata.scans

    def candidates(self, key: str) -> list[str]:
        return self.router.candidates(key)

    # -- metadata (client/metadata.py) -------------------------------------------------

    async def stat(self, uri: str) -> FileStatus:
        return await self.metadata.stat(uri)

    def list_batches(self, uri: str) -> AsyncIterator[list[FileStatus]]:
        """A directory's entries, a batch (one listing request) at a time."""
        return self.metadata.list_batches(uri)

    async def invalidate(self, uri: str, *, recursive: bool = False, pages: bool = False) -> None:
        await self.metadata.invalidate(uri, recursive=recursive, pages=pages)

    # -- open files (client/reading.py, client/prefetch.py) ---------------------------

    def open_pinned(self, uri: str, status: FileStatus) -> OpenFile:
        """An open file of `uri` pinned to the version and size of `status`, with its own
        prefetcher. `close` it when done."""
        return self.reader.open_file(uri, status)

    def close(self, f: OpenFile) -> None:
        """The open file is done: its readahead runs are cancelled (what they fetched
        stays buffered)."""
        ahead = f.ahead
        if ahead is not None and ahead.reader is self.reader:  # not a forked parent's
            ahead.close()

    async def whole_file(self, f: OpenFile, wait: bool = True) -> dict | None:
        """Where the owning worker keeps this pinned version as one file, if the worker
        is on this machine and holds all of it: {"path", "size", "page_size",
        "checksums"}; None otherwise (nothing is fetched). Without `wait`, None too
        while the worker is still making that file (from its pages, in the background)."""
        address = self.owner_here(f.uri)
        if address is None:
            return None
        try:
            return await self.workers.whole_object(address, f.uri, f.status.version, f.status.size,
                                                   self.page_size, wait)
        except (DoraError, OSError) as exc:
            log.debug("worker %s: no whole file of %s: %s", address, f.uri, exc)
            return None

    def owner_here(self, uri: str) -> str | None:
        """The address of the worker that owns `uri`, if it is on this machine (and not
        suspected of being down); else None."""
        for address in self.router.candidates(uri)[:1]:
            if self.router.is_local(address) and not self.router.suspected(address):
                return address
        return None
