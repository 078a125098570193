"""The S3 adapter's long GETs through presigned URLs over kept sockets
(dorafs/ufs/s3direct.py), against moto on loopback, directly, through the fault proxy
and through a relay (plain and TLS): pinned versions, kept sockets and the server
closing them, the retry policy (silence, not duration; a retry asks only for the bytes
still missing), answers about the request, a proxy in the environment."""

from __future__ import annotations

import gc
import ssl

import pytest
import trio
import trustme

from dorafs.errors import StaleVersion, UfsError
from dorafs.ufs.retry import RetryPolicy
from dorafs.ufs.s3 import FAST_GET_LIMIT, S3Ufs
from tests.relay import KeepAliveFront, Relay

MIB = 1 << 20
LONG = FAST_GET_LIMIT + MIB  # a read longer than obstore's: it comes here


def _data(n: int, seed: int = 7) -> bytes:
    block = bytes((seed * 31 + i) % 251 for i in range(4096))
    return (block * (n // len(block) + 1))[:n]


def _run(fn):
    return trio.run(fn)


def _port(endpoint: str) -> int:
    return int(endpoint.rsplit(":", 1)[1])


def test_long_reads_are_presigned_gets_pinned_to_their_version(s3_server, bucket):
    key = "dir/odd name+%&=.bin"
    data = _data(2 * LONG + 12345)
    etag = s3_server.client().put_object(Bucket=bucket, Key=key, Body=data)["ETag"]
    uri = f"s3://{bucket}/{key}"

    async def main():
        ufs = S3Ufs()
        try:
            assert bytes(await ufs.read(uri, 0, LONG, etag)) == data[:LONG]
            assert bytes(await ufs.read(uri, 777, LONG, etag)) == data[777:777 + LONG]
            tail = await ufs.read(uri, 2 * LONG, LONG, etag)  # short at the end of the object
            assert bytes(tail) == data[2 * LONG:]
            assert ufs._direct.gets == 3
            assert ufs._fast.gets == 0
            # Not pinned: boto3's (an abandoned attempt could write another version's bytes)
            assert bytes(await ufs.read(uri, 5, LONG, "")) == data[5:5 + LONG]
            assert ufs._direct.gets == 3
            s3_server.client().put_object(Bucket=bucket, Key=key, Body=b"another version")
            with pytest.raises(StaleVersion):
                await ufs.read(uri, 0, LONG, etag)
            s3_server.client().delete_object(Bucket=bucket, Key=key)
            with pytest.raises(StaleVersion):
                await ufs.read(uri, 0, LONG, etag)
            assert ufs._direct.gets == 5
        finally:
            await ufs.aclose()

    _run(main)


def test_one_socket_serves_one_get_after_another_and_a_closed_one_is_replaced(s3_server, bucket, monkeypatch):
    """GETs one after another reuse one socket where the store keeps connections; when
    the store closes it while it is idle, the next GET opens another, and a read never
    fails for it. A store that closes after each answer (moto) gets a socket a GET."""
    data = _data(LONG)
    etag = s3_server.client().put_object(Bucket=bucket, Key="k", Body=data)["ETag"]
    front = KeepAliveFront(s3_server.endpoint)

    async def main(expect_kept: bool):
        ufs = S3Ufs()
        try:
            for _ in range(3):
                assert bytes(await ufs.read(f"s3://{bucket}/k", 0, LONG, etag)) == data
            assert (ufs._direct.gets, ufs._direct.connections) == (3, 1 if expect_kept else 3)
            if expect_kept:
                front.close_idle()
                assert bytes(await ufs.read(f"s3://{bucket}/k", 0, LONG, etag)) == data
                assert (ufs._direct.gets, ufs._direct.connections) == (4, 2)
        finally:
            await ufs.aclose()

    try:
        _run(lambda: main(False))  # moto itself
        monkeypatch.setenv("AWS_ENDPOINT_URL", front.endpoint)
        _run(lambda: main(True))
        assert front.connections == 2
    finally:
        front.close()


def _through(relay: Relay, read, **ufs_args) -> None:
    """`await read(ufs)` with a new S3Ufs (closed after it), then the relay closed."""
    async def main():
        ufs = S3Ufs(**ufs_args)
        try:
            await read(ufs)
        finally:
            await ufs.aclose()

    try:
        _run(main)
    finally:
        relay.close()


def _tls_context(ca_path=None) -> ssl.SSLContext:
    """A server context with a certificate for loopback from a CA of its own (written
    to `ca_path` if given)."""
    ca = trustme.CA()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(context)
    if ca_path is not None:
        ca.cert_pem.write_to_path(str(ca_path))
    return context


def test_a_store_behind_tls_is_read_with_the_ca_bundle_boto3_uses(s3_server, bucket, tmp_path, monkeypatch):
    context = _tls_context(tmp_path / "ca.pem")
    data = _data(LONG + 5)
    etag = s3_server.client().put_object(Bucket=bucket, Key="t", Body=data)["ETag"]
    front = KeepAliveFront(s3_server.endpoint)
    relay = Relay(_port(front.endpoint), tls=context)
    monkeypatch.setenv("AWS_ENDPOINT_URL", relay.endpoint)
    monkeypatch.setenv("AWS_CA_BUNDLE", str(tmp_path / "ca.pem"))

    async def read(ufs):
        assert relay.endpoint.startswith("https://")
        assert bytes(await ufs.read(f"s3://{bucket}/t", 3, LONG, etag)) == data[3:3 + LONG]
        assert bytes(await ufs.read(f"s3://{bucket}/t", 0, LONG, etag)) == data[:LONG]
        assert (ufs._direct.gets, ufs._direct.connections) == (2, 1)

    try:
        _through(relay, read)
    finally:
        front.close()


@pytest.mark.parametrize("via", ["presigned", "boto3"])
def test_a_long_run_cut_mid_body_goes_on_from_its_bytes(s3_server, bucket, proxy, monkeypatch, via):
    """A long pinned GET whose answer breaks off is an incomplete read, retried from the
    bytes that did arrive, never a short object; through the presigned path and through
    boto3 (where that path is not used), both receiving straight into the caller's
    buffer. A later read of the same length receives into that buffer once nothing
    refers to it, and returns its own object's bytes."""
    data = _data(FAST_GET_LIMIT + 3 * MIB)
    other = _data(len(data), seed=11)
    etag = s3_server.client().put_object(Bucket=bucket, Key="cut", Body=data)["ETag"]
    other_etag = s3_server.client().put_object(Bucket=bucket, Key="other", Body=other)["ETag"]
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
    proxy.cut(1, 2 * MIB + 100, lambda seen: seen.op == "get_range")

    async def main():
        ufs = S3Ufs(retry=RetryPolicy(base=0.01))
        if via == "boto3":
            ufs._direct = None
        try:
            got = await ufs.read(f"s3://{bucket}/cut", 0, len(data), etag)
            assert bytes(got) == data
            del got
            gc.collect()  # the retried attempt's exception held the buffer in a cycle
            again = await ufs.read(f"s3://{bucket}/other", 0, len(other), other_etag)
            assert bytes(again) == other
            assert ufs._direct is None or ufs._direct.gets == 3
            return ufs.buffers.reused
        finally:
            await ufs.aclose()

    reused = _run(main)
    ranges = [{k.lower(): v for k, v in s.headers.items()}["range"] for s in proxy.seen if s.op == "get_range"]
    assert len(ranges) == 3  # the cut answer, the rest of it, the other object
    start = int(ranges[1].split("=")[1].split("-")[0])
    assert 0 < start <= 2 * MIB + 100  # the retry asked only for what was missing
    assert start >= MIB  # ...and kept what had arrived
    assert reused == 1


def test_a_slow_long_body_that_keeps_moving_is_not_cut(s3_server, bucket, proxy, monkeypatch):
    """5 MiB at 2 MiB/s takes ~2.5 s, longer than the 1 s silence bound, and each MiB
    received takes 0.5 s: what came is reported at least every quarter of a second."""
    data = _data(LONG)
    etag = s3_server.client().put_object(Bucket=bucket, Key="slow", Body=data)["ETag"]
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
    proxy.limit(2 * MIB)

    async def main():
        ufs = S3Ufs(retry=RetryPolicy(timeout=1.0, deadline=2.0, min_rate=MIB))
        try:
            start = trio.current_time()
            got = await ufs.read(f"s3://{bucket}/slow", 0, LONG, etag)
            assert trio.current_time() - start > 2.0
            assert bytes(got) == data
            assert ufs._direct.gets == 1
        finally:
            await ufs.aclose()

    _run(main)
    assert proxy.count("get_range") == 1


def test_throttling_is_retried_a_412_is_not_and_an_answer_about_the_request_goes_to_boto3(
        s3_server, bucket, proxy, monkeypatch):
    data = _data(LONG)
    etag = s3_server.client().put_object(Bucket=bucket, Key="t", Body=data)["ETag"]
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)

    async def main():
        ufs = S3Ufs(retry=RetryPolicy(base=0.01))
        try:
            proxy.fail(2, 503, "SlowDown")
            assert bytes(await ufs.read(f"s3://{bucket}/t", 0, LONG, etag)) == data
            assert (proxy.count("get_range"), ufs._direct.gets) == (3, 3)
            proxy.fail(1, 412, "PreconditionFailed")
            with pytest.raises(StaleVersion):
                await ufs.read(f"s3://{bucket}/t", 0, LONG, etag)
            assert (proxy.count("get_range"), ufs._direct.gets) == (4, 4)
            # A 400 is about the request: boto3 makes it, for this bucket from now on.
            proxy.fail(1, 400, "InvalidRequest")
            assert bytes(await ufs.read(f"s3://{bucket}/t", 0, LONG, etag)) == data
            assert bytes(await ufs.read(f"s3://{bucket}/t", 0, LONG, etag)) == data
            assert (proxy.count("get_range"), ufs._direct.gets) == (7, 5)
        finally:
            proxy.passthrough()
            await ufs.aclose()

    _run(main)


def test_a_proxy_in_the_environment_leaves_long_reads_to_boto3(s3_server, bucket, monkeypatch):
    """boto3 sends through the proxy the environment names; a socket of ours would not."""
    data = _data(LONG)
    etag = s3_server.client().put_object(Bucket=bucket, Key="p", Body=data)["ETag"]
    relay = Relay(_port(s3_server.endpoint))  # the proxy: forwards the requests as they are
    monkeypatch.setenv("HTTP_PROXY", relay.endpoint)
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)

    async def read(ufs):
        assert bytes(await ufs.read(f"s3://{bucket}/p", 0, LONG, etag)) == data
        assert ufs._direct.gets == 0

    _through(relay, read)
    assert relay.connections >= 1


def test_a_url_signed_earlier_is_used_again_and_signed_anew_when_refused(s3_server, bucket, proxy, monkeypatch):
    """GETs of one object within a minute share one presigned URL; a 403 to a URL signed
    earlier (credentials rotated meanwhile) is asked again once with a URL signed now,
    while a 403 to a URL just signed is the store's answer: EACCES, asked once."""
    import errno

    data = _data(LONG)
    etag = s3_server.client().put_object(Bucket=bucket, Key="u", Body=data)["ETag"]
    other = s3_server.client().put_object(Bucket=bucket, Key="v", Body=data)["ETag"]
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)

    def signatures(key: str) -> list[str]:
        return [s.path.split("X-Amz-Signature=")[1] for s in proxy.seen
                if s.op == "get_range" and f"/{key}?" in s.path]

    async def main():
        ufs = S3Ufs(retry=RetryPolicy(base=0.01))
        try:
            for _ in range(2):
                assert bytes(await ufs.read(f"s3://{bucket}/u", 0, LONG, etag)) == data
                await trio.sleep(1.1)  # signed again, the URL would differ (X-Amz-Date is in seconds)
            assert len(set(signatures("u"))) == 1  # two GETs, one URL
            proxy.fail(1, 403, "AccessDenied")
            assert bytes(await ufs.read(f"s3://{bucket}/u", 0, LONG, etag)) == data
            assert len(signatures("u")) == 4 and ufs._direct.gets == 4
            proxy.fail(1, 403, "AccessDenied")
            with pytest.raises(UfsError) as caught:
                await ufs.read(f"s3://{bucket}/v", 0, LONG, other)
            assert caught.value.errno == errno.EACCES
            assert len(signatures("v")) == 1 and ufs._direct.gets == 5
        finally:
            proxy.passthrough()
            await ufs.aclose()

    _run(main)


def test_an_unreadable_ca_bundle_plays_no_part_over_plain_http(s3_server, bucket, tmp_path, monkeypatch, caplog):
    """Over plain http no CA bundle is loaded (as with boto3): long reads are presigned
    GETs, and nothing is said about the bundle."""
    data = _data(LONG)
    etag = s3_server.client().put_object(Bucket=bucket, Key="ca", Body=data)["ETag"]
    monkeypatch.setenv("AWS_CA_BUNDLE", str(tmp_path / "absent.pem"))

    async def main():
        ufs = S3Ufs()
        try:
            for _ in range(2):
                assert bytes(await ufs.read(f"s3://{bucket}/ca", 0, LONG, etag)) == data
            assert ufs._direct.gets == 2 and ufs._direct._tls is None
        finally:
            await ufs.aclose()

    _run(main)
    assert not [r for r in caplog.records if "cannot be set up" in r.getMessage()]


def test_an_unreadable_ca_bundle_leaves_long_reads_to_boto3_and_says_so(s3_server, bucket, tmp_path, monkeypatch, caplog):
    """The signing client and its TLS context are made at the first long GET (not at the
    adapter's first call); one that cannot be made is said once, and boto3 reads (and
    fails as boto3 does without the bundle: a clear error, not a hang)."""
    data = _data(LONG)
    etag = s3_server.client().put_object(Bucket=bucket, Key="ca", Body=data)["ETag"]
    relay = Relay(_port(s3_server.endpoint), tls=_tls_context())
    monkeypatch.setenv("AWS_ENDPOINT_URL", relay.endpoint)
    monkeypatch.setenv("AWS_CA_BUNDLE", str(tmp_path / "absent.pem"))

    async def read(ufs):
        for _ in range(2):
            with pytest.raises(UfsError):
                await ufs.read(f"s3://{bucket}/ca", 0, LONG, etag)
        assert ufs._direct.gets == 0

    _through(relay, read, retry=RetryPolicy(timeout=2.0, attempts=2))
    said = [r for r in caplog.records if "presigned GETs cannot be set up" in r.getMessage()]
    assert len(said) == 1 and "absent.pem" in said[0].getMessage()
