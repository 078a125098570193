"""The S3 clients bench/s3clients.py compares, behind one small interface, and the checks of
what dorafs relies on (If-Match, credentials and endpoint from the environment, profiles).

Each client answers `get(key, start, length, slot, if_match) -> (nbytes, etag)`,
`head(key) -> (size, etag)`, `read_back(...)` (the bytes, for the checks) and
`batch(ops, concurrency)`, which runs a list of operations one or several at a time.
`slot` names the buffer (or file) that one in-flight request owns.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

from servers import S3Server

BUCKET = "bench"
PREFIX = "s3clients"
KIB, MIB = 1024, 1024 * 1024
LARGE = 8 * MIB  # the largest range measured: the size of a preallocated buffer
REGION = "us-east-1"


def content(seed: int, size: int) -> bytes:
    """Deterministic bytes, distinct per object (the checks compare them)."""
    block = (seed.to_bytes(4, "little") + bytes(range(256)))[:256] * (64 * KIB // 256)
    return (block * (size // len(block) + 1))[:size]


class Precondition(Exception):
    """The store refused a conditional GET (412): the object changed since its ETag."""


class ThreadedClient:
    """A synchronous client: eight at once is eight threads, each with its own slot."""

    name = ""

    def __init__(self, server: S3Server, workdir: Path):
        self.server = server
        self.keep: list = [None] * 8  # the last body of each slot (a fill would write it out)
        self.pool = ThreadPoolExecutor(8, thread_name_prefix=self.name)

    def get(self, key: str, start: int, length: int, slot: int = 0, if_match: str | None = None) -> tuple[int, str]:
        raise NotImplementedError

    def head(self, key: str) -> tuple[int, str]:
        raise NotImplementedError

    def read_back(self, key: str, start: int, length: int, if_match: str | None = None) -> tuple[bytes, str]:
        """The bytes of a range (for the checks)."""
        n, etag = self.get(key, start, length, 0, if_match)
        return bytes(self.keep[0][:n]), etag

    def batch(self, ops: list[tuple], concurrency: int) -> int:
        def run(part: list[tuple], slot: int) -> int:
            total = 0
            for op in part:
                if op[0] == "head":
                    self.head(op[1])
                else:
                    n, _ = self.get(op[1], op[2], op[3], slot)
                    if n != op[3]:
                        raise RuntimeError(f"{self.name}: {n} bytes for a {op[3]}-byte range of {op[1]}")
                    total += n
            return total

        if concurrency == 1:
            return run(ops, 0)
        parts = [ops[i::concurrency] for i in range(concurrency)]
        return sum(f.result() for f in [self.pool.submit(run, part, i) for i, part in enumerate(parts)])

    def close(self) -> None:
        self.pool.shutdown()


def boto3_client(endpoint: str | None, key: str | None, secret: str | None):
    import boto3.session
    from botocore.config import Config

    session = boto3.session.Session()  # with no arguments: environment, profiles, instance role
    kwargs = {} if key is None else {"aws_access_key_id": key, "aws_secret_access_key": secret}
    return session.client("s3", endpoint_url=endpoint, region_name=session.region_name or REGION,
                          config=Config(max_pool_connections=16,
                                        retries={"mode": "standard", "total_max_attempts": 1}), **kwargs)


def boto3_error_is_412(exc: Exception) -> bool:
    from botocore.exceptions import ClientError

    if not isinstance(exc, ClientError):
        return False
    code = str(exc.response.get("Error", {}).get("Code", ""))
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return code in {"PreconditionFailed", "412"} or status == 412


class Boto3(ThreadedClient):
    name = "boto3"

    def __init__(self, server: S3Server, workdir: Path, client=None):
        super().__init__(server, workdir)
        self.s3 = client or boto3_client(server.endpoint, server.key, server.secret)

    def _get(self, key: str, start: int, length: int, if_match: str | None):
        params = {"Bucket": BUCKET, "Key": key, "Range": f"bytes={start}-{start + length - 1}"}
        if if_match:
            params["IfMatch"] = if_match
        try:
            return self.s3.get_object(**params)
        except Exception as exc:
            if boto3_error_is_412(exc):
                raise Precondition(str(exc)) from exc
            raise

    def get(self, key, start, length, slot=0, if_match=None):
        response = self._get(key, start, length, if_match)
        with response["Body"] as body:
            self.keep[slot] = body.read()
        return len(self.keep[slot]), response["ETag"]

    def head(self, key):
        r = self.s3.head_object(Bucket=BUCKET, Key=key)
        return r["ContentLength"], r["ETag"]


class Boto3Readinto(Boto3):
    name = "boto3-readinto"

    def __init__(self, server: S3Server, workdir: Path, client=None):
        super().__init__(server, workdir, client)
        self.keep = [bytearray(LARGE) for _ in range(8)]  # preallocated, reused

    def get(self, key, start, length, slot=0, if_match=None):
        response = self._get(key, start, length, if_match)
        view = memoryview(self.keep[slot])[:length]
        got = 0
        with response["Body"] as body:
            while got < length:
                n = body.readinto(view[got:])
                if n == 0:
                    break
                got += n
        return got, response["ETag"]


class _Delivered:
    """What dorafs.ufs.s3direct reports each received piece to (a `Progress` without
    the trio loop behind it): the bytes delivered so far."""

    def __init__(self) -> None:
        self.done = 0

    def deliver(self, ticket: int, store) -> int:
        n = store(self.done)
        self.done += n
        return n


class Presigned(ThreadedClient):
    """dorafs's own long GETs (dorafs/ufs/s3direct.py): a URL boto3 presigns, sent over a
    kept socket, the body received straight into a preallocated buffer."""

    name = "presigned"

    def __init__(self, server: S3Server, workdir: Path, session=None):
        super().__init__(server, workdir)
        import boto3.session
        from botocore.config import Config

        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
        from dorafs.ufs.retry import RetryPolicy
        from dorafs.ufs.s3direct import DirectGets

        self.keep = [bytearray(LARGE) for _ in range(8)]  # preallocated, reused
        with EnvVars(AWS_ENDPOINT_URL=server.endpoint if session is None else os.environ.get("AWS_ENDPOINT_URL")):
            session = session or boto3.session.Session(aws_access_key_id=server.key,
                                                       aws_secret_access_key=server.secret, region_name=REGION)
            self.s3 = session.client("s3", region_name=session.region_name or REGION,
                                     config=Config(max_pool_connections=16))
            self.direct = DirectGets(RetryPolicy(), 8)
            self.direct.configure(session, self.s3)

    def get(self, key, start, length, slot=0, if_match=None):
        from botocore.exceptions import ClientError

        delivered = _Delivered()
        try:
            etag = self.direct.get_into(BUCKET, key, start, start + length, if_match or "", delivered, 0,
                                        memoryview(self.keep[slot])[:length])
        except ClientError as exc:
            if boto3_error_is_412(exc):
                raise Precondition(str(exc)) from exc
            raise
        if if_match and etag and etag != if_match:
            raise Precondition(f"answered {etag}")
        return delivered.done, etag

    def head(self, key):  # boto3's (dorafs sends its HEADs through obstore)
        r = self.s3.head_object(Bucket=BUCKET, Key=key)
        return r["ContentLength"], r["ETag"]

    def close(self) -> None:
        super().close()
        self.direct.close()


class Obstore(ThreadedClient):
    name = "obstore"

    def __init__(self, server: S3Server, workdir: Path, store=None):
        super().__init__(server, workdir)
        from obstore.store import S3Store

        self.store = store or S3Store(BUCKET, endpoint=server.endpoint, access_key_id=server.key,
                                      secret_access_key=server.secret, region=REGION,
                                      client_options={"allow_http": True})

    def get(self, key, start, length, slot=0, if_match=None):
        import obstore
        from obstore.exceptions import PreconditionError

        options = {"range": (start, start + length)}
        if if_match:
            options["if_match"] = if_match
        try:
            result = obstore.get(self.store, key, options=options)
            data = result.bytes()  # Rust-owned buffer; the transfer ran without the GIL
        except PreconditionError as exc:
            raise Precondition(str(exc)) from exc
        self.keep[slot] = data
        return len(data), result.meta["e_tag"] or ""

    def head(self, key):
        import obstore

        meta = obstore.head(self.store, key)
        return meta["size"], meta["e_tag"] or ""


class ObstoreFile(Obstore):
    """obstore, then the body written to a file as a fill would (open with O_TRUNC, write, close)."""

    name = "obstore-file"

    def __init__(self, server: S3Server, workdir: Path, store=None):
        super().__init__(server, workdir, store)
        self.files = [workdir / f"obstore-{os.getpid()}-{i}.bin" for i in range(8)]

    def get(self, key, start, length, slot=0, if_match=None):
        n, etag = super().get(key, start, length, slot, if_match)
        fd = os.open(self.files[slot], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            view = memoryview(self.keep[slot])
            done = 0
            while done < n:  # os.write releases the interpreter while the kernel copies
                done += os.write(fd, view[done:])
        finally:
            os.close(fd)
        return n, etag

    def read_back(self, key, start, length, if_match=None):
        n, etag = self.get(key, start, length, 0, if_match)
        return self.files[0].read_bytes(), etag

    def close(self) -> None:
        super().close()
        for f in self.files:
            f.unlink(missing_ok=True)


class Crt:
    """awscrt's S3 client: meta-requests in flight at once, completed on its own threads."""

    name = "crt-mem"
    to_file = False

    def __init__(self, server: S3Server, workdir: Path, endpoint: str | None = None, provider=None):
        from awscrt import auth, s3

        endpoint = endpoint or server.endpoint
        url = urlsplit(endpoint)
        self.host = url.netloc  # the CRT connects to the Host header's host and port
        if provider is None:
            provider = auth.AwsCredentialsProvider.new_static(server.key, server.secret)
        signing = s3.create_default_s3_signing_config(region=REGION, credential_provider=provider)
        tls = s3.S3RequestTlsMode.DISABLED if url.scheme == "http" else s3.S3RequestTlsMode.ENABLED
        self.client = s3.S3Client(region=REGION, signing_config=signing, tls_mode=tls,
                                  part_size=LARGE)  # one request per 8 MiB range
        self.buffers = [bytearray(LARGE) for _ in range(8)]
        self.files = [workdir / f"crt-{os.getpid()}-{i}.bin" for i in range(8)]

    def _request(self, method: str, key: str, headers: list[tuple[str, str]], slot: int,
                 done: Callable[[object], None] | None = None, start: int = 0):
        from awscrt import http, s3

        request = http.HttpRequest(method, f"/{BUCKET}/{key}", http.HttpHeaders([("Host", self.host)] + headers))
        answer = {"status": None, "headers": {}}

        def on_headers(status_code, headers, **kwargs):
            answer["status"] = status_code
            answer["headers"] = {k.lower(): v for k, v in headers}

        kwargs = {"on_headers": on_headers}
        if method == "HEAD":
            kwargs.update(type=s3.S3RequestType.DEFAULT, operation_name="HeadObject")
        elif self.to_file:
            kwargs.update(type=s3.S3RequestType.GET_OBJECT, recv_filepath=str(self.files[slot]))
        else:
            view = memoryview(self.buffers[slot])
            base = start  # on_body's offset counts from the object's start, not the range's

            def on_body(chunk, offset, **kwargs):
                at = offset - base
                view[at:at + len(chunk)] = chunk

            kwargs.update(type=s3.S3RequestType.GET_OBJECT, on_body=on_body)
        meta = self.client.make_request(request=request, **kwargs)
        if done is not None:
            meta.finished_future.add_done_callback(lambda fut: done(fut))
        return meta, answer

    def get(self, key, start, length, slot=0, if_match=None):
        from awscrt.s3 import S3ResponseError

        headers = [("Range", f"bytes={start}-{start + length - 1}")]
        if if_match:
            headers.append(("If-Match", if_match))
        meta, answer = self._request("GET", key, headers, slot, start=start)
        try:
            meta.finished_future.result()
        except S3ResponseError as exc:
            if exc.status_code == 412:
                raise Precondition(f"HTTP 412 {exc.name}") from exc
            raise
        return int(answer["headers"].get("content-length", 0)), answer["headers"].get("etag", "")

    def read_back(self, key, start, length, if_match=None):
        n, etag = self.get(key, start, length, 0, if_match)
        if self.to_file:
            return self.files[0].read_bytes(), etag
        return bytes(self.buffers[0][:n]), etag

    def head(self, key):
        meta, answer = self._request("HEAD", key, [], 0)
        meta.finished_future.result()
        return int(answer["headers"].get("content-length", 0)), answer["headers"].get("etag", "")

    def batch(self, ops, concurrency):
        """Keep `concurrency` meta-requests in flight; the caller's thread only waits."""
        free = list(range(concurrency))
        lock = threading.Condition()
        errors: list[BaseException] = []
        total = 0
        for op in ops:
            with lock:
                while not free:
                    lock.wait()
                slot = free.pop()

            def done(fut, slot=slot):
                with lock:
                    if fut.exception() is not None:
                        errors.append(fut.exception())
                    free.append(slot)
                    lock.notify()

            if op[0] == "head":
                self._request("HEAD", op[1], [], slot, done)
            else:
                self._request("GET", op[1], [("Range", f"bytes={op[2]}-{op[2] + op[3] - 1}")], slot, done,
                              start=op[2])
                total += op[3]
        with lock:
            while len(free) < concurrency:
                lock.wait()
        if errors:
            raise errors[0]
        return total

    def close(self) -> None:
        for f in self.files:
            f.unlink(missing_ok=True)


class CrtFile(Crt):
    name = "crt-file"
    to_file = True


CLIENTS: dict[str, Callable[[S3Server, Path], object]] = {
    "boto3": Boto3, "boto3-readinto": Boto3Readinto, "crt-mem": Crt, "crt-file": CrtFile, "obstore": Obstore,
    "obstore-file": ObstoreFile, "presigned": Presigned,
}


def available(name: str) -> str | None:
    """None when the client's package imports, else why not."""
    module = {"crt-mem": "awscrt.s3", "crt-file": "awscrt.s3", "obstore": "obstore",
              "obstore-file": "obstore"}.get(name, "boto3")
    try:
        __import__(module)
        return None
    except ImportError as exc:
        return f"{exc} (bench/setup.sh installs it)"


# -- the checks -------------------------------------------------------------------------------


class EnvVars:
    """Set (or, with None, remove) environment variables for a block; restore after."""

    def __init__(self, **values: str | None):
        self.values = values
        self.saved: dict[str, str | None] = {}

    def __enter__(self):
        for k, v in self.values.items():
            self.saved[k] = os.environ.get(k)
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v

    def __exit__(self, *exc):
        for k, v in self.saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


AWS_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL",
            "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_CONFIG_FILE",
            "AWS_SHARED_CREDENTIALS_FILE", "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_ALLOW_HTTP",
            "AWS_EC2_METADATA_DISABLED")


def client_from_environment(name: str, server: S3Server, workdir: Path):
    """The client built as dorafs would build it, with no credentials or endpoint passed in."""
    if name.startswith("boto3"):
        cls = Boto3Readinto if name == "boto3-readinto" else Boto3
        return cls(server, workdir, client=boto3_client(None, None, None))
    if name == "presigned":
        import boto3.session

        return Presigned(server, workdir, session=boto3.session.Session())
    if name.startswith("crt"):
        from awscrt import auth

        # The CRT reads no AWS_ENDPOINT_URL: the caller takes it from the environment.
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ["AWS_ENDPOINT_URL"]
        cls = CrtFile if name == "crt-file" else Crt
        return cls(server, workdir, endpoint=endpoint, provider=auth.AwsCredentialsProvider.new_default_chain())
    from obstore.store import S3Store

    cls = ObstoreFile if name == "obstore-file" else Obstore
    return cls(server, workdir, store=S3Store(BUCKET, client_options={"allow_http": True}))


def client_from_profile(name: str, server: S3Server, workdir: Path):
    """A named profile (AWS_PROFILE) and the endpoint from the environment."""
    if name.startswith("boto3") or name.startswith("crt") or name == "presigned":
        return client_from_environment(name, server, workdir)  # their default chains read profiles
    from obstore.auth.boto3 import Boto3CredentialProvider
    from obstore.store import S3Store
    import boto3.session

    # object_store reads no profiles itself; obstore's bridge asks a boto3 session.
    provider = Boto3CredentialProvider(boto3.session.Session())
    cls = ObstoreFile if name == "obstore-file" else Obstore
    return cls(server, workdir, store=S3Store(BUCKET, client_options={"allow_http": True},
                                                  credential_provider=provider))


def attempt(fn: Callable[[], object]) -> tuple[bool, str]:
    try:
        value = fn()
        return True, str(value)[:80]
    except Exception as exc:
        return False, f"{type(exc).__name__}: {str(exc).splitlines()[0][:100] if str(exc) else ''}"


def run_checks(name: str, server: S3Server, workdir: Path, client) -> dict[str, str]:
    """What dorafs relies on, tried on this server. Each value starts with ok / FAIL / n/a."""
    checks: dict[str, str] = {}
    admin = server.client()
    key = f"{PREFIX}/check/{name}"
    first, second = content(1001, 300 * KIB), content(1002, 300 * KIB)
    admin.put_object(Bucket=BUCKET, Key=key, Body=first)
    etag = admin.head_object(Bucket=BUCKET, Key=key)["ETag"]

    data, got_etag = client.read_back(key, 1000, 200 * KIB)
    checks["bytes"] = "ok" if data == first[1000:1000 + 200 * KIB] and got_etag == etag else \
        f"FAIL: {len(data)} bytes, etag {got_etag!r} (want {etag!r})"
    size, head_etag = client.head(key)
    checks["head"] = "ok" if (size, head_etag) == (len(first), etag) else f"FAIL: {size} {head_etag!r}"
    ok, why = attempt(lambda: client.read_back(key, 0, 64 * KIB, if_match=etag))
    checks["if-match same"] = "ok" if ok else f"FAIL: {why}"

    admin.put_object(Bucket=BUCKET, Key=key, Body=second)  # the object changes
    try:
        data, new_etag = client.read_back(key, 0, 64 * KIB, if_match=etag)
        if new_etag != etag:
            checks["if-match changed"] = ("n/a: server ignored If-Match (200, new ETag in the answer; "
                                          "comparing it catches the change)")
        else:
            checks["if-match changed"] = "FAIL: old ETag served after a change"
    except Precondition as exc:
        checks["if-match changed"] = f"ok: 412 ({str(exc)[:60]})"
    except Exception as exc:
        checks["if-match changed"] = f"FAIL: {type(exc).__name__}: {str(exc)[:80]}"

    # Credentials and endpoint from the environment only.
    env = {v: None for v in AWS_VARS}
    env.update(AWS_ACCESS_KEY_ID=server.key, AWS_SECRET_ACCESS_KEY=server.secret, AWS_ENDPOINT_URL=server.endpoint,
               AWS_DEFAULT_REGION=REGION, AWS_EC2_METADATA_DISABLED="true",
               AWS_CONFIG_FILE=str(workdir / "absent"), AWS_SHARED_CREDENTIALS_FILE=str(workdir / "absent"))
    with EnvVars(**env):
        ok, why = attempt(lambda: client_from_environment(name, server, workdir).read_back(key, 0, 4 * KIB)[0]
                          == second[:4 * KIB] or "wrong bytes")
    checks["env credentials+endpoint"] = "ok" if ok and why == "True" else f"FAIL: {why}"

    # A named profile in a config file, no keys in the environment.
    profiles = workdir / "aws-credentials"
    profiles.write_text(f"[dorafs-bench]\naws_access_key_id = {server.key}\n"
                        f"aws_secret_access_key = {server.secret}\n")
    config = workdir / "aws-config"
    config.write_text(f"[profile dorafs-bench]\nregion = {REGION}\n")
    env = {v: None for v in AWS_VARS}
    env.update(AWS_PROFILE="dorafs-bench", AWS_SHARED_CREDENTIALS_FILE=str(profiles),
               AWS_CONFIG_FILE=str(config), AWS_ENDPOINT_URL=server.endpoint, AWS_EC2_METADATA_DISABLED="true")
    with EnvVars(**env):
        ok, why = attempt(lambda: client_from_profile(name, server, workdir).read_back(key, 0, 4 * KIB)[0]
                          == second[:4 * KIB] or "wrong bytes")
    via = " (through obstore.auth.boto3)" if name.startswith("obstore") else ""
    checks["profile"] = ("ok" + via) if ok and why == "True" else f"FAIL: {why}"

    # The key from the environment is the one sent: an unknown key id is refused. (s3rver
    # checks the key id of a V4 signature but not the signature; moto checks neither.)
    if server.name == "s3rver":
        env = {v: None for v in AWS_VARS}
        env.update(AWS_ACCESS_KEY_ID="UNKNOWNKEY", AWS_SECRET_ACCESS_KEY=server.secret,
                   AWS_ENDPOINT_URL=server.endpoint, AWS_DEFAULT_REGION=REGION, AWS_EC2_METADATA_DISABLED="true",
                   AWS_CONFIG_FILE=str(workdir / "absent"), AWS_SHARED_CREDENTIALS_FILE=str(workdir / "absent"))
        with EnvVars(**env):
            ok, why = attempt(lambda: client_from_environment(name, server, workdir).read_back(key, 0, 4 * KIB))
        checks["unknown key refused"] = f"ok: {why[:70]}" if not ok else "FAIL: served with an unknown key"
    return checks
