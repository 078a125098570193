"""Fault injection against real processes: every case reads files through a real mount and
checks every byte. Workers are killed, stopped and restarted; the registry and etcd go
away; S3 (moto behind tests/faultproxy.py) throttles, fails and hangs; the cache disk
fills up; page files rot. Speed figures for these cases are in bench/faults.py.
"""

from __future__ import annotations

import errno
import os
import signal
import time
from pathlib import Path

import httpx
import pytest

from dorafs.client.reading import FAILURE_MEMORY
from dorafs.ring import HashRing
from tests.cluster import CORRUPT, EXPIRED, FAILOVER, is_mounted, unreachable
from tests.support import free_port, tmpfs, wait_for

MiB = 1 << 20
FAST = "worker_timeout=1s,connect_timeout=0.5s"  # failover within a second


def put(s3, bucket: str, key: str, size: int) -> bytes:
    data = os.urandom(size)
    s3.put_object(Bucket=bucket, Key=key, Body=data)
    return data


def read_checked(path: Path, data: bytes, *, during=None, at: int = 0) -> None:
    """Read `path` in 256 KiB chunks, calling `during()` once `at` bytes are in; compare."""
    got = bytearray()
    with open(path, "rb") as f:
        while chunk := f.read(256 * 1024):
            got += chunk
            if during is not None and len(got) >= at:
                during()
                during = None
    assert len(got) == len(data) and bytes(got) == data, "wrong bytes"


def wid(worker) -> str:
    return httpx.get(f"http://{worker.address}/v1/info", timeout=5).json()["id"]


def owner_of(workers, uri: str):
    ring = HashRing([wid(w) for w in workers])
    owner = ring.owner(uri)
    return next(w for w in workers if wid(w) == owner)


def mount_health(port: int) -> dict:
    return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).json()


def mount_metric(port: int, name: str) -> float:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith(name) and not line.startswith("#"))


# -- workers ------------------------------------------------------------------------------

def test_worker_sigkill_mid_read_then_ring_rebuilt(procs, s3_server, bucket):
    s3 = s3_server.client()
    files = {f"f{i}.bin": put(s3, bucket, f"k/f{i}.bin", 12 * MiB) for i in range(2)}
    registry = procs.registry()
    workers = [procs.worker(registry=registry.url) for _ in range(2)]
    wait_for(lambda: len(registry.workers()) == 2, what="both workers registered")
    port = free_port()
    # No readahead and no short-circuit reads: the pages after the kill must come from a
    # worker, not from a run fetched before it or page files kept open.
    mount = procs.mount(f"s3://{bucket}/k", registry=registry.url,
                        options=f"{FAST},metrics_listen=127.0.0.1:{port},readahead_pages=0,short_circuit=0")
    victim = owner_of(workers, f"s3://{bucket}/k/f0.bin")
    procs.allow = (FAILOVER, EXPIRED)
    assert mount_metric(port, "dorafs_mount_failovers_total") == 0
    read_checked(mount.path("f0.bin"), files["f0.bin"], during=victim.kill, at=4 * MiB)
    assert mount_metric(port, "dorafs_mount_failovers_total") >= 1
    # The registry drops it after its TTL; the mount rebuilds its ring without it.
    wait_for(lambda: mount_health(port)["workers"] == 1, timeout=15, what="the ring to drop the dead worker")
    read_checked(mount.path("f1.bin"), files["f1.bin"])


def test_worker_sigstop_bounded_stall_then_failover(procs, s3_server, bucket):
    s3 = s3_server.client()
    data = put(s3, bucket, "s/big.bin", 16 * MiB)
    workers = [procs.worker(), procs.worker()]
    port = free_port()
    # No readahead and no short-circuit reads: the pages after the stop must come from a
    # worker, not from a run fetched before it or page files kept open.
    mount = procs.mount(f"s3://{bucket}/s", workers=[w.address for w in workers],
                        options=f"{FAST},metrics_listen=127.0.0.1:{port},readahead_pages=0,short_circuit=0")
    victim = owner_of(workers, f"s3://{bucket}/s/big.bin")
    procs.allow = (FAILOVER,)
    try:
        read_checked(mount.path("big.bin"), data, during=lambda: os.kill(victim.pid, signal.SIGSTOP), at=4 * MiB)
        assert mount_metric(port, "dorafs_mount_failovers_total") >= 1
    finally:
        os.kill(victim.pid, signal.SIGCONT)


def test_worker_restart_mid_read_and_its_keys_come_back(procs, s3_server, bucket):
    s3 = s3_server.client()
    first = put(s3, bucket, "r/a.bin", 4 * MiB)
    second = put(s3, bucket, "r/b.bin", 12 * MiB)
    workers = [procs.worker(), procs.worker()]
    addresses = [w.address for w in workers]
    # No kernel cache, a one-page buffer and no short-circuit reads of page files kept
    # open: every re-read reaches a worker.
    mount = procs.mount(f"s3://{bucket}/r", workers=addresses,
                        options=f"{FAST},direct_io,buffer_size=1MiB,readahead_pages=0,short_circuit=0")
    owner = owner_of(workers, f"s3://{bucket}/r/a.bin")
    read_checked(mount.path("a.bin"), first)  # cached on its owner
    victim = owner_of(workers, f"s3://{bucket}/r/b.bin")
    procs.allow = (FAILOVER,)
    read_checked(mount.path("b.bin"), second, during=victim.restart, at=4 * MiB)
    assert victim.alive()
    # The restarted worker keeps its cache and serves its keys again (hits, no UFS read).
    hits = owner.counter("dorafs_worker_page_requests_total{result=hit}")

    def served_by_owner():
        read_checked(mount.path("a.bin"), first)
        return owner.counter("dorafs_worker_page_requests_total{result=hit}") >= hits + 4

    wait_for(served_by_owner, timeout=40, interval=1, what="the owner to serve its pages again")


def test_no_worker_answers_reads_go_to_the_ufs(procs, s3_server, bucket):
    s3 = s3_server.client()
    files = {f"f{i}.bin": put(s3, bucket, f"u/f{i}.bin", 3 * MiB) for i in range(2)}
    workers = [procs.worker(), procs.worker()]
    port = free_port()
    mount = procs.mount(f"s3://{bucket}/u", workers=[w.address for w in workers],
                        options=f"{FAST},metrics_listen=127.0.0.1:{port}")
    read_checked(mount.path("f0.bin"), files["f0.bin"])
    procs.allow = (FAILOVER, r"WARNING dorafs\.membership\.static .* worker 127\.0\.0\.1:\d+ unreachable \(.*\); "
                             r"retrying in the background")
    for worker in workers:
        worker.kill()
    read_checked(mount.path("f1.bin"), files["f1.bin"])
    assert mount_metric(port, 'dorafs_mount_ufs_fallbacks_total{kind="page"}') >= 3  # its 3 pages


def test_page_files_corrupted(procs, s3_server, bucket):
    data = put(s3_server.client(), bucket, "c/file.bin", 5 * MiB)
    # Kept as pages and read page by page: a file this size cached whole or read to its
    # end would otherwise be sealed into one object file (tests/test_objectfiles.py rots
    # one of those).
    worker = procs.worker(extra=["--seal-min-size", "0"])
    pagewise = "passthrough_min_size=64MiB"
    mount = procs.mount(f"s3://{bucket}/c", workers=[worker.address], options=pagewise)
    read_checked(mount.path("file.bin"), data)
    mount.unmount()
    pages = sorted(worker.page_files())
    assert len(pages) == 5
    for page in pages:  # rot every page, at a different place each
        raw = bytearray(page.read_bytes())
        raw[len(raw) // 3] ^= 0x5A
        page.write_bytes(raw)
    procs.allow = CORRUPT
    again = procs.mount(f"s3://{bucket}/c", workers=[worker.address], options=pagewise)
    read_checked(again.path("file.bin"), data)
    assert worker.metrics()["dorafs_worker_corrupt_pages_total"] == 5


# -- membership sources -------------------------------------------------------------------

def test_registry_killed_reads_go_on(procs, s3_server, bucket):
    s3 = s3_server.client()
    files = {f"f{i}.bin": put(s3, bucket, f"g/f{i}.bin", 6 * MiB) for i in range(4)}
    registry = procs.registry()
    workers = [procs.worker(registry=registry.url) for _ in range(2)]
    wait_for(lambda: len(registry.workers()) == 2, what="both workers registered")
    port = free_port()
    mount = procs.mount(f"s3://{bucket}/g", registry=registry.url, options=f"{FAST},metrics_listen=127.0.0.1:{port}")
    read_checked(mount.path("f0.bin"), files["f0.bin"])
    procs.allow = unreachable(r"registry http://127\.0\.0\.1:\d+")
    registry.kill()
    for name in ("f1.bin", "f2.bin", "f3.bin"):
        read_checked(mount.path(name), files[name])
    assert mount_health(port)["workers"] == 2  # the last known membership
    owners = {owner_of(workers, f"s3://{bucket}/g/{name}") for name in files}  # one or both workers
    assert all(w.counter("dorafs_worker_page_requests_total") > 0 for w in owners)
    assert mount_metric(port, 'dorafs_mount_ufs_fallbacks_total{kind="page"}') == 0  # workers served it all
    assert "keeping the last known 2 workers" in mount.log_text()


def test_one_etcd_member_killed(procs, s3_server, bucket):
    s3 = s3_server.client()
    files = {f"f{i}.bin": put(s3, bucket, f"e/f{i}.bin", 6 * MiB) for i in range(3)}
    etcd = procs.etcd()
    workers = [procs.worker(registry=etcd.url) for _ in range(2)]
    port = free_port()
    mount = procs.mount(f"s3://{bucket}/e", registry=etcd.url, options=f"{FAST},metrics_listen=127.0.0.1:{port}")
    wait_for(lambda: mount_health(port)["workers"] == 2, what="the mount to see both workers")
    read_checked(mount.path("f0.bin"), files["f0.bin"])
    # If the member killed led the cluster, the two left answer 503 (no leader, leader
    # changed) until they elect one: a daemon asking then warns that etcd is unreachable and
    # keeps what it knew, which is right. Any other warning still fails the test.
    procs.allow = (rf"WARNING dorafs\.membership\.\w+ .* etcd etcd://\S+ unreachable \(.*leader.*\); "
                   rf"(keeping the last known \d+ workers|retrying every)",)
    etcd.kill(0)  # the first endpoint: the one every client talks to first
    read_checked(mount.path("f1.bin"), files["f1.bin"])
    # Membership still follows changes, through the members left.
    workers[1].stop()
    wait_for(lambda: mount_health(port)["workers"] == 1, timeout=15, what="the mount to see the worker leave")
    read_checked(mount.path("f2.bin"), files["f2.bin"])


def test_whole_etcd_cluster_down_then_back(procs, s3_server, bucket):
    s3 = s3_server.client()
    files = {f"f{i}.bin": put(s3, bucket, f"d/f{i}.bin", 6 * MiB) for i in range(3)}
    etcd = procs.etcd()
    workers = [procs.worker(registry=etcd.url) for _ in range(2)]
    port = free_port()
    mount = procs.mount(f"s3://{bucket}/d", registry=etcd.url, options=f"{FAST},metrics_listen=127.0.0.1:{port}")
    wait_for(lambda: mount_health(port)["workers"] == 2, what="the mount to see both workers")
    procs.allow = unreachable(r"etcd etcd://\S+")
    for i in range(3):
        etcd.kill(i)
    read_checked(mount.path("f0.bin"), files["f0.bin"])
    read_checked(mount.path("f1.bin"), files["f1.bin"])
    assert mount_health(port)["workers"] == 2  # the last known membership
    for i in range(3):
        etcd.start(i)
    for member in etcd.members:
        member.wait_healthy()
    third = procs.worker(registry=etcd.url)
    wait_for(lambda: mount_health(port)["workers"] == 3, timeout=20, what="the mount to see a new worker")
    read_checked(mount.path("f2.bin"), files["f2.bin"])
    assert "keeping the last known 2 workers" in mount.log_text()
    assert third.alive() and all(w.alive() for w in workers)


# -- the UFS ------------------------------------------------------------------------------

def test_s3_throttling_then_ok_is_retried(procs, s3_server, bucket, proxy):
    data = put(s3_server.client(), bucket, "t/file.bin", 3 * MiB)
    env = proxy.env(s3_server.env)
    worker = procs.worker(env=env)
    mount = procs.mount(f"s3://{bucket}/t", workers=[worker.address], env=env)
    proxy.fail(3, 503, "SlowDown")
    read_checked(mount.path("file.bin"), data)
    assert proxy.injected == 3
    assert worker.counter("dorafs_worker_ufs_errors_total") == 0  # every fill succeeded in the end


def test_s3_failing_forever_is_eio_and_the_mount_stays(procs, s3_server, bucket, proxy):
    s3 = s3_server.client()
    data = put(s3, bucket, "x/file.bin", 2 * MiB)
    env = proxy.env(s3_server.env)
    worker = procs.worker(env=env, extra=["--ufs-attempts", "3", "--ufs-deadline", "2s"])
    mount = procs.mount(f"s3://{bucket}/x", workers=[worker.address], env=env,
                        options="ufs_attempts=3,ufs_deadline=2s")
    assert mount.path("file.bin").stat().st_size == len(data)
    proxy.fail(None, 500, "InternalError")
    procs.allow = (r"InternalError",)
    started = time.monotonic()
    with pytest.raises(OSError) as failure:
        mount.path("file.bin").read_bytes()
    assert failure.value.errno == errno.EIO
    assert time.monotonic() - started < 20  # bounded: 3 attempts within 2 s, not botocore's minutes
    assert proxy.injected >= 3
    assert "InternalError" in worker.log_text()  # the cause is logged
    proxy.passthrough()
    assert is_mounted(mount.mountpoint)
    assert sorted(os.listdir(mount.mountpoint)) == ["file.bin"]
    time.sleep(FAILURE_MEMORY)  # a failed page answers its error again this long
    read_checked(mount.path("file.bin"), data)


def test_s3_hanging_times_out_with_eio(procs, s3_server, bucket, proxy):
    procs.allow = (r"WARNING dorafs\.http\.server .* GET /v1/(page|locate): S3 get_object \S+/h/file\.bin: "
                   r"(stalled: no progress within the \d+s timeout|ConnectionClosedError: "
                   r"|ConnectionError: An HTTP Client failed to establish a connection)",  # obstore's words
                   r"WARNING dorafs\.fuse .* read: S3 get_object \S+/h/file\.bin: stalled: .* \(EIO\)$")
    data = put(s3_server.client(), bucket, "h/file.bin", 2 * MiB)
    env = proxy.env(s3_server.env)
    worker = procs.worker(env=env, extra=["--ufs-timeout", "1s", "--ufs-deadline", "2s"])
    mount = procs.mount(f"s3://{bucket}/h", workers=[worker.address], env=env,
                        options="ufs_timeout=1s,ufs_deadline=2s")
    assert mount.path("file.bin").stat().st_size == len(data)
    proxy.hang()
    started = time.monotonic()
    with pytest.raises(OSError) as failure:
        mount.path("file.bin").read_bytes()
    assert failure.value.errno == errno.EIO
    assert time.monotonic() - started < 20
    assert "deadline" in worker.log_text() or "timeout" in worker.log_text().lower()
    proxy.passthrough()
    assert is_mounted(mount.mountpoint)
    time.sleep(FAILURE_MEMORY)
    read_checked(mount.path("file.bin"), data)


# -- the cache disk -----------------------------------------------------------------------

@pytest.fixture
def small_tmpfs(tmp_path):
    """A 3 MiB tmpfs (we are root), always unmounted."""
    with tmpfs(tmp_path / "small-disk", "3m") as path:
        yield path


def test_cache_directory_full(procs, s3_server, bucket, small_tmpfs):
    procs.allow = (r"WARNING worker\.pagestore .* cache disk full \(No space left on device .*\): "
                   r"caching at most \d+ bytes instead of \d+",)
    s3 = s3_server.client()
    files = {f"f{i}.bin": put(s3, bucket, f"full/f{i}.bin", 6 * MiB) for i in range(2)}
    worker = procs.worker(cache_dir=small_tmpfs / "cache", cache_size="1GiB")
    try:
        mount = procs.mount(f"s3://{bucket}/full", workers=[worker.address])
        for name, data in files.items():
            read_checked(mount.path(name), data)
        health = httpx.get(f"http://{worker.address}/healthz", timeout=5)
        assert health.status_code == 200 and health.json()["status"] == "degraded"
        assert "full" in health.json()["cache"]
        metrics = worker.metrics()
        assert metrics["dorafs_worker_cache_degraded"] == 1
        assert metrics["dorafs_worker_cache_write_errors"] >= 1
        assert metrics["dorafs_worker_cache_limit_bytes"] < 3 * MiB
        assert metrics["dorafs_worker_cache_used_bytes"] <= 3 * MiB
        # Reads keep working from the pages that fit and from the UFS.
        mount.unmount()
        again = procs.mount(f"s3://{bucket}/full", workers=[worker.address])
        for name, data in files.items():
            read_checked(again.path(name), data)
    finally:
        for proc in procs.started:
            proc.stop()  # free the tmpfs before the fixture unmounts it
