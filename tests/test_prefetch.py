"""Each open file's prefetcher (dorafs/client/prefetch.py) against a real S3 API (moto)
behind the fault proxy, which holds every ranged GET for a while: a store slow enough
that the readahead is still in flight when the file closes or its reader seeks away.

No worker answers, so every page comes from the store through the client, one GET per
page, and the client makes at most `THREADS` store calls at a time: the rest of a
window's pages wait for a thread. Left alone, each page of the window reaches the
store; once the readahead is cancelled, only the GETs already in their threads do.
"""

from __future__ import annotations

import os
import random
import time

import trio

from dorafs.client.prefetch import RUN_PAGES
from dorafs.ufs.s3 import CHUNK
from tests.faultproxy import PIECE
from tests.support import free_port, run_client
from tests.test_operations import scrape
from dorafs.config import MountConfig

PAGE = 256 << 10
PAGES = 64
HOLD = 0.6  # seconds the proxy holds each ranged GET
THREADS = 2  # the client's store calls in flight (ufs_threads)
MiB = 1 << 20
RATE = 1 * MiB  # bytes/s the proxy passes on per connection in the mounted test
RUNS_END = -(-17 // RUN_PAGES) * RUN_PAGES - 1  # the last page of the runs a 16-page window starts at page 0


def ranged_gets(proxy) -> int:
    return proxy.count("get_range")


def setup(s3_server, bucket, proxy, monkeypatch, hold: float = HOLD):
    data = random.Random(3).randbytes(PAGES * PAGE)
    s3_server.client().put_object(Bucket=bucket, Key="big.bin", Body=data)
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
    proxy.delay(hold, None, lambda seen: seen.op == "get_range")
    return data, f"s3://{bucket}/big.bin"


def run(body):
    run_client(MountConfig(page_size=PAGE, readahead_pages=16, random_read=0), body, threads=THREADS)


async def start_readahead(client, uri):
    """A sequential reader of small pieces of page 0: its window grows to 16 pages, and
    the runs for pages 1 to `RUNS_END` start (the window's end rounded up to a whole
    run); THREADS of their GETs are in flight, the others wait."""
    f = client.open_pinned(uri, await client.stat(uri))
    for n in range(6):
        await client.read(f, n * 4096, 4096)
    await trio.sleep(HOLD / 3)
    assert f.ahead.running >= 2, "the readahead did not start"
    return f


async def streamed(proxy, *, settle: float = 1.0) -> int:
    """The bytes of ranged GETs' answers passed on, once they stopped for `settle` seconds."""
    sent = proxy.sent("get_range")
    while True:
        await trio.sleep(settle)
        now = proxy.sent("get_range")
        if now == sent:
            return now
        sent = now


async def quiet(proxy, *, settle: float = 2 * HOLD + 0.5) -> int:
    """The ranged GETs once no new one has come for `settle` seconds."""
    seen = ranged_gets(proxy)
    while True:
        await trio.sleep(settle)
        now = ranged_gets(proxy)
        if now == seen:
            return now
        seen = now


def test_closing_a_file_cancels_its_readahead(s3_server, bucket, proxy, monkeypatch):
    data, uri = setup(s3_server, bucket, proxy, monkeypatch)

    async def body(client):
        f = await start_readahead(client, uri)
        runs = f.ahead.running
        scheduled = client.reader.prefetches.pages
        at_close = ranged_gets(proxy)
        client.close(f)
        after = await quiet(proxy)
        # Left alone, the readahead would ask for every page of its window (15 GETs, not
        # counting page 1's, in before the window grew). Closed, the store sees at most
        # the GETs already in their threads.
        assert scheduled >= 8
        assert after <= 2 + THREADS, (at_close, after, runs)  # pages 0 and 1, and those in flight
        assert f.ahead.running == 0
        assert client.reader.prefetches.pages == 0 and not client.reader.prefetches.scheduled
        assert client.reader.prefetches.cancelled_runs == runs

        # What was fetched stays usable: page 0 comes from the buffer, no GET; a page
        # whose run was cancelled is fetched by the reader that wants it.
        again = client.open_pinned(uri, f.status)
        assert bytes(await client.read(again, 8192, 4096)) == data[8192:12288]
        assert ranged_gets(proxy) == after
        assert bytes(await client.read(again, 12 * PAGE, 100)) == data[12 * PAGE:12 * PAGE + 100]
        client.close(again)

    run(body)


def test_a_seek_away_cancels_the_runs_behind_it(s3_server, bucket, proxy, monkeypatch):
    data, uri = setup(s3_server, bucket, proxy, monkeypatch)

    async def body(client):
        f = await start_readahead(client, uri)
        runs = f.ahead.running
        at_seek = ranged_gets(proxy)
        far = (RUNS_END + max(16, RUN_PAGES) + 2) * PAGE + 5  # more than a window past the runs in flight
        assert bytes(await client.read(f, far, 4096)) == data[far:far + 4096]
        after = await quiet(proxy)
        # The far read is one GET; the runs left behind ask for nothing more.
        assert after <= 2 + THREADS + 1, (at_seek, after, runs)
        assert f.ahead.running == 0
        assert client.reader.prefetches.cancelled_runs == runs
        # The file is still open: reading on from the new place reads ahead again.
        await client.read(f, far + 4096, 4096)
        assert f.ahead.running >= 1
        client.close(f)

    run(body)


def test_a_read_near_the_runs_keeps_them(s3_server, bucket, proxy, monkeypatch):
    """A reader that steps back a little (or the kernel's reads arriving out of order)
    is not a seek away: the runs go on and bring their pages."""
    data, uri = setup(s3_server, bucket, proxy, monkeypatch, hold=HOLD / 3)

    async def body(client):
        f = await start_readahead(client, uri)
        assert bytes(await client.read(f, 0, 4096)) == data[:4096]  # back to the start: near
        await quiet(proxy, settle=HOLD)
        assert client.reader.prefetches.cancelled_runs == 0
        gets = ranged_gets(proxy)
        for index in range(1, 17):  # every page of the window came
            assert bytes(await client.read(f, index * PAGE, 10)) == data[index * PAGE:index * PAGE + 10]
        assert ranged_gets(proxy) == gets
        client.close(f)

    run(body)


def test_a_release_through_the_mount_cancels_the_files_readahead(procs, s3_server, bucket, proxy):
    """The same through the kernel: closing the file (FUSE RELEASE) ends its readahead,
    and the store stops sending its pages. The mount's only worker does not answer, so
    the mount reads the store itself, every GET in a thread of its own (the window is
    smaller than the mount's UFS threads); the proxy passes each answer on at `RATE`."""
    size = 20 * MiB
    data = random.Random(5).randbytes(size)
    s3_server.client().put_object(Bucket=bucket, Key="stream.bin", Body=data)
    procs.allow = (r"worker 127\.0\.0\.1:9 unreachable",)
    port = free_port()
    mount = procs.mount(f"s3://{bucket}", workers=["127.0.0.1:9"], env=proxy.env(s3_server.env),
                        options=f"direct_io,page_size=1MiB,readahead_pages=16,random_read=0,"
                                f"metrics_listen=127.0.0.1:{port}")
    proxy.limit(RATE)
    fd = os.open(mount.path("stream.bin"), os.O_RDONLY)
    try:
        for n in range(6):  # direct_io: each read reaches the mount as it is; the window grows to 16
            assert os.read(fd, 4096) == data[n * 4096:(n + 1) * 4096]
        time.sleep(0.3)  # pages 1-16 on their way, a part of each sent
        at_close = proxy.sent("get_range")
    finally:
        os.close(fd)
    after = trio.run(streamed, proxy)
    proxy.limit(None)
    # Left alone, the readahead brings pages 1-16 whole: 16 MiB more than page 0. Released,
    # each GET in flight stops at its next piece (CHUNK) and the store sends no more.
    in_flight = 15
    assert after - at_close <= in_flight * (CHUNK + 2 * PIECE), (at_close, after)
    metrics = scrape(f"127.0.0.1:{port}")
    assert metrics["dorafs_mount_readahead_runs_total"] >= 3
    assert metrics["dorafs_mount_readahead_cancelled_runs_total"] >= 1
