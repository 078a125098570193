"""The read path's answers without copies (dorafs/client/reading.py), in process against a
real worker on loopback (its page files read directly) and a real S3 API (moto): a read
across pages taken as pieces, and a readahead run's later pages reaching the readers that
wait for them as each lands."""

from __future__ import annotations

import os

import trio

from dorafs.config import MountConfig
from tests.support import run_client

MiB = 1 << 20


def run(config: MountConfig, addresses: list[str], body) -> None:
    run_client(config, body, addresses)


def test_a_read_across_pages_of_different_blocks_is_a_view_of_each(procs, s3_server, bucket):
    data = os.urandom(3 * MiB + 12345)
    s3_server.client().put_object(Bucket=bucket, Key="p/f.bin", Body=data)
    worker = procs.worker()
    uri = f"s3://{bucket}/p/f.bin"
    config = MountConfig(readahead_pages=0, random_read=0)  # each page fetched on its own: a block each

    async def body(client):
        f = client.open_pinned(uri, await client.stat(uri))
        for index in range(3):
            assert bytes(await client.read(f, index * MiB, MiB)) == data[index * MiB:(index + 1) * MiB]
        assert client.stats.short_circuit_pages == 3  # read from the worker's files, checked here
        start, end = MiB // 2, 2 * MiB + MiB // 2
        whole = await client.read(f, start, end - start)
        assert not isinstance(whole, tuple) and bytes(whole) == data[start:end]
        parts = await client.read(f, start, end - start, True)
        assert isinstance(parts, tuple) and [len(p) for p in parts] == [MiB // 2, MiB, MiB // 2]
        assert b"".join(parts) == data[start:end]
        # A page read to its end by a later read that was answered first is no longer
        # buffered, but its kept file answers its part.
        client.buffer.discard(client.reader.key(f, 1))
        parts = await client.read(f, start, end - start, True)
        assert isinstance(parts, tuple) and b"".join(parts) == data[start:end]
        client.close(f)

    run(config, [worker.address], body)


def test_another_handle_reading_a_page_of_a_run_gets_it_at_once(procs, s3_server, bucket):
    """A second handle on the file reads a page that the first handle's readahead runs
    bring: it waits for that run, which names its pages as they land, and is answered
    while the first handle's reader stays where it was."""
    data = os.urandom(24 * MiB)
    s3_server.client().put_object(Bucket=bucket, Key="h/f.bin", Body=data)
    worker = procs.worker()
    uri = f"s3://{bucket}/h/f.bin"

    async def body(client):
        status = await client.stat(uri)
        first = client.open_pinned(uri, status)
        assert bytes(await client.read(first, 0, 4 * MiB)) == data[:4 * MiB]  # readahead: pages 4-19
        await trio.sleep(1)  # this reader stays at page 4
        other = client.open_pinned(uri, status)
        offset = 15 * MiB + 100
        with trio.fail_after(5):
            assert bytes(await client.read(other, offset, 4096)) == data[offset:offset + 4096]
        client.close(other)
        client.close(first)

    run(MountConfig(), [worker.address], body)


def test_a_reader_waiting_for_a_later_page_of_a_slow_run_gets_it_as_it_lands(procs, s3_server, bucket, proxy):
    """A store slow enough that a run's pages land one by one (4 MiB/s per connection):
    another reader waiting for a later page of the run is answered once that page lands,
    not when the whole run is in."""
    data = os.urandom(24 * MiB)
    s3_server.client().put_object(Bucket=bucket, Key="s/f.bin", Body=data)
    proxy.limit(4 * MiB)
    worker = procs.worker(env=proxy.env(s3_server.env))
    uri = f"s3://{bucket}/s/f.bin"

    async def body(client):
        status = await client.stat(uri)
        first = client.open_pinned(uri, status)
        assert bytes(await client.read(first, 0, 4 * MiB)) == data[:4 * MiB]  # runs of pages 0-7 and 8-15
        other = client.open_pinned(uri, status)
        offset = 14 * MiB + 100  # landing about 1.75 s after its run's GET started
        with trio.fail_after(15):
            assert bytes(await client.read(other, offset, 4096)) == data[offset:offset + 4096]
        client.close(other)
        client.close(first)

    run(MountConfig(), [worker.address], body)
