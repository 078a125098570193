"""S3 adapter (boto3) for `s3://bucket/key` and `s3a://bucket/key` URIs.

Subtleties:
- S3 has no directories. `key` is a directory when any object lives under `key/` (or a
  `key/` marker object exists); a directory shadows a same-named file, as in
  mountpoint-s3, so `stat` and listings never show both.
- A listing page ends at an arbitrary key. A file `a` may come on one page and the
  prefix `a/` that shadows it on the next (keys such as `a.txt` sort between them), so a
  file whose `name/` sorts after the last key of its page is held back to the next page:
  the page's last file, and files whose names are prefixes of it; a handful at most. So
  pages hold up to `MaxKeys` entries, usually one less.
- Versions are ETags, kept with their quotes. Reads send `If-Match`, so a change between
  pinning and reading is a 412 (`StaleVersion`), never bytes of another version.
- mtimes are whole seconds: HEAD gives second resolution, listings may give milliseconds,
  and `stat` and a listing must agree.
- boto3 is blocking: every call (client creation included) runs in a thread behind this
  adapter's `CapacityLimiter`, sized like the client's connection pool.
- Retries are ours, not botocore's (which is set to one attempt): `dorafs.ufs.retry`
  bounds them by progress (botocore's connect and read timeouts are per socket
  operation) and by a deadline that grows with the bytes moved, and never retries an
  answer about the object (412, 404...).
- A ranged GET streams its body in the thread into the caller's buffer, chunk by chunk,
  reporting each to a `Progress`: the caller can use the first bytes before the last
  arrive, a stall is seen as one, and a retry asks only for the bytes still missing.
- Requests whose answer comes only after the server worked through many bytes get a
  socket idle bound that grows with those bytes (`RetryPolicy.idle_for`; one boto3
  client per bound, created on first use): CompleteMultipartUpload and copies (moto
  completes hundreds of MiB in seconds and sends nothing meanwhile), and uploads (the
  last megabytes of a body sit in socket buffers and drain at the link's pace after the
  sender is done, so the answer may be seconds away while everything is moving). An
  upload's body goes as a stream, in blocks each bounded by the socket timeout: sent
  as bytes it would be one `sendall`, which Python bounds as a whole.
- Writes: `put_object` for an object in one piece, a multipart upload for more (aborted
  by the writer when it gives up, so no partial object appears). Writes tell the truth:
  when a PUT, an UploadPart or a CompleteMultipartUpload gets no answer (timeout,
  broken connection, 5xx) or a retry is refused (412, NoSuchUpload), the adapter first
  looks whether the lost attempt took effect (the object's ETag and size against the MD5
  of what was sent, or the upload's part list) and only then retries or fails: the same
  bytes are never sent twice once they have landed.
- Commits are conditional (`expect`): `If-None-Match: *` for a new object, `If-Match`
  on the version the writer staged from. A 412 whose object is not what this writer
  sent is a `CommitConflict` (ESTALE) naming both versions. Whether the server honours
  conditions is probed once per bucket (`_check_conditions`); where it ignores or
  refuses them (logged once) the version is checked with a HEAD just before writing.
  CompleteMultipartUpload's If-Match is ignored by some servers that honour the rest
  (moto), so it is always checked with a HEAD as well. A directory made through the mount is a
  `key/` marker; removing the last entry of a directory puts its marker, so the
  directory stays as it would on a disk. A rename is copy then delete (multipart copy
  past 5 GiB): not atomic, and a directory's objects move one by one.
"""

from __future__ import annotations

import datetime as _dt
import errno as _errno
import hashlib
import io
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import trio
from botocore.exceptions import BotoCoreError, ClientError, ConnectionError, HTTPClientError, IncompleteReadError

from dorafs.errors import DoraError, NotADirectory, NotFound, StaleVersion, UfsError
from dorafs.ufs.base import NEW, CommitConflict, FileStatus, UnderFileSystem, Upload
from dorafs.ufs.buffers import BufferPool
from dorafs.ufs.retry import Abandoned, Attempt, Progress, RetryPolicy, call_with_retries
from dorafs.ufs.s3direct import DirectGets, Refused
from dorafs.ufs.s3fast import FastPath

log = logging.getLogger(__name__)

T = TypeVar("T")

# Error codes meaning "this key / bucket is not there" (HEAD answers carry only the status).
_NO_KEY = {"NoSuchKey", "404", "NotFound"}
_NO_BUCKET = "NoSuchBucket"
_ACCESS = {"AccessDenied", "403", "Forbidden", "AllAccessDisabled"}
# Answers worth another try: throttling and server-side trouble (any 5xx is retried too).
# ConditionalRequestConflict (409): another conditional write to the key is in flight.
_TRANSIENT = {"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "TooManyRequests",
              "RequestTimeout", "InternalError", "ServiceUnavailable", "ConditionalRequestConflict",
              "503", "500", "502", "504"}
_CHANGED = {"PreconditionFailed", "412"}
_NO_UPLOAD = {"NoSuchUpload"}
_UNSUPPORTED = {"NotImplemented", "501"}
CHUNK = 256 * 1024  # a streamed body is read and reported in pieces of this size
FAST_GET_LIMIT = 4 << 20  # GETs up to this length go through obstore (dorafs.ufs.s3fast), longer ones boto3


def split_uri(uri: str) -> tuple[str, str]:
    """(bucket, key) of `s3://bucket/key`; key is '' at the bucket root, never ends in '/'."""
    _, sep, rest = uri.partition("://")
    if not sep:
        raise ValueError(f"not an S3 URI: {uri!r}")
    bucket, _, key = rest.partition("/")
    return bucket, key.rstrip("/")


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", "")) or str(
        exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", "")
    )


def _seconds(value: _dt.datetime | None) -> float:
    return float(int(value.timestamp())) if value is not None else 0.0


def classify(exc: BaseException) -> Attempt | None:
    """Retry throttling, 5xx, timeouts and broken connections; nothing else."""
    if isinstance(exc, ClientError):
        code = _code(exc)
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        message = exc.response.get("Error", {}).get("Message", "")
        cause = f"{code} {message}".strip() + (f" (HTTP {status})" if status else "")
        return Attempt((code in _TRANSIENT or status >= 500 or status == 429) and code not in _UNSUPPORTED, cause)
    if isinstance(exc, (ConnectionError, HTTPClientError, IncompleteReadError)):
        return Attempt(True, f"{type(exc).__name__}: {exc}")
    if isinstance(exc, BotoCoreError):
        return Attempt(False, f"{type(exc).__name__}: {exc}")
    if isinstance(exc, OSError):
        return Attempt(True, f"{type(exc).__name__}: {exc}")
    return None


def _failure(op: str, bucket: str, key: str, exc: Exception) -> UfsError:
    """One-line cause: operation, object, error code. Never credentials."""
    where = f"s3://{bucket}/{key}"
    if isinstance(exc, ClientError):
        code = _code(exc)
        message = exc.response.get("Error", {}).get("Message", "")
        errno = _errno.EACCES if code in _ACCESS else None
        return UfsError(f"S3 {op} {where}: {code} {message}".rstrip(), errno=errno)
    return UfsError(f"S3 {op} {where}: {type(exc).__name__}: {exc}")


def _raw_body(body: Any) -> Any | None:
    """The `http.client` response under a GET's body (a urllib3 response, or botocore's
    wrapper of one), when its bytes can be received straight into the caller's buffer:
    a plain body (no content coding for urllib3 to undo). None: read through
    `body.read` (one copy more)."""
    stream = getattr(body, "_raw_stream", body)
    fp = getattr(stream, "_fp", None)
    if fp is None or not hasattr(fp, "readinto") or not hasattr(stream, "release_conn"):
        return None
    if stream.headers.get("content-encoding") or getattr(stream, "_decoder", None) is not None:
        return None
    return fp


def _receive_into(body: Any, raw: Any, buffer: bytearray, length: int, progress: Progress, ticket: int) -> int:
    """Receive a GET's body from `raw` straight into `buffer` at `progress.done` on, a
    chunk at a time, each reported to `progress` (no copy in Python: the kernel's into
    the buffer is the only one).

    Only for a read pinned to a version: an attempt abandoned meanwhile may still write
    into the buffer, but only the same bytes of the same version at the same offsets
    as the attempt after it, and only past what was delivered. Returns the bytes received."""
    view = memoryview(buffer)
    got = 0
    while progress.done < length:
        at = progress.done
        n = raw.readinto(view[at:min(length, at + CHUNK)])
        if not n:
            break
        got += n

        def store(now: int, at=at, n=n) -> int:
            if now != at:  # another attempt delivered meanwhile: this one was abandoned
                raise Abandoned()
            return n

        progress.deliver(ticket, store)
    if raw.isclosed():  # read to its end: the connection goes back to the pool (else closing the body closes it)
        getattr(body, "_raw_stream", body).release_conn()
    return got


class S3Ufs(UnderFileSystem):
    """One boto3 client (thread-safe) shared by every call, created on first use."""

    _page_size = 1000  # MaxKeys of a listing page; S3's own maximum. Tests lower it.

    def __init__(self, threads: int = 16, retry: RetryPolicy | None = None):
        self._threads = threads
        self.retry = retry or RetryPolicy()
        self._limiter = trio.CapacityLimiter(threads)
        self._client: Any = None
        self._patient: dict[float, Any] = {}  # socket idle bound -> a client with that read timeout
        self._client_lock = trio.Lock()
        self._honours: dict[str, bool] = {}  # bucket -> does its server honour conditional writes
        # GETs and HEADs go through obstore (dorafs.ufs.s3fast) where it can make them.
        self._fast = FastPath(self.retry, threads) if FastPath.available() else None
        # Longer GETs through presigned URLs over kept sockets (dorafs.ufs.s3direct).
        self._direct: DirectGets | None = DirectGets(self.retry, threads)
        self.buffers = BufferPool()  # receive buffers of long reads, reused (dorafs/ufs/buffers.py)

    # -- plumbing ---------------------------------------------------------------------

    def _make_client(self, read_timeout: float | None = None) -> Any:
        import boto3.session
        from botocore.config import Config

        session = boto3.session.Session()  # endpoint, credentials, profile: AWS config
        client = session.client(
            "s3",
            # Local S3-compatible servers need some region; AWS itself ignores a wrong one.
            region_name=session.region_name or "us-east-1",
            config=Config(
                retries={"mode": "standard", "total_max_attempts": 1},  # dorafs.ufs.retry retries
                connect_timeout=self.retry.timeout,
                read_timeout=read_timeout or self.retry.timeout,
                max_pool_connections=self._threads,  # one connection per thread
            ),
        )
        if self._fast is not None and read_timeout is None:
            try:
                self._fast.configure(session, client)
            except Exception as exc:  # an unreadable CA bundle...: boto3 reads everything
                log.warning("S3 reads go through boto3 (the fast path cannot be configured: %s)", exc)
                self._fast = None
        if self._direct is not None and read_timeout is None:
            try:
                self._direct.configure(session, client)
            except Exception as exc:
                log.warning("long S3 reads go through boto3 (presigned GETs cannot be configured: %s)", exc)
                self._direct = None
        return client

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        return await trio.to_thread.run_sync(fn, *args, limiter=self._limiter)

    async def _s3(self, idle: float = 0.0) -> Any:
        """The client; with `idle` above the policy's timeout, one whose socket read
        timeout is at least `idle` (rounded up to a power of two seconds)."""
        if idle > self.retry.timeout:
            bound = float(2 ** math.ceil(math.log2(idle)))
            if bound not in self._patient:
                async with self._client_lock:
                    if bound not in self._patient:
                        self._patient[bound] = await self._call(self._make_client, bound)
            return self._patient[bound]
        if self._client is None:
            async with self._client_lock:
                if self._client is None:
                    self._client = await self._call(self._make_client)
        return self._client

    async def _api(self, op: str, bucket: str, key: str, *, nbytes: int = 0, idle: float = 0.0,
                   settled=None, **params: Any) -> dict:
        """Call `client.<op>(Bucket=bucket, **params)` in a thread; `UfsError` on failure
        except for `ClientError`, which the caller interprets first. `nbytes`: what the
        call moves or makes the server work through (stretches the deadline); `idle`: how
        long the server may be silent; `settled`: see `call_with_retries`."""
        client = await self._s3(idle)
        body = params.pop("Body", None)

        def call() -> dict:
            if body is None:
                return getattr(client, op)(Bucket=bucket, **params)
            # As a stream, a body is sent in blocks, each bounded by the socket timeout;
            # as bytes it would be one sendall, bounded as a whole (a slow link fails).
            return getattr(client, op)(Bucket=bucket, Body=io.BytesIO(body), **params)

        try:
            return await call_with_retries(self.retry, f"S3 {op} s3://{bucket}/{key}", call,
                                           classify, self._limiter, nbytes=nbytes, settled=settled)
        except BotoCoreError as exc:
            raise _failure(op, bucket, key, exc) from exc

    async def _head(self, bucket: str, key: str) -> dict | None:
        """head_object, or None if there is no such key."""
        await self._s3()
        fast = self._fast
        try:
            if fast is not None and fast.usable(bucket, key):
                try:
                    return await call_with_retries(self.retry, f"S3 head_object s3://{bucket}/{key}",
                                                   lambda: fast.head(bucket, key), classify, self._limiter)
                except ClientError as exc:
                    if not self._refusal(exc, bucket):
                        raise
            return await self._api("head_object", bucket, key, Key=key)
        except ClientError as exc:
            if _code(exc) in _NO_KEY:
                return None
            raise _failure("head_object", bucket, key, exc) from exc

    def _refusal(self, exc: ClientError, bucket: str) -> bool:
        """True (the bucket is read with boto3 from now on) for an answer of the fast
        path that is about the request rather than the object: a redirect to another
        region, a request the server does not understand."""
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        if self._fast is None or status not in (301, 307, 400, 501):
            return False
        self._fast.refuse(bucket, f"{_code(exc)} {exc.response.get('Error', {}).get('Message', '')}".strip())
        return True

    async def _list(self, bucket: str, key: str, **params: Any) -> dict:
        try:
            return await self._api("list_objects_v2", bucket, key, **params)
        except ClientError as exc:
            if _code(exc) == _NO_BUCKET:
                raise NotFound(f"no such bucket: s3://{bucket}") from exc
            raise _failure("list_objects_v2", bucket, key, exc) from exc

    # -- the interface ----------------------------------------------------------------

    async def stat(self, uri: str) -> FileStatus:
        bucket, key = split_uri(uri)
        if not key:
            try:
                await self._api("head_bucket", bucket, "")
            except ClientError as exc:
                if _code(exc) in _NO_KEY | {_NO_BUCKET}:
                    raise NotFound(f"no such bucket: s3://{bucket}") from exc
                raise _failure("head_bucket", bucket, "", exc) from exc
            return FileStatus(name="", is_dir=True)

        # HEAD and a one-key listing concurrently. Each task keeps its outcome, so the
        # listing's verdict (NoSuchBucket, directory) decides before HEAD's errors do.
        outcome: dict[str, Any] = {}

        async def keep(name: str, fn: Callable[[], Any]) -> None:
            try:
                outcome[name] = await fn()
            except Exception as exc:  # re-raised below, in order of precedence
                outcome[name] = exc

        async with trio.open_nursery() as nursery:
            nursery.start_soon(keep, "head", lambda: self._head(bucket, key))
            nursery.start_soon(
                keep, "list", lambda: self._list(bucket, key, Prefix=key + "/", MaxKeys=1)
            )

        name = key.rsplit("/", 1)[-1]
        listing, head = outcome["list"], outcome["head"]
        if isinstance(listing, Exception):
            raise listing
        if listing.get("Contents") or listing.get("CommonPrefixes"):
            marker = next((o for o in listing.get("Contents", []) if o["Key"] == key + "/"), None)
            return FileStatus(name=name, is_dir=True, mtime=_seconds(marker and marker["LastModified"]))
        if isinstance(head, Exception):
            raise head
        if head is None:
            raise NotFound(f"no such file or directory: {uri}")
        return FileStatus(
            name=name, is_dir=False, size=int(head["ContentLength"]),
            mtime=_seconds(head.get("LastModified")), version=str(head.get("ETag", "")),
        )

    async def list_batches(self, uri: str) -> AsyncIterator[list[FileStatus]]:
        bucket, key = split_uri(uri)
        prefix = key + "/" if key else ""
        params: dict[str, Any] = {"Prefix": prefix, "Delimiter": "/", "MaxKeys": self._page_size}
        held: dict[str, FileStatus] = {}  # files that a prefix on a later page may shadow
        first = True
        while True:
            page = await self._list(bucket, key, **params)
            contents = page.get("Contents", [])
            prefixes = page.get("CommonPrefixes", [])
            if first and key and not contents and not prefixes:
                if await self._head(bucket, key) is not None:
                    raise NotADirectory(f"not a directory: {uri}")
                raise NotFound(f"no such directory: {uri}")
            first = False

            entries = held
            held = {}
            for obj in contents:
                name = obj["Key"][len(prefix):]
                if name and "/" not in name:  # skips the directory's own `prefix/` marker
                    entries[name] = FileStatus(
                        name=name, is_dir=False, size=int(obj.get("Size", 0)),
                        mtime=_seconds(obj.get("LastModified")), version=str(obj.get("ETag", "")),
                    )
            for common in prefixes:
                name = common["Prefix"][len(prefix):].rstrip("/")
                if name and "/" not in name:
                    entries[name] = FileStatus(name=name, is_dir=True)  # shadows a file

            truncated = bool(page.get("IsTruncated"))
            if truncated:
                last = max([o["Key"] for o in contents] + [c["Prefix"] for c in prefixes], default="")
                for name in [n for n, s in entries.items() if not s.is_dir]:
                    if prefix + name + "/" > last:
                        held[name] = entries.pop(name)
            if entries:
                yield [entries[n] for n in sorted(entries)]
            if not truncated:
                return
            params["ContinuationToken"] = page["NextContinuationToken"]

    async def read(self, uri: str, offset: int, length: int, version: str,
                   progress: Progress | None = None) -> bytes | bytearray:
        if length <= 0:
            return b""
        bucket, key = split_uri(uri)
        base: dict[str, Any] = {"Key": key}
        if version:
            base["IfMatch"] = version
        client = await self._s3()
        progress = progress or Progress()
        pooled = self.buffers.take(length)  # 16 MiB or a power of two: this read has its start
        buffer = progress.buffer = pooled if len(pooled) == length else memoryview(pooled)[:length]

        # obstore for short GETs; a long run (a sequential reader's readahead, a Parquet
        # reader's column chunks) through a presigned URL over a kept socket, received
        # straight into the buffer (bench/README.md, "Long GETs over a kept socket");
        # boto3 where neither can make the request. Only a pinned read receives straight
        # into the buffer: an abandoned attempt may still write there, which is harmless
        # only when it writes the same version's bytes (see `_receive_into`).
        fast = self._fast if length <= FAST_GET_LIMIT else None
        direct = self._direct if length > FAST_GET_LIMIT and version else None

        def get() -> int:
            """One attempt: the bytes still missing, streamed into `buffer`."""
            ticket = progress.begin()
            start = offset + progress.done
            if progress.done >= length:
                return progress.done
            if direct is not None and direct.usable(bucket):
                try:
                    etag = direct.get_into(bucket, key, start, offset + length, version, progress, ticket, buffer)
                except Refused:
                    pass  # boto3 reads it (and, for an answer about the bucket, the bucket from now on)
                else:
                    if version and etag and etag != version:  # a store that ignores If-Match
                        raise _OtherVersion(etag)
                    return progress.done
            if fast is not None and fast.usable(bucket, key):
                try:
                    etag = fast.get_into(bucket, key, start, offset + length, version, progress, ticket, buffer)
                except ClientError as exc:
                    if not self._refusal(exc, bucket):
                        raise
                else:
                    if version and etag and etag != version:  # a store that ignores If-Match
                        raise _OtherVersion(etag)
                    return progress.done
            response = client.get_object(Bucket=bucket, Range=f"bytes={start}-{offset + length - 1}", **base)
            etag = str(response.get("ETag", ""))
            if version and etag and etag != version:  # a store that ignores If-Match: no byte of it
                response["Body"].close()
                raise _OtherVersion(etag)
            expected = int(response.get("ContentLength", -1))
            with response["Body"] as body:  # a blocking socket: read here, chunk by chunk
                raw = _raw_body(body) if version else None
                if raw is not None:
                    got = _receive_into(body, raw, buffer, length, progress, ticket)
                else:
                    got = 0
                    while progress.done < length:
                        chunk = body.read(min(CHUNK, length - progress.done))
                        if not chunk:
                            break
                        got += len(chunk)

                        def store(at: int, chunk=chunk) -> int:
                            buffer[at:at + len(chunk)] = chunk
                            return len(chunk)

                        progress.deliver(ticket, store)
            if got < expected and progress.done < length:  # broken off: retried, never a short object
                raise IncompleteReadError(actual_bytes=got, expected_bytes=expected)
            return progress.done

        try:
            got = await call_with_retries(self.retry, f"S3 get_object s3://{bucket}/{key}", get, classify,
                                          self._limiter, nbytes=length, progress=progress)
        except _OtherVersion as exc:
            raise StaleVersion(f"changed since version {version} (now {exc}): {uri}") from None
        except ClientError as exc:
            code = _code(exc)
            if code in _CHANGED:
                raise StaleVersion(f"changed since version {version}: {uri}") from exc
            if code in {"InvalidRange", "416"}:
                got = progress.done  # S3 answers 416 only for a start at or past the end of the object
            elif code in _NO_KEY:
                # Deleted since its version was pinned: that version is gone for good, which
                # is a stale version to the caller (refresh metadata), not a missing path.
                if version:
                    raise StaleVersion(f"deleted since version {version}: {uri}") from exc
                raise NotFound(f"no such file: {uri}") from exc
            else:
                raise _failure("get_object", bucket, key, exc) from exc
        except BotoCoreError as exc:
            raise _failure("get_object", bucket, key, exc) from exc
        if got < length:  # past the end of the object (a caller may hold views of the buffer)
            return bytes(memoryview(buffer)[:got])
        return buffer

    async def aclose(self) -> None:
        if self._direct is not None:
            self._direct.close()
        client, self._client = self._client, None
        if client is not None:
            await self._call(client.close)

    # -- writes (the mount's; see base.py) --------------------------------------------

    _copy_part_size = 1 << 30  # ranges of a multipart copy (objects past 5 GiB)
    _single_copy_limit = 5 << 30  # CopyObject's own limit
    _batch = 8  # copies in flight during a directory rename

    async def _write(self, op: str, bucket: str, key: str, **params: Any) -> dict:
        try:
            return await self._api(op, bucket, key, **params)
        except ClientError as exc:
            if _code(exc) == _NO_BUCKET:
                raise NotFound(f"no such bucket: s3://{bucket}") from exc
            raise _failure(op, bucket, key, exc) from exc

    def _condition(self, bucket: str, expect: str | None) -> dict[str, str]:
        """The headers of a conditional write (none where the server does not honour them)."""
        if expect is None or not self._honours.get(bucket, True):
            return {}
        return {"IfNoneMatch": "*"} if expect == NEW else {"IfMatch": expect}

    async def _check_conditions(self, bucket: str) -> bool:
        """Does the server honour conditional writes in `bucket`? Asked once per bucket and
        adapter (i.e. per mount) with a PUT of a probe key that must fail (If-Match on a
        version no object has): a server that honours it answers 412 or 404 and writes
        nothing; one that writes the probe ignores conditions (the probe is deleted).
        A server that ignores them, or refuses them (501), is logged once."""
        if bucket in self._honours:
            return self._honours[bucket]
        probe = f".dorafs-conditional-write-probe-{uuid.uuid4().hex}"
        honoured = True
        try:
            await self._api("put_object", bucket, probe, Key=probe, Body=b"",
                            IfMatch='"00000000000000000000000000000000"')
        except ClientError as exc:
            honoured = _code(exc) not in _UNSUPPORTED
        except DoraError:
            return True  # not known yet: ask again with the next write
        else:
            honoured = False
            try:
                await self._api("delete_object", bucket, probe, Key=probe)
            except (ClientError, DoraError) as exc:
                log.warning("could not delete the probe object s3://%s/%s: %s", bucket, probe, exc)
        if not honoured:
            log.warning("the S3 server of s3://%s does not honour conditional writes: a commit checks the "
                        "object's version just before writing instead (a concurrent writer in between is "
                        "overwritten)", bucket)
        self._honours[bucket] = honoured
        return honoured

    def _refuses_conditions(self, exc: ClientError, bucket: str) -> bool:
        """True (logged once) when the server refused a conditional write as unsupported."""
        if _code(exc) not in _UNSUPPORTED and \
                exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") != 501:
            return False
        if self._honours.get(bucket, True):
            log.warning("the S3 server of s3://%s refuses conditional writes (%s): a commit checks the object's "
                        "version just before writing instead", bucket, _code(exc))
        self._honours[bucket] = False
        return True

    async def _precheck(self, bucket: str, key: str, expect: str | None) -> None:
        """The object is still at `expect` (NEW: absent), by a HEAD: where the server does
        not check the condition itself."""
        if expect is None:
            return
        head = await self._head(bucket, key)  # a store that cannot answer fails the commit (EIO)
        if (head is None) if expect == NEW else (head is not None and str(head.get("ETag", "")) == expect):
            return
        raise await self._conflict(bucket, key, expect)

    async def _current(self, bucket: str, key: str) -> dict | None:
        """HEAD of the object (None if absent), for deciding what a lost write did."""
        try:
            return await self._head(bucket, key)
        except DoraError:
            return None

    async def _conflict(self, bucket: str, key: str, expect: str) -> CommitConflict:
        head = await self._current(bucket, key)
        now = "no object" if head is None else f"version {head.get('ETag', '?')} ({head.get('ContentLength')} bytes)"
        was = "no object" if expect == NEW else f"version {expect}"
        message = f"s3://{bucket}/{key} changed while it was written here: staged from {was}, the store now has {now}"
        log.warning("%s; this commit is refused and the written bytes stay staged", message)
        return CommitConflict(message)

    async def put(self, uri: str, data: bytes, expect: str | None = None) -> FileStatus:
        bucket, key = split_uri(uri)
        digest: list[str] = []

        async def landed(_exc: BaseException | None = None) -> dict | None:
            """The object, if it is exactly `data` (a lost or refused PUT that took effect)."""
            head = await self._current(bucket, key)
            if head is None or int(head.get("ContentLength", -1)) != len(data):
                return None
            if not digest:
                digest.append(await trio.to_thread.run_sync(_md5, data, limiter=self._limiter))
            return head if str(head.get("ETag", "")).strip('"') == digest[0] else None

        while True:
            if expect is not None and not await self._check_conditions(bucket):
                await self._precheck(bucket, key, expect)
            condition = self._condition(bucket, expect)
            try:
                answer = await self._api("put_object", bucket, key, Key=key, Body=data, nbytes=len(data),
                                         idle=self.retry.idle_for(len(data)), settled=landed, **condition)
            except ClientError as exc:
                if condition and self._refuses_conditions(exc, bucket):
                    continue
                if _code(exc) == _NO_BUCKET:
                    raise NotFound(f"no such bucket: s3://{bucket}") from exc
                if _code(exc) in _CHANGED | _NO_KEY and condition:
                    if (head := await landed()) is not None:  # a retry refused: the first had landed
                        return _written(key, len(data), head)
                    raise await self._conflict(bucket, key, expect) from exc
                raise _failure("put_object", bucket, key, exc) from exc
            return _written(key, len(data), answer)

    async def start_upload(self, uri: str, part_size: int, expect: str | None = None) -> Upload:
        bucket, key = split_uri(uri)
        answer = await self._write("create_multipart_upload", bucket, key, Key=key)
        return S3Upload(self, bucket, key, answer["UploadId"], expect)

    async def delete(self, uri: str) -> None:
        bucket, key = split_uri(uri)
        await self._write("delete_object", bucket, key, Key=key)
        await self._keep_parent(bucket, key)

    async def make_dir(self, uri: str) -> None:
        bucket, key = split_uri(uri)
        if key:
            await self._write("put_object", bucket, key, Key=key + "/", Body=b"")

    async def remove_dir(self, uri: str) -> None:
        bucket, key = split_uri(uri)
        await self._write("delete_object", bucket, key, Key=key + "/")
        await self._keep_parent(bucket, key)

    async def _keep_parent(self, bucket: str, key: str) -> None:
        """A directory exists on S3 only through its contents: when removing `key` left
        its parent empty, a marker keeps the parent (as `rm` of a last file would)."""
        parent = key.rpartition("/")[0]
        if not parent:
            return
        listing = await self._list(bucket, parent, Prefix=parent + "/", MaxKeys=1)
        if not listing.get("Contents"):
            await self._write("put_object", bucket, parent, Key=parent + "/", Body=b"")

    async def rename(self, src: str, dst: str, is_dir: bool) -> None:
        src_bucket, src_key = split_uri(src)
        dst_bucket, dst_key = split_uri(dst)
        if not is_dir:
            head = await self._head(src_bucket, src_key)
            if head is None:
                raise NotFound(f"no such file: {src}")
            await self._copy(src_bucket, src_key, dst_bucket, dst_key, int(head["ContentLength"]))
            await self._write("delete_object", src_bucket, src_key, Key=src_key)
        else:
            objects = await self._all_keys(src_bucket, src_key + "/")
            limit = trio.Semaphore(self._batch)

            async def move(key: str, size: int) -> None:
                async with limit:
                    await self._copy(src_bucket, key, dst_bucket, dst_key + key[len(src_key):], size)

            async with trio.open_nursery() as nursery:  # every copy before any delete
                for key, size in objects:
                    nursery.start_soon(move, key, size)
            for start in range(0, len(objects), 1000):
                batch = [{"Key": key} for key, _ in objects[start:start + 1000]]
                await self._write("delete_objects", src_bucket, src_key, Delete={"Objects": batch, "Quiet": True})
        await self._keep_parent(src_bucket, src_key)

    async def _all_keys(self, bucket: str, prefix: str) -> list[tuple[str, int]]:
        found: list[tuple[str, int]] = []
        params: dict[str, Any] = {"Prefix": prefix}
        while True:
            page = await self._list(bucket, prefix, **params)
            found += [(o["Key"], int(o.get("Size", 0))) for o in page.get("Contents", [])]
            if not page.get("IsTruncated"):
                return found
            params["ContinuationToken"] = page["NextContinuationToken"]

    async def _copy(self, src_bucket: str, src_key: str, dst_bucket: str, dst_key: str, size: int) -> None:
        source = {"Bucket": src_bucket, "Key": src_key}
        if size <= self._single_copy_limit:
            await self._write("copy_object", dst_bucket, dst_key, Key=dst_key, CopySource=source,
                              nbytes=size, idle=self.retry.idle_for(size))
            return
        upload = await self.start_upload(f"s3://{dst_bucket}/{dst_key}", self._copy_part_size)
        try:
            for number, start in enumerate(range(0, size, self._copy_part_size), 1):
                end = min(start + self._copy_part_size, size) - 1
                answer = await self._write("upload_part_copy", dst_bucket, dst_key, Key=dst_key,
                                           UploadId=upload.upload_id, PartNumber=number, CopySource=source,
                                           CopySourceRange=f"bytes={start}-{end}", nbytes=end - start + 1,
                                           idle=self.retry.idle_for(end - start + 1))
                upload.parts[number] = (answer["CopyPartResult"]["ETag"], end - start + 1)
            await upload.complete(len(upload.parts))
        except BaseException:
            with trio.CancelScope(shield=True):
                await upload.abort()
            raise


class _OtherVersion(Exception):
    """A GET answered with another version than the one asked for (If-Match ignored)."""


def _md5(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def multipart_etag(part_etags: list[str]) -> str:
    """The ETag S3 gives an object completed from parts with these ETags (no SSE-KMS):
    the MD5 of their binary MD5s, then `-` and the count."""
    joined = b"".join(bytes.fromhex(etag.strip('"')) for etag in part_etags)
    return f'"{hashlib.md5(joined, usedforsecurity=False).hexdigest()}-{len(part_etags)}"'


def _written(key: str, size: int, answer: dict) -> FileStatus:
    """Status of an object just written (mtime: now, in whole seconds, as S3 gives it)."""
    return FileStatus(name=key.rsplit("/", 1)[-1], is_dir=False, size=size, mtime=float(int(time.time())),
                      version=str(answer.get("ETag", "")))


class S3Upload(Upload):
    """A multipart upload: part ETags kept here until `complete` names them all."""

    def __init__(self, ufs: S3Ufs, bucket: str, key: str, upload_id: str, expect: str | None = None):
        self.ufs, self.bucket, self.key, self.upload_id = ufs, bucket, key, upload_id
        self.expect = expect  # the commit's condition (NEW, an ETag, or None)
        self.parts: dict[int, tuple[str, int]] = {}  # number -> (ETag, size)
        self.gone = False  # S3 no longer knows the upload (completed, aborted or expired)

    async def _listed_part(self, number: int) -> tuple[str, int] | None:
        """Part `number` as the server holds it, or None."""
        params: dict[str, Any] = {"Key": self.key, "UploadId": self.upload_id}
        while True:
            try:
                page = await self.ufs._api("list_parts", self.bucket, self.key, **params)
            except (ClientError, DoraError):
                return None
            for part in page.get("Parts", []):
                if int(part["PartNumber"]) == number:
                    return str(part["ETag"]), int(part["Size"])
            if not page.get("IsTruncated"):
                return None
            params["PartNumberMarker"] = page["NextPartNumberMarker"]

    async def put_part(self, number: int, data: bytes) -> None:
        async def landed(_exc: BaseException) -> dict | None:
            """The part, if the server holds exactly these bytes under its number."""
            held = await self._listed_part(number)
            if held is None or held[1] != len(data):
                return None
            digest = await trio.to_thread.run_sync(_md5, data, limiter=self.ufs._limiter)
            return {"ETag": held[0]} if held[0].strip('"') == digest else None

        try:
            answer = await self.ufs._api("upload_part", self.bucket, self.key, Key=self.key,
                                         UploadId=self.upload_id, PartNumber=number, Body=data,
                                         nbytes=len(data), idle=self.ufs.retry.idle_for(len(data)),
                                         settled=landed)
        except ClientError as exc:
            if _code(exc) in _NO_UPLOAD:
                self.gone = True
            raise _failure("upload_part", self.bucket, self.key, exc) from exc
        self.parts[number] = (str(answer["ETag"]), len(data))

    async def complete(self, count: int) -> FileStatus:
        names = [self.parts[n][0] for n in range(1, count + 1)]
        size = sum(self.parts[n][1] for n in range(1, count + 1))
        expected = multipart_etag(names)
        ufs, bucket, key = self.ufs, self.bucket, self.key

        async def landed(_exc: BaseException | None = None) -> dict | None:
            """The object, if it is this upload (a complete whose answer was lost)."""
            head = await ufs._current(bucket, key)
            if head is not None and str(head.get("ETag", "")) == expected and int(head.get("ContentLength", -1)) == size:
                return head
            return None

        parts = [{"PartNumber": n, "ETag": names[n - 1]} for n in range(1, count + 1)]
        while True:
            honoured = self.expect is None or await ufs._check_conditions(bucket)
            condition = ufs._condition(bucket, self.expect)
            if not honoured or "IfMatch" in condition:  # some servers ignore If-Match here (moto)
                await ufs._precheck(bucket, key, self.expect)
            try:
                answer = await ufs._api("complete_multipart_upload", bucket, key, Key=key, UploadId=self.upload_id,
                                        MultipartUpload={"Parts": parts}, nbytes=size, idle=ufs.retry.idle_for(size),
                                        settled=landed, **condition)
            except ClientError as exc:
                code = _code(exc)
                if condition and ufs._refuses_conditions(exc, bucket):
                    continue
                if code in _CHANGED | _NO_UPLOAD | _NO_KEY:
                    if (head := await landed()) is not None:  # an earlier attempt completed it
                        self.gone = True
                        return _written(key, size, head)
                    if code in _NO_UPLOAD:
                        self.gone = True
                    elif condition:
                        raise await ufs._conflict(bucket, key, self.expect) from exc
                if code == _NO_BUCKET:
                    raise NotFound(f"no such bucket: s3://{bucket}") from exc
                raise _failure("complete_multipart_upload", bucket, key, exc) from exc
            self.gone = True
            return _written(key, size, answer)

    async def abort(self) -> None:
        if self.gone:
            return
        try:
            await self.ufs._write("abort_multipart_upload", self.bucket, self.key, Key=self.key,
                                  UploadId=self.upload_id)
        except NotFound:
            pass
        except DoraError as exc:  # S3's lifecycle rules remove what an abort could not
            if "NoSuchUpload" not in str(exc):
                log.warning("could not abort the upload of s3://%s/%s: %s", self.bucket, self.key, exc)
        self.gone = True
