"""The scheduler: distributed load (and free) jobs, run by the registry.

A job walks a UFS path, groups what it finds by ring owner (`dorafs.routing`, the rule the
mount routes by) and sends each worker batches of the files it owns (`POST /v1/load`);
the worker caches their pages and answers per file. Each page is fetched once, into the
worker a mount will ask for it.

Subtleties:
- Bounded memory: the walk is depth-first in name order through the owners' paginated
  `/v1/list`, so the job holds a stack of (directory, last name handled), the batches
  not yet answered (a few per worker: the walk pauses when they pile up), counters, the
  files waiting for their retry and the last failures. Never the whole file list.
- Listing through the owning workers, not the UFS directly, warms their listing and
  status caches as a side effect: a mount reading the loaded tree afterwards asks the UFS
  nothing (within the workers' TTLs). A load starts by dropping what the workers cache
  under the path, so it sees the UFS as it is now; `skip_cached` keeps that metadata and
  costs the UFS nothing for files already cached.
- Persistence: the job's file (`STATE_DIR/jobs/ID.json`, written atomically, at most a few
  times a second) holds the walk stack together with every batch it has produced and
  not yet seen answered. Both change without an await in between, so any saved state is
  consistent: after a restart the walk goes on from the stack and the batches are sent
  again. A batch done but not yet saved is sent twice; the worker answers from its cache.
- Workers that die: a failed send puts the batch back and backs that worker off; once the
  registry expires it, the batch is regrouped over the new ring. Pages the dead worker
  had loaded are gone with it, and a worker that joins takes over keys whose pages sit
  elsewhere; so a pass during which the ring changed is followed by another pass over
  the path (each file to its current owner: already-cached pages cost a lookup, not a
  fetch), up to MAX_PASSES.
- Failures: a failed file is retried once at the end of the job; what still fails is
  counted, and the last `jobs.MAX_FAILED_KEPT` failures are kept with their causes. A job with
  failures ends `failed`, otherwise `completed`.
- Cancel: the job's tasks are cancelled (in-flight requests dropped) and every worker is
  told to stop the job's batches (`POST /v1/load/cancel`), which stops their fetching.
- Every call to a worker goes through `WorkerCalls.call`.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from pathlib import Path

import httpx
import trio

from dorafs.errors import DoraError, NotFound, Unavailable, from_wire
from dorafs.files import write_atomic
from dorafs.membership import WorkerInfo
from dorafs.routing import Routing, build_routing
from dorafs.security import Credentials
from dorafs.ufs import FileStatus, join
from registry.jobs import Batch, Job, JobSpec
from registry.state import MembershipTable

log = logging.getLogger("dorafs.registry.scheduler")

JOB_DIR = "jobs"
BATCH_FILES = 32  # files per batch: a few seconds of work, so cancel and failover are quick
BATCH_BYTES = 256 << 20
BATCH_SECONDS = 60  # under a bandwidth limit, a batch is at most this long at the worker's share
SLOTS_PER_WORKER = 2  # batches in flight per worker: the next one is there when one ends
QUEUED_PER_WORKER = 3  # batches waiting per worker before the walk pauses
LIST_LIMIT = 1000
MAX_RETRY = 10_000  # failed files kept for the retry at the end; later ones fail for good
MAX_PASSES = 4
MAX_ATTEMPTS = 3  # error answers (not connection failures) before a batch's files fail
KEEP_FINISHED = 100  # finished jobs kept on disk
SAVE_INTERVAL = 0.25
CALL_TIMEOUT = httpx.Timeout(600.0, connect=3.0)  # a batch under a bandwidth limit takes time


class WorkerCalls:
    """HTTP calls from the scheduler to workers: the one place they go through."""

    def __init__(self, credentials: Credentials | None = None):
        self.credentials = credentials or Credentials()
        self._http = httpx.AsyncClient(timeout=CALL_TIMEOUT, **self.credentials.httpx_options())

    async def aclose(self) -> None:
        await self._http.aclose()

    async def call(self, method: str, address: str, path: str, *, params: dict | None = None,
                   body: dict | None = None, timeout: httpx.Timeout | float | None = None) -> dict:
        """The JSON answer; `Unavailable` if the worker cannot be reached, its DoraError if it says no."""
        kw = {} if timeout is None else {"timeout": timeout}
        try:
            response = await self._http.request(method, f"{self.credentials.scheme}://{address}{path}", params=params, json=body, **kw)
        except httpx.HTTPError as exc:
            raise Unavailable(f"worker {address}: {exc or type(exc).__name__}") from None
        try:
            answer = response.json()
        except ValueError:
            answer = {"message": response.text[:200]}
        if response.status_code != 200:
            raise from_wire(response.status_code, answer if isinstance(answer, dict) else None)
        return answer


class Scheduler:
    def __init__(self, state_dir: Path, table: MembershipTable, credentials: Credentials | None = None):
        self.dir = Path(state_dir) / JOB_DIR
        self.table = table
        self.jobs: dict[str, Job] = {}
        self.calls = WorkerCalls(credentials)
        self._runners: dict[str, trio.CancelScope] = {}
        self._wakes: dict[str, trio.Event] = {}
        self._dirty: set[str] = set()
        self._nursery: trio.Nursery | None = None
        self._routing_cache: tuple[int, Routing] | None = None

    # -- lifecycle --------------------------------------------------------------------

    def load(self) -> None:
        """Read saved jobs (blocking: call before serving or in a thread)."""
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        for path in sorted(self.dir.glob("*.json")):
            try:
                job = Job.from_dict(json.loads(path.read_text()))
            except (ValueError, KeyError, TypeError) as exc:
                log.warning("job file %s is unreadable (%s): ignored", path, exc)
                continue
            self.jobs[job.id] = job

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Run (and resume) jobs until cancelled."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._save_loop)
                for job in sorted(self.jobs.values(), key=lambda j: j.created):
                    if job.state == "running":
                        for batch in job.batches.values():
                            batch.ring_version = -1  # regroup over the ring as it is now
                        log.info("resuming job %s (%s %s): %d files listed, %d batches pending",
                                 job.id, job.spec.kind, job.spec.uri, job.counters["files_listed"], len(job.batches))
                        self._start(job)
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._nursery = None
            with trio.CancelScope(shield=True):
                for job in self.jobs.values():  # stopping: keep the running jobs' last positions
                    if job.state == "running":
                        await self._save_now(job)
                await self.calls.aclose()

    def _start(self, job: Job) -> None:
        self._nursery.start_soon(self._run_job, job)

    # -- the API ----------------------------------------------------------------------

    async def submit(self, spec: JobSpec) -> Job:
        routing = self.routing()
        if not routing.workers:
            raise Unavailable("no live workers to load into")
        if spec.kind == "load" and not spec.skip_cached:
            # Start from the UFS as it is now: drop what the workers cache under the path.
            await self._on_all_workers("/v1/invalidate", {"uri": spec.uri, "recursive": 1})
        root = await self._stat(spec.uri)  # through its owner: its status is cached there
        job = Job(id=uuid.uuid4().hex[:12], spec=spec, members=sorted(routing.workers))
        job.root_is_dir = root.is_dir
        if root.is_dir:
            job.stack = [{"dir": spec.uri, "after": ""}]
        else:
            job.counters["files_listed"], job.counters["bytes_listed"] = 1, root.size
            self._add(job, spec.uri, root)
            self._finish_filling(job)
            job.listing_done = True
        self.jobs[job.id] = job
        await self._save_now(job)
        self._forget_old_jobs()
        log.info("job %s submitted: %s %s%s", job.id, spec.kind, spec.uri, " (recursive)" if spec.recursive else "")
        self._start(job)
        return job

    def get(self, job_id: str) -> Job:
        job = self.jobs.get(job_id)
        if job is None:
            raise NotFound(f"no job {job_id!r}")
        return job

    async def cancel(self, job_id: str) -> Job:
        job = self.get(job_id)
        if job.state != "running":
            return job
        job.state = "cancelled"
        job.finished = time.time()
        scope = self._runners.get(job.id)
        if scope is not None:
            scope.cancel()
        await self._save_now(job)
        stopped = await self._on_all_workers("/v1/load/cancel", {"job": job.id})
        log.info("job %s cancelled (%d worker batches stopped)", job.id, sum(a.get("stopped", 0) for a in stopped))
        return job

    # -- routing ----------------------------------------------------------------------

    def routing(self) -> Routing:
        """The ring over the live workers, rebuilt when the membership changes."""
        version = self.table.version
        if self._routing_cache is None or self._routing_cache[0] != version:
            workers = {w["id"]: WorkerInfo.from_dict(w) for w in self.table.snapshot()["workers"]}
            self._routing_cache = (version, build_routing(workers))
        return self._routing_cache[1]

    async def _on_owner(self, uri: str, path: str, params: dict) -> dict:
        """GET from the first ring candidate of `uri` that answers; wait for workers if none does.

        No short timeout: a worker's first listing of a huge directory reads all of it.
        """
        delay = 0.2
        while True:
            for worker in self.routing().candidates(uri, 3):
                try:
                    return await self.calls.call("GET", worker.address, path, params=params)
                except Unavailable:
                    continue
            await trio.sleep(delay)
            delay = min(delay * 2, 2.0)

    async def _on_all_workers(self, path: str, params: dict) -> list[dict]:
        answers: list[dict] = []

        async def one(worker: WorkerInfo) -> None:
            try:
                answers.append(await self.calls.call("POST", worker.address, path, params=params, timeout=10))
            except DoraError as exc:
                log.warning("%s on worker %s failed: %s", path, worker.id, exc)

        async with trio.open_nursery() as nursery:
            for worker in self.routing().workers.values():
                nursery.start_soon(one, worker)
        return answers

    async def _stat(self, uri: str) -> FileStatus:
        with trio.fail_after(60):
            try:
                return FileStatus.from_dict(await self._on_owner(uri, "/v1/stat", {"uri": uri}))
            except trio.TooSlowError:
                raise Unavailable(f"no worker answered a stat of {uri}") from None

    # -- one job ----------------------------------------------------------------------

    async def _run_job(self, job: Job) -> None:
        with trio.CancelScope() as scope:
            self._runners[job.id] = scope
            try:
                await self._passes(job)
            except DoraError as exc:
                log.error("job %s failed: %s", job.id, exc)
                job.error = str(exc)
                job.state = "failed"
            except Exception as exc:  # a bug: the job fails, the registry keeps serving
                log.exception("job %s failed", job.id)
                job.error = f"internal error: {type(exc).__name__}: {exc}"
                job.state = "failed"
            finally:
                self._runners.pop(job.id, None)
        if job.state == "running":
            job.state = "failed" if job.counters["files_failed"] else "completed"
        job.finished = job.finished or time.time()
        with trio.CancelScope(shield=True):
            await self._save_now(job)
        c = job.counters
        log.info("job %s %s: %d files (%d already cached), %d failed, %d pages fetched, %d bytes loaded, %.1fs",
                 job.id, job.state, c["files_done"], c["files_cached"], c["files_failed"], c["pages_fetched"],
                 c["bytes_loaded"], job.finished - job.created)

    async def _passes(self, job: Job) -> None:
        while True:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._walk, job)
                nursery.start_soon(self._dispatch, job)
            members = sorted(self.routing().workers)
            if not job.retrying and members != job.members and job.passes < MAX_PASSES:
                log.info("job %s: the workers changed during pass %d; checking every file against the new ring",
                         job.id, job.passes)
                job.passes += 1
                job.members = members
                root = await self._stat(job.spec.uri)  # its owner may be new too
                if job.root_is_dir:
                    job.stack = [{"dir": job.spec.uri, "after": ""}]
                    job.listing_done = False
                else:
                    self._add(job, job.spec.uri, root)
                    self._finish_filling(job)
                self._mark(job)
                continue
            if job.retry and not job.retrying:
                job.retrying = True
                log.info("job %s: retrying %d failed files", job.id, len(job.retry))
                for item in job.retry:
                    self._add(job, item["uri"], FileStatus.from_dict(item["status"]), retry=True)
                self._finish_filling(job)
                job.retry = []
                self._mark(job)
                continue
            break
        if job.spec.kind == "free":
            await self._on_all_workers("/v1/invalidate", {"uri": job.spec.uri, "recursive": int(job.spec.recursive)})

    # -- the walk ---------------------------------------------------------------------

    async def _walk(self, job: Job) -> None:
        while job.stack:
            frame = job.stack[-1]
            directory = frame["dir"]
            try:
                answer = await self._on_owner(directory, "/v1/list",
                                              {"uri": directory, "after": frame["after"], "limit": LIST_LIMIT})
            except DoraError as exc:  # gone since it was listed, not a directory, UFS failing
                if job.passes == 1:
                    job.fail_file(directory, f"cannot list: {exc}", "EIO")
                job.stack.pop()
                self._mark(job)
                continue
            descended = False
            for raw in answer["entries"]:
                status = FileStatus.from_dict(raw)
                uri = join(directory, status.name)
                if job.passes == 1:
                    job.counters["dirs_listed" if status.is_dir else "files_listed"] += 1
                    job.counters["bytes_listed"] += status.size
                self._add(job, uri, status)
                frame["after"] = status.name
                self._mark(job)
                if status.is_dir and job.spec.recursive:
                    job.stack.append({"dir": uri, "after": ""})
                    descended = True
                    break
                await self._room(job)
            if not descended and answer.get("next") is None:
                job.stack.pop()
                self._mark(job)
            await self._room(job)
        self._finish_filling(job)
        job.listing_done = True
        self._mark(job)

    def _add(self, job: Job, uri: str, status: FileStatus, *, retry: bool = False) -> None:
        """Put a file (or directory, for its status) in the batch of its owner still filling."""
        routing = self.routing()
        owner = routing.owner(uri)
        owner_id = owner.id if owner is not None else ""
        batch = next((b for b in job.batches.values() if b.filling and b.owner == owner_id and b.retry == retry), None)
        if batch is None:
            batch = Batch(job.next_batch, owner_id, [], retry=retry, ring_version=self.table.version)
            job.next_batch += 1
            job.batches[batch.id] = batch
        batch.add(uri, status)
        if len(batch.files) >= BATCH_FILES or batch.nbytes >= self._batch_bytes(job, routing):
            batch.filling = False
            self._wake(job)

    @staticmethod
    def _batch_bytes(job: Job, routing: Routing) -> int:
        """Under a bandwidth limit, a batch is about a minute of a worker's share."""
        if not job.spec.bandwidth:
            return BATCH_BYTES
        return min(BATCH_BYTES, max(1, job.spec.bandwidth * BATCH_SECONDS // max(1, len(routing.workers))))

    def _finish_filling(self, job: Job) -> None:
        for batch in job.batches.values():
            batch.filling = False
        self._wake(job)

    async def _room(self, job: Job) -> None:
        """Wait while enough batches are waiting to be sent (bounded memory)."""
        while True:
            limit = QUEUED_PER_WORKER * max(1, len(self.routing().workers))
            if sum(1 for b in job.batches.values() if not b.filling) < limit:
                return
            await self._wait(job)

    # -- dispatch ---------------------------------------------------------------------

    async def _dispatch(self, job: Job) -> None:
        running: dict[int, tuple[str, trio.CancelScope]] = {}  # batch id -> (worker id, scope)
        backoff: dict[str, float] = {}  # worker id -> no sends before this time
        async with trio.open_nursery() as nursery:
            while True:
                routing = self.routing()
                for wid, scope in list(running.values()):
                    if wid not in routing.workers:
                        scope.cancel()  # the worker left: its batch goes back to the queue
                busy: dict[str, int] = {}
                for wid, _ in running.values():
                    busy[wid] = busy.get(wid, 0) + 1
                self._regroup(job, routing)
                idle = [b for b in job.batches.values() if b.filling and b.files and not busy.get(b.owner)
                        and not any(q.owner == b.owner and not q.filling for q in job.batches.values())]
                for batch in idle:  # keep workers busy while the walk is slow: send what there is
                    batch.filling = False
                now = trio.current_time()
                for batch in sorted(job.batches.values(), key=lambda b: b.id):
                    if batch.filling or batch.id in running or batch.owner not in routing.workers:
                        continue
                    if busy.get(batch.owner, 0) >= SLOTS_PER_WORKER or backoff.get(batch.owner, 0) > now:
                        continue
                    busy[batch.owner] = busy.get(batch.owner, 0) + 1
                    scope = trio.CancelScope()
                    running[batch.id] = (batch.owner, scope)
                    nursery.start_soon(self._send, job, batch, routing.workers[batch.owner], scope, running, backoff)
                if job.listing_done and not job.batches:
                    return
                await self._wait(job, timeout=0.5)

    def _regroup(self, job: Job, routing: Routing) -> None:
        """Queued batches grouped under an older ring go to the files' current owners."""
        for batch in list(job.batches.values()):
            if batch.filling or batch.ring_version == self.table.version:
                continue
            owners = {}
            for item in batch.files:
                owner = routing.owner(item["uri"])
                owners.setdefault(owner.id if owner else "", []).append(item)
            if not owners:
                del job.batches[batch.id]
                continue
            if list(owners) == [batch.owner]:
                batch.ring_version = self.table.version
                continue
            del job.batches[batch.id]
            for owner_id, items in owners.items():
                new = Batch(job.next_batch, owner_id, items, sum(i["status"].get("size", 0) for i in items),
                            filling=False, retry=batch.retry, ring_version=self.table.version)
                job.next_batch += 1
                job.batches[new.id] = new
            self._mark(job)

    async def _send(self, job: Job, batch: Batch, worker: WorkerInfo, scope: trio.CancelScope,
                    running: dict, backoff: dict) -> None:
        spec = job.spec
        share = spec.bandwidth // max(1, len(self.routing().workers)) if spec.bandwidth else 0
        body = {"job": job.id, "files": batch.files, "mode": spec.kind, "verify": spec.verify,
                "metadata_only": spec.metadata_only, "bandwidth": max(share, 1) if spec.bandwidth else 0}
        answer = None
        try:
            with scope:
                answer = await self.calls.call("POST", worker.address, "/v1/load", body=body)
        except Unavailable as exc:
            delay = 1.0
            log.warning("job %s: batch %d to worker %s failed (%s); sending it again later", job.id, batch.id,
                        worker.id, exc)
            backoff[worker.id] = trio.current_time() + delay
        except DoraError as exc:
            batch.attempts += 1
            job.counters["batch_failures"] += 1
            log.warning("job %s: worker %s refused batch %d (%s)", job.id, worker.id, batch.id, exc)
            if batch.attempts >= MAX_ATTEMPTS:
                for item in batch.files:
                    job.fail_file(item["uri"], f"worker {worker.id}: {exc}")
                job.batches.pop(batch.id, None)
        finally:
            running.pop(batch.id, None)
            self._mark(job)
        if answer is not None:
            job.batches.pop(batch.id, None)
            self._apply(job, batch, answer)
            self._mark(job)

    def _apply(self, job: Job, batch: Batch, answer: dict) -> None:
        c = job.counters
        c["batches"] += 1
        first = job.passes == 1 and not batch.retry
        by_uri = {item["uri"]: item for item in batch.files}
        retrying = {item["uri"] for item in job.retry}
        for result in answer.get("results", []):
            uri = result.get("uri", "")
            if result.get("ok"):
                for key in ("pages_fetched", "pages_cached", "pages_repaired", "pages_freed"):
                    c[key] += int(result.get(key, 0))
                c["bytes_loaded"] += int(result.get("bytes", 0))
                if result.get("dir") or not (first or batch.retry):
                    continue
                c["files_done"] += 1
                c["bytes_done"] += int(by_uri.get(uri, {}).get("status", {}).get("size", 0))
                if job.spec.kind == "load" and not result.get("pages_fetched") and result.get("pages_cached"):
                    c["files_cached"] += 1
                continue
            error, errno = str(result.get("error", "failed")), str(result.get("errno", "EIO"))
            if job.state != "running":
                continue  # cancelled: not a failure of the file
            if batch.retry or len(job.retry) >= MAX_RETRY:
                job.fail_file(uri, error, errno)
            elif uri not in retrying and uri in by_uri:
                job.retry.append({"uri": uri, "status": by_uri[uri]["status"], "error": error})

    # -- waking and saving ------------------------------------------------------------

    def _wake(self, job: Job) -> None:
        event = self._wakes.pop(job.id, None)
        if event is not None:
            event.set()

    async def _wait(self, job: Job, timeout: float = 0.5) -> None:
        event = self._wakes.setdefault(job.id, trio.Event())
        with trio.move_on_after(timeout):
            await event.wait()

    def _mark(self, job: Job) -> None:
        self._dirty.add(job.id)
        self._wake(job)

    async def _save_loop(self) -> None:
        while True:
            await trio.sleep(SAVE_INTERVAL)
            for job_id in list(self._dirty):
                job = self.jobs.get(job_id)
                if job is not None:
                    await self._save_now(job)

    async def _save_now(self, job: Job) -> None:
        self._dirty.discard(job.id)
        text = json.dumps(job.to_dict())  # a snapshot taken on the trio thread: consistent
        try:
            await trio.to_thread.run_sync(write_atomic, self.dir / f"{job.id}.json", text)
        except OSError as exc:
            log.error("cannot save job %s to %s (%s): a restart would lose its progress", job.id, self.dir, exc)

    def _forget_old_jobs(self) -> None:
        finished = sorted((j for j in self.jobs.values() if j.state != "running"), key=lambda j: j.created)
        for job in finished[:max(0, len(finished) - KEEP_FINISHED)]:
            del self.jobs[job.id]
            try:
                os.unlink(self.dir / f"{job.id}.json")
            except FileNotFoundError:
                pass

