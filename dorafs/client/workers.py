"""HTTP calls from the client to one worker, with end-to-end page checksums.

A worker sends each page with its xxh3-64 checksum; the client checks it on arrival. A
mismatch (disk or wire corruption) is retried once with `verify=1`, which makes the
worker re-check its page file, drop it if corrupt and refetch it from the UFS.
Connection failures and timeouts become `Unavailable`, so the caller tries the next
ring candidate; any other error answer is authoritative and is raised as is. The
timeout (`worker_timeout`) bounds a worker's silence, not a request's duration: a worker
filling a page from a slow store says every second that it is still at work
(dorafs/client/transport.py), and is waited for.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable

import xxhash

from dorafs import runs
from dorafs.client.transport import Chunks, Transport, TransportError
from dorafs.errors import Unavailable, from_wire
from dorafs.pages import page_length
from dorafs.security import Credentials
from dorafs.ufs import FileStatus

log = logging.getLogger(__name__)


class CorruptPage(Unavailable):
    """A worker kept sending a page whose bytes do not match its checksum."""


async def _next_frame(chunks: Chunks, index: int, kind: int) -> tuple[int, int, str] | None:
    """The next frame of `kind` in an answer of frames (dorafs/runs.py), as (page, length,
    checksum), its data still to read; None at the answer's end or at an ERROR frame for a
    later page. An ERROR frame for page `index`, the first asked for, is raised."""
    while (n := await chunks.size()):
        got, page, length, checksum = runs.parse(await chunks.read(n))
        if got == runs.WAIT:
            continue
        if await chunks.size() != length:
            raise ValueError("a frame and its data differ in length")
        if got == runs.ERROR:
            body = json.loads(await chunks.read(length))
            if page == index:
                raise from_wire(int(body.get("status", 502)), body)
            return None
        if got != kind:
            raise ValueError(f"a frame of kind {got} where {kind} was expected")
        return page, length, checksum
    return None


class WorkerClient:
    def __init__(self, *, timeout: float, connect_timeout: float, credentials: Credentials | None = None):
        self._transport = Transport(timeout=timeout, connect_timeout=connect_timeout, credentials=credentials)

    async def aclose(self) -> None:
        await self._transport.aclose()

    async def _get(self, address: str, path: str, params: dict, method: str = "GET"):
        try:
            response = await self._transport.request(method, address, path, params)
        except TransportError as exc:
            raise Unavailable(str(exc)) from None
        if response.status != 200:
            try:
                body = json.loads(response.body)
            except ValueError:
                body = {"message": bytes(response.body[:200]).decode("utf-8", "replace")}
            raise from_wire(response.status, body if isinstance(body, dict) else None)
        return response

    async def page(self, address: str, uri: str, version: str, size: int, index: int,
                   page_size: int, run: int = 1, part: tuple[int, int] | None = None) -> bytes | bytearray:
        """A page, or with `part` = (offset, length) those bytes of it."""
        params = {"uri": uri, "version": version, "size": size, "index": index, "page_size": page_size}
        if run > 1:
            params["run"] = run
        if part is not None:
            params["offset"], params["length"] = part
        for attempt in (0, 1):
            response = await self._get(address, "/v1/page", params)
            data = response.body
            expected = response.headers.get("x-dorafs-checksum", "")
            if xxhash.xxh3_64_hexdigest(data) == expected:
                return data
            log.warning("page %d of %s from worker %s failed its checksum%s", index, uri, address,
                        "; asking the worker to verify and refetch" if attempt == 0 else " again")
            params["verify"] = "1"
        raise CorruptPage(f"worker {address} sent a corrupt page {index} of {uri} twice")

    async def run(self, address: str, uri: str, version: str, size: int, index: int, page_size: int,
                  count: int, into: Callable[[int, int], memoryview], landed: Callable[[int], None]) -> None:
        """Pages index.. index+count-1 in one answer (`/v1/run`), as each arrives: page
        `i` of `n` bytes is received into `into(i, n)`, then `landed(i)` once its checksum
        matched. It may end early (a page the worker could not send, one that failed its
        checksum): the caller fetches what did not land page by page. An error answer for
        the run's first page is raised as is; `Unavailable` when the worker breaks off."""
        params = {"uri": uri, "version": version, "size": size, "index": index, "page_size": page_size,
                  "count": count}

        async def consume(chunks: Chunks) -> None:
            while (frame := await _next_frame(chunks, index, runs.PAGE)) is not None:
                page, length, checksum = frame
                view = into(page, length)
                await chunks.read_into(view)
                if xxhash.xxh3_64_hexdigest(view) != checksum:
                    log.warning("page %d of %s from worker %s failed its checksum; fetching it again",
                                page, uri, address)
                    return
                landed(page)

        await self._stream(address, "/v1/run", params, consume)

    async def _stream(self, address: str, path: str, params: dict,
                      consume: Callable[[Chunks], Awaitable[None]]) -> None:
        """A request answered with frames (dorafs/runs.py), each taken by `consume`."""
        try:
            response = await self._transport.stream(address, path, params, consume)
        except TransportError as exc:
            raise Unavailable(str(exc)) from None
        except ValueError as exc:
            raise Unavailable(f"worker {address}: a broken run answer: {exc}") from None
        if response is not None:
            if response.status == 200:
                raise Unavailable(f"worker {address} answered a run without frames")
            try:
                body = json.loads(response.body)
            except ValueError:
                body = {"message": bytes(response.body[:200]).decode("utf-8", "replace")}
            raise from_wire(response.status, body if isinstance(body, dict) else None)

    async def locate(self, address: str, uri: str, version: str, size: int, index: int,
                     page_size: int, count: int = 1) -> list[tuple[int, str, int, str, int]]:
        """Where the files of pages index.. index+count-1 are, as (index, path, size,
        checksum, offset in the file), consecutive from `index`; shorter (even empty)
        where the worker holds a page only in memory (it could not be cached)."""
        params = {"uri": uri, "version": version, "size": size, "index": index, "page_size": page_size,
                  "count": count}
        response = await self._get(address, "/v1/locate", params)
        pages = json.loads(response.body)["pages"]
        return [(p["index"], p["path"], p["size"], p["checksum"], p.get("offset", 0)) for p in pages]

    async def places(self, address: str, uri: str, version: str, size: int, index: int, page_size: int,
                     count: int, placed: Callable[[list[tuple[int, str, int, str, int]]], Awaitable[bool]]) -> None:
        """Where the files of pages index.. index+count-1 are, in one answer
        (`/v1/locate?stream=1`), as they land: `await placed([(index, path, size,
        checksum, offset), ...])` for each page in order, the pages whose frames came
        together in one call (the worker names the pages that landed together in one
        write), which answers whether to go on. It may end early (a page held only in
        memory, or one the worker could not fill): the caller asks for what did not
        come page by page. An error answer for the first page is raised as is;
        `Unavailable` when the worker breaks off."""
        params = {"uri": uri, "version": version, "size": size, "index": index, "page_size": page_size,
                  "count": count, "stream": 1}

        def take_places(received: bytearray) -> tuple[list, int]:
            return runs.whole_frames(received, runs.PLACE)

        async def consume(chunks: Chunks) -> None:
            while True:
                together = chunks.take_received(take_places)  # what came already, at once
                if not together:  # else wait for the next frame (or a WAIT, an ERROR, the end)
                    frame = await _next_frame(chunks, index, runs.PLACE)
                    if frame is None:
                        return
                    page, length, checksum = frame
                    together = [(page, length, checksum, bytes(await chunks.read(length)))]
                    together += chunks.take_received(take_places)
                located = []
                for page, _, checksum, data in together:
                    path, _, offset = data.decode().rpartition("\n")
                    located.append((page, path, page_length(page, size, page_size), checksum, int(offset)))
                if not await placed(located):
                    return

        await self._stream(address, "/v1/locate", params, consume)

    async def whole_object(self, address: str, uri: str, version: str, size: int,
                           page_size: int, wait: bool = True) -> dict | None:
        """The worker's one file of this object version if it holds all of it: {"path",
        "size", "page_size", "checksums"}; None if it does not (without `wait`, also
        while it is still being made)."""
        params = {"uri": uri, "version": version, "size": size, "index": 0, "page_size": page_size,
                  "wait": int(wait)}
        response = await self._get(address, "/v1/object", params)
        return json.loads(response.body)["object"]

    async def stat(self, address: str, uri: str, **ttls: float) -> tuple[FileStatus, float | None]:
        """The status and its age (seconds since the worker read it from the UFS)."""
        response = await self._get(address, "/v1/stat", {"uri": uri, **ttls})
        body = json.loads(response.body)
        age = body.get("age")
        return FileStatus.from_dict(body), None if age is None else float(age)

    async def list_batch(self, address: str, uri: str, after: str, limit: int,
                        **ttls: float) -> tuple[list[FileStatus], str | None, float | None]:
        """Entries, the cursor for the next page, and the listing's age (seconds since the
        worker read it from the UFS)."""
        response = await self._get(address, "/v1/list", {"uri": uri, "after": after, "limit": limit, **ttls})
        body = json.loads(response.body)
        age = body.get("age")
        return [FileStatus.from_dict(e) for e in body["entries"]], body.get("next"), None if age is None else float(age)

    async def invalidate(self, address: str, uri: str, *, recursive: bool = False,
                         pages: bool | str = False) -> dict:
        """Drop what the worker caches about `uri` (see the worker's /v1/invalidate).

        pages: False keeps cached pages, True drops them, "changed" drops those of
        objects whose version changed.
        """
        if isinstance(pages, bool):
            pages = "1" if pages else "0"
        params = {"uri": uri, "recursive": int(recursive), "pages": pages}
        response = await self._get(address, "/v1/invalidate", params, method="POST")
        return json.loads(response.body)
