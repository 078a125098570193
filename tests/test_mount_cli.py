"""The mount as users run it: detached or in the foreground, unmounted by umount or a
signal, with one-line errors for bad input; and a cluster driven by the registry."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from tests.cluster import REPO, is_mounted
from tests.support import port_open, wait_for


def run(argv: list[str], env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    full = dict(os.environ, PYTHONPATH=str(REPO), **(env or {}))
    return subprocess.run(argv, capture_output=True, text=True, env=full, cwd=REPO, timeout=timeout)


def dorafs(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "dorafs.cli.main", *args], env=env)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture
def mountpoint(tmp_path):
    """A mount point that is always unmounted afterwards, whatever the test did."""
    path = tmp_path / "mnt"
    path.mkdir()
    yield path
    if is_mounted(path):
        subprocess.run(["fusermount3", "-u", str(path)], capture_output=True)
        try:
            wait_for(lambda: not is_mounted(path), timeout=0.5, what="the unmount")
        except TimeoutError:
            pass  # lazily below
    if is_mounted(path):
        subprocess.run(["fusermount3", "-uz", str(path)], capture_output=True)


def _mount_pid(stdout: str) -> int:
    return int(stdout.split("(pid ")[1].split(",")[0])


def test_detached_mount_then_umount_stops_everything(s3_server, bucket, tmp_path, mountpoint):
    s3_server.client().put_object(Bucket=bucket, Key="d/hello.txt", Body=b"hello, dorafs\n")
    cache = tmp_path / "cache"
    env = {"XDG_CACHE_HOME": str(tmp_path / "xdg")}
    result = dorafs("mount", f"s3://{bucket}/d", str(mountpoint), "--cache-dir", str(cache), env=env)
    assert result.returncode == 0, result.stderr
    assert "mounted" in result.stdout
    pid = _mount_pid(result.stdout)
    try:
        assert is_mounted(mountpoint)
        assert (mountpoint / "hello.txt").read_bytes() == b"hello, dorafs\n"
        worker_address = (cache / "worker.addr").read_text().strip()
        host, port = worker_address.rsplit(":", 1)
        assert port_open(host, int(port))
        subprocess.run(["umount", str(mountpoint)], check=True)
        wait_for(lambda: not pid_alive(pid), timeout=20, what="the mount process to exit")
        assert not is_mounted(mountpoint)
        assert not port_open(host, int(port)), "the embedded worker outlived its mount"
        assert not (cache / "worker.addr").exists()
    finally:
        if pid_alive(pid):
            os.kill(pid, signal.SIGKILL)
    log = next((tmp_path / "xdg" / "dorafs" / "logs").glob("mount-*.log")).read_text()
    assert "Traceback" not in log


def test_sigterm_unmounts_cleanly(procs, s3_server, bucket):
    s3_server.client().put_object(Bucket=bucket, Key="t/x", Body=b"x")
    mount = procs.mount(f"s3://{bucket}/t", extra=["--cache-dir", str(procs.tmp / "embedded-cache")])
    assert (mount.path("x")).read_bytes() == b"x"
    address = (procs.tmp / "embedded-cache" / "worker.addr").read_text().strip()
    mount.proc.send_signal(signal.SIGTERM)
    assert mount.proc.wait(20) == 0
    assert not is_mounted(mount.mountpoint)
    host, port = address.rsplit(":", 1)
    assert not port_open(host, int(port))


@pytest.mark.parametrize("case", ["missing-bucket", "file-not-dir", "bad-option", "bad-size", "no-mountpoint",
                                  "not-a-uri"])
def test_bad_mounts_fail_with_one_line(case, s3_server, bucket, tmp_path, mountpoint):
    s3_server.client().put_object(Bucket=bucket, Key="file.txt", Body=b"f")
    cache = ["--cache-dir", str(tmp_path / "cache")]
    args, code = {
        "missing-bucket": (["s3://no-such-bucket-here/x", str(mountpoint), *cache], 1),
        "file-not-dir": ([f"s3://{bucket}/file.txt", str(mountpoint), *cache], 1),
        "bad-option": ([f"s3://{bucket}", str(mountpoint), "-o", "bogus=1"], 2),
        "bad-size": ([f"s3://{bucket}", str(mountpoint), "-o", "page_size=lots"], 2),
        "no-mountpoint": ([f"s3://{bucket}", str(tmp_path / "nowhere")], 2),
        "not-a-uri": (["just-a-bucket", str(mountpoint)], 2),
    }[case]
    result = dorafs("mount", *args, env={"XDG_CACHE_HOME": str(tmp_path / "xdg")})
    assert result.returncode == code, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dorafs:"), result.stderr
    assert "Traceback" not in result.stderr
    assert not is_mounted(mountpoint)
    if (tmp_path / "cache").exists():  # an embedded worker was started: it must be gone
        assert not (tmp_path / "cache" / "worker.addr").exists()


def test_mount_helper_accepts_mount_options(s3_server, bucket, tmp_path, mountpoint):
    s3_server.client().put_object(Bucket=bucket, Key="h/a.txt", Body=b"via mount.dorafs")
    opts = f"rw,nosuid,nodev,_netdev,cache_dir={tmp_path / 'cache'},attr_timeout=2s"
    result = run([sys.executable, "-c", "from dorafs.cli.mount import mount_helper; mount_helper()",
                  f"s3://{bucket}/h", str(mountpoint), "-o", opts], env={"XDG_CACHE_HOME": str(tmp_path / "xdg")})
    assert result.returncode == 0, result.stderr
    pid = _mount_pid(result.stdout)
    try:
        assert (mountpoint / "a.txt").read_bytes() == b"via mount.dorafs"
    finally:
        subprocess.run(["umount", str(mountpoint)], check=False)
        wait_for(lambda: not pid_alive(pid), timeout=20, what="the mount to exit")


def test_registry_cluster_serves_and_survives_a_leaving_worker(procs, s3_server, bucket):
    s3 = s3_server.client()
    files = {f"part-{i}.bin": os.urandom(1_500_000 + i) for i in range(12)}
    for name, data in files.items():
        s3.put_object(Bucket=bucket, Key=f"r/{name}", Body=data)
    registry = procs.registry()
    workers = [procs.worker(registry=registry.url) for _ in range(3)]
    wait_for(lambda: len(registry.workers()) == 3, what="three registered workers")
    listed = run([sys.executable, "-m", "dorafs.cli.admin", "--registry", registry.url, "workers", "--json"])
    assert listed.returncode == 0, listed.stderr
    assert sorted(w["address"] for w in json.loads(listed.stdout)["workers"]) == sorted(w.address for w in workers)

    mount = procs.mount(f"s3://{bucket}/r", registry=registry.url, options="direct_io")
    for name, data in files.items():
        assert mount.path(name).read_bytes() == data
    served = [w.counter("dorafs_worker_page_requests_total") for w in workers]
    assert sum(1 for s in served if s > 0) >= 2, served  # the ring spreads files over workers

    workers[0].stop()  # a clean stop deregisters; the client drops it from its ring
    wait_for(lambda: len(registry.workers()) == 2, what="the worker to leave")
    for name, data in files.items():
        assert mount.path(name).read_bytes() == data
    assert "worker" in mount.log_text()
