"""The S3 adapter's long ranged GETs: a URL boto3 signs, sent over a kept socket, the
body received straight into the caller's buffer.

Why: boto3 spends about 4 ms of interpreter time on every GET here before a byte
arrives (building, signing and parsing through its hooks), and its body comes through
http.client's buffered reader, a few Python calls per socket read; obstore receives into
buffers of its own, which the caller then copies. Per 8 MiB GET on s3rver: boto3 10.7
CPU-ms, obstore 14.6, a presigned URL read this way 5.1 (bench/README.md, "Long GETs
over a kept socket"). So a fill's long run (a sequential reader's readahead, a Parquet
reader's column chunks) comes here; HEADs and short GETs stay with obstore
(dorafs.ufs.s3fast), listings and writes with boto3 (dorafs.ufs.s3).

How: boto3 presigns a GetObject URL (Signature Version 4, valid for `EXPIRES`, used
for further GETs of the object for `URL_REUSE`): credentials, endpoint, addressing style
and region are boto3's, from the same session as the adapter's client, so every
credential source users configure for boto3 works, refreshed when boto3 refreshes them
(botocore renews temporary credentials 10-15 minutes before they expire, longer than a
URL is reused; a 403 to a reused URL is asked again with a new one). `Range` and `If-Match` go as plain
headers (a presigned URL signs only `host`). The answer is read here: its head parsed,
its body received with `recv_into` into the caller's buffer a `CHUNK` at a time (one
`recv` call with MSG_WAITALL on a plain socket), each chunk reported to the `Progress`.

Subtleties:
- Only for reads pinned to a version (`dorafs.ufs.s3` sends the others elsewhere): an
  attempt abandoned while its `recv_into` waits may still write into the buffer once
  bytes come, at offsets the next attempt delivered too; with If-Match they are the
  same bytes.
- Pinned reads: a store that ignores If-Match is caught by comparing the answer's ETag,
  as `dorafs.ufs.s3` does for boto3's answers; the answer's Content-Range must start
  where the read asked, else the bucket is read with boto3 from then on.
- Retries and timeouts stay dorafs's (`dorafs.ufs.retry`): a socket waits at most `TICK`
  per receive (SO_RCVTIMEO, or the TLS socket's timeout), so a slow but moving body
  reports what came at least that often and the caller's stall watch sees progress;
  `RetryPolicy.timeout` of silence fails the attempt here too. Errors are botocore's
  `ClientError` (an answer, with S3's code parsed from its XML body) or an `OSError`
  (no answer, a broken connection), which `dorafs.ufs.s3` interprets as it does
  boto3's; a body cut short is an `IncompleteReadError`, retried from the bytes received.
- Sockets are kept per origin (`threads` at most) for the next GET. One closed by the
  server while idle is found readable before it is used and dropped; one the server
  closed just as a request went out (no byte of an answer) is retried once on a new
  socket. A socket goes back only after a whole answer was read: never after an error,
  an abandoned attempt or a short read.
- Not used (boto3 reads instead, logged once) where the request is not a plain one:
  an HTTP proxy configured for the endpoint, an answer about the request rather than
  the object (a redirect to another region, 400, 501: that bucket only), a chunked
  body.
"""

from __future__ import annotations

import logging
import re
import select
import socket
import ssl
import struct
import threading
import time
import urllib.request
from collections import OrderedDict
from typing import Any
from urllib.parse import urlsplit

from botocore.exceptions import ClientError, IncompleteReadError

from dorafs.ufs.retry import Abandoned, Progress, RetryPolicy

log = logging.getLogger(__name__)

CHUNK = 1 << 20  # received and reported in pieces of this size (a page)
TICK = 0.25  # seconds a receive waits at most before reporting what came
EXPIRES = 900  # seconds a presigned URL is valid for
URL_REUSE = 60  # seconds one is used for further GETs of its object (well within EXPIRES and a token's life)
URLS_KEPT = 4096  # objects whose URLs are kept
HEAD_LIMIT = 64 << 10  # the longest answer head accepted
_CODE = re.compile(rb"<Code>([^<]{1,100})</Code>")
_MESSAGE = re.compile(rb"<Message>([^<]{0,300})</Message>")
_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


class Refused(Exception):
    """The store answered in a way this path does not read (boto3 reads instead)."""


class _Closed(Exception):
    """A kept socket closed before any byte of the answer: the request goes again."""


class DirectGets:
    """Presigned GETs over kept sockets, for one adapter's boto3 session."""

    def __init__(self, retry: RetryPolicy, threads: int):
        self.retry = retry
        self.threads = threads
        self.tick = min(TICK, retry.timeout / 4)
        self._session: Any = None  # the adapter's boto3 session and client (`configure`)
        self._client: Any = None
        self._signer: Any = None  # a boto3 client that presigns (Signature Version 4), made on first use
        self._making = threading.Lock()
        self._tls: ssl.SSLContext | None = None
        self._idle: dict[tuple[str, str, int], list[socket.socket]] = {}
        self._lock = threading.Lock()
        self._refused: set[str] = set()
        self._urls: OrderedDict[tuple[str, str], tuple[Any, float]] = OrderedDict()  # (bucket, key) -> (URL, signed at)
        self._proxied = False
        self._broken = False  # the signing client or TLS context could not be made
        self.gets = 0  # requests made here (statistics; tests read them)
        self.connections = 0  # sockets opened

    def configure(self, session: Any, client: Any) -> None:
        """Sign with `session` as the adapter's `client` is configured, but always with
        Signature Version 4 (what every current S3 region and compatible store takes).
        The signing client and the TLS context are made at the first GET (`_ready`):
        making them here would double the time the adapter's first call takes (a
        mount's first look at its root)."""
        meta = client.meta
        self._session, self._client = session, client
        endpoint = urlsplit(meta.endpoint_url)
        proxies = urllib.request.getproxies()
        if meta.config.proxies or (proxies.get(endpoint.scheme) and not urllib.request.proxy_bypass(endpoint.hostname or "")):
            self._proxied = True
            log.info("long S3 reads go through boto3: a proxy is configured for %s", endpoint.netloc)

    def _ready(self) -> Any:
        """The signing client, made on first use (with the TLS context, for an https
        endpoint only)."""
        signer = self._signer
        if signer is None:
            from botocore.config import Config

            with self._making:
                if self._signer is None:
                    meta = self._client.meta
                    ca_file = None
                    try:
                        ca_file = self._session._session.get_config_variable("ca_bundle")
                        if urlsplit(meta.endpoint_url).scheme == "https":  # (loading the CAs costs 30-60 ms of CPU)
                            self._tls = ssl.create_default_context(cafile=ca_file) if ca_file else ssl.create_default_context()
                        self._signer = self._session.client(
                            "s3", region_name=meta.region_name, config=meta.config.merge(Config(signature_version="s3v4")))
                    except Exception as exc:  # an unreadable CA bundle...: boto3 reads, and says why
                        self._broken = True
                        log.warning("long S3 reads go through boto3 (presigned GETs cannot be set up: %s%s)",
                                    exc, f"; CA bundle {ca_file}" if ca_file else "")
                        raise Refused(str(exc)) from exc
                signer = self._signer
        return signer

    def usable(self, bucket: str) -> bool:
        return self._session is not None and not self._proxied and not self._broken and bucket not in self._refused

    def refuse(self, bucket: str, why: str) -> None:
        if bucket not in self._refused:
            self._refused.add(bucket)
            log.warning("reading s3://%s with boto3 from now on: %s", bucket, why)

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, {}
        for socks in idle.values():
            for sock in socks:
                sock.close()

    # -- a request (blocking: runs in the adapter's threads) -------------------------

    def get_into(self, bucket: str, key: str, start: int, end: int, version: str, progress: Progress,
                 ticket: int, buffer: Any) -> str:
        """Bytes [start, end) of the object streamed into `buffer` at `progress.done`
        onwards (short at the object's end); the answer's ETag. `Refused` when the
        store's answer is not one this path reads."""
        url, reused = self._url(bucket, key, fresh=False)
        try:
            return self._get_into(url, bucket, start, end, version, progress, ticket, buffer)
        except ClientError as exc:
            if not reused or exc.response["ResponseMetadata"]["HTTPStatusCode"] != 403:
                raise
        # Refused with a URL signed a while ago (credentials rotated, a clock that jumped):
        # once more with one signed now, which is what boto3 would send.
        url, _ = self._url(bucket, key, fresh=True)
        return self._get_into(url, bucket, start, end, version, progress, ticket, buffer)

    def _url(self, bucket: str, key: str, fresh: bool) -> tuple[Any, bool]:
        """The object's presigned URL, split, and whether it was signed before: one
        signed within `URL_REUSE` seconds is used again (signing costs 0.3-1 ms of
        interpreter time, most of a short GET's), unless `fresh`."""
        now = time.monotonic()
        with self._lock:
            cached = self._urls.get((bucket, key))
        if cached is not None and not fresh and now - cached[1] < URL_REUSE:
            return cached[0], True
        url = urlsplit(self._ready().generate_presigned_url(
            "get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=EXPIRES))
        with self._lock:
            self._urls[(bucket, key)] = (url, now)
            self._urls.move_to_end((bucket, key))
            while len(self._urls) > URLS_KEPT:
                self._urls.popitem(last=False)
        return url, False

    def _get_into(self, url: Any, bucket: str, start: int, end: int, version: str, progress: Progress,
                  ticket: int, buffer: Any) -> str:
        origin = (url.scheme, url.hostname or "", url.port or (443 if url.scheme == "https" else 80))
        request = (f"GET {url.path}{'?' + url.query if url.query else ''} HTTP/1.1\r\nHost: {url.netloc}\r\n"
                   f"Range: bytes={start}-{end - 1}\r\n" + (f"If-Match: {version}\r\n" if version else "")
                   + "User-Agent: dorafs\r\n\r\n").encode()
        self.gets += 1
        sock, kept = self._socket(origin)
        try:
            try:
                status, fields, rest = self._exchange(sock, request)
            except _Closed:
                if not kept:
                    raise ConnectionResetError("the store closed the connection before answering") from None
                sock.close()  # closed by the server while we asked: once more, on a new socket
                sock, kept = self._socket(origin, fresh=True)
                status, fields, rest = self._exchange(sock, request)
            if status not in (200, 206):
                raise self._error(sock, status, fields, rest, bucket)
            etag = fields.get("etag", "")
            if version and etag and etag != version:
                sock.close()
                return etag  # the caller refuses it: a store that ignored If-Match
            if "transfer-encoding" in fields or "content-length" not in fields:
                raise Refused(f"a GET answered without a length ({fields.get('transfer-encoding', 'no length')})")
            length = int(fields["content-length"])
            if status == 206:
                found = _RANGE.fullmatch(fields.get("content-range", ""))
                if found is None or int(found.group(1)) != start:
                    raise Refused(f"a GET of bytes {start}- answered {fields.get('content-range')!r}")
            elif start:
                raise Refused("the store ignored a GET's Range")
            whole = self._body(sock, origin[0] == "https", rest, length, buffer, progress, ticket)
            if whole and fields.get("connection", "").lower() != "close":
                self._keep(origin, sock)
            else:
                sock.close()
            return etag
        except Refused as exc:
            sock.close()
            self.refuse(bucket, str(exc))
            raise
        except BaseException:
            sock.close()
            raise

    def _socket(self, origin: tuple[str, str, int], fresh: bool = False) -> tuple[socket.socket, bool]:
        """A socket to `origin`: a kept one still open, else a new one; and whether it was kept."""
        if not fresh:
            with self._lock:
                idle = self._idle.get(origin) or []
                while idle:
                    sock = idle.pop()
                    # Readable while idle: the server closed it (or sent what nobody asked for).
                    if not select.select([sock], [], [], 0)[0]:
                        return sock, True
                    sock.close()
        scheme, host, port = origin
        sock = socket.create_connection((host, port), timeout=self.retry.timeout)
        self.connections += 1
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if scheme == "https":
                assert self._tls is not None
                sock = self._tls.wrap_socket(sock, server_hostname=host)
                sock.settimeout(self.tick)
            else:  # blocking, each receive bounded by the kernel: MSG_WAITALL takes a whole chunk
                sock.settimeout(None)
                tick = struct.pack("ll", int(self.tick), int(self.tick % 1 * 1e6))
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tick)
                sent = struct.pack("ll", int(self.retry.timeout), int(self.retry.timeout % 1 * 1e6))
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, sent)
        except BaseException:
            sock.close()
            raise
        return sock, False

    def _keep(self, origin: tuple[str, str, int], sock: socket.socket) -> None:
        with self._lock:
            idle = self._idle.setdefault(origin, [])
            if len(idle) < self.threads:
                idle.append(sock)
                return
        sock.close()

    def _exchange(self, sock: socket.socket, request: bytes) -> tuple[int, dict[str, str], bytes]:
        """Send `request`; the answer's status, fields (lowercase names) and the bytes
        received past its head."""
        data = b""
        quiet = time.monotonic()
        try:
            sock.sendall(request)
        except (BrokenPipeError, ConnectionResetError):
            raise _Closed() from None
        while True:
            try:
                chunk = sock.recv(16384)
            except (BlockingIOError, TimeoutError):
                if time.monotonic() - quiet >= self.retry.timeout:
                    raise TimeoutError(f"no answer within {self.retry.timeout:g}s") from None
                continue
            except ConnectionResetError:
                if data:
                    raise
                raise _Closed() from None
            if not chunk:
                if not data:
                    raise _Closed()
                raise ConnectionResetError("the store closed the connection inside an answer's head")
            data += chunk
            end = data.find(b"\r\n\r\n")
            if end >= 0:
                break
            if len(data) > HEAD_LIMIT:
                raise ConnectionError("an answer's head longer than 64 KiB")
        lines = data[:end].decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
            raise ConnectionError(f"not an HTTP answer: {lines[0][:80]!r}")
        fields: dict[str, str] = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            fields[name.strip().lower()] = value.strip()
        if parts[0] == "HTTP/1.0" and fields.get("connection", "").lower() != "keep-alive":
            fields["connection"] = "close"
        return int(parts[1]), fields, data[end + 4:]

    def _body(self, sock: socket.socket, tls: bool, rest: bytes, length: int, buffer: Any,
              progress: Progress, ticket: int) -> bool:
        """Receive an answer's body of `length` bytes (`rest` already in) into `buffer`
        at `progress.done` onwards, each piece reported; True when the whole body was
        read (the socket can serve another request)."""
        view = memoryview(buffer)
        room = len(view) - progress.done
        want = min(length, room)  # a longer body (a store that answered more) is cut here
        got = 0
        if rest:
            piece = rest[:want]
            self._deliver(progress, ticket, view, piece, len(piece), progress.done)
            got = len(piece)
        quiet = time.monotonic()
        while got < want:
            at = progress.done
            target = view[at:at + min(CHUNK, want - got)]
            try:
                n = _receive(sock, target, tls, self.tick)
            except (BlockingIOError, TimeoutError):
                n = -1
            if n == 0:
                raise IncompleteReadError(actual_bytes=got, expected_bytes=length)
            if n < 0:
                if time.monotonic() - quiet >= self.retry.timeout:
                    raise TimeoutError(f"no byte of the body for {self.retry.timeout:g}s")
                continue
            self._deliver(progress, ticket, view, None, n, at)
            got += n
            quiet = time.monotonic()
        return got == length

    @staticmethod
    def _deliver(progress: Progress, ticket: int, view: memoryview, piece: bytes | None, n: int,
                 at: int) -> None:
        """Report `n` bytes received at `at` in `view` (`piece`: bytes to put there first)."""
        def store(now: int) -> int:
            if now != at:  # another attempt delivered meanwhile: this one was abandoned
                raise Abandoned()
            if piece is not None:
                view[now:now + n] = piece
            return n

        progress.deliver(ticket, store)

    def _error(self, sock: socket.socket, status: int, fields: dict[str, str], rest: bytes,
               bucket: str) -> BaseException:
        """The exception for an answer that is not the object's bytes; the socket is
        closed (its framing is not read further)."""
        body = rest
        want = min(int(fields.get("content-length") or 0), 16384)
        try:
            while len(body) < want:
                chunk = sock.recv(want - len(body))
                if not chunk:
                    break
                body += chunk
        except OSError:
            pass
        sock.close()
        found = _CODE.search(body)
        code = found.group(1).decode("latin-1") if found else str(status)
        said = _MESSAGE.search(body)
        message = said.group(1).decode("latin-1") if said else ""
        if status in (301, 307, 400, 501):
            return Refused(f"{status} {code} {message}".strip())
        return ClientError({"Error": {"Code": code, "Message": message},
                            "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")


def _receive(sock: socket.socket, view: memoryview, tls: bool, tick: float) -> int:
    """Receive into `view` until it is full, `tick` went by with bytes in, or the peer
    closed (0); raises BlockingIOError/TimeoutError when nothing came within `tick`."""
    if not tls:  # one call: the kernel fills it, or returns what came by SO_RCVTIMEO
        return sock.recv_into(view, len(view), socket.MSG_WAITALL)
    got = 0
    began = time.monotonic()
    while got < len(view):
        try:
            n = sock.recv_into(view[got:])
        except (BlockingIOError, TimeoutError):
            if got:
                return got
            raise
        if not n:
            return got
        got += n
        if time.monotonic() - began >= tick:
            break
    return got
