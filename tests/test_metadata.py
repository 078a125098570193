"""Worker metadata through real daemons: caching, freshness, invalidation."""

from __future__ import annotations

import httpx

from tests.cluster import ProcessSet


def stat(worker, uri: str) -> httpx.Response:
    return httpx.get(f"http://{worker.address}/v1/stat", params={"uri": uri}, timeout=10)


def invalidate(worker, uri: str, **flags) -> dict:
    params = {"uri": uri} | {k: int(v) for k, v in flags.items()}
    response = httpx.post(f"http://{worker.address}/v1/invalidate", params=params, timeout=10)
    assert response.status_code == 200, response.text
    return response.json()


def test_invalidate_drops_status_and_pages(s3_server, bucket, procs: ProcessSet):
    s3 = s3_server.client()
    s3.put_object(Bucket=bucket, Key="d/a.bin", Body=b"one")
    worker = procs.worker()
    uri = f"s3://{bucket}/d/a.bin"
    first = stat(worker, uri).json()
    assert first["size"] == 3
    page = httpx.get(f"http://{worker.address}/v1/page", timeout=10, params={
        "uri": uri, "version": first["version"], "size": 3, "index": 0, "page_size": 1 << 20})
    assert page.content == b"one" and len(worker.page_files()) == 1

    s3.put_object(Bucket=bucket, Key="d/a.bin", Body=b"second")
    assert stat(worker, uri).json() == first  # still within the status TTL

    counts = invalidate(worker, uri, pages=True)
    assert counts == {"statuses": 1, "listings": 0, "pages": 1}
    assert worker.page_files() == []
    assert stat(worker, uri).json()["size"] == 6


def test_invalidate_rejects_bad_uri(procs: ProcessSet):
    worker = procs.worker()
    response = httpx.post(f"http://{worker.address}/v1/invalidate", params={"uri": "no-scheme"}, timeout=10)
    assert response.status_code == 400 and "scheme" in response.json()["message"]
