"""The S3 adapter's data path: ranged GETs and HEADs through obstore (Rust object_store).

Why: boto3 spends about 1-2 ms of interpreter time on every request before a byte
arrives (signing, hooks, parsing); obstore spends 0.15-0.4 ms and releases the
interpreter while it waits (bench/README.md, "S3 clients"). Per MiB received obstore
costs more (its buffers, then a copy into the caller's), so the adapter sends HEADs and
GETs of up to `dorafs.ufs.s3.FAST_GET_LIMIT` (4 MiB) here: a cold small file (a HEAD
and a GET) and a random reader's page. A sequential reader's long runs go through
presigned URLs over kept sockets (dorafs.ufs.s3direct); control calls, listings and
writes stay with boto3 (dorafs.ufs.s3).

Subtleties:
- Configuration comes from the boto3 client the adapter already made, so both agree:
  the endpoint (`AWS_ENDPOINT_URL`, `AWS_ENDPOINT_URL_S3`, the config file's
  `endpoint_url`), the region, the CA bundle (`AWS_CA_BUNDLE`, `ca_bundle`) and
  `verify`. Credentials are asked of the boto3 session through `_Credentials`, so every
  source boto3 knows works here too (environment, profiles, SSO, instance roles, web
  identity), refreshed when boto3 refreshes them.
- With an endpoint the store speaks path-style (`endpoint/bucket/key`), as S3-compatible
  servers expect; without one, virtual-hosted style on AWS.
- Retries and timeouts stay dorafs's (`dorafs.ufs.retry`): object_store retries nothing
  (`max_retries` 0); connect and read timeouts are the policy's `timeout` (the read
  timeout counts silence: it restarts with every read from the socket) and the whole
  request has no bound of its own (the caller's deadline grows with the bytes).
- A GET streams: each chunk object_store hands over is copied into the caller's buffer
  (the one copy from the receive buffer) and reported to the `Progress`, so a stall is
  seen as one and a retry asks only for the bytes still missing.
- Errors become botocore's `ClientError` (an HTTP answer, with S3's code where known) or
  `EndpointConnectionError`-like `ConnectionError` (no answer), so `dorafs.ufs.s3`
  interprets every answer in one place whichever client asked.
- A key object_store cannot name (empty or `.`/`..` segments, a trailing `/`) and a
  bucket whose requests it cannot make (an answer that is neither about the object nor
  transient, e.g. a redirect to another region) are read with boto3 instead: `usable()`
  says which; the fallback is logged once per bucket.
"""

from __future__ import annotations

import datetime as _dt
import logging
import re
import threading
from typing import Any

from botocore.exceptions import ClientError, ConnectionError

from dorafs.ufs.retry import Progress, RetryPolicy

log = logging.getLogger(__name__)

CHUNK = 256 * 1024  # the least a streamed chunk holds (object_store joins smaller ones)
_STATUS = re.compile(r"status(?: code)?:? (\d{3})")  # in object_store's message of an HTTP answer
_S3_CODE = re.compile(r"<Code>([A-Za-z]+)</Code>")
# S3 codes for the statuses dorafs.ufs.s3 reads by code.
_CODES = {304: "304", 400: "400", 403: "AccessDenied", 404: "NoSuchKey", 412: "PreconditionFailed",
          416: "InvalidRange", 429: "TooManyRequests", 500: "InternalError", 501: "NotImplemented",
          502: "502", 503: "SlowDown", 504: "504"}


class _Credentials:
    """Credentials for object_store from a boto3 session, whatever their source."""

    refresh = _dt.timedelta(minutes=5)  # how long object_store may keep refreshable ones

    def __init__(self, session: Any):
        self._session = session
        self._lock = threading.Lock()

    def __call__(self) -> dict:
        with self._lock:
            credentials = self._session.get_credentials()
            if credentials is None:
                raise RuntimeError("no AWS credentials found (environment, profile or instance role)")
            frozen = credentials.get_frozen_credentials()  # refreshes them when due
            expires = None
            if hasattr(credentials, "refresh_needed"):  # botocore's RefreshableCredentials
                expires = _dt.datetime.now(_dt.timezone.utc) + self.refresh
            return {"access_key_id": frozen.access_key, "secret_access_key": frozen.secret_key,
                    "token": frozen.token, "expires_at": expires}


class FastPath:
    """obstore stores, one per bucket, configured like the adapter's boto3 client."""

    def __init__(self, retry: RetryPolicy, threads: int):
        self.retry = retry
        self.threads = threads
        self._stores: dict[str, Any] = {}
        self._refused: set[str] = set()  # buckets read with boto3 (logged once)
        self._lock = threading.Lock()
        self._settings: dict | None = None  # from the boto3 client; None: not configured yet
        self.gets = 0  # requests made here (statistics; tests read them)
        self.heads = 0

    @staticmethod
    def available() -> bool:
        try:
            import obstore  # noqa: F401
        except ImportError:  # pragma: no cover - a dependency; its absence is logged by the caller
            return False
        return True

    def configure(self, session: Any, client: Any) -> None:
        """Take endpoint, region and TLS settings from the adapter's boto3 `client`."""
        meta = client.meta
        endpoint = meta.endpoint_url
        custom = not re.match(r"https://s3[.-]([a-z0-9-]+\.)?amazonaws\.com", endpoint or "")
        # The CA bundle as boto3 finds it (AWS_CA_BUNDLE, or `ca_bundle` in the config file).
        ca_file = session._session.get_config_variable("ca_bundle")
        client_options: dict[str, Any] = {
            "connect_timeout": _duration(self.retry.timeout),
            "read_timeout": _duration(self.retry.timeout),
            "timeout": "365d",  # no bound on a whole transfer: dorafs.ufs.retry's deadline is
            "pool_max_idle_per_host": str(self.threads),
            "allow_http": endpoint.startswith("http://") if endpoint else False,
        }
        if ca_file:
            with open(ca_file, "rb") as f:
                client_options["root_certificate"] = f.read()
        self._settings = {
            "endpoint": endpoint if custom else None,
            "region": meta.region_name or "us-east-1",
            "client_options": client_options,
            "credentials": _Credentials(session),
        }

    def usable(self, bucket: str, key: str) -> bool:
        if self._settings is None or bucket in self._refused or not key:
            return False
        parts = key.split("/")
        return all(p not in ("", ".", "..") for p in parts)

    def refuse(self, bucket: str, why: str) -> None:
        if bucket not in self._refused:
            self._refused.add(bucket)
            log.warning("reading s3://%s with boto3 from now on: %s", bucket, why)

    def _store(self, bucket: str) -> Any:
        store = self._stores.get(bucket)
        if store is None:
            with self._lock:
                store = self._stores.get(bucket)
                if store is None:
                    from obstore.store import S3Store

                    s = self._settings
                    assert s is not None
                    config: dict[str, Any] = {"region": s["region"]}
                    if s["endpoint"]:
                        config["endpoint"] = s["endpoint"]
                    else:
                        config["virtual_hosted_style_request"] = True
                    store = S3Store(bucket, config=config, client_options=s["client_options"],
                                    retry_config={"max_retries": 0}, credential_provider=s["credentials"])
                    self._stores[bucket] = store
        return store

    # -- requests (blocking: run in the adapter's threads) -------------------------------

    def get_into(self, bucket: str, key: str, start: int, end: int, version: str, progress: Progress,
                 ticket: int, buffer: bytearray) -> str:
        """Bytes [start, end) of the object streamed into `buffer` at `progress.done`
        onwards (short at the object's end); the answer's ETag."""
        import obstore

        options: dict[str, Any] = {"range": (start, end)}
        if version:
            options["if_match"] = version
        self.gets += 1
        try:
            result = obstore.get(self._store(bucket), key, options=options)
            etag = result.meta.get("e_tag") or ""
            if version and etag and etag != version:
                return etag  # the caller refuses it: a store that ignored If-Match
            for chunk in result.stream(min_chunk_size=CHUNK):
                n = len(chunk)
                if not n:
                    break

                def store(at: int, chunk=chunk, n=n) -> int:
                    n = min(n, len(buffer) - at)
                    buffer[at:at + n] = memoryview(chunk)[:n]
                    return n

                progress.deliver(ticket, store)
                if progress.done >= len(buffer):
                    break
        except Exception as exc:
            raise translate(exc, "GetObject") from exc
        return etag

    def head(self, bucket: str, key: str) -> dict:
        """HEAD as boto3 answers it: ContentLength, LastModified, ETag."""
        import obstore

        self.heads += 1
        try:
            meta = obstore.head(self._store(bucket), key)
        except Exception as exc:
            raise translate(exc, "HeadObject") from exc
        return {"ContentLength": int(meta["size"]), "LastModified": meta["last_modified"],
                "ETag": meta.get("e_tag") or ""}


def translate(exc: BaseException, op: str) -> BaseException:
    """An obstore error as the botocore exception dorafs.ufs.s3 reads."""
    from obstore import exceptions as ox

    status = 0
    if isinstance(exc, (ox.NotFoundError, FileNotFoundError)):  # obstore raises the builtin one
        status = 404
    elif isinstance(exc, ox.PreconditionError):
        status = 412
    elif isinstance(exc, ox.NotModifiedError):
        status = 304
    elif isinstance(exc, (ox.PermissionDeniedError, ox.UnauthenticatedError, PermissionError)):
        status = 403
    elif isinstance(exc, (ox.BaseError, OSError)):  # OSError: a body broken or timed out mid-stream
        found = _STATUS.search(str(exc))
        status = int(found.group(1)) if found else 0
    else:
        return exc  # not obstore's (Abandoned, a bug): as it is
    message = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
    if not status:  # no HTTP answer: the connection failed, timed out or broke
        return ConnectionError(error=message)
    named = _S3_CODE.search(str(exc))
    code = named.group(1) if named else _CODES.get(status, str(status))
    return ClientError({"Error": {"Code": code, "Message": message},
                        "ResponseMetadata": {"HTTPStatusCode": status}}, op)


def _duration(seconds: float) -> str:
    return f"{max(1, int(seconds * 1000))}ms"
