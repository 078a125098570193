"""Slow is not broken: a store that is merely slow costs time, never an error.

The real moto server behind tests/faultproxy.py limited to 1 MB/s and 256 KB/s per
connection: every 8 MiB readahead run then takes far longer than `ufs_deadline` (4 s),
and every page longer than `ufs_timeout` (2 s); reads must still return exact bytes,
and a write must still land. A UFS request fails only when it stops making progress.
"""

from __future__ import annotations

import hashlib
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

MiB = 1 << 20


def put(s3, bucket: str, key: str, size: int) -> bytes:
    data = os.urandom(size)
    s3.put_object(Bucket=bucket, Key=key, Body=data)
    return data


def read_timed(path: Path, data: bytes) -> float:
    """Read `path` sequentially in 256 KiB calls, check every byte; the longest call."""
    longest = 0.0
    got = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while True:
            started = time.monotonic()
            chunk = f.read(256 * 1024)
            longest = max(longest, time.monotonic() - started)
            if not chunk:
                break
            got.update(chunk)
            size += len(chunk)
    assert size == len(data) and got.digest() == hashlib.sha256(data).digest(), f"wrong bytes from {path}"
    return longest


def slow_cluster(procs, s3_server, bucket, proxy, prefix: str, rate: int):
    env = proxy.env(s3_server.env)
    proxy.limit(rate)
    worker = procs.worker(env=env)
    return procs.mount(f"s3://{bucket}/{prefix}", workers=[worker.address], env=env), worker


def test_cold_reads_at_1_mb_per_s_per_connection(procs, s3_server, bucket, proxy):
    """A 64 MiB object, then four readers side by side: runs of 8 MiB take 8 s each."""
    s3 = s3_server.client()
    big = put(s3, bucket, "one/big.bin", 64 * MiB)
    small = {f"p{i}.bin": put(s3, bucket, f"one/p{i}.bin", 8 * MiB) for i in range(4)}
    mount, worker = slow_cluster(procs, s3_server, bucket, proxy, "one", 1_000_000)
    started = time.monotonic()
    read_timed(mount.path("big.bin"), big)
    elapsed = time.monotonic() - started
    # The limit was in force: 16 connections at most (ufs_threads), 1 MB/s each.
    assert elapsed > 64 * MiB / (16 * 1_000_000)
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda item: read_timed(mount.path(item[0]), item[1]), small.items()))
    assert worker.counter("dorafs_worker_ufs_errors_total") == 0  # slow, never failed


def test_cold_reads_at_256_kb_per_s_per_connection(procs, s3_server, bucket, proxy):
    """At 256 KB/s a page takes 4 s and a run 33 s: a reader waits for its page, not for
    the run (the run's first page is answered once its bytes are in)."""
    s3 = s3_server.client()
    one = put(s3, bucket, "quarter/one.bin", 24 * MiB)
    small = {f"p{i}.bin": put(s3, bucket, f"quarter/p{i}.bin", 2 * MiB) for i in range(4)}
    mount, worker = slow_cluster(procs, s3_server, bucket, proxy, "quarter", 256_000)
    longest = read_timed(mount.path("one.bin"), one)
    # A page takes 4.1 s; a run of 8 would take 33 s, one of 2 pages 8.2 s.
    assert longest < 7.5, f"a read() waited {longest:.1f}s: for a run, not for its page"
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda item: read_timed(mount.path(item[0]), item[1]), small.items()))
    assert worker.counter("dorafs_worker_ufs_errors_total") == 0


def test_write_at_1_mb_per_s_per_connection_lands_once(procs, s3_server, bucket, proxy):
    """Each 5 MiB part takes 5 s to send: beyond the 4 s deadline of a call that moves no
    data, within the deadline that grows with the bytes."""
    s3 = s3_server.client()
    env = proxy.env(s3_server.env)
    proxy.limit(1_000_000)
    worker = procs.worker(env=env)
    mount = procs.mount(f"s3://{bucket}", workers=[worker.address], env=env,
                        options=f"staging_dir={procs.tmp / 'staging'},upload_part_size=5MiB")
    data = os.urandom(12 * MiB)
    with open(mount.path("w.bin"), "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    assert s3.get_object(Bucket=bucket, Key="w.bin")["Body"].read() == data
    assert proxy.payload("upload_part") == len(data)  # each byte once
