"""The S3 adapter's data path through obstore (dorafs/ufs/s3fast.py), against moto on
loopback, directly and through the fault proxy: pinned versions, ranges, keys obstore
cannot name, credentials from a profile, and the retry policy (silence, not duration;
a retry asks only for the bytes still missing)."""

from __future__ import annotations

import os

import pytest
import trio

from dorafs.errors import NotFound, StaleVersion, UfsError
from dorafs.ufs.retry import RetryPolicy
from dorafs.ufs.s3 import FAST_GET_LIMIT, S3Ufs

MIB = 1 << 20


def _data(n: int, seed: int = 7) -> bytes:
    block = bytes((seed * 31 + i) % 251 for i in range(4096))
    return (block * (n // len(block) + 1))[:n]


def _run(fn):
    return trio.run(fn)


def test_reads_go_through_obstore_pinned_to_their_version(s3_server, bucket):
    client = s3_server.client()
    key = "dir/odd name+%&=.bin"
    data = _data(3 * MIB + 123)
    etag = client.put_object(Bucket=bucket, Key=key, Body=data)["ETag"]
    uri = f"s3://{bucket}/{key}"

    async def main():
        ufs = S3Ufs()
        try:
            status = await ufs.stat(uri)
            assert (status.size, status.version) == (len(data), etag)
            assert ufs._fast.heads >= 1
            got = await ufs.read(uri, 1000, 2 * MIB, etag)
            assert bytes(got) == data[1000:1000 + 2 * MIB]
            tail = await ufs.read(uri, len(data) - 10, MIB, etag)  # short at the end of the object
            assert bytes(tail) == data[-10:]
            assert bytes(await ufs.read(uri, len(data), 100, etag)) == b""  # at the end: nothing
            assert ufs._fast.gets == 3
            client.put_object(Bucket=bucket, Key=key, Body=b"another version")
            with pytest.raises(StaleVersion):
                await ufs.read(uri, 0, 100, etag)
            client.delete_object(Bucket=bucket, Key=key)
            with pytest.raises(StaleVersion):
                await ufs.read(uri, 0, 100, etag)
            with pytest.raises(NotFound):
                await ufs.read(f"s3://{bucket}/missing", 0, 100, "")
            assert await ufs._head(bucket, "missing") is None
        finally:
            await ufs.aclose()

    _run(main)


def test_keys_obstore_cannot_name_are_read_with_boto3(s3_server, bucket):
    client = s3_server.client()
    keys = ["a//double", "b/./dot", "c/../up"]
    for i, key in enumerate(keys):
        client.put_object(Bucket=bucket, Key=key, Body=_data(100_000, i))

    async def main():
        ufs = S3Ufs()
        try:
            for i, key in enumerate(keys):
                head = await ufs._head(bucket, key)
                got = await ufs.read(f"s3://{bucket}/{key}", 10, 50_000, head["ETag"])
                assert bytes(got) == _data(100_000, i)[10:50_010]
            assert ufs._fast.gets == 0 and ufs._fast.heads == 0
        finally:
            await ufs.aclose()

    _run(main)


def test_credentials_from_a_named_profile(s3_server, bucket, tmp_path, monkeypatch):
    client = s3_server.client()
    etag = client.put_object(Bucket=bucket, Key="p", Body=_data(5000))["ETag"]
    (tmp_path / "credentials").write_text("[dorafs-test]\naws_access_key_id = testing\n"
                                          "aws_secret_access_key = testing\n")
    (tmp_path / "config").write_text("[profile dorafs-test]\nregion = us-east-1\n")
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_PROFILE", "dorafs-test")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")

    async def main():
        ufs = S3Ufs()
        try:
            assert bytes(await ufs.read(f"s3://{bucket}/p", 0, 5000, etag)) == _data(5000)
            assert ufs._fast.gets == 1
        finally:
            await ufs.aclose()

    _run(main)


def test_a_body_cut_short_is_resumed_from_the_bytes_received(s3_server, bucket, proxy, monkeypatch):
    data = _data(4 * MIB)
    etag = s3_server.client().put_object(Bucket=bucket, Key="cut", Body=data)["ETag"]
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
    proxy.cut(1, 1536 * 1024, lambda seen: seen.op == "get_range")

    async def main():
        ufs = S3Ufs()
        try:
            got = await ufs.read(f"s3://{bucket}/cut", 100, 3 * MIB, etag)
            assert bytes(got) == data[100:100 + 3 * MIB]
            assert ufs._fast.gets == 2
        finally:
            await ufs.aclose()

    _run(main)
    ranges = [s.headers.get("range") or s.headers.get("Range") for s in proxy.seen if s.op == "get_range"]
    assert len(ranges) == 2
    start = int(ranges[1].split("=")[1].split("-")[0])
    assert 100 < start <= 100 + 1536 * 1024  # the retry asked only for what was missing
    assert start - 100 >= 1024 * 1024  # ...and kept what had arrived


def test_a_slow_body_that_keeps_moving_is_not_cut(s3_server, bucket, proxy, monkeypatch):
    """A 1.5 MiB range at 512 KiB/s takes ~3 s, longer than the 1 s silence bound."""
    data = _data(2 * MIB)
    etag = s3_server.client().put_object(Bucket=bucket, Key="slow", Body=data)["ETag"]
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
    proxy.limit(512 * 1024)

    async def main():
        ufs = S3Ufs(retry=RetryPolicy(timeout=1.0, deadline=2.0, min_rate=256 * 1024))
        try:
            start = trio.current_time()
            got = await ufs.read(f"s3://{bucket}/slow", 0, 1536 * 1024, etag)
            assert trio.current_time() - start > 1.5
            assert bytes(got) == data[:1536 * 1024]
        finally:
            await ufs.aclose()

    _run(main)
    assert proxy.count("get_range") == 1


@pytest.mark.parametrize("size", [1000, FAST_GET_LIMIT + MIB], ids=["obstore", "presigned"])
def test_a_silent_store_fails_the_read_after_its_attempts(s3_server, bucket, proxy, monkeypatch, size):
    """Through obstore (a short read) and through the presigned path (a long one:
    dorafs/ufs/s3direct.py) alike."""
    etag = s3_server.client().put_object(Bucket=bucket, Key="quiet", Body=_data(size))["ETag"]
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)

    async def main():
        ufs = S3Ufs(retry=RetryPolicy(attempts=2, timeout=0.5, deadline=3.0))
        try:
            await ufs.stat(f"s3://{bucket}/quiet")  # the client exists before the store goes quiet
            proxy.hang()
            with pytest.raises(UfsError, match="stalled|deadline|timed out|timeout"):
                await ufs.read(f"s3://{bucket}/quiet", 0, size, etag)
        finally:
            proxy.passthrough()
            await ufs.aclose()

    _run(main)
    assert proxy.count("get_range") == 2


def test_throttling_is_retried_and_a_412_is_not(s3_server, bucket, proxy, monkeypatch):
    etag = s3_server.client().put_object(Bucket=bucket, Key="t", Body=_data(10_000))["ETag"]
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)

    async def main():
        ufs = S3Ufs()
        try:
            proxy.fail(2, 503, "SlowDown")
            assert bytes(await ufs.read(f"s3://{bucket}/t", 0, 10_000, etag)) == _data(10_000)
            assert proxy.count("get_range") == 3
            proxy.fail(None, 412, "PreconditionFailed")
            with pytest.raises(StaleVersion):
                await ufs.read(f"s3://{bucket}/t", 0, 10_000, etag)
            assert proxy.count("get_range") == 4
        finally:
            proxy.passthrough()
            await ufs.aclose()

    _run(main)


def test_the_ca_bundle_boto3_uses_is_the_fast_paths(s3_server, tmp_path, monkeypatch):
    """TLS settings come from the same AWS configuration: an unreadable CA bundle is not
    silently ignored (the adapter falls back to boto3 for reads and says so)."""
    monkeypatch.setenv("AWS_CA_BUNDLE", str(tmp_path / "absent.pem"))

    async def main():
        ufs = S3Ufs()
        try:
            await ufs._s3()
        finally:
            await ufs.aclose()
        return ufs

    ufs = _run(main)
    assert ufs._fast is None
    assert os.environ["AWS_CA_BUNDLE"].endswith("absent.pem")


def test_long_runs_are_read_with_boto3_where_presigned_gets_are_not_used(s3_server, bucket):
    """A GET longer than FAST_GET_LIMIT (a sequential reader's run) is not obstore's:
    without the presigned path (dorafs/ufs/s3direct.py; a proxy, a refusing bucket)
    boto3 makes it, pinned all the same."""
    data = _data(FAST_GET_LIMIT + MIB)
    etag = s3_server.client().put_object(Bucket=bucket, Key="long", Body=data)["ETag"]

    async def main():
        ufs = S3Ufs()
        ufs._direct = None
        try:
            assert bytes(await ufs.read(f"s3://{bucket}/long", 0, len(data), etag)) == data
            assert ufs._fast.gets == 0
            assert bytes(await ufs.read(f"s3://{bucket}/long", 5, FAST_GET_LIMIT, etag)) == data[5:5 + FAST_GET_LIMIT]
            assert ufs._fast.gets == 1
            s3_server.client().put_object(Bucket=bucket, Key="long", Body=b"new")
            with pytest.raises(StaleVersion):
                await ufs.read(f"s3://{bucket}/long", 0, len(data), etag)
        finally:
            await ufs.aclose()

    _run(main)
