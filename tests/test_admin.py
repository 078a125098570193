"""`dorafs-admin` against real daemons: workers, stat, ring, job commands and bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import httpx
import pytest

from dorafs.ring import HashRing
from tests.cluster import EXPIRED, REPO, _env
from tests.support import free_port, wait_for
from tests.test_scheduler import LONG_TTL, admin, cluster, upload


def test_workers_stat_and_ring(procs, s3_server, bucket):
    files = upload(s3_server.client(), bucket, "st", 12, dirs=1, size=lambda i: (3 << 19) + i)  # 2 pages each
    registry, workers = cluster(procs, n=3)
    uri = f"s3://{bucket}/st/d0/f00003.bin"

    ring = json.loads(admin(registry, "ring", uri, "--json").stdout)
    expected = HashRing([w["id"] for w in registry.workers()]).candidates(uri)
    assert [c["id"] for c in ring["candidates"]] == expected
    assert ring["candidates"][0]["role"] == "owner"
    table = admin(registry, "ring", uri)
    assert table.returncode == 0 and expected[0] in table.stdout and "owner" in table.stdout

    before = json.loads(admin(registry, "stat", uri, "--json").stdout)
    assert before["percent_cached"] == 0.0 and before["pages"] == 2 and before["owner"] == expected[0]
    assert before["status"]["version"] and before["status"]["size"] == (3 << 19) + 3

    # Half the file through a mount: one of its two pages is cached, on the ring's owner.
    mount = procs.mount(f"s3://{bucket}/st", registry=registry.url, options="direct_io")
    with open(mount.path("d0/f00003.bin"), "rb") as f:
        assert f.read(4096) == files["d0/f00003.bin"][:4096]
    after = json.loads(admin(registry, "stat", uri, "--json").stdout)
    assert after["cached_pages"] >= 1 and after["percent_cached"] >= 50.0
    assert after["status"]["version"] == before["status"]["version"]

    assert admin(registry, "load", f"s3://{bucket}/st/d0", "--progress").returncode == 0
    rows = json.loads(admin(registry, "stat", f"s3://{bucket}/st/d0", "--json").stdout)
    assert rows[0]["status"]["is_dir"] and rows[0]["percent_cached"] == 100.0
    assert len(rows) == 13 and all(r["percent_cached"] == 100.0 for r in rows[1:])
    table = admin(registry, "stat", f"s3://{bucket}/st/d0")
    assert table.returncode == 0 and "100.0%" in table.stdout and "f00011.bin" in table.stdout

    listed = json.loads(admin(registry, "workers", "--json").stdout)["workers"]
    assert {w["state"] for w in listed} == {"up"}
    assert sum(w["used"] for w in listed) == sum(map(len, files.values()))
    assert any(w["hit_rate"] is not None for w in listed)
    table = admin(registry, "workers")
    assert table.returncode == 0 and "up" in table.stdout and "HIT RATE" in table.stdout

    workers[2].kill()
    listed = json.loads(admin(registry, "workers", "--json").stdout)["workers"]
    assert [w["state"] for w in listed].count("unreachable") == 1
    procs.allow = (EXPIRED,)


def test_job_commands_and_bad_input(procs, s3_server, bucket):
    upload(s3_server.client(), bucket, "jb", 30, dirs=1)
    registry, _ = cluster(procs, n=1, extra=LONG_TTL)

    submitted = admin(registry, "load", f"s3://{bucket}/jb", "--recursive", "--verify", "--json")
    assert submitted.returncode == 0, submitted.stderr
    job_id = json.loads(submitted.stdout)["id"]
    wait_for(lambda: json.loads(admin(registry, "job", "status", job_id, "--json").stdout)["state"] == "completed",
             what="the job")
    status = admin(registry, "job", "status", job_id)
    assert status.returncode == 0 and f"job {job_id} completed: 30 of 30 files" in status.stdout
    listing = admin(registry, "job", "list")
    assert listing.returncode == 0 and job_id in listing.stdout and "completed" in listing.stdout
    cancel_done = admin(registry, "job", "cancel", job_id, "--json")  # cancelling a finished job changes nothing
    assert json.loads(cancel_done.stdout)["state"] == "completed"

    def one_line_error(result, *needles):
        assert result.returncode != 0 and result.stdout == "", result
        assert result.stderr.startswith("dorafs-admin: ") and result.stderr.count("\n") == 1, result.stderr
        for needle in needles:
            assert needle in result.stderr, result.stderr

    one_line_error(admin(registry, "load", f"s3://{bucket}/missing", "--progress"), "404", "no such")
    one_line_error(admin(registry, "load", "not-a-uri"), "not a UFS URI")
    one_line_error(admin(registry, "load", f"s3://{bucket}/jb", "--bandwidth", "fast"), "--bandwidth")
    one_line_error(admin(registry, "job", "status", "nope"), "no job")
    one_line_error(admin(registry, "job", "cancel"), "needs a job id")
    one_line_error(admin(registry, "stat", f"s3://{bucket}/missing"), "404")
    down = subprocess.run([sys.executable, "-m", "dorafs.cli.admin", "--registry", f"127.0.0.1:{free_port()}",
                           "job", "list"], capture_output=True, text=True, cwd=REPO, env=_env(), timeout=30)
    one_line_error(down, "unreachable")

    # The daemon answers bad job requests with 400 and a message, and keeps serving.
    for body in ({"uri": 3}, {"uri": "s3://x/y", "bandwidth": -1}, {"uri": "s3://x/y", "kind": "delete"},
                 {"uri": "s3://x/y", "recursive": "yes"}):
        response = httpx.post(f"{registry.url}/v1/jobs", json=body, timeout=10)
        assert response.status_code == 400 and response.json()["message"], body
    assert httpx.get(f"{registry.url}/v1/job", params={"id": "nope"}).status_code == 404
    assert httpx.get(f"{registry.url}/v1/job").status_code == 400


@pytest.mark.parametrize("args", [["load"], ["job", "frob"], ["stat"]])
def test_bad_arguments_exit_2(args):
    result = subprocess.run([sys.executable, "-m", "dorafs.cli.admin", *args], capture_output=True, text=True,
                            cwd=REPO, env=_env(), timeout=30)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr


def test_no_workers_is_a_clear_error(procs):
    registry = procs.registry()
    procs.allow = (r"WARNING dorafs\.http\.server .* POST /v1/jobs: no live workers to load into$",)
    result = admin(registry, "load", "s3://bucket/x")
    assert result.returncode == 1 and "no live workers" in result.stderr, result.stderr
    assert httpx.get(f"{registry.url}/healthz").status_code == 200
