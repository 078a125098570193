"""Operations: systemd readiness (sd_notify), the mount's /metrics, mount -t dorafs and fstab."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.cluster import ESTALE_READ, REPO, Mount, Registry, Worker, _env, is_mounted
from tests.support import free_port, wait_for


@pytest.fixture
def notify_socket(tmp_path, monkeypatch):
    """A datagram socket standing in for systemd's NOTIFY_SOCKET."""
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(30)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))  # inherited by the processes tests.cluster starts
    yield sock
    sock.close()


def messages(sock: socket.socket, until: str) -> list[str]:
    got = []
    while not any(until in m for m in got):
        got.append(sock.recv(4096).decode())
    return got


def test_daemons_and_mount_notify_ready(notify_socket, tmp_path, s3_server, bucket):
    s3_server.client().put_object(Bucket=bucket, Key="n/x", Body=b"x")
    started = []
    try:
        registry = Registry(tmp_path, "registry")
        started.append(registry)
        assert any(m.startswith("READY=1") for m in messages(notify_socket, "READY=1"))
        worker = Worker(tmp_path, "worker", registry=registry.url)
        started.append(worker)
        ready = messages(notify_socket, "READY=1")
        assert any(f"STATUS=serving on {worker.address}" in m for m in ready)
        mount = Mount(tmp_path, f"s3://{bucket}/n", workers=[worker.address])
        started.append(mount)
        assert any("READY=1" in m and "serving s3://" in m for m in messages(notify_socket, "READY=1"))
        worker.stop()
        assert any("STOPPING=1" in m for m in messages(notify_socket, "STOPPING=1"))
    finally:
        for proc in reversed(started):
            proc.stop()


def test_embedded_worker_leaves_readiness_to_the_mount(notify_socket, tmp_path, s3_server, bucket):
    s3_server.client().put_object(Bucket=bucket, Key="e/x", Body=b"x")
    mount = Mount(tmp_path, f"s3://{bucket}/e", extra=["--cache-dir", str(tmp_path / "cache")])
    try:
        got = messages(notify_socket, "READY=1")
        time.sleep(0.5)
        notify_socket.settimeout(0.2)
        try:
            while True:
                got.append(notify_socket.recv(4096).decode())
        except TimeoutError:
            pass
        assert [m for m in got if "READY=1" in m] == [m for m in got if "serving s3://" in m]  # one sender
    finally:
        mount.stop()


def scrape(address: str) -> dict[str, float]:
    samples = {}
    for family in text_string_to_metric_families(httpx.get(f"http://{address}/metrics", timeout=5).text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            samples[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return samples


def test_mount_serves_its_metrics(procs, s3_server, bucket):
    procs.allow = (ESTALE_READ,)
    s3_server.client().put_object(Bucket=bucket, Key="m/f.bin", Body=os.urandom(3 << 20))
    worker = procs.worker()
    port = free_port()
    mount = procs.mount(f"s3://{bucket}/m", workers=[worker.address],
                        options=f"metrics_listen=127.0.0.1:{port},readahead_pages=0")
    assert len(mount.path("f.bin").read_bytes()) == 3 << 20
    s3_server.client().put_object(Bucket=bucket, Key="m/gone.bin", Body=os.urandom(3 << 20))
    fd = os.open(mount.path("gone.bin"), os.O_RDONLY)
    try:
        s3_server.client().delete_object(Bucket=bucket, Key="m/gone.bin")
        with pytest.raises(OSError):
            os.pread(fd, 4096, 2 << 20)  # ESTALE: the pinned version is gone
    finally:
        os.close(fd)
    m = scrape(f"127.0.0.1:{port}")
    assert m["dorafs_mount_reads_total"] >= 1
    assert m["dorafs_mount_read_bytes_total"] == 3 << 20  # the failed read returned nothing
    assert m["dorafs_mount_read_latency_seconds_count"] == m["dorafs_mount_reads_total"]
    assert m["dorafs_mount_worker_pages_total"] == 3
    assert m["dorafs_mount_ufs_fallbacks_total{kind=page}"] == 0
    assert m["dorafs_mount_errors_total{errno=ESTALE}"] >= 1  # the kernel may retry a failed read once
    assert m["dorafs_mount_workers"] == 1
    assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).json()["status"] == "ok"


# -- mount(8) ---------------------------------------------------------------------------

def _helper_installed() -> bool:
    return any(os.path.exists(f"{d}/mount.dorafs") for d in ("/sbin", "/usr/sbin"))


needs_helper = pytest.mark.skipif(os.geteuid() != 0 or not _helper_installed(),
                                  reason="needs root and /sbin/mount.dorafs (scripts/setup.sh installs it)")


def _wait_unmounted(path) -> None:
    wait_for(lambda: not is_mounted(path), timeout=20, what="the unmount")


@needs_helper
def test_mount_t_dorafs_and_umount(s3_server, bucket, tmp_path):
    s3_server.client().put_object(Bucket=bucket, Key="mt/hello.txt", Body=b"mounted by mount(8)")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    env = {**_env(), "XDG_CACHE_HOME": str(tmp_path / "xdg")}
    result = subprocess.run(["mount", "-t", "dorafs", f"s3://{bucket}/mt", str(mnt),
                             "-o", f"ro,cache_dir={tmp_path / 'cache'},attr_timeout=2s"],
                            capture_output=True, text=True, env=env, timeout=60)
    try:
        assert result.returncode == 0, result.stderr
        assert (mnt / "hello.txt").read_bytes() == b"mounted by mount(8)"
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)
        _wait_unmounted(mnt)
    bad = subprocess.run(["mount", "-t", "dorafs", f"s3://{bucket}/mt", str(mnt), "-o", "bogus_option=1"],
                         capture_output=True, text=True, env=env, timeout=60)
    assert bad.returncode != 0 and "unknown key mount.bogus_option" in bad.stderr
    assert not is_mounted(mnt)


@needs_helper
def test_fstab_line_mounts_with_mount_point_alone(s3_server, bucket, tmp_path):
    s3_server.client().put_object(Bucket=bucket, Key="fs/a.txt", Body=b"from fstab")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    fstab = tmp_path / "fstab"
    fstab.write_text(f"# test fstab\ns3://{bucket}/fs {mnt} dorafs "
                     f"_netdev,nofail,cache_dir={tmp_path / 'cache'} 0 0\n")
    env = {**_env(), "XDG_CACHE_HOME": str(tmp_path / "xdg")}
    result = subprocess.run(["mount", "--fstab", str(fstab), str(mnt)], capture_output=True, text=True,
                            env=env, timeout=60)
    try:
        assert result.returncode == 0, result.stderr
        assert (mnt / "a.txt").read_bytes() == b"from fstab"
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)
        _wait_unmounted(mnt)


def test_request_ids_in_logs_and_request_latency_in_metrics(procs):
    worker = procs.worker()
    procs.allow = (r"no-such-bucket",)
    response = httpx.get(f"http://{worker.address}/v1/page", timeout=30, headers={"X-Request-Id": "trace-42"},
                         params={"uri": "s3://no-such-bucket-x/k", "version": "v", "size": 10, "index": 0})
    assert response.status_code in (404, 412, 502)
    wait_for(lambda: "[trace-42]" in worker.log_text(), timeout=10, what="the request id in the log")
    m = worker.metrics()
    assert m['dorafs_worker_request_latency_seconds_count{path=/v1/page,status=' +
             f'{response.status_code // 100}xx}}'] == 1


def test_journald_format_under_systemd(tmp_path, monkeypatch):
    monkeypatch.setenv("JOURNAL_STREAM", "8:12345")
    worker = Worker(tmp_path, "journald-worker")
    try:
        first = worker.log_text().splitlines()[0]
        assert first.startswith("<6>dorafs-worker: INFO "), first  # priority prefix, no timestamp
    finally:
        worker.stop()


def test_admin_report_sums_worker_metrics(procs, s3_server, bucket):
    s3 = s3_server.client()
    for i in range(6):
        s3.put_object(Bucket=bucket, Key=f"rep/f{i}.bin", Body=os.urandom((1 << 20) + i))
    registry = procs.registry()
    workers = [procs.worker(registry=registry.url) for _ in range(2)]
    wait_for(lambda: len(registry.workers()) == 2, what="two workers")
    for _ in range(2):  # a fresh mount each pass (its page buffer is empty): the second is all hits
        # Page by page (sealed object files are read without page requests to count).
        mount = procs.mount(f"s3://{bucket}/rep", registry=registry.url,
                            options="direct_io,passthrough_min_size=1GiB")
        for i in range(6):
            assert len(mount.path(f"f{i}.bin").read_bytes()) == (1 << 20) + i
        mount.unmount()
    result = subprocess.run([sys.executable, "-m", "dorafs.cli.admin", "--registry", registry.url, "report",
                             "--json"], capture_output=True, text=True, cwd=REPO, env=_env(), timeout=60)
    assert result.returncode == 0, result.stderr
    import json

    report = json.loads(result.stdout)
    cluster = report["cluster"]
    pages = sum(-(-((1 << 20) + i) // (1 << 20)) for i in range(6))  # 11: f0 is exactly one page
    # Every page is asked for once per pass. Cold, a file's first read fills its pages
    # with one UFS read (a run): its first page is the miss, the later ones hits once in.
    misses = cluster["misses"]
    assert cluster["pages"] == pages and cluster["hits"] + misses == 2 * pages
    assert 6 <= misses <= pages
    assert cluster["hit_rate"] == pytest.approx(cluster["hits"] / (2 * pages))
    assert cluster["ufs_requests"] >= misses
    assert cluster["capacity"] == sum(w.counter("dorafs_worker_cache_capacity_bytes") for w in workers)
    assert set(report["workers"]) == {w.address for w in workers}
    table = subprocess.run([sys.executable, "-m", "dorafs.cli.admin", "--registry", registry.url, "report"],
                           capture_output=True, text=True, cwd=REPO, env={**_env(), "COLUMNS": "160"}, timeout=60)
    assert table.returncode == 0 and "total" in table.stdout and f"{cluster['hit_rate']:.1%}" in table.stdout
