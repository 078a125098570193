"""Worker metadata through real daemons: caching, freshness, invalidation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.cluster import ProcessSet, _env
from tests.support import wait_for


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
    again = stat(worker, uri).json()
    assert again["version"] == first["version"] and again["age"] >= first["age"]  # still within the status TTL

    counts = invalidate(worker, uri, pages=True)
    assert counts == {"statuses": 1, "listings": 0, "pages": 1}
    assert worker.page_files() == []
    fresh = stat(worker, uri).json()
    assert fresh["size"] == 6 and fresh["age"] < again["age"]  # read from the UFS again


def test_invalidate_rejects_bad_uri(procs: ProcessSet):
    worker = procs.worker()
    response = httpx.post(f"http://{worker.address}/v1/invalidate", params={"uri": "no-scheme"}, timeout=10)
    assert response.status_code == 400 and "scheme" in response.json()["message"]


def listing(worker, uri: str, limit: int = 1000, **params) -> list[str]:
    names, after = [], ""
    while True:
        response = httpx.get(f"http://{worker.address}/v1/list", timeout=30,
                             params={"uri": uri, "after": after, "limit": limit, **params})
        assert response.status_code == 200, response.text
        body = response.json()
        names += [e["name"] for e in body["entries"]]
        if body["next"] is None:
            return names
        after = body["next"]


def ufs_calls(worker, op: str) -> float:
    return worker.metrics()[f"dorafs_worker_ufs_requests_total{{op={op}}}"]


def levels(worker, op: str) -> dict[str, float]:
    m = worker.metrics()
    return {level: m[f"dorafs_worker_metadata_requests_total{{op={op},result={level}}}"]
            for level in ("memory", "disk", "miss")}


def test_restarted_worker_serves_metadata_from_disk_without_ufs(s3_server, bucket, procs: ProcessSet):
    s3 = s3_server.client()
    for name in ("a.txt", "b.txt", "sub/c.txt"):
        s3.put_object(Bucket=bucket, Key=f"r/{name}", Body=name.encode())
    worker = procs.worker()
    root = f"s3://{bucket}/r"
    assert listing(worker, root) == ["a.txt", "b.txt", "sub"]
    before = stat(worker, f"{root}/a.txt").json()
    fetched = time.time() - before.pop("age")
    assert stat(worker, f"{root}/missing").status_code == 404

    worker.restart()
    assert ufs_calls(worker, "stat") == 0 and ufs_calls(worker, "list") == 0
    assert listing(worker, root) == ["a.txt", "b.txt", "sub"]
    again = stat(worker, f"{root}/a.txt").json()
    assert abs(time.time() - again.pop("age") - fetched) < 1  # its age counts from the UFS read, across the restart
    assert again == before
    assert stat(worker, f"{root}/missing").status_code == 404  # the negative entry survived too
    assert stat(worker, f"{root}/b.txt").json()["size"] == 5  # from the listing kept on disk
    assert ufs_calls(worker, "stat") == 0 and ufs_calls(worker, "list") == 0
    assert levels(worker, "stat")["disk"] >= 2 and levels(worker, "list")["disk"] == 1, (levels(worker, "stat"), levels(worker, "list"))
    assert {k: v for k, v in stat(worker, f"{root}/a.txt").json().items() if k != "age"} == before
    assert levels(worker, "stat")["memory"] >= 1, levels(worker, "stat")  # promoted to memory by the first lookup


def test_ttl_minus_one_never_rechecks_and_zero_always_does(s3_server, bucket, procs: ProcessSet):
    s3 = s3_server.client()
    s3.put_object(Bucket=bucket, Key="t/f", Body=b"1")
    worker = procs.worker(extra=["--status-ttl", "0.2s"])
    uri = f"s3://{bucket}/t/f"
    assert stat(worker, uri).json()["size"] == 1
    s3.put_object(Bucket=bucket, Key="t/f", Body=b"22")
    time.sleep(0.5)  # past the worker's own TTL: only the request's TTL matters below
    calls = ufs_calls(worker, "stat")
    for _ in range(3):
        assert httpx.get(f"http://{worker.address}/v1/stat", params={"uri": uri, "ttl": -1}).json()["size"] == 1
    assert ufs_calls(worker, "stat") == calls
    for i in range(3):
        assert httpx.get(f"http://{worker.address}/v1/stat", params={"uri": uri, "ttl": 0}).json()["size"] == 2
        assert ufs_calls(worker, "stat") == calls + i + 1
    assert stat(worker, uri).json()["size"] == 2  # the worker's default TTL: just refetched
    bad = httpx.get(f"http://{worker.address}/v1/stat", params={"uri": uri, "ttl": "soon"})
    assert bad.status_code == 400 and "ttl" in bad.json()["message"]


def test_negative_entries_have_their_own_ttl(s3_server, bucket, procs: ProcessSet):
    s3 = s3_server.client()
    worker = procs.worker()
    uri = f"s3://{bucket}/n/late"
    get = lambda **p: httpx.get(f"http://{worker.address}/v1/stat", params={"uri": uri, **p})  # noqa: E731
    assert get(negative_ttl=60).status_code == 404
    s3.put_object(Bucket=bucket, Key="n/late", Body=b"here")
    calls = ufs_calls(worker, "stat")
    assert get(negative_ttl=60, ttl=60).status_code == 404  # negative entry still trusted
    assert ufs_calls(worker, "stat") == calls
    time.sleep(0.6)
    assert get(negative_ttl=0.5, ttl=60).json()["size"] == 4  # negative entry expired
    assert ufs_calls(worker, "stat") == calls + 1


def test_large_listing_is_served_from_disk_in_name_order(s3_server, bucket, procs: ProcessSet):
    from concurrent.futures import ThreadPoolExecutor

    s3 = s3_server.client()
    names = sorted(f"f{i:05d}" for i in range(1500)) + ["sub"]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda n: s3.put_object(Bucket=bucket, Key=f"big/{n}", Body=b"x"), names[:-1]))
    s3.put_object(Bucket=bucket, Key="big/sub/inner", Body=b"y")
    worker = procs.worker(extra=["--metadata-entries", "200"])  # far fewer than the listing
    uri = f"s3://{bucket}/big"
    assert listing(worker, uri, limit=333) == names
    assert worker.metrics()["dorafs_worker_metadata_memory_entries"] <= 200
    assert listing(worker, uri, limit=1000) == names
    assert levels(worker, "list") == {"memory": 0, "disk": 4 + 2, "miss": 1}  # per page request
    assert ufs_calls(worker, "list") == 1
    mount = procs.mount(uri, workers=[worker.address])
    calls = ufs_calls(worker, "stat")  # the mount's stat of its root
    assert sorted(os.listdir(mount.mountpoint)) == names
    assert os.stat(mount.path("f00042")).st_size == 1
    assert os.stat(mount.path("sub")).st_nlink == 2
    assert ufs_calls(worker, "stat") == calls  # answered from the listing


def test_unreadable_metadata_store_is_replaced(s3_server, bucket, procs: ProcessSet):
    procs.allow = (r"WARNING worker\.metastore .* metadata store \S+ is unreadable \(file is not a database\); "
                   r"moved to",)
    s3_server.client().put_object(Bucket=bucket, Key="c/f", Body=b"abc")
    worker = procs.worker()
    assert stat(worker, f"s3://{bucket}/c/f").json()["size"] == 3
    worker.stop()
    db = worker.cache_dir / "metadata.db"
    for suffix in ("-wal", "-shm"):
        Path(str(db) + suffix).unlink(missing_ok=True)
    db.write_bytes(b"this is not a database" * 100)
    worker.restart()
    assert stat(worker, f"s3://{bucket}/c/f").json()["size"] == 3
    assert "metadata store" in worker.log_text() and "moved to" in worker.log_text()
    assert list(worker.cache_dir.glob("metadata.db.broken-*"))


def test_refresh_shows_changes_at_once(s3_server, bucket, procs: ProcessSet):
    s3 = s3_server.client()
    s3.put_object(Bucket=bucket, Key="f/old.txt", Body=b"old")
    s3.put_object(Bucket=bucket, Key="f/gone.txt", Body=b"gone")
    workers = [procs.worker(), procs.worker()]
    mount = procs.mount(f"s3://{bucket}/f", workers=[w.address for w in workers])  # default TTLs: minutes
    assert sorted(os.listdir(mount.mountpoint)) == ["gone.txt", "old.txt"]
    s3.put_object(Bucket=bucket, Key="f/new.txt", Body=b"new")
    s3.delete_object(Bucket=bucket, Key="f/gone.txt")
    assert sorted(os.listdir(mount.mountpoint)) == ["gone.txt", "old.txt"]  # cached listing

    result = subprocess.run([sys.executable, "-m", "dorafs.cli.admin", "refresh", f"s3://{bucket}/f",
                             "--workers", ",".join(w.address for w in workers), "--json"],
                            capture_output=True, text=True, env=_env(), timeout=60)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert sum(c["listings"] for c in report["workers"].values()) == 1 and not report["failed"]
    assert sorted(os.listdir(mount.mountpoint)) == ["new.txt", "old.txt"]
    assert mount.path("new.txt").read_bytes() == b"new"


def test_refresh_recursive_drops_pages_of_changed_objects_only(s3_server, bucket, procs: ProcessSet):
    s3 = s3_server.client()
    s3.put_object(Bucket=bucket, Key="p/a/same.bin", Body=b"s" * 1000)
    s3.put_object(Bucket=bucket, Key="p/a/changes.bin", Body=b"c" * 1000)
    worker = procs.worker()
    mount = procs.mount(f"s3://{bucket}/p", workers=[worker.address])
    assert mount.path("a", "same.bin").read_bytes() == b"s" * 1000
    assert mount.path("a", "changes.bin").read_bytes() == b"c" * 1000
    assert len(worker.page_files()) == 2
    s3.put_object(Bucket=bucket, Key="p/a/changes.bin", Body=b"C" * 2000)
    result = subprocess.run([sys.executable, "-m", "dorafs.cli.admin", "refresh", f"s3://{bucket}/p",
                             "--recursive", "--workers", worker.address, "--json"],
                            capture_output=True, text=True, env=_env(), timeout=60)
    assert result.returncode == 0, result.stderr
    counts = json.loads(result.stdout)["workers"][worker.address]
    assert counts["statuses"] == 2 and counts["pages"] == 1
    assert len(worker.page_files()) == 1


def test_refresh_errors_are_one_line(procs: ProcessSet):
    worker = procs.worker()
    for argv, message in ((["refresh", "not-a-uri", "--workers", worker.address], "scheme"),
                          (["refresh", "s3://b/x", "--workers", "127.0.0.1:1"], "unreachable")):
        result = subprocess.run([sys.executable, "-m", "dorafs.cli.admin", *argv],
                                capture_output=True, text=True, env=_env(), timeout=60)
        assert result.returncode == 1 and message in result.stderr
        assert result.stderr.startswith("dorafs-admin: ") and "Traceback" not in result.stderr


def test_hundred_thousand_entry_directory(procs: ProcessSet, tmp_path):
    """A 100,000-entry directory lists completely through a mount, twice, the second time
    from the owner's store (not the UFS) while the worker's memory level stays bounded."""
    src = tmp_path / "huge"
    src.mkdir()
    names = [f"item-{i:06d}" for i in range(100_000)]
    for name in names:
        (src / name).touch()
    worker = procs.worker(extra=["--metadata-entries", "20000"])
    mount = procs.mount(f"file://{src}", workers=[worker.address])
    assert sorted(os.listdir(mount.mountpoint)) == names
    assert worker.metrics()["dorafs_worker_metadata_memory_entries"] <= 20_000
    mount.unmount()
    again = procs.mount(f"file://{src}", workers=[worker.address])
    listed = 0
    with os.scandir(again.mountpoint) as entries:
        for entry in entries:
            listed += 1
    assert listed == len(names)
    assert ufs_calls(worker, "list") == 1
    assert levels(worker, "list")["disk"] >= 99


def test_a_stat_scan_prefetches_the_directory_listing(s3_server, bucket, procs: ProcessSet):
    s3 = s3_server.client()
    for i in range(40):
        s3.put_object(Bucket=bucket, Key=f"scan/f{i:02d}", Body=b"x" * i)
    worker = procs.worker()
    for i in range(8):  # eight misses in one directory: its listing is fetched behind them
        assert stat(worker, f"s3://{bucket}/scan/f{i:02d}").json()["size"] == i
    wait_for(lambda: worker.metrics()["dorafs_worker_listing_prefetches_total"] == 1, what="the prefetch")
    calls = ufs_calls(worker, "stat")
    for i in range(8, 40):
        assert stat(worker, f"s3://{bucket}/scan/f{i:02d}").json()["size"] == i
    assert stat(worker, f"s3://{bucket}/scan/absent").status_code == 404
    assert ufs_calls(worker, "stat") == calls and ufs_calls(worker, "list") == 1


def test_a_mount_reading_small_files_by_name_asks_the_store_about_two_of_them(s3_server, bucket, procs: ProcessSet):
    """Cold small files opened by name, one after another: the second miss in their
    directory has the mount list it ahead, and the misses while that listing runs wait
    for it rather than asking the store each (a HEAD and a one-key listing per status).
    Opening the mount's root again and again is no scan of the directory above it."""
    s3 = s3_server.client()
    for i in range(30):
        s3.put_object(Bucket=bucket, Key=f"two/d/f{i:02d}", Body=bytes([i]) * 100)
    worker = procs.worker()
    mount = procs.mount(f"s3://{bucket}/two", workers=[worker.address])
    for _ in range(3):
        os.stat(mount.mountpoint)
    stats_before = ufs_calls(worker, "stat")
    for i in range(30):
        assert mount.path(f"d/f{i:02d}").read_bytes() == bytes([i]) * 100
    # d (a directory, looked up once), f00 and f01; then the listing of d answers the rest
    assert ufs_calls(worker, "stat") - stats_before <= 3
    assert ufs_calls(worker, "list") <= 2  # d's listing (and the root's, if the kernel looked around)
    assert worker.metrics()["dorafs_worker_ufs_requests_total{op=read}"] == 30


def test_a_mount_opening_files_by_name_lists_their_directory_ahead(s3_server, bucket, procs: ProcessSet):
    """A mount that misses the status of eight files of one directory fetches that
    directory's listing once, and opens the rest of its files without a status request."""
    from tests.support import free_port

    s3 = s3_server.client()
    for i in range(40):
        s3.put_object(Bucket=bucket, Key=f"ms/f{i:02d}", Body=bytes([i]) * (i + 1))
    worker = procs.worker()
    port = free_port()
    mount = procs.mount(f"s3://{bucket}/ms", workers=[worker.address], options=f"metrics_listen=127.0.0.1:{port}")

    def mount_counter(name: str) -> float:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        return sum(float(line.split()[1]) for line in text.splitlines() if line.startswith(name + " "))

    for i in range(8):
        assert mount.path(f"f{i:02d}").read_bytes() == bytes([i]) * (i + 1)
    wait_for(lambda: mount_counter("dorafs_mount_listing_prefetches_total") == 1, what="the mount's prefetch")
    asked = sum(levels(worker, "stat").values())
    kept = mount_counter("dorafs_mount_statuses_kept_total")
    for i in range(8, 40):
        assert mount.path(f"f{i:02d}").read_bytes() == bytes([i]) * (i + 1)
    assert sum(levels(worker, "stat").values()) == asked
    assert mount_counter("dorafs_mount_statuses_kept_total") >= kept + 2 * 32  # lookup and open of each
    assert not mount.path("absent").exists()  # a name the listing lacks is still asked about
    assert sum(levels(worker, "stat").values()) == asked + 1
