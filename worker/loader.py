"""The worker's side of load and free jobs: one batch of files at a time.

The registry's scheduler sends each worker batches of the files it owns (`POST /v1/load`)
and gets back one result per file. A batch entry carries the file's status from the
scheduler's listing, so the worker learns it without asking the UFS again (a mount's
`stat` after a load is a cache hit), then caches every page that is not cached yet.

Subtleties:
- Pages are filled in runs (`WorkerService.load_run`): one UFS read for up to `MAX_RUN`
  consecutive missing pages, through the same single-flight fills as reads, so a page
  being read by a mount while a load asks for it is fetched from the UFS once.
- Work is bounded per worker, not per batch: one `CapacityLimiter` for all run fetches of
  all jobs (the UFS thread count), so two jobs share a worker's UFS budget.
- A job's bandwidth share is a token bucket per job on this worker, charged a run's
  missing bytes before the run is fetched (a debt model: a large page borrows, and the next
  fetch waits the debt off), so the rate holds whatever the page size.
- Cancel (`POST /v1/load/cancel?job=`) cancels the job's running batches at once (their
  UFS reads in flight finish in their threads, nothing new starts) and refuses the job's
  later batches: the scheduler may still have one on the wire. Unfinished files come back
  as cancelled.
- Results are per file and never fail the batch: the scheduler retries failed files once
  at the end of the job and reports the rest with their causes.
"""

from __future__ import annotations

import errno as _errno
import logging
from collections import OrderedDict
from dataclasses import dataclass, field

import trio

from dorafs.errors import DoraError, InvalidRequest
from dorafs.pages import object_id, page_count, page_length
from dorafs.ufs import FileStatus
from worker.access import UfsRoots, check_uri
from worker.service import MAX_RUN, WorkerService

log = logging.getLogger(__name__)

MAX_BATCH = 10_000  # entries in one request; the scheduler sends far fewer
REMEMBERED_JOBS = 1000  # cancelled job ids and bandwidth buckets kept


class TokenBucket:
    """`rate` bytes per second, with a burst of one second's worth."""

    def __init__(self, rate: float):
        self.rate = rate
        self.tokens = rate
        self.stamp = trio.current_time()

    async def take(self, n: int) -> None:
        if self.rate <= 0:
            return
        now = trio.current_time()
        self.tokens = min(self.rate, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        self.tokens -= n
        if self.tokens < 0:
            await trio.sleep(-self.tokens / self.rate)


@dataclass
class _Job:
    bucket: TokenBucket | None = None
    scopes: set = field(default_factory=set)
    cancelled: bool = False


@dataclass
class BatchOptions:
    mode: str = "load"  # or "free"
    verify: bool = False
    metadata_only: bool = False
    bandwidth: int = 0  # bytes/s for this job on this worker; 0: unlimited

    @classmethod
    def from_body(cls, body: dict) -> BatchOptions:
        mode = body.get("mode", "load")
        if mode not in ("load", "free"):
            raise InvalidRequest(f"'mode' must be 'load' or 'free', got {mode!r}")
        bandwidth = body.get("bandwidth", 0)
        if isinstance(bandwidth, bool) or not isinstance(bandwidth, int) or bandwidth < 0:
            raise InvalidRequest(f"'bandwidth' must be a non-negative integer, got {bandwidth!r}")
        return cls(mode, bool(body.get("verify")), bool(body.get("metadata_only")), bandwidth)


def _entries(body: dict) -> list[tuple[str, FileStatus | None]]:
    files = body.get("files")
    if not isinstance(files, list) or len(files) > MAX_BATCH:
        raise InvalidRequest(f"'files' must be a list of at most {MAX_BATCH} entries")
    found = []
    for item in files:
        if not isinstance(item, dict) or not isinstance(item.get("uri"), str):
            raise InvalidRequest(f"each file must be an object with a 'uri', got {str(item)[:100]}")
        status = None
        if item.get("status") is not None:
            try:
                status = FileStatus.from_dict(item["status"])
            except (KeyError, TypeError, ValueError) as exc:
                raise InvalidRequest(f"bad status for {item['uri']}: {exc}") from None
        found.append((check_uri(item["uri"]), status))
    return found


class Loader:
    def __init__(self, service: WorkerService, concurrency: int, roots: UfsRoots | None = None):
        self.service = service
        self.roots = roots or UfsRoots([])
        self.metrics = service.metrics
        self._limiter = trio.CapacityLimiter(max(1, concurrency))
        self._jobs: OrderedDict[str, _Job] = OrderedDict()

    def _job(self, job_id: str) -> _Job:
        job = self._jobs.get(job_id)
        if job is None:
            job = self._jobs[job_id] = _Job()
            while len(self._jobs) > REMEMBERED_JOBS:
                oldest = next(iter(self._jobs))
                if self._jobs[oldest].scopes:
                    break  # still running: keep it
                del self._jobs[oldest]
        self._jobs.move_to_end(job_id)
        return job

    def cancel(self, job_id: str) -> int:
        """Stop the job's running batches and refuse its later ones; the batches stopped."""
        job = self._job(job_id)
        job.cancelled = True
        for scope in job.scopes:
            scope.cancel()
        if job.scopes:
            log.info("job %s cancelled: stopping %d running batches", job_id, len(job.scopes))
        return len(job.scopes)

    async def run_batch(self, body: dict) -> dict:
        job_id = body.get("job")
        if not isinstance(job_id, str) or not job_id:
            raise InvalidRequest(f"'job' must be a non-empty string, got {job_id!r}")
        options = BatchOptions.from_body(body)
        entries = [(await self.roots.check(uri), status) for uri, status in _entries(body)]
        job = self._job(job_id)
        results: list[dict | None] = [None] * len(entries)
        if not job.cancelled:
            if options.bandwidth:
                if job.bucket is None:
                    job.bucket = TokenBucket(options.bandwidth)
                job.bucket.rate = options.bandwidth  # the share changes with the number of workers
            with trio.CancelScope() as scope:
                job.scopes.add(scope)
                try:
                    async with trio.open_nursery() as nursery:
                        for i, (uri, status) in enumerate(entries):
                            nursery.start_soon(self._one, job, options, results, i, uri, status)
                finally:
                    job.scopes.discard(scope)
        for i, (uri, _) in enumerate(entries):
            if results[i] is None:
                self.metrics.load_files.labels("cancelled").inc()
                results[i] = {"uri": uri, "ok": False, "error": "cancelled", "errno": "ECANCELED"}
        return {"job": job_id, "cancelled": job.cancelled, "results": results}

    async def _one(self, job: _Job, options: BatchOptions, results: list, i: int, uri: str,
                   status: FileStatus | None) -> None:
        try:
            if options.mode == "free":
                results[i] = await self._free(uri, status)
            else:
                results[i] = await self._load(job, options, uri, status)
        except DoraError as exc:
            self.metrics.load_files.labels("failed").inc()
            results[i] = {"uri": uri, "ok": False, "error": str(exc),
                          "errno": _errno.errorcode.get(exc.errno, "EIO")}
        except Exception as exc:  # a bug or an unmapped library error: reported, not fatal
            log.exception("loading %s failed", uri)
            self.metrics.load_files.labels("failed").inc()
            results[i] = {"uri": uri, "ok": False, "error": f"{type(exc).__name__}: {exc}", "errno": "EIO"}

    async def _load(self, job: _Job, options: BatchOptions, uri: str, status: FileStatus | None) -> dict:
        service = self.service
        if status is None:
            status = await service.stat(uri)
        else:
            await service.learn_status(uri, status)
        result = {"uri": uri, "ok": True, "dir": status.is_dir, "bytes": 0,
                  "pages_fetched": 0, "pages_cached": 0, "pages_repaired": 0}
        if status.is_dir or options.metadata_only:
            self.metrics.load_files.labels("metadata").inc()
            return result
        size, version = status.size, status.version
        page_size = service.config.page_size

        errors: list[DoraError] = []
        pages = page_count(size, page_size)

        async def one_run(first: int, count: int) -> None:
            async with self._limiter:
                if errors:
                    return  # the file failed already: do not spend the UFS on it
                try:
                    if job.bucket is not None:
                        missing = [i for i in range(first, first + count) if service.store.peek((oid, i)) is None]
                        await job.bucket.take(sum(page_length(i, size, page_size) for i in missing))
                    fetched = set(await service.load_run(uri, version, size, first, count))
                    for index in range(first, first + count):
                        if options.verify and index not in fetched and \
                                await service.load_page(uri, version, size, index, verify=True):
                            result["pages_repaired"] += 1
                            self.metrics.load_pages.labels("repaired").inc()
                except DoraError as exc:  # kept here: a nursery would wrap it in a group
                    errors.append(exc)
                    return
            for index in range(first, first + count):
                length = page_length(index, size, page_size)
                if index in fetched:
                    result["pages_fetched"] += 1
                    result["bytes"] += length
                    self.metrics.load_pages.labels("fetched").inc()
                    self.metrics.load_bytes.inc(length)
                else:
                    result["pages_cached"] += 1
                    self.metrics.load_pages.labels("cached").inc()

        oid = object_id(uri, version)
        async with trio.open_nursery() as nursery:  # runs of one UFS read each, side by side
            for first in range(0, pages, MAX_RUN):
                nursery.start_soon(one_run, first, min(MAX_RUN, pages - first))
        if errors:
            raise errors[0]
        if size >= page_size:  # one file of it, ready for a mount on this machine to hold at its first open
            await service.whole_object(uri, version, size)
        self.metrics.load_files.labels("loaded" if result["pages_fetched"] else "cached").inc()
        return result

    async def _free(self, uri: str, status: FileStatus | None) -> dict:
        service = self.service
        if status is not None:
            await service.learn_status(uri, status)  # so the pages of the listed version go too
        counts = await service.invalidate(uri, pages="all")
        self.metrics.load_files.labels("freed").inc()
        return {"uri": uri, "ok": True, "dir": bool(status and status.is_dir), "pages_freed": counts["pages"]}

