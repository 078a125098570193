"""Statuses and listings for the mount: kept here, else from the owning worker, else the UFS.

Subtleties:
- A status asked for is first looked up in what this mount keeps (client/statuses.py,
  for `status_ttl`); a miss asks the owner of the URI (client/router.py), which answers
  from its metadata store within the TTL it is given; when no worker answers, the mount
  asks the UFS itself.
- Misses in one directory soon bring its whole listing (dorafs/scans.py; the second
  miss, `LIST_AHEAD_AFTER`): the listing runs in the background, in the nursery the
  client owns, and keeps every status it brings, bounded by `LIST_AHEAD_ENTRIES`. A miss
  in a directory being listed so waits for that listing (at most `LISTING_WAIT`) rather
  than asking for its own status.
- A listing comes in *batches* of up to `LIST_BATCH` entries (the wire protocol calls
  them pages: `/v1/list?after=&limit=`, `WorkerClient.list_batch`); `list_batches` yields
  them one at a time, so a directory of a million entries never sits in memory at once.
- When the UFS fails (a worker answers EIO for a status or a listing it had to refresh),
  the mount asks the owner again for what it holds, whatever its age (`ttl=-1`): a store
  outage costs freshness, not the data already cached. Logged once per outage; during
  it, one request every `OUTAGE_RECHECK` seconds tries the UFS again.
- `invalidate` after a change through this mount: the owner of the URI forgets its
  status, the owner of the parent its listing; a recursive change asks every worker.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import trio

from dorafs.client.router import Router
from dorafs.client.statuses import StatusMemo
from dorafs.client.workers import WorkerClient
from dorafs.config import MountConfig
from dorafs.errors import DoraError, NotFound, UfsError, Unavailable
from dorafs.scans import ListingPrefetch
from dorafs.ufs import FileStatus, UfsSet, join
from dorafs.ufs.base import parent as parent_uri

log = logging.getLogger(__name__)

T = TypeVar("T")
LIST_BATCH = 1000  # entries per listing request
LIST_AHEAD_ENTRIES = 16 * LIST_BATCH  # statuses a listing fetched ahead of a scan may bring
# Status misses in one directory before its listing is fetched ahead. A miss costs the
# store a HEAD and a one-key listing (dorafs/ufs/s3.py, `stat`); a listing of up to 1,000
# entries costs one request: the second miss already says more are coming
# (`python3 bench/coldcpu.py --mode quick --small`: S3 requests per small file).
LIST_AHEAD_AFTER = 2
LISTING_WAIT = 0.5  # seconds a status miss waits for its directory's listing on the way, at most
# While the UFS fails, statuses and listings come straight from what the workers hold,
# and one request per this many seconds tries the UFS again (each try costs the retries).
OUTAGE_RECHECK = 2.0


class Metadata:
    """Statuses and listings, with the UFS outage policy (see the module's note)."""

    def __init__(self, config: MountConfig, router: Router, workers: WorkerClient, ufs: UfsSet, stats):
        self.config = config
        self.router = router
        self.ufs = ufs
        self.stats = stats
        self._workers = workers
        self.statuses = StatusMemo(config.status_ttl, config.attr_timeout)
        # A listing is fetched ahead once per status_ttl at most: within it, further
        # misses mean a directory larger than the listing brought (LIST_AHEAD_ENTRIES).
        self.scans = ListingPrefetch(self._list_ahead, after=LIST_AHEAD_AFTER,
                                     again_after=max(config.status_ttl, 0.0))
        self.nursery: trio.Nursery | None = None  # the client's: listings fetched ahead run there
        self._outage: str | None = None  # the UFS error that made the mount use held metadata
        self._outage_recheck = 0.0  # until then, metadata requests skip the failing UFS

    async def stat(self, uri: str) -> FileStatus:
        """The status of `uri`: kept by this mount (see statuses.py), else from its owner,
        else from the UFS. Misses in one directory soon bring its whole listing (scans.py)."""
        now = trio.current_time()
        status = self.statuses.get(uri, now)
        if status is not None:
            return status
        parent = parent_uri(uri)
        if parent:
            listing = self.scans.listing(parent)
            if listing is not None:  # the scan's listing is on its way: it brings this status too
                with trio.move_on_after(LISTING_WAIT):
                    await listing.wait()
                status = self.statuses.get(uri, trio.current_time())
                if status is not None:
                    return status
            else:
                self.scans.miss(parent, self.nursery, uri)
        try:
            status, age = await self._from_owner(
                uri,
                lambda address: self._workers.stat(
                    address, uri, ttl=self.config.status_ttl, negative_ttl=self.config.negative_ttl),
                lambda address: self._workers.stat(address, uri, ttl=-1, negative_ttl=-1))
        except Unavailable:
            self.stats.ufs_fallback_metadata += 1
            status, age = await self.ufs.get(uri).stat(uri), 0.0
        self.statuses.put(uri, status, age, now)
        return status

    async def list_batches(self, uri: str) -> AsyncIterator[list[FileStatus]]:
        """A directory's entries a batch at a time, from its owner (or the UFS). The
        mount keeps their statuses as it keeps those of `stat`."""
        after = ""
        while True:
            now = trio.current_time()
            try:
                entries, after_next, age = await self._from_owner(
                    uri,
                    lambda address: self._workers.list_batch(address, uri, after, LIST_BATCH,
                                                            ttl=self.config.listing_ttl),
                    lambda address: self._workers.list_batch(address, uri, after, LIST_BATCH, ttl=-1))
            except Unavailable:
                self.stats.ufs_fallback_metadata += 1
                async for batch in self.ufs.get(uri).list_batches(uri):
                    batch = [e for e in batch if e.name > after] if after else batch
                    if batch:
                        self._keep_listed(uri, batch, 0.0, trio.current_time())
                        yield batch
                return
            if entries:
                self._keep_listed(uri, entries, age, now)
                yield entries
            if after_next is None:
                return
            after = after_next

    async def _from_owner(self, uri: str, fresh: Callable[[str], Awaitable[T]],
                          held: Callable[[str], Awaitable[T]]) -> T:
        """A status or listing as fresh as the mount's TTLs ask (`fresh`), or, while the
        UFS fails, what the owner holds (`held`)."""
        if self._outage is not None and trio.current_time() < self._outage_recheck:
            return await self.router.route(uri, held)  # an outage: no UFS attempt per request
        try:
            result = await self.router.route(uri, fresh)
        except UfsError as exc:
            return await self._held(uri, exc, held)
        self._store_answers()
        return result

    async def _held(self, uri: str, error: UfsError, call: Callable[[str], Awaitable[T]]) -> T:
        """What the owner of `uri` holds, whatever its age, now that the UFS failed with
        `error`; `error` itself if it holds nothing (or does not answer)."""
        try:
            result = await self.router.route(uri, call)
        except NotFound:
            raise  # held: "no such path"
        except DoraError:
            raise error from None
        if self._outage is None:
            log.warning("the UFS fails (%s); serving the statuses and listings the workers hold, "
                        "whatever their age, until it answers again", error)
        self._outage = str(error)
        self._outage_recheck = trio.current_time() + OUTAGE_RECHECK
        return result

    def _store_answers(self) -> None:
        if self._outage is not None:
            log.info("the UFS answers again; statuses and listings follow their TTLs")
            self._outage = None

    def _keep_listed(self, uri: str, entries: list[FileStatus], age: float | None, now: float) -> None:
        for entry in entries:
            self.statuses.put(join(uri, entry.name), entry, age, now)

    async def _list_ahead(self, uri: str) -> None:
        """Fetch a listing for the statuses it brings (list_batches keeps them), up to
        LIST_AHEAD_ENTRIES: the statuses kept are bounded, and a huge directory would
        only push out what the scan still needs."""
        entries = 0
        async for batch in self.list_batches(uri):
            entries += len(batch)
            if entries >= LIST_AHEAD_ENTRIES:
                break
        log.debug("listed %s ahead of a scan: %d entries", uri, entries)

    async def invalidate(self, uri: str, *, recursive: bool = False, pages: bool = False) -> None:
        """Make the workers forget `uri` after it changed through this mount.

        The owner of `uri` drops its status, the owner of the parent its listing. A
        worker that does not answer has nothing this mount can reach anyway; its TTLs
        bound how long it may serve the old entry. `recursive` (a directory renamed or
        removed) asks every worker, since the paths under `uri` hash anywhere. `pages`
        drops the data pages of the version the owner knew too (they would never be
        served again: a new version has new page ids; this frees their space at once).
        This mount forgets the statuses it kept of them first.
        """
        self.statuses.forget(uri, recursive=recursive)
        if recursive:
            for info in list(self.router.membership.workers.values()):
                try:
                    await self._workers.invalidate(info.address, uri, recursive=True, pages=pages)
                except DoraError as exc:
                    log.warning("could not invalidate %s on %s: %s", uri, info.address, exc)
            return
        parent = parent_uri(uri)
        for key in [uri] + ([parent] if parent else []):
            drop_pages = pages and key == uri
            try:
                await self.router.route(key, lambda address: self._workers.invalidate(address, uri, pages=drop_pages))
            except Unavailable as exc:
                log.warning("could not invalidate %s on its owner: %s", uri, exc)
