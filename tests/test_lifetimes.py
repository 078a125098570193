"""The embedded worker ends with its mount, however the mount ends (dorafs/mount.py,
worker/main.py `_watch_lifeline`): real mounts, real signals, the worker found by its
parent pid in /proc."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest

from tests.support import wait_for


def _state(pid: int) -> str | None:
    """The process's state letter, None once it is gone (reaped)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return stat.rpartition(")")[2].split()[0]


def _running(pid: int) -> bool:
    return _state(pid) not in (None, "Z", "X")


def _embedded_worker(mount_pid: int) -> int | None:
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        ppid = int(stat.rpartition(")")[2].split()[1])
        if ppid == mount_pid and b"worker.main" in cmdline:
            return int(entry.name)
    return None


@pytest.fixture
def embedded(procs, tmp_path):
    """Start an embedded-worker mount of a local directory; yields (mount, worker pid).
    Whatever the test does, the worker does not outlive it."""
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    (data / "f.txt").write_bytes(b"hello")
    started: list[int] = []

    def start(name: str):
        mount = procs.mount(f"file://{data}", name=name, options=f"cache_dir={tmp_path / name / 'cache'}")
        worker = wait_for(lambda: _embedded_worker(mount.pid), what="the embedded worker")
        started.append(worker)
        assert mount.path("f.txt").read_bytes() == b"hello"
        return mount, worker

    yield start
    for pid in started:
        if _running(pid):
            os.kill(pid, signal.SIGKILL)  # a worker this test started, by its pid


def test_embedded_worker_exits_when_its_mount_is_killed(embedded):
    mount, worker = embedded("killed")
    mount.proc.send_signal(signal.SIGKILL)
    mount.proc.wait(10)
    wait_for(lambda: not _running(worker), timeout=10, what="the embedded worker to exit")
    mount.unmount()  # the dead mount's entry (fusermount3 -u of a mount nobody serves)


def test_embedded_worker_exits_on_sigterm_right_after_unmount(embedded):
    for attempt in range(3):
        mount, worker = embedded(f"term{attempt}")
        subprocess.run(["fusermount3", "-u", str(mount.mountpoint)], check=True, capture_output=True)
        mount.proc.send_signal(signal.SIGTERM)
        mount.proc.wait(15)
        wait_for(lambda: not _running(worker), timeout=10, what="the embedded worker to exit")
        mount.unmount()


def test_embedded_worker_exits_on_a_clean_unmount(embedded):
    mount, worker = embedded("clean")
    mount.unmount()
    assert mount.proc.returncode == 0
    wait_for(lambda: not _running(worker), timeout=10, what="the embedded worker to exit")
