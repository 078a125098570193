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
  bounds them by a deadline and never retries an answer about the object (412, 404...).
- Writes: `put_object` for an object in one piece, a multipart upload for more, aborted
  on failure so no partial object appears. A directory made through the mount is a
  `key/` marker; removing the last entry of a directory puts its marker, so the
  directory stays as it would on a disk. A rename is copy then delete (multipart copy
  past 5 GiB): not atomic, and a directory's objects move one by one.
"""

from __future__ import annotations

import datetime as _dt
import errno as _errno
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import trio
from botocore.exceptions import BotoCoreError, ClientError, ConnectionError, HTTPClientError, IncompleteReadError

from dorafs.errors import DoraError, NotADirectory, NotFound, StaleVersion, UfsError
from dorafs.ufs.base import FileStatus, UnderFileSystem, Upload
from dorafs.ufs.retry import Attempt, RetryPolicy, call_with_retries

log = logging.getLogger(__name__)

T = TypeVar("T")

# Error codes meaning "this key / bucket is not there" (HEAD answers carry only the status).
_NO_KEY = {"NoSuchKey", "404", "NotFound"}
_NO_BUCKET = "NoSuchBucket"
_ACCESS = {"AccessDenied", "403", "Forbidden", "AllAccessDisabled"}
# Answers worth another try: throttling and server-side trouble (any 5xx is retried too).
_TRANSIENT = {"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "TooManyRequests",
              "RequestTimeout", "InternalError", "ServiceUnavailable", "503", "500", "502", "504"}


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
        return Attempt(code in _TRANSIENT or status >= 500 or status == 429, cause)
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


class S3Ufs(UnderFileSystem):
    """One boto3 client (thread-safe) shared by every call, created on first use."""

    _page_size = 1000  # MaxKeys of a listing page; S3's own maximum. Tests lower it.

    def __init__(self, threads: int = 16, retry: RetryPolicy | None = None):
        self._threads = threads
        self.retry = retry or RetryPolicy()
        self._limiter = trio.CapacityLimiter(threads)
        self._client: Any = None
        self._client_lock = trio.Lock()

    # -- plumbing ---------------------------------------------------------------------

    def _make_client(self) -> Any:
        import boto3.session
        from botocore.config import Config

        session = boto3.session.Session()  # endpoint, credentials, profile: AWS config
        return session.client(
            "s3",
            # Local S3-compatible servers need some region; AWS itself ignores a wrong one.
            region_name=session.region_name or "us-east-1",
            config=Config(
                retries={"mode": "standard", "total_max_attempts": 1},  # dorafs.ufs.retry retries
                connect_timeout=self.retry.timeout,
                read_timeout=self.retry.timeout,
                max_pool_connections=self._threads,  # one connection per thread
            ),
        )

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        return await trio.to_thread.run_sync(fn, *args, limiter=self._limiter)

    async def _s3(self) -> Any:
        if self._client is None:
            async with self._client_lock:
                if self._client is None:
                    self._client = await self._call(self._make_client)
        return self._client

    async def _api(self, op: str, bucket: str, key: str, **params: Any) -> dict:
        """Call `client.<op>(Bucket=bucket, **params)` in a thread; `UfsError` on failure
        except for `ClientError`, which the caller interprets first."""
        client = await self._s3()
        try:
            return await call_with_retries(self.retry, f"S3 {op} s3://{bucket}/{key}",
                                           lambda: getattr(client, op)(Bucket=bucket, **params),
                                           classify, self._limiter)
        except BotoCoreError as exc:
            raise _failure(op, bucket, key, exc) from exc

    async def _head(self, bucket: str, key: str) -> dict | None:
        """head_object, or None if there is no such key."""
        try:
            return await self._api("head_object", bucket, key, Key=key)
        except ClientError as exc:
            if _code(exc) in _NO_KEY:
                return None
            raise _failure("head_object", bucket, key, exc) from exc

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

    async def list_pages(self, uri: str) -> AsyncIterator[list[FileStatus]]:
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

    async def read(self, uri: str, offset: int, length: int, version: str) -> bytes:
        if length <= 0:
            return b""
        bucket, key = split_uri(uri)
        params: dict[str, Any] = {"Key": key, "Range": f"bytes={offset}-{offset + length - 1}"}
        if version:
            params["IfMatch"] = version
        client = await self._s3()

        def get() -> tuple[str, bytes]:
            response = client.get_object(Bucket=bucket, **params)
            with response["Body"] as body:  # read fully here: the body is a blocking socket
                return str(response.get("ETag", "")), body.read()

        try:
            etag, data = await call_with_retries(self.retry, f"S3 get_object s3://{bucket}/{key}", get,
                                                 classify, self._limiter)
        except ClientError as exc:
            code = _code(exc)
            if code in {"PreconditionFailed", "412"}:
                raise StaleVersion(f"changed since version {version}: {uri}") from exc
            if code in {"InvalidRange", "416"}:
                return b""  # S3 answers 416 only for a start at or past the end of the object
            if code in _NO_KEY:
                # Deleted since its version was pinned: that version is gone for good, which
                # is a stale version to the caller (refresh metadata), not a missing path.
                if version:
                    raise StaleVersion(f"deleted since version {version}: {uri}") from exc
                raise NotFound(f"no such file: {uri}") from exc
            raise _failure("get_object", bucket, key, exc) from exc
        except BotoCoreError as exc:
            raise _failure("get_object", bucket, key, exc) from exc
        if version and etag and etag != version:  # a store that ignores If-Match
            raise StaleVersion(f"changed since version {version}: {uri}")
        return data

    async def aclose(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await self._call(client.close)

    # -- writes (the mount's; see base.py) --------------------------------------------

    min_part_size = 5 << 20  # S3's smallest part but the last
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

    async def put(self, uri: str, data: bytes) -> FileStatus:
        bucket, key = split_uri(uri)
        answer = await self._write("put_object", bucket, key, Key=key, Body=data)
        return _written(key, len(data), answer)

    async def start_upload(self, uri: str, part_size: int) -> Upload:
        bucket, key = split_uri(uri)
        answer = await self._write("create_multipart_upload", bucket, key, Key=key)
        return S3Upload(self, bucket, key, answer["UploadId"])

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
            await self._write("copy_object", dst_bucket, dst_key, Key=dst_key, CopySource=source)
            return
        upload = await self.start_upload(f"s3://{dst_bucket}/{dst_key}", self._copy_part_size)
        try:
            for number, start in enumerate(range(0, size, self._copy_part_size), 1):
                end = min(start + self._copy_part_size, size) - 1
                answer = await self._write("upload_part_copy", dst_bucket, dst_key, Key=dst_key,
                                           UploadId=upload.upload_id, PartNumber=number, CopySource=source,
                                           CopySourceRange=f"bytes={start}-{end}")
                upload.parts[number] = (answer["CopyPartResult"]["ETag"], end - start + 1)
            await upload.complete(len(upload.parts))
        except BaseException:
            with trio.CancelScope(shield=True):
                await upload.abort()
            raise


def _written(key: str, size: int, answer: dict) -> FileStatus:
    """Status of an object just written (mtime: now, in whole seconds, as S3 gives it)."""
    return FileStatus(name=key.rsplit("/", 1)[-1], is_dir=False, size=size, mtime=float(int(time.time())),
                      version=str(answer.get("ETag", "")))


class S3Upload(Upload):
    """A multipart upload: part ETags kept here until `complete` names them all."""

    def __init__(self, ufs: S3Ufs, bucket: str, key: str, upload_id: str):
        self.ufs, self.bucket, self.key, self.upload_id = ufs, bucket, key, upload_id
        self.parts: dict[int, tuple[str, int]] = {}  # number -> (ETag, size)

    async def put_part(self, number: int, data: bytes) -> None:
        answer = await self.ufs._write("upload_part", self.bucket, self.key, Key=self.key, UploadId=self.upload_id,
                                       PartNumber=number, Body=data)
        self.parts[number] = (str(answer["ETag"]), len(data))

    async def complete(self, count: int) -> FileStatus:
        parts = [{"PartNumber": n, "ETag": self.parts[n][0]} for n in range(1, count + 1)]
        answer = await self.ufs._write("complete_multipart_upload", self.bucket, self.key, Key=self.key,
                                       UploadId=self.upload_id, MultipartUpload={"Parts": parts})
        return _written(self.key, sum(self.parts[n][1] for n in range(1, count + 1)), answer)

    async def abort(self) -> None:
        try:
            await self.ufs._write("abort_multipart_upload", self.bucket, self.key, Key=self.key,
                                  UploadId=self.upload_id)
        except DoraError as exc:  # S3's lifecycle rules remove what an abort could not
            log.warning("could not abort the upload of s3://%s/%s: %s", self.bucket, self.key, exc)
