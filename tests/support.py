"""Shared helpers for tests that run real processes on loopback."""

from __future__ import annotations

import itertools
import os
import random
import signal
import socket
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path


# Ports for the tests' daemons come from below the kernel's ephemeral range (32768 and up
# by default), one block per pytest-xdist worker, handed out in turn. A port from the
# ephemeral range (bind to port 0) could be taken by any outgoing connection's source port,
# here or in the other worker, between this check and the daemon binding it.
_PORT_BLOCK = 5000
_PORT_BASE = 12000


def _port_block() -> range:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    index = int(worker[2:]) if worker[2:].isdigit() else 0
    low = _PORT_BASE + (index % 4) * _PORT_BLOCK
    return range(low, low + _PORT_BLOCK)


_ports = _port_block()
_next_port = itertools.count(random.randrange(len(_ports)))


def free_port() -> int:
    """A loopback port no one listens on, that no other test of this run is handed."""
    for _ in range(len(_ports)):
        port = _ports[next(_next_port) % len(_ports)]
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {_ports.start}-{_ports.stop - 1}")


def wait_for(predicate, timeout: float = 20.0, interval: float = 0.05, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


def port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


def stop_process(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """End a process we started: SIGTERM, then SIGKILL. Only ever by its own pid."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout)


class S3Server:
    """moto's S3 server as a real process on loopback."""

    def __init__(self, log_dir: Path):
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.log = open(log_dir / "moto.log", "wb")
        self.proc = subprocess.Popen(
            ["moto_server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=self.log, stderr=subprocess.STDOUT,
        )
        wait_for(lambda: port_open("127.0.0.1", self.port), what="moto server")

    @property
    def env(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def client(self):
        import boto3

        return boto3.client(
            "s3", endpoint_url=self.endpoint, aws_access_key_id="testing",
            aws_secret_access_key="testing", region_name="us-east-1",
        )

    def stop(self) -> None:
        stop_process(self.proc)
        self.log.close()


@contextmanager
def tmpfs(path: Path, size: str):
    """A tmpfs of `size` (e.g. "3m") mounted at the new directory `path` (we are root),
    always unmounted: a real small disk for full-disk and eviction tests."""
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


def run_client(config, body, addresses=(), **ufs_options) -> None:
    """`await body(client)` with an in-process client (`DoraClient`, its tasks running) of
    the workers at `addresses` (none: it reads the UFS itself), over a `UfsSet` made with
    `ufs_options`; both are closed after."""
    import trio

    from dorafs.client import DoraClient
    from dorafs.membership import StaticMembership
    from dorafs.ufs import UfsSet

    async def main():
        ufs = UfsSet(**ufs_options)
        client = DoraClient(config, StaticMembership(list(addresses)), ufs)
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(client.run)
                await body(client)
                nursery.cancel_scope.cancel()
        finally:
            await ufs.aclose()

    trio.run(main)


def cached_pages(path) -> int:
    """How many of a file's pages the kernel's page cache holds (mincore over a
    mapping of it; asking by reading would start a readahead that brings them back)."""
    import mmap

    from dorafs.client.local import page_cache_residency

    with open(path, "rb") as f:
        if not os.fstat(f.fileno()).st_size:
            return 0
        mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    try:
        residency = page_cache_residency(mapping)
    finally:
        mapping.close()
    assert residency is not None, "mincore refused"
    return sum(residency)


def drop_from_page_cache(path, tries: int = 20) -> bool:
    """Have the kernel forget a file's cached pages (written back first); True once it
    holds none. A page still in a CPU's batch of new pages is not dropped at once:
    asked again a few times. False on a file system that keeps files in memory (tmpfs)."""
    for _ in range(tries):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        if not cached_pages(path):
            return True
        time.sleep(0.05)
    return False


def disk_only(path, attempt, tries: int = 10) -> None:
    """`attempt()` must raise WouldBlock (dorafs.client.local) for a file only on the
    disk. A read that does not wait may still start the kernel's readahead, which on a
    fast disk can bring the bytes before the read looks: then the file is dropped and
    asked again, up to `tries` times. Skips on a file system that keeps files in memory."""
    import pytest

    from dorafs.client.local import WouldBlock

    for _ in range(tries):
        if not drop_from_page_cache(path):
            pytest.skip("this file system keeps the file in memory (tmpfs): nothing to wait for")
        try:
            attempt()
        except WouldBlock:
            return
    pytest.fail(f"a read that does not wait found {path} in the page cache after each of {tries} drops")


def mount_counters(port: int, *names: str) -> dict[str, float]:
    """The samples of a mount's /metrics (served on 127.0.0.1:`port`) whose names start
    with one of `names`, by name."""
    import httpx

    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    return {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if line.startswith(names)}
