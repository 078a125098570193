"""A store outage with the data loaded: a mount starts from what the workers hold,
serves it exactly, fails an uncached read with EIO and serves it once the store is back.

Real processes: moto behind a TCP relay (tests/relay.py) that goes down and comes back
on the same port (moto keeps its buckets), a registry, two workers, `dorafs-admin load`.
"""

from __future__ import annotations

import errno
import os
import time

import pytest

from tests.relay import Relay
from tests.support import wait_for
from tests.test_scheduler import admin

MiB = 1 << 20


@pytest.fixture
def relay(s3_server):
    r = Relay(s3_server.port)
    yield r
    r.close()


@pytest.mark.parametrize("root", ["", "/ds"], ids=["bucket", "prefix"])
def test_mount_starts_and_serves_loaded_data_while_s3_is_down(procs, s3_server, bucket, relay, root):
    """The mount asks for statuses and listings fresher than what the workers hold
    (TTL 0: always recheck, as a mount would long after the load): the store failing,
    it starts and serves what they hold."""
    s3 = s3_server.client()
    files = {"a.bin": os.urandom(3 * MiB + 5), "sub/b.bin": os.urandom(2 * MiB), "cold.bin": os.urandom(MiB + 7)}
    for name, data in files.items():
        s3.put_object(Bucket=bucket, Key=f"{root[1:]}/{name}".lstrip("/"), Body=data)
    uri = f"s3://{bucket}{root}"
    env = relay.env(s3_server.env)
    registry = procs.registry()
    workers = [procs.worker(registry=registry.url, env=env) for _ in range(2)]
    wait_for(lambda: len(registry.workers()) == 2, what="2 workers to register")
    loaded = admin(registry, "load", uri, "--recursive", "--progress")
    assert loaded.returncode == 0, loaded.stderr
    freed = admin(registry, "free", f"{uri}/cold.bin")  # its pages go
    assert freed.returncode == 0, freed.stderr
    # Statuses and listings again (free dropped the directory's listing): the pages stay.
    listed = admin(registry, "load", uri, "--recursive", "--metadata-only", "--progress")
    assert listed.returncode == 0, listed.stderr

    relay.down()
    procs.allow += (r"S3 .*(EndpointConnectionError|Could not connect|failed to establish a connection)",)
    mount = procs.mount(uri, registry=registry.url, env=env, options="status_ttl=0,listing_ttl=0,negative_ttl=0")
    assert sorted(os.listdir(mount.mountpoint)) == ["a.bin", "cold.bin", "sub"]
    assert os.listdir(mount.path("sub")) == ["b.bin"]
    for name in ("a.bin", "sub/b.bin"):
        assert mount.path(name).read_bytes() == files[name], name
    assert os.stat(mount.path("cold.bin")).st_size == len(files["cold.bin"])

    start = time.monotonic()
    with pytest.raises(OSError) as info:
        mount.path("cold.bin").read_bytes()
    assert info.value.errno == errno.EIO
    assert time.monotonic() - start < 30  # an error, not a hang

    relay.up()

    def read_cold():
        try:
            return mount.path("cold.bin").read_bytes()
        except OSError as exc:
            assert exc.errno == errno.EIO  # until the mount's short memory of the failure ends
            return None
    assert wait_for(read_cold, timeout=15, interval=0.2, what="the read to succeed once S3 is back") == files["cold.bin"]
    assert all(w.alive() for w in workers)
