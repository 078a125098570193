"""The etcd membership backend against a real 3-member etcd cluster on loopback.

In-process tests drive `EtcdMembership` and `EtcdRegistration` (dorafs/membership/etcd.py) directly;
the end-to-end ones run workers and a mount with `--registry etcd://...`. Outages of
single members and of the whole cluster under reads are in tests/test_faults.py.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import subprocess
import sys

import pytest
import trio

from dorafs.membership import etcd as etcd_backend
from dorafs.membership import WorkerInfo, heartbeat_loop, open_membership
from tests.cluster import REPO, Etcd
from tests.support import free_port, wait_for
from tests.test_faults import owner_of


@pytest.fixture
def etcd(tmp_path):
    cluster = Etcd(tmp_path)
    try:
        yield cluster
    finally:
        cluster.stop()


def info(n: int) -> WorkerInfo:
    return WorkerInfo(f"w{n}", f"127.0.0.1:{30000 + n}", 1 << 20, 1 << 30)


async def until(predicate, timeout: float, what: str) -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.02)


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def test_parse_url():
    assert etcd_backend.parse_url("etcd://127.0.0.1:2379") == (["http://127.0.0.1:2379"], "/dorafs/workers/")
    assert etcd_backend.parse_url("etcd://a:1,b:2/team") == (["http://a:1", "http://b:2"], "/team/workers/")
    assert etcd_backend.parse_url("etcd://a:1+b:2")[0] == ["http://a:1", "http://b:2"]  # for mount -o
    for bad in ("etcd://", "http://a:1", "etcd://a", "etcd://a:x", "etcd://:1"):
        with pytest.raises(ValueError):
            etcd_backend.parse_url(bad)
    assert etcd_backend.prefix_end("/dorafs/workers/") == b64("/dorafs/workers0")


def test_workers_join_leave_and_clients_follow(etcd, caplog):
    caplog.set_level(logging.INFO, logger="dorafs.membership")

    async def main():
        membership = open_membership(etcd.url, [])
        assert isinstance(membership, etcd_backend.EtcdMembership)
        changes = []
        membership.add_listener(lambda: changes.append(sorted(membership.workers)))
        async with trio.open_nursery() as nursery:
            await nursery.start(heartbeat_loop, etcd.url, info(1), 0.3)
            await nursery.start(membership.run)
            assert membership.workers == {"w1": info(1)}
            # A second worker joins: the watch pushes it.
            second = trio.CancelScope()

            async def run_second():
                with second:
                    await heartbeat_loop(etcd.url, info(2), 0.3)

            nursery.start_soon(run_second)
            await until(lambda: "w2" in membership.workers, 5, "w2 seen")
            # It leaves cleanly: its lease is revoked, so it is gone well before its TTL (2 s).
            started = trio.current_time()
            second.cancel()
            await until(lambda: "w2" not in membership.workers, 5, "w2 gone")
            assert trio.current_time() - started < 1.5
            assert changes == [["w1"], ["w1", "w2"], ["w1"]]
            nursery.cancel_scope.cancel()
        # Cancelled: w1 revoked its lease on the way out.
        assert not etcd.call("/kv/range", {"key": b64("/dorafs/workers/w1")}).get("kvs")

    trio.run(main)


def test_lost_lease_and_deleted_key_are_registered_again(etcd, caplog, monkeypatch):
    caplog.set_level(logging.INFO, logger="dorafs.membership")
    monkeypatch.setattr(etcd_backend, "CHECK_EVERY", 2)
    key = b64("/dorafs/workers/w1")

    def lease_of() -> str | None:
        kvs = etcd.call("/kv/range", {"key": key}).get("kvs")
        return kvs[0].get("lease") if kvs else None

    async def main():
        membership = etcd_backend.EtcdMembership(etcd.url)
        async with trio.open_nursery() as nursery:
            await nursery.start(heartbeat_loop, etcd.url, info(1), 0.2)
            await nursery.start(membership.run)
            lease = lease_of()
            assert lease and "w1" in membership.workers
            # The lease disappears (as after a partition longer than the TTL).
            etcd.call("/lease/revoke", {"ID": lease})
            await until(lambda: lease_of() not in (None, lease), 5, "a new lease")
            await until(lambda: "w1" in membership.workers, 5, "w1 back in the view")
            # An operator deletes the key but the lease lives on.
            etcd.call("/kv/deleterange", {"key": key})
            await until(lambda: "w1" not in membership.workers, 5, "w1 deleted")
            await until(lambda: "w1" in membership.workers, 5, "w1 registered again")
            nursery.cancel_scope.cancel()

    trio.run(main)
    messages = [r.getMessage() for r in caplog.records]
    assert any("expired; registering again" in m for m in messages)
    assert any("vanished from etcd; registering again" in m for m in messages)


def test_compacted_watch_is_cancelled_and_the_client_reads_again(etcd, caplog):
    caplog.set_level(logging.INFO, logger="dorafs.membership")
    prefix = "/dorafs/workers/"

    async def main():
        # Revisions move on and are compacted away.
        for n in range(5):
            etcd.call("/kv/put", {"key": b64(prefix + f"w{n}"), "value": b64(json.dumps(info(n).to_dict()))})
        header = etcd.call("/kv/range", {"key": b64(prefix + "w0")})["header"]
        etcd.call("/kv/compaction", {"revision": header["revision"], "physical": True})
        membership = etcd_backend.EtcdMembership(etcd.url)
        membership._etcd = etcd_backend.EtcdClient(membership.endpoints)
        try:
            # A watch from before the compaction is cancelled by the server...
            with pytest.raises(etcd_backend._WatchCancelled, match="compacted"):
                with trio.fail_after(5):
                    await membership._watch({}, 2)
        finally:
            await membership._etcd.aclose()
        # ...and a running membership reads again after any watch ends.
        membership = etcd_backend.EtcdMembership(etcd.url)
        membership.watch_renew = 0.5
        async with trio.open_nursery() as nursery:
            await nursery.start(membership.run)
            assert sorted(membership.workers) == [f"w{n}" for n in range(5)]
            etcd.call("/kv/deleterange", {"key": b64(prefix + "w0")})
            await until(lambda: "w0" not in membership.workers, 5, "w0 deleted")
            await trio.sleep(1.2)  # watches renewed twice: the view stays the same
            assert sorted(membership.workers) == [f"w{n}" for n in range(1, 5)]
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_member_killed_mid_watch_and_whole_cluster_outage(etcd, caplog):
    caplog.set_level(logging.INFO, logger="dorafs.membership")

    async def main():
        membership = etcd_backend.EtcdMembership(etcd.url)
        async with trio.open_nursery() as nursery:
            # A beat a second (a 5 s lease): w1 stays registered while its heartbeat moves to
            # another member, however busy the machine (a 2 s lease once ran out here).
            await nursery.start(heartbeat_loop, etcd.url, info(1), 1.0)
            await nursery.start(membership.run)
            assert "w1" in membership.workers
            # The member the client watches through dies: it moves to another one.
            await trio.to_thread.run_sync(etcd.kill, 0)
            etcd.call("/kv/put", {"key": b64("/dorafs/workers/w9"), "value": b64(json.dumps(info(9).to_dict()))})
            await until(lambda: "w9" in membership.workers, 10, "w9 seen through another member")
            # Every member dies: the last view stays.
            for i in (1, 2):
                await trio.to_thread.run_sync(etcd.kill, i)
            await until(lambda: not membership.reachable, 70, "outage noticed")
            assert sorted(membership.workers) == ["w1", "w9"]
            for i in range(3):
                await trio.to_thread.run_sync(etcd.start, i)
            for member in etcd.members:
                await trio.to_thread.run_sync(member.wait_healthy)
            await until(lambda: membership.reachable, 10, "etcd back")
            etcd.call("/kv/deleterange", {"key": b64("/dorafs/workers/w9")})
            await until(lambda: sorted(membership.workers) == ["w1"], 10, "w9 deleted after the outage")
            nursery.cancel_scope.cancel()

    trio.run(main)
    outage = [r for r in caplog.records if "unreachable" in r.getMessage() and "keeping" in r.getMessage()]
    assert len(outage) == 1  # logged once per outage


def test_membership_starts_when_etcd_is_down():
    async def main():
        membership = open_membership(f"etcd://127.0.0.1:{free_port()}", [])
        async with trio.open_nursery() as nursery:
            started = trio.current_time()
            await nursery.start(membership.run)
            assert 1.5 < trio.current_time() - started < 4
            assert membership.workers == {}
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_cluster_through_etcd_end_to_end(procs, s3_server, bucket):
    """Workers and a mount configured with etcd://; dorafs-admin reads the same list."""
    data = {f"f{i}.bin": os.urandom((i + 1) * (1 << 20) + 17) for i in range(4)}
    s3 = s3_server.client()
    for name, body in data.items():
        s3.put_object(Bucket=bucket, Key=f"e2e/{name}", Body=body)
    cluster = procs.etcd()
    workers = [procs.worker(registry=cluster.url) for _ in range(2)]
    mount = procs.mount(f"s3://{bucket}/e2e", registry=cluster.url.replace(",", "+"))
    for name, body in data.items():
        assert mount.path(name).read_bytes() == body
    owners = {owner_of(workers, f"s3://{bucket}/e2e/{name}") for name in data}  # the ring's choice
    assert all(w.counter("dorafs_worker_page_requests_total") > 0 for w in owners)

    admin = [sys.executable, "-m", "dorafs.cli.admin", "--registry", cluster.url]
    listed = subprocess.run(admin + ["workers", "--json"], capture_output=True, text=True, cwd=REPO, timeout=30)
    assert listed.returncode == 0, listed.stderr
    state = json.loads(listed.stdout)
    assert sorted(w["address"] for w in state["workers"]) == sorted(w.address for w in workers)
    assert all(0 <= w["last_heartbeat_age"] <= 3 for w in state["workers"])
    report = subprocess.run(admin + ["report", "--json"], capture_output=True, text=True, cwd=REPO, timeout=30)
    assert report.returncode == 0, report.stderr
    assert json.loads(report.stdout)["cluster"]["bytes_served"] >= sum(map(len, data.values()))


def test_bad_etcd_urls_and_etcd_down_are_one_line_errors(tmp_path):
    worker = subprocess.run([sys.executable, "-m", "worker.main", "--registry", "etcd://nohostport",
                             "--cache-dir", str(tmp_path / "c")], capture_output=True, text=True, cwd=REPO,
                            timeout=30)
    assert worker.returncode == 2
    assert worker.stderr.strip().count("\n") == 0 and "etcd" in worker.stderr
    down = subprocess.run([sys.executable, "-m", "dorafs.cli.admin", "--registry", f"etcd://127.0.0.1:{free_port()}",
                           "workers"], capture_output=True, text=True, cwd=REPO, timeout=30)
    assert down.returncode == 1
    assert down.stderr.startswith("dorafs-admin: etcd") and down.stderr.strip().count("\n") == 0
