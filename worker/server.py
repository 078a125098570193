"""The worker's HTTP API.

  GET /v1/page?uri=&version=&size=&index=&page_size=[&verify=1][&run=N][&offset=&length=]
        page bytes (sendfile); headers: X-Dorafs-Checksum (xxh3-64 of the body),
        X-Dorafs-Cache (hit|miss); run=N: on a miss, also fill up to N-1 following pages
        with the same UFS read; offset, length: only those bytes of the page (a random
        reader's small read; the whole page is still filled and cached)
  GET /v1/run?uri=&version=&size=&index=&page_size=&count=N
        pages index.. index+N-1 in one answer, each as it lands: cached pages at once,
        the first missing one fills the rest with one UFS read (as run=N); a chunked body
        of frames, each page with its length and checksum (dorafs/runs.py). It may end
        early (an ERROR frame, or a page evicted before it could be sent)
  GET /v1/locate?uri=&version=&size=&index=&page_size=[&count=N][&stream=1]
        where the files of pages index.. index+N-1 are, {"pages": [{"index", "path",
        "size", "checksum", "offset"}]} (offset: where the page starts in the file),
        consecutive from `index`: the cached ones, up to and
        including the first miss, which one UFS read fills with the misses after it
        (as run=N) and which is answered once its own bytes are in; ending early at the
        next page not in yet or at a page held only in memory. For short-circuit reads
        by a client on the same machine (dorafs/client/local.py). stream=1: every page
        of the run, each as it lands, in a chunked body of frames as /v1/run's, with a
        PLACE frame (its file and offset) for each page's bytes (dorafs/runs.py)
  GET /v1/object?uri=&version=&size=&index=0&page_size=
        &wait=0|1 {"object": {"path", "size", "page_size", "checksums"} | null}: the one file of a
        wholly cached object version (sealed now if its pages are cached, or with wait=0
        sealed in the background and null answered at once; nothing is
        fetched), for a mount on this machine that hands it to the kernel (passthrough)
  GET /v1/stat?uri=[&ttl=&negative_ttl=]         FileStatus as JSON (404 if missing), with "age":
        seconds since it was read from the UFS (a mount keeps it until its TTL runs out)
  GET /v1/list?uri=&after=&limit=[&ttl=]         {"entries": [...], "next": name | null, "age": seconds}
        ttl, negative_ttl: the caller's freshness in seconds (-1 never recheck, 0 always);
        the worker's configured TTLs apply when absent.
  POST /v1/invalidate?uri=&recursive=0|1&pages=0|1|changed
        drop cached metadata of uri and its parent's listing (recursive: everything
        under uri); pages=1 drops the dropped files' pages, pages=changed only those of
        objects the UFS now has at another version; {"statuses", "listings", "pages"}
  GET /v1/cached?uri=[&version=&size=] {"status", "pages", "cached_pages", "cached_bytes"}
  POST /v1/load    {"job", "files": [{"uri", "status"?}], "mode": load|free, "verify",
                   "metadata_only", "bandwidth"}  -> {"job", "cancelled", "results": [per file]}
  POST /v1/load/cancel?job=            stop the job's batches here -> {"stopped"}
  GET /v1/info                         identity, page size, capacity, usage
  GET /healthz, GET /metrics

Errors are JSON `{errno, message}` with the status of the DoraError (404 ENOENT, 412
ESTALE for a changed object, 400 EINVAL for bad input, 403 EACCES for a URI outside the
worker's UFS roots, 401 without the cluster secret, 502 EIO for a failing UFS).
Every URI passes `worker.access` before anything reads it.
"""

from __future__ import annotations

import json
import time

import trio

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from dorafs import runs
from dorafs.errors import DoraError, InvalidRequest, sole
from dorafs.http import FileBody, HttpServer, Request, Response, json_response
from dorafs.http.server import PROGRESS_INTERVAL, StreamBody
from dorafs.pages import page_count
from dorafs.ufs import FileStatus
from worker.access import UfsRoots, check_uri, check_version
from worker.loader import Loader
from worker.pagestore import checksum
from worker.service import MAX_RUN, WorkerService

MAX_LIST_LIMIT = 10_000


def build_server(service: WorkerService, info: dict) -> HttpServer:
    server = HttpServer("dorafs-worker", service.metrics.registry, "dorafs_worker")
    roots = UfsRoots(service.config.ufs_roots)
    loader = Loader(service, service.config.ufs_threads, roots)

    async def allowed_uri(req: Request) -> str:
        return await roots.check(check_uri(req.arg("uri")))

    async def page_args(req: Request) -> tuple[str, str, int, int]:
        """uri, version, size and index of a page request, checked (a page size, when
        given, must be this worker's)."""
        uri = await allowed_uri(req)
        version = check_version(req.arg("version"))
        size = req.int_arg("size")
        index = req.int_arg("index")
        page_size = req.int_arg("page_size", service.config.page_size, minimum=1)
        if page_size != service.config.page_size:
            raise InvalidRequest(f"page size {page_size} differs from this worker's {service.config.page_size}")
        return uri, version, size, index

    @server.route("GET", "/v1/page")
    async def page(req: Request) -> Response:
        uri, version, size, index = await page_args(req)
        run = req.int_arg("run", 1, minimum=1)
        result = await service.page(uri, version, size, index, verify=req.query.get("verify") == "1", run=run)
        headers = {"X-Dorafs-Checksum": result.checksum, "X-Dorafs-Cache": "hit" if result.hit else "miss"}
        if "offset" in req.query or "length" in req.query:
            offset = req.int_arg("offset", 0)
            length = min(req.int_arg("length"), max(0, result.size - offset))
            part = await service.page_part(result, offset, length)
            if part is not None:
                return Response(200, part, headers | {"X-Dorafs-Checksum": checksum(part)})
            result = await service.page(uri, version, size, index, verify=False)  # evicted meanwhile
            part = bytes(memoryview(result.data)[offset:offset + length]) if result.data is not None else \
                await service.page_part(result, offset, length)
            if part is None:
                raise InvalidRequest("page vanished twice while serving; retry")
            return Response(200, part, headers | {"X-Dorafs-Checksum": checksum(part)})
        if result.data is not None:
            return Response(200, result.data, headers)
        fd = service.open_page(result)
        if fd is None:  # evicted between lookup and open: serve it again through a fill
            result = await service.page(uri, version, size, index, verify=False)
            if result.data is not None:
                return Response(200, result.data, headers | {"X-Dorafs-Cache": "miss"})
            fd = service.open_page(result)
            if fd is None:
                raise InvalidRequest("page vanished twice while serving; retry")
        return Response(200, FileBody(fd, result.entry.offset, result.size), headers)

    @server.route("GET", "/v1/run")
    async def run(req: Request) -> Response:
        uri, version, size, index = await page_args(req)
        total = page_count(size, service.config.page_size)
        if index >= total:
            raise InvalidRequest(f"page {index} is past the end of a {size}-byte object")
        count = min(req.int_arg("count", 1, minimum=1), MAX_RUN, total - index)

        async def send_page(send, pages: list) -> int:
            sent = 0
            for i, result in pages:
                part = result.data
                if part is None:
                    fd = service.open_page(result)
                    if fd is None:  # evicted meanwhile: the reader asks for it on its own
                        break
                    part = FileBody(fd, result.entry.offset, result.size)
                await send(runs.header(runs.PAGE, i, result.size, result.checksum))
                await send(part)
                sent += 1
            return sent

        return Response(200, StreamBody(lambda send: _frames(send, uri, version, size, index, count, send_page)))

    async def _place(send, pages: list) -> int:
        """Where each page is, a PLACE frame each, all in one write; it stops before a page
        held only in memory. How many were sent."""
        parts = []
        for i, result in pages:
            if result.entry is None:
                break
            place = f"{result.entry.path}\n{result.entry.offset}".encode()
            parts += (runs.header(runs.PLACE, i, len(place), result.checksum), place)
        if parts:
            await send(tuple(parts))
        return len(parts) // 2

    async def _frames(send, uri: str, version: str, size: int, index: int, count: int, frame) -> None:
        """The pages of a run as they land: `await frame(send, [(i, result), ...])` for a
        page with the pages after it that have landed too (the worker's thread tells its
        loop of them a few at a time), which answers how many it sent; it ends at one not
        sent. A page that cannot be filled ends it with an ERROR frame. While the stream
        waits for a page, a WAIT frame goes out every PROGRESS_INTERVAL (`_Heartbeat`)."""
        async def each_page(beat: _Heartbeat) -> None:
            i, end = index, index + count
            while i < end:
                result = service.ready(uri, version, size, i)
                if result is None:
                    try:
                        result = await service.page(uri, version, size, i, verify=False, run=end - i)
                    except DoraError as exc:  # the pages before it stand; the reader learns why
                        body = json.dumps(exc.to_wire() | {"status": exc.http_status}).encode()
                        await beat.frame(send, (runs.header(runs.ERROR, i, len(body)), body))
                        return
                pages = [(i, result)]
                while i + len(pages) < end:
                    landed = service.ready(uri, version, size, i + len(pages))
                    if landed is None:
                        break
                    pages.append((i + len(pages), landed))
                sent = await beat.frame(frame, send, pages)
                if sent < len(pages):
                    return
                i += sent

        await _Heartbeat.around(send, each_page)

    @server.route("GET", "/v1/locate")
    async def locate(req: Request) -> Response:
        uri, version, size, index = await page_args(req)
        count = min(req.int_arg("count", 1, minimum=1), MAX_RUN, page_count(size, service.config.page_size) - index)
        # Cached pages come at once; the first missing one fills the rest of the run with
        # one UFS read and is answered as soon as its own bytes are in (the run goes on
        # landing meanwhile, and the caller asks for the pages after it).
        service.read_here(uri, version)  # a mount on this machine: worth sealing once whole
        if req.query.get("stream") == "1":  # every page of the run in one answer, as each lands
            return Response(200, StreamBody(lambda send: _frames(send, uri, version, size, index, count, _place)))
        pages = []
        waited = False
        for i in range(index, index + max(1, count)):
            result = service.ready(uri, version, size, i)
            if result is None:
                if waited:
                    break
                result = await service.page(uri, version, size, i, verify=False, run=index + count - i)
                waited = True
            if result.entry is None:
                break
            pages.append({"index": i, "path": str(result.entry.path), "size": result.size,
                          "checksum": result.checksum, "offset": result.entry.offset})
        return json_response({"pages": pages})

    @server.route("GET", "/v1/object")
    async def whole_object(req: Request) -> Response:
        uri, version, size, _ = await page_args(req)
        whole = await service.whole_object(uri, version, size, wait=req.query.get("wait", "1") != "0")
        if whole is None:
            return json_response({"object": None})
        return json_response({"object": {"path": str(whole.path), "size": whole.size,
                                         "page_size": whole.page_size, "checksums": whole.checksums}})

    @server.route("GET", "/v1/stat")
    async def stat(req: Request) -> Response:
        status, fetched = await service.stat_fetched(await allowed_uri(req), ttl=_ttl(req, "ttl"),
                                                     negative_ttl=_ttl(req, "negative_ttl"))
        return json_response({**status.to_dict(), "age": round(max(0.0, time.time() - fetched), 3)})

    @server.route("GET", "/v1/list")
    async def listing(req: Request) -> Response:
        uri = await allowed_uri(req)
        limit = min(req.int_arg("limit", 1000, minimum=1), MAX_LIST_LIMIT)
        entries, after, fetched = await service.list_batch(uri, req.query.get("after", ""), limit, ttl=_ttl(req, "ttl"))
        return json_response({"entries": [e.to_dict() for e in entries], "next": after,
                              "age": round(max(0.0, time.time() - fetched), 3)})

    @server.route("POST", "/v1/invalidate")
    async def invalidate(req: Request) -> Response:
        uri = await allowed_uri(req)
        pages = {"0": "none", "1": "all", "changed": "changed"}.get(req.query.get("pages", "0"))
        if pages is None:
            raise InvalidRequest("pages must be 0, 1 or changed")
        counts = await service.invalidate(uri, recursive=req.query.get("recursive") == "1", pages=pages)
        return json_response(counts)

    @server.route("POST", "/v1/load")
    async def load(req: Request) -> Response:
        return json_response(await loader.run_batch(req.json()))

    @server.route("POST", "/v1/load/cancel")
    async def load_cancel(req: Request) -> Response:
        return json_response({"stopped": loader.cancel(req.arg("job"))})

    @server.route("GET", "/v1/cached")
    async def cached(req: Request) -> Response:
        uri = await allowed_uri(req)
        if "version" in req.query:  # the caller knows the version (from a listing): no stat
            status = FileStatus(uri.rpartition("/")[2], False, req.int_arg("size"), version=req.arg("version"))
        else:
            status = await service.stat(uri)
        pages, nbytes = (0, 0) if status.is_dir else service.cached_pages(uri, status.version)
        total = 0 if status.is_dir else page_count(status.size, service.config.page_size)
        return json_response({"status": status.to_dict(), "pages": total, "cached_pages": pages,
                              "cached_bytes": nbytes})

    @server.route("GET", "/v1/info")
    async def get_info(req: Request) -> Response:
        store = service.store
        return json_response(info | {"used": store.used, "pages": len(store), "held": store.held})

    @server.route("GET", "/healthz")
    async def healthz(req: Request) -> Response:
        # 200 either way: a degraded worker still serves every read (from the UFS, uncached),
        # so load balancers keep it; operators alert on "degraded" or the metric.
        service.update_gauges()
        if service.health is not None:
            return json_response({"status": "degraded", "cache": service.health})
        return json_response({"status": "ok"})

    @server.route("GET", "/metrics")
    async def metrics(req: Request) -> Response:
        service.update_gauges()
        return Response(200, generate_latest(service.metrics.registry), content_type=CONTENT_TYPE_LATEST)

    return server


class _Heartbeat:
    """WAIT frames for one streamed answer whenever nothing was sent for PROGRESS_INTERVAL
    (a page still being filled from a slow store), so that the reader sees the worker
    at work, never silence.

    One task for the whole stream, woken once an interval: a page that lands in time
    costs a time stamp, not a task, a nursery and a timer of its own (those were a
    sixth of the worker's loop in a cold sequential read: bench/README.md, "Receive
    buffers that nobody zeroes"). A frame goes out whole: a WAIT is never sent inside
    one, nor one inside a WAIT."""

    def __init__(self, send):
        self._send = send
        self._lock = trio.Lock()
        self._last = trio.current_time()  # when the last frame went out

    @classmethod
    async def around(cls, send, produce) -> None:
        """`await produce(beat)`, its frames sent through `beat.frame`, with WAIT frames
        in its silences; its exception (or the heartbeat's: the reader is gone) raised as
        it is, not in a group, for the server to tell a gone reader from a failure."""
        beat = cls(send)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(beat.run)
                try:
                    await produce(beat)
                finally:
                    nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            raise sole(group) from None

    async def frame(self, fn, *args):
        """`await fn(*args)`, which sends one frame (or none), with no WAIT meanwhile."""
        try:
            self._lock.acquire_nowait()  # the usual case: no WAIT going out; no checkpoint
        except trio.WouldBlock:
            await self._lock.acquire()
        try:
            return await fn(*args)
        finally:
            self._last = trio.current_time()
            self._lock.release()

    async def run(self) -> None:
        while True:
            await trio.sleep_until(self._last + PROGRESS_INTERVAL)
            if trio.current_time() < self._last + PROGRESS_INTERVAL:
                continue  # a frame went out meanwhile
            if self._lock.locked():  # a frame is going out (to a slow reader): it is no silence
                await trio.sleep(PROGRESS_INTERVAL)
                continue
            await self.frame(self._send, runs.header(runs.WAIT))


def _ttl(req: Request, name: str) -> float | None:
    """A TTL in seconds from the query (-1 never recheck, 0 always), or None if absent."""
    raw = req.query.get(name)
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        raise InvalidRequest(f"{name} must be a number of seconds, not {raw[:40]!r}") from None
    if value != value or value < -1:
        raise InvalidRequest(f"{name} must be -1, 0 or a positive number of seconds")
    return value


