"""The worker's HTTP API.

  GET /v1/page?uri=&version=&size=&index=&page_size=[&verify=1]   page bytes (sendfile)
        headers: X-Dorafs-Checksum (xxh3-64 of the body), X-Dorafs-Cache (hit|miss)
  GET /v1/stat?uri=                    FileStatus as JSON
  GET /v1/list?uri=&after=&limit=      {"entries": [...], "next": name | null}
  GET /v1/info                         identity, page size, capacity, usage
  GET /healthz, GET /metrics

Errors are JSON `{errno, message}` with the status of the DoraError (404 ENOENT, 412
ESTALE for a changed object, 400 EINVAL for bad input, 502 EIO for a failing UFS).
"""

from __future__ import annotations


from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from dorafs.errors import InvalidRequest
from dorafs.http import FileBody, HttpServer, Request, Response, json_response
from worker.service import WorkerService, check_uri

MAX_LIST_LIMIT = 10_000


def build_server(service: WorkerService, info: dict) -> HttpServer:
    server = HttpServer("dorafs-worker", service.metrics.registry, "dorafs_worker")

    @server.route("GET", "/v1/page")
    async def page(req: Request) -> Response:
        uri = check_uri(req.arg("uri"))
        version = req.arg("version")
        size = req.int_arg("size")
        index = req.int_arg("index")
        page_size = req.int_arg("page_size", service.config.page_size, minimum=1)
        if page_size != service.config.page_size:
            raise InvalidRequest(f"page size {page_size} differs from this worker's {service.config.page_size}")
        result = await service.page(uri, version, size, index, verify=req.query.get("verify") == "1")
        headers = {"X-Dorafs-Checksum": result.checksum, "X-Dorafs-Cache": "hit" if result.hit else "miss"}
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
        return Response(200, FileBody(fd, 0, result.size), headers)

    @server.route("GET", "/v1/stat")
    async def stat(req: Request) -> Response:
        status = await service.stat(check_uri(req.arg("uri")))
        return json_response(status.to_dict())

    @server.route("GET", "/v1/list")
    async def listing(req: Request) -> Response:
        uri = check_uri(req.arg("uri"))
        limit = min(req.int_arg("limit", 1000, minimum=1), MAX_LIST_LIMIT)
        entries, after = await service.list_page(uri, req.query.get("after", ""), limit)
        return json_response({"entries": [e.to_dict() for e in entries], "next": after})

    @server.route("GET", "/v1/info")
    async def get_info(req: Request) -> Response:
        store = service.store
        return json_response(info | {"used": store.used, "pages": len(store)})

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


