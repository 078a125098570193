"""Security: the cluster secret, TLS, the worker's URI checks, mount permissions, credentials.

Real daemons and mounts on loopback (moto for S3); a test CA made with trustme. The
fuzzing of the worker API lives in test_security_fuzz.py.
"""

from __future__ import annotations

import errno
import os
import re
import secrets
import shutil
import socket
import ssl
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx
import pytest
import trio
import trustme

from dorafs.config import ConfigError, load_config
from dorafs.security import Credentials, client_context, read_secret
from tests.cluster import REFUSED, REPO, ProcessSet, _env
from tests.support import wait_for

MiB = 1 << 20


# -- fixtures: a CA made here, a secret file --------------------------------------------

@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    """A test CA and a server certificate for 127.0.0.1; paths to the PEM files."""
    root = tmp_path_factory.mktemp("tls")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    paths = {"ca": root / "ca.pem", "cert": root / "cert.pem", "key": root / "key.pem"}
    ca.cert_pem.write_to_path(str(paths["ca"]))
    cert.cert_chain_pems[0].write_to_path(str(paths["cert"]))
    for blob in cert.cert_chain_pems[1:]:
        blob.write_to_path(str(paths["cert"]), append=True)
    cert.private_key_pem.write_to_path(str(paths["key"]))
    os.chmod(paths["key"], 0o600)
    return paths


def write_secret(directory: Path, value: str | None = None, mode: int = 0o600) -> tuple[Path, str]:
    value = value or secrets.token_hex(32)
    path = directory / f"secret-{secrets.token_hex(4)}"
    path.write_text(value + "\n")
    os.chmod(path, mode)
    return path, value


def bearer(secret: str) -> dict:
    return {"Authorization": f"Bearer {secret}"}


# -- the secret: where it may come from ---------------------------------------------------

def test_secret_file_must_be_owner_only_and_never_shows_in_the_error(tmp_path):
    path, value = write_secret(tmp_path, mode=0o640)
    with pytest.raises(ConfigError) as info:
        read_secret(path, env={})
    assert "chmod 600" in str(info.value) and value not in str(info.value) and "\n" not in str(info.value)
    os.chmod(path, 0o600)
    assert read_secret(path, env={}) == value.encode()
    assert read_secret(None, env={"DORAFS_SECRET": value}) == value.encode()
    assert read_secret(None, env={}) is None
    with pytest.raises(ConfigError, match="at least 16"):
        read_secret(None, env={"DORAFS_SECRET": "short"})
    with pytest.raises(ConfigError, match="printable ASCII"):
        read_secret(None, env={"DORAFS_SECRET": "a secret with spaces in it"})
    assert value not in repr(Credentials(value.encode(), None))


def test_daemons_refuse_a_readable_secret_file_and_have_no_secret_flag(tmp_path):
    path, value = write_secret(tmp_path, mode=0o644)
    for program in ("worker.main", "registry.main"):
        result = subprocess.run([sys.executable, "-m", program, "--secret-file", str(path),
                                 "--listen", "127.0.0.1:0", "--cache-dir" if program == "worker.main" else "--state-dir",
                                 str(tmp_path / program)], capture_output=True, text=True, env=_env(), cwd=REPO,
                                timeout=60)
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "accessible to group or others" in lines[0] and value not in lines[0]
        # The secret itself cannot be given on a command line at all.
        result = subprocess.run([sys.executable, "-m", program, "--secret", value], capture_output=True,
                                text=True, env=_env(), cwd=REPO, timeout=60)
        assert result.returncode == 2 and "unrecognized arguments" in result.stderr
    # Nor as a mount option or a config key.
    with pytest.raises(ConfigError, match="unknown key mount.secret"):
        load_config("mount", {"secret": value}, env={})


# -- authentication on every endpoint ----------------------------------------------------

WORKER_ENDPOINTS = [("GET", "/v1/page?uri=s3://b/k&version=v&size=10&index=0"), ("GET", "/v1/stat?uri=s3://b/k"),
                    ("GET", "/v1/locate?uri=s3://b/k&version=v&size=10&index=0&count=2"),
                    ("GET", "/v1/list?uri=s3://b"), ("GET", "/v1/info"), ("GET", "/metrics"),
                    ("HEAD", "/v1/info"), ("GET", "/no/such/endpoint"), ("POST", "/v1/info")]
REGISTRY_ENDPOINTS = [("POST", "/v1/workers"), ("POST", "/v1/heartbeat"), ("POST", "/v1/deregister"),
                      ("GET", "/v1/workers"), ("GET", "/v1/workers?since=0&wait=1"), ("GET", "/metrics"),
                      ("GET", "/no/such/endpoint")]


def _refused_everywhere(base: str, endpoints, good: str, **options) -> None:
    wrong = secrets.token_hex(32)
    for method, path in endpoints:
        for headers in ({}, bearer(wrong), {"Authorization": f"Basic {good}"}, bearer(good[:-1]),
                        bearer(good + "x"), {"Authorization": good}):
            response = httpx.request(method, base + path, headers=headers, json={"id": "x"}, timeout=10, **options)
            assert response.status_code == 401, (method, path, headers, response.text)
            if method != "HEAD":
                assert response.json()["errno"] == "EACCES"
            assert good not in response.text and wrong not in response.text
    assert httpx.get(base + "/healthz", timeout=10, **options).status_code == 200


def test_every_endpoint_but_healthz_needs_the_secret(procs, tmp_path):
    procs.allow = (REFUSED,)
    secret_path, secret = write_secret(tmp_path)
    registry = procs.registry(extra=["--secret-file", str(secret_path)], http={"headers": bearer(secret)})
    worker = procs.worker(registry=registry.url, extra=["--secret-file", str(secret_path)],
                          http={"headers": bearer(secret)})
    wait_for(lambda: len(registry.workers()) == 1, what="the worker registered with its token")

    _refused_everywhere(f"http://{worker.address}", WORKER_ENDPOINTS, secret)
    _refused_everywhere(registry.url, REGISTRY_ENDPOINTS, secret)

    # With the secret the same requests are answered.
    info = httpx.get(f"http://{worker.address}/v1/info", headers=bearer(secret), timeout=10)
    assert info.status_code == 200 and info.json()["address"] == worker.address
    assert "dorafs_worker_pages" in httpx.get(f"http://{worker.address}/metrics", headers=bearer(secret),
                                               timeout=10).text
    assert httpx.get(f"http://{worker.address}/no/such", headers=bearer(secret), timeout=10).status_code == 404

    # Each refusal is logged, naming the path and never a token.
    for proc in (worker, registry):
        text = proc.log_text()
        assert re.search(r"WARNING .*refused GET /metrics from 127\.0\.0\.1:\d+: (no|a wrong) cluster secret", text)
        assert secret not in text
        assert not re.search(r"Bearer [0-9a-f]{8}", text)


def test_metrics_can_be_open_or_on_their_own_port(procs, tmp_path):
    procs.allow = (REFUSED,)
    secret_path, secret = write_secret(tmp_path)
    # metrics_auth=false: /metrics is open on the main port, the API is not.
    registry = procs.registry(extra=["--secret-file", str(secret_path)], env={"DORAFS_REGISTRY_METRICS_AUTH": "false"},
                              http={"headers": bearer(secret)})
    assert httpx.get(f"{registry.url}/metrics", timeout=10).status_code == 200
    assert httpx.get(f"{registry.url}/v1/workers", timeout=10).status_code == 401
    # metrics_listen: a second plain port with only /metrics and /healthz; the main one stays protected.
    from tests.support import free_port

    port = free_port()
    worker = procs.worker(extra=["--secret-file", str(secret_path), "--metrics-listen", f"127.0.0.1:{port}"],
                          http={"headers": bearer(secret)})
    wait_for(lambda: "metrics on" in worker.log_text(), what="the metrics listener")
    assert "dorafs_worker_pages" in httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=10).status_code == 200
    assert httpx.get(f"http://127.0.0.1:{port}/v1/info", timeout=10).status_code == 404
    assert httpx.get(f"http://127.0.0.1:{port}/v1/stat?uri=file:///etc/passwd", timeout=10).status_code == 404
    assert httpx.get(f"http://{worker.address}/metrics", timeout=10).status_code == 401


def test_admin_presents_the_secret_and_fails_in_one_line_without_it(procs, tmp_path):
    procs.allow = (REFUSED,)
    secret_path, secret = write_secret(tmp_path)
    registry = procs.registry(extra=["--secret-file", str(secret_path)], http={"headers": bearer(secret)})
    procs.worker(registry=registry.url, extra=["--secret-file", str(secret_path)], http={"headers": bearer(secret)})
    wait_for(lambda: len(registry.workers()) == 1, what="the worker registered")
    admin = [sys.executable, "-m", "dorafs.cli.admin", "--registry", registry.url]
    env = {k: v for k, v in _env().items() if not k.startswith("DORAFS_SECRET")}
    ok = subprocess.run([*admin, "--secret-file", str(secret_path), "report", "--json"], capture_output=True,
                        text=True, env=env, timeout=60)
    assert ok.returncode == 0, ok.stderr
    assert '"pages"' in ok.stdout
    refused = subprocess.run([*admin, "workers"], capture_output=True, text=True, env=env, timeout=60)
    assert refused.returncode == 1
    assert len(refused.stderr.strip().splitlines()) == 1 and "HTTP 401" in refused.stderr


# -- TLS -----------------------------------------------------------------------------------

def test_tls_cluster_end_to_end(procs, tmp_path, tls, s3_server, bucket):
    """Registry, worker and mount all on TLS with the secret; bytes arrive intact through the worker."""
    procs.allow = (REFUSED, r"WARNING dorafs\.membership\.registry .* registry https://\S+ unreachable "
                            r"\(HTTP 401: missing or wrong cluster secret\); keeping the last known 0 workers")
    secret_path, secret = write_secret(tmp_path)
    data = os.urandom(3 * MiB + 12345)
    s3_server.client().put_object(Bucket=bucket, Key="tls/data.bin", Body=data)
    server_tls = ["--secret-file", str(secret_path), "--tls-cert", str(tls["cert"]), "--tls-key", str(tls["key"])]
    verify = ssl.create_default_context(cafile=str(tls["ca"]))
    http = {"headers": bearer(secret), "verify": verify}
    registry = procs.registry(extra=server_tls, http=http)
    assert registry.url.startswith("https://")
    worker = procs.worker(registry=registry.url, extra=[*server_tls, "--tls-ca", str(tls["ca"])], http=http)
    wait_for(lambda: len(registry.workers()) == 1, what="the worker registered over TLS")
    mount = procs.mount(f"s3://{bucket}/tls", registry=registry.url,
                        options=f"secret_file={secret_path},tls_ca={tls['ca']},direct_io")
    assert mount.path("data.bin").read_bytes() == data
    assert worker.counter("dorafs_worker_bytes_served_total") >= len(data)  # through the worker, not around it
    assert "ufs_fallback" not in mount.log_text()

    # The admin CLI over https with the CA and the secret.
    admin = subprocess.run([sys.executable, "-m", "dorafs.cli.admin", "--registry", registry.url, "--tls-ca",
                            str(tls["ca"]), "--secret-file", str(secret_path), "report", "--json"],
                           capture_output=True, text=True, env=_env(), timeout=60)
    assert admin.returncode == 0, admin.stderr
    assert worker.address in admin.stdout

    # A mount without the secret gets no worker list and no page from the workers: it
    # reads the UFS with its own credentials, the worker serves it nothing.
    served = worker.counter("dorafs_worker_bytes_served_total")
    outsider = procs.mount(f"s3://{bucket}/tls", registry=registry.url, options=f"tls_ca={tls['ca']},direct_io",
                           env={"DORAFS_SECRET": ""})
    assert outsider.path("data.bin").read_bytes() == data
    assert worker.counter("dorafs_worker_bytes_served_total") == served
    assert re.search(r"registry https://\S+ unreachable \(HTTP 401: missing or wrong cluster secret\)",
                     outsider.log_text())


def test_tls_page_bodies_without_sendfile_and_plain_http_fails_cleanly(procs, tmp_path, tls):
    """Cached pages go out in chunks through TLS (not sendfile); plain HTTP to the TLS port is dropped."""
    secret_path, secret = write_secret(tmp_path)
    root = tmp_path / "data"
    root.mkdir()
    data = os.urandom(2 * MiB + 99)
    (root / "f.bin").write_bytes(data)
    worker = procs.worker(extra=["--secret-file", str(secret_path), "--tls-cert", str(tls["cert"]),
                                 "--tls-key", str(tls["key"]), "--ufs-roots", f"file://{root}"])
    host, port = worker.address.rsplit(":", 1)

    async def read_twice():
        from dorafs.client.workers import WorkerClient
        from dorafs.ufs import FsspecUfs

        ufs = FsspecUfs("file")
        status = await ufs.stat(f"file://{root}/f.bin")
        client = WorkerClient(timeout=10, connect_timeout=5,
                              credentials=Credentials(secret.encode(), client_context(tls["ca"])))
        try:
            pages = []
            for _ in range(2):  # a miss (bytes in memory), then a hit (the page file, chunked through TLS)
                pages.append(b"".join([bytes(await client.page(worker.address, f"file://{root}/f.bin",
                                                               status.version, status.size, i, MiB))
                                       for i in range(3)]))
            return pages
        finally:
            await client.aclose()

    cold, warm = trio.run(read_twice)
    assert cold == data and warm == data
    hits = httpx.get(f"https://{worker.address}/metrics", headers=bearer(secret),
                     verify=ssl.create_default_context(cafile=str(tls["ca"])), timeout=10).text
    assert re.search(r'dorafs_worker_page_requests_total\{result="hit"\} 3\.0', hits)

    # Plain HTTP to the TLS port: no HTTP answer, the connection is closed, the worker goes on.
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        received = b""
        while chunk := sock.recv(4096):
            received += chunk
        assert not received.startswith(b"HTTP/")
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://{worker.address}/healthz", timeout=10)
    # A client that does not trust the test CA refuses the worker's certificate.
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(f"https://{worker.address}/healthz", timeout=10)
    assert httpx.get(f"https://{worker.address}/healthz", verify=ssl.create_default_context(cafile=str(tls["ca"])),
                     timeout=10).status_code == 200
    assert "TLS handshake with 127.0.0.1" in worker.log_text()


def test_tls_client_to_a_plain_port_fails_cleanly(procs, tls):
    worker = procs.worker()

    async def fetch():
        from dorafs.client.transport import Transport, TransportError

        transport = Transport(timeout=5, connect_timeout=5, credentials=Credentials(None, client_context(tls["ca"])))
        try:
            with pytest.raises(TransportError, match="unreachable"):
                await transport.get(worker.address, "/healthz", {})
        finally:
            await transport.aclose()

    trio.run(fetch)
    assert httpx.get(f"http://{worker.address}/healthz", timeout=10).status_code == 200


# -- the worker's URI checks and UFS roots --------------------------------------------------

@pytest.mark.parametrize("uri", [
    "file:///data/../etc/passwd", "file:///data/./x", "file:///data//x", "s3://b/a/../../x", "s3://b/./k",
    "file:///data/x\x00y", "file:///data/\n", "s3://" + "b/" + "k" * 1025, "file:///" + "a/" * 3000,
    "noscheme", "://x", "1abc://x", "file:..",
])
def test_check_uri_refuses_hostile_uris(uri):
    from dorafs.errors import InvalidRequest
    from worker.access import check_uri

    with pytest.raises(InvalidRequest):
        check_uri(uri)


def test_ufs_roots_confine_the_worker_even_through_symlinks(tmp_path):
    from dorafs.errors import PermissionDenied
    from worker.access import UfsRoots, check_uri

    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "link").symlink_to("/etc")
    (root / "inner").symlink_to(root / "sub")
    roots = UfsRoots([f"file://{root}", "s3://bucket/prefix"])

    async def check():
        assert await roots.check(check_uri(f"file://{root}/sub/x")) == f"file://{root}/sub/x"
        assert await roots.check(f"file://{root}/inner/x")
        assert await roots.check("s3://bucket/prefix") and await roots.check("s3://bucket/prefix/k")
        for uri in (f"file://{root}/link/passwd", f"file://{root}-other/x", "file:///etc/passwd",
                    "s3://bucket/prefix2/k", "s3://bucket", "s3://other/prefix/k", "memory:///x"):
            with pytest.raises(PermissionDenied):
                await roots.check(uri)
        assert await UfsRoots([]).check("file:///etc/passwd")  # no roots: the open default

    trio.run(check)


def test_embedded_worker_demands_a_secret_and_stays_below_the_mount_root(procs, tmp_path):
    procs.allow = (REFUSED,)
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.txt").write_text("hello")
    cache = tmp_path / "embedded-cache"
    mount = procs.mount(f"file://{data}", options=f"cache_dir={cache}")
    assert mount.path("a.txt").read_text() == "hello"
    address = (cache / "worker.addr").read_text().strip()
    secret_file = cache / "worker.secret"
    assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600 and stat.S_IMODE(cache.stat().st_mode) == 0o700
    secret = secret_file.read_text().strip()
    pid = int(re.search(r"embedded worker pid (\d+)", mount.log_text()).group(1))
    assert secret not in Path(f"/proc/{pid}/cmdline").read_bytes().decode()
    assert secret not in Path(f"/proc/{pid}/environ").read_bytes().decode()
    assert httpx.get(f"http://{address}/v1/stat", params={"uri": "file:///etc/passwd"}, timeout=10).status_code == 401
    outside = httpx.get(f"http://{address}/v1/stat", params={"uri": "file:///etc/passwd"}, headers=bearer(secret),
                        timeout=10)
    assert outside.status_code == 403 and outside.json()["errno"] == "EACCES"
    inside = httpx.get(f"http://{address}/v1/stat", params={"uri": f"file://{data}/a.txt"}, headers=bearer(secret),
                       timeout=10)
    assert inside.status_code == 200 and inside.json()["size"] == 5
    mount.unmount()
    assert not secret_file.exists() and not (cache / "worker.addr").exists()


# -- hostile object keys in the mount's namespace ------------------------------------------

def test_hostile_keys_cannot_escape_the_mount(procs, s3_server, bucket):
    s3 = s3_server.client()
    keys = {
        "data/ok.txt": b"ok",
        "data/../escape.txt": b"escape", "data/../../etc/passwd": b"root:x:0:0",
        "data/./dot.txt": b"dot", "data//empty-segment.txt": b"empty", "data/sub//x": b"x",
        "data/" + "n" * 300: b"long", "data/sub/" + "m" * 256 + "/deep.txt": b"deep",
        "data/trailing/": b"", "data/sub/real.txt": b"real", "data/..": b"dotdot-file", "data/.": b"dot-file",
        "../outside.txt": b"outside",
    }
    for key, body in keys.items():
        s3.put_object(Bucket=bucket, Key=key, Body=body)
    worker = procs.worker(extra=["--ufs-roots", f"s3://{bucket}/data"])
    mount = procs.mount(f"s3://{bucket}/data", workers=[worker.address])
    root = mount.mountpoint.resolve()
    assert sorted(os.listdir(root)) == ["ok.txt", "sub", "trailing"]
    assert sorted(os.listdir(root / "sub")) == ["real.txt"]
    assert os.listdir(root / "trailing") == []
    seen = []
    for directory, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(directory, name)
            assert os.path.realpath(path).startswith(str(root) + "/")
            seen.append(path.relative_to(root).as_posix())
    assert sorted(seen) == ["ok.txt", "sub", "sub/real.txt", "trailing"]
    assert (root / "ok.txt").read_bytes() == b"ok" and (root / "sub/real.txt").read_bytes() == b"real"
    # Names the kernel cannot show are not there, whatever the path says.
    with pytest.raises(OSError) as info:
        os.stat(root / ("n" * 300))
    assert info.value.errno == errno.ENAMETOOLONG  # a name over NAME_MAX, as a local disk answers
    for name in ("escape.txt", "dot.txt", "empty-segment.txt"):
        assert not (root / name).exists()
    # `..` from the mount root is the kernel's: the directory holding the mount point.
    assert os.stat(root / "..").st_ino == os.stat(root.parent).st_ino
    # And the worker refuses those keys by URI too.
    for uri in (f"s3://{bucket}/data/../escape.txt", f"s3://{bucket}/data/./dot.txt",
                f"s3://{bucket}/data//empty-segment.txt", f"s3://{bucket}/outside.txt"):
        status = httpx.get(f"http://{worker.address}/v1/stat", params={"uri": uri}, timeout=10).status_code
        assert status in (400, 403), uri


# -- file modes: cache directory, page files, the mount's permission options ---------------

def test_cache_directory_is_0700_and_cached_files_0600(procs, tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    (root / "f.bin").write_bytes(os.urandom(MiB + 5))
    cache = tmp_path / "preexisting-cache"
    cache.mkdir(mode=0o755)
    os.chmod(cache, 0o755)
    worker = procs.worker(name="modes", extra=["--cache-dir", str(cache)])
    mount = procs.mount(f"file://{root}", workers=[worker.address])
    assert len(mount.path("f.bin").read_bytes()) == MiB + 5
    assert stat.S_IMODE(os.stat(cache).st_mode) == 0o700
    # A mount on this machine read it: its pages went into its object file, with their sums.
    cached = [p for p in (cache / "pages").glob("??/*") if p.is_file()] + \
        [p for p in (cache / "objects").glob("??/*") if p.is_file()]
    assert sorted(p.suffix for p in cached) == ["", ".sums"]
    for path in cached:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
        assert stat.S_IMODE(path.parent.stat().st_mode) & 0o077 == 0


NOBODY = 65534
OTHER = 65533  # a uid with no account: nobody's files are not its files


def as_user(uid: int, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", *argv],
                          capture_output=True, text=True, timeout=60)


@pytest.fixture
def open_dir():
    """A directory every user can traverse (pytest's tmp dirs are root-only)."""
    path = Path(tempfile.mkdtemp(prefix="dorafs-perm-"))
    os.chmod(path, 0o755)
    with ProcessSet(path) as procs:
        yield path, procs
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root and setpriv")
def test_mount_permission_options_are_enforced_by_the_kernel(open_dir):
    base, procs = open_dir
    data = base / "data"
    (data / "sub").mkdir(parents=True)
    (data / "sub" / "f.txt").write_text("secret bytes")
    for path in (data, data / "sub"):
        os.chmod(path, 0o755)
    os.chmod(data / "sub" / "f.txt", 0o644)
    worker = procs.worker()

    # Owned by nobody, private to nobody: nobody reads, another user is refused, root reads.
    private = procs.mount(f"file://{data}", workers=[worker.address],
                          options=f"allow_other,default_permissions,uid={NOBODY},gid={NOBODY},"
                                  "file_mode=0600,dir_mode=0700")
    path = private.path("sub", "f.txt")
    st = os.stat(path)
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (NOBODY, NOBODY, 0o600)
    assert stat.S_IMODE(os.stat(private.path("sub")).st_mode) == 0o700
    assert as_user(NOBODY, "cat", str(path)).stdout == "secret bytes"
    refused = as_user(OTHER, "cat", str(path))
    assert refused.returncode != 0 and "Permission denied" in refused.stderr
    refused = as_user(OTHER, "ls", str(private.mountpoint))
    assert refused.returncode != 0 and "Permission denied" in refused.stderr
    assert path.read_text() == "secret bytes"  # root

    # Readable modes, but no allow_other: FUSE itself keeps every other user out.
    own = procs.mount(f"file://{data}", workers=[worker.address], options="file_mode=0644,dir_mode=0755")
    assert own.path("sub", "f.txt").read_text() == "secret bytes"
    refused = as_user(NOBODY, "cat", str(own.path("sub", "f.txt")))
    assert refused.returncode != 0 and "Permission denied" in refused.stderr

    # Group access through gid: a member of the group reads, others do not.
    group = procs.mount(f"file://{data}", workers=[worker.address],
                        options=f"allow_other,uid=0,gid={OTHER},file_mode=0640,dir_mode=0755")
    assert as_user(OTHER, "cat", str(group.path("sub", "f.txt"))).stdout == "secret bytes"
    refused = as_user(NOBODY, "cat", str(group.path("sub", "f.txt")))
    assert refused.returncode != 0 and "Permission denied" in refused.stderr


def test_mode_options_are_parsed_and_checked():
    config = load_config("mount", {"file_mode": "0640", "dir_mode": "750", "uid": "1000", "gid": "0"}, env={},
                         ufs_uri="s3://b", mountpoint=Path("/"))
    assert (config.file_mode, config.dir_mode, config.uid, config.gid) == (0o640, 0o750, 1000, 0)
    for key, value in (("file_mode", "0999"), ("file_mode", "rw-r--r--"), ("dir_mode", "077777"), ("uid", "-1")):
        with pytest.raises(ConfigError, match=f"mount.{key}"):
            load_config("mount", {key: value}, env={})


# -- credentials never leave the process ---------------------------------------------------

def test_credentials_appear_in_no_log_state_file_or_response(procs, tmp_path, s3_server, bucket, monkeypatch):
    procs.allow = (REFUSED,)
    aws_secret = "AWSSECRET" + secrets.token_hex(16)
    aws_key = "AKIA" + secrets.token_hex(8).upper()
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", aws_secret)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", aws_key)
    secret_path, secret = write_secret(tmp_path)
    s3_server.client().put_object(Bucket=bucket, Key="cred/f.bin", Body=os.urandom(MiB + 1))
    registry = procs.registry(extra=["--secret-file", str(secret_path)], http={"headers": bearer(secret)})
    worker = procs.worker(registry=registry.url, extra=["--secret-file", str(secret_path)],
                          http={"headers": bearer(secret)})
    wait_for(lambda: len(registry.workers()) == 1, what="the worker registered")
    mount = procs.mount(f"s3://{bucket}/cred", registry=registry.url, options=f"secret_file={secret_path}")
    assert len(mount.path("f.bin").read_bytes()) == MiB + 1
    with pytest.raises(FileNotFoundError):
        mount.path("missing.bin").read_bytes()

    base, auth = f"http://{worker.address}", bearer(secret)
    answers = [
        httpx.get(f"{base}/v1/info", headers=auth, timeout=10),
        httpx.get(f"{base}/metrics", headers=auth, timeout=10),
        httpx.get(f"{registry.url}/v1/workers", headers=auth, timeout=10),
        httpx.get(f"{registry.url}/metrics", headers=auth, timeout=10),
        httpx.get(f"{base}/v1/stat", params={"uri": "s3://no-such-bucket-here/k"}, headers=auth, timeout=30),
        httpx.get(f"{base}/v1/list", params={"uri": "s3://no-such-bucket-here"}, headers=auth, timeout=30),
        httpx.get(f"{base}/v1/page", params={"uri": f"s3://{bucket}/cred/f.bin", "version": "\"stale\"",
                                             "size": MiB + 1, "index": 0}, headers=auth, timeout=30),
        httpx.get(f"{base}/v1/page", params={"uri": "s3://no-such-bucket-here/k", "version": "v", "size": 5,
                                             "index": 0}, headers=auth, timeout=30),
        httpx.get(f"{base}/v1/info", headers=bearer(aws_secret), timeout=10),
        httpx.get(f"{base}/v1/info", headers={"Authorization": f"Bearer {secret[:-1]}"}, timeout=10),
    ]
    assert {a.status_code for a in answers[4:]} >= {401, 412}
    assert any(a.status_code >= 500 for a in answers[4:8])  # the UFS failure path was exercised
    procs.allow += (r"S3 .*no-such-bucket-here",)
    for proc in (mount, worker, registry):
        proc.stop()
    for answer in answers:
        text = answer.text + "".join(f"{k}: {v}\n" for k, v in answer.headers.items())
        for value in (aws_secret, aws_key, secret):
            assert value not in text, (answer.request.url, value[:4])
    files = [p for p in tmp_path.rglob("*") if p.is_file() and p != secret_path]
    assert any(p.name == "log" for p in files) and any("state" in p.parts for p in files)
    for path in files:
        content = path.read_bytes()
        for value in (aws_secret, aws_key, secret):
            assert value.encode() not in content, (path, value[:4])
