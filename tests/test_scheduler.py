"""Load and free jobs through real daemons: registry (scheduler), workers, moto S3, FUSE mounts.

- loading 2,000 files across 3 workers fetches each page from the UFS exactly once, into
  the worker the mount routes it to, and a mount then reads the whole tree (listings,
  statuses, pages) without a single UFS request;
- a worker killed mid-job and a registry crashed mid-job both end in a completed job with
  every file cached;
- failed files are retried once at the end and reported with their causes;
- `free` makes the next read go to the UFS; `cancel` stops the workers' fetching;
and, in process, the worker's token bucket and the job's persisted form.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from dorafs.membership import WorkerInfo
from dorafs.routing import build_routing
from tests.cluster import CORRUPT, EXPIRED, REPO, RESENT_BATCH, _env, unreachable
from tests.support import wait_for

LONG_TTL = ["--status-ttl", "10m", "--listing-ttl", "10m"]


def upload(s3, bucket: str, prefix: str, n: int, dirs: int = 4, size=lambda i: 1024 + (i * 37) % 7168) -> dict:
    """n small objects spread over `dirs` subdirectories; {relative path: bytes}."""
    files = {f"d{i % dirs}/f{i:05d}.bin": os.urandom(size(i)) for i in range(n)}
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda item: s3.put_object(Bucket=bucket, Key=f"{prefix}/{item[0]}", Body=item[1]),
                      files.items()))
    return files


def admin(registry, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dorafs.cli.admin", "--registry", registry.url, *args],
                          capture_output=True, text=True, cwd=REPO, env=_env() | {"COLUMNS": "200"},
                          timeout=timeout)


def submit(registry, uri: str, **options) -> str:
    response = httpx.post(f"{registry.url}/v1/jobs", json={"uri": uri, "recursive": True} | options, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()["id"]


def job(registry, job_id: str) -> dict:
    response = httpx.get(f"{registry.url}/v1/job", params={"id": job_id}, timeout=10)
    assert response.status_code == 200, response.text
    return response.json()


def wait_job(registry, job_id: str, timeout: float = 120) -> dict:
    def ended():
        try:
            state = job(registry, job_id)
        except httpx.HTTPError:
            return None  # the registry is restarting
        return state if state["state"] != "running" else None
    return wait_for(ended, timeout=timeout, interval=0.2, what=f"job {job_id} to end")


def ufs(workers, op: str | None = None) -> float:
    if op is None:
        return sum(w.counter("dorafs_worker_ufs_requests_total") for w in workers)
    return sum(w.metrics()[f"dorafs_worker_ufs_requests_total{{op={op}}}"] for w in workers)


def cluster(procs, n: int = 3, ttl: str = "3s", extra=LONG_TTL):
    registry = procs.registry(ttl=ttl)
    workers = [procs.worker(registry=registry.url, extra=extra) for _ in range(n)]
    wait_for(lambda: len(registry.workers()) == n, what=f"{n} workers to register")
    return registry, workers


def owners(registry, uris) -> dict[str, int]:
    routing = build_routing({w["id"]: WorkerInfo.from_dict(w) for w in registry.workers()})
    counts: dict[str, int] = {}
    for uri in uris:
        owner = routing.owner(uri).address
        counts[owner] = counts.get(owner, 0) + 1
    return counts


def read_tree(mount, files: dict) -> None:
    seen = set()
    for d in sorted({name.split("/")[0] for name in files}):
        for name in os.listdir(mount.path(d)):
            seen.add(f"{d}/{name}")
    assert seen == set(files)
    for name, data in files.items():
        assert mount.path(name).read_bytes() == data, name


def test_load_2000_files_then_mount_reads_without_ufs(procs, s3_server, bucket):
    files = upload(s3_server.client(), bucket, "ds", 2000)
    registry, workers = cluster(procs)
    result = admin(registry, "load", f"s3://{bucket}/ds", "--recursive", "--progress")
    assert result.returncode == 0, result.stderr
    assert "completed: 2000 of 2000 files" in result.stdout, result.stdout

    # Each page fetched from the UFS exactly once (every file is one page), into its owner.
    assert ufs(workers, "read") == 2000
    pages = {w.address: w.metrics()["dorafs_worker_pages"] for w in workers}
    assert pages == owners(registry, [f"s3://{bucket}/ds/{name}" for name in files])
    assert all(count > 300 for count in pages.values()), pages  # spread over the three
    (listed,) = [j for j in json.loads(admin(registry, "job", "list", "--json").stdout)]
    assert listed["state"] == "completed" and listed["files_done"] == 2000 and listed["dirs_listed"] == 4
    assert listed["pages_fetched"] == 2000 and listed["bytes_loaded"] == sum(map(len, files.values()))

    before = ufs(workers)
    mount = procs.mount(f"s3://{bucket}/ds", registry=registry.url)
    read_tree(mount, files)
    assert ufs(workers) == before, "a read after the load went to the UFS"

    # A second load finds everything cached: no page is fetched again.
    again = admin(registry, "load", f"s3://{bucket}/ds", "--recursive", "--skip-cached", "--progress", "--json")
    assert again.returncode == 0, again.stderr
    summary = json.loads(again.stdout)
    assert summary["files_cached"] == 2000 and summary["pages_fetched"] == 0
    assert ufs(workers, "read") == 2000


def test_a_load_of_8_mib_files_makes_one_get_per_file(procs, s3_server, bucket, proxy):
    """Pages are filled in runs: an 8 MiB file (8 pages) is one ranged GET to the store,
    not eight, and every page of it is cached."""
    s3 = s3_server.client()
    files = {f"f{i}.bin": os.urandom(8 << 20) for i in range(4)}
    for name, data in files.items():
        s3.put_object(Bucket=bucket, Key=f"big/{name}", Body=data)
    env = proxy.env(s3_server.env)
    registry = procs.registry()
    workers = [procs.worker(registry=registry.url, extra=LONG_TTL, env=env) for _ in range(2)]
    wait_for(lambda: len(registry.workers()) == 2, what="2 workers to register")
    result = admin(registry, "load", f"s3://{bucket}/big", "--recursive", "--progress", "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["pages_fetched"] == 32 and summary["bytes_loaded"] == 32 << 20, json.dumps(summary)
    assert proxy.count("get_range") == 4, [s.headers.get("Range") for s in proxy.seen if s.op == "get_range"]
    assert ufs(workers, "read") == 4
    assert sum(w.metrics()["dorafs_worker_pages"] for w in workers) == 32

    before = ufs(workers)
    mount = procs.mount(f"s3://{bucket}/big", registry=registry.url)
    for name, data in files.items():
        assert mount.path(name).read_bytes() == data, name
    assert ufs(workers) == before and proxy.count("get_range") == 4, "a read after the load went to the UFS"


def test_worker_killed_mid_job_completes_with_every_file_cached(procs, s3_server, bucket):
    files = upload(s3_server.client(), bucket, "k", 600, size=lambda i: 4096)
    registry, workers = cluster(procs, ttl="2s")
    procs.allow = (EXPIRED, RESENT_BATCH)
    job_id = submit(registry, f"s3://{bucket}/k", bandwidth=300 << 10)  # ~8 s for 2.4 MB
    wait_for(lambda: job(registry, job_id)["files_done"] >= 100, timeout=60, what="some progress")
    victim = workers[0]
    victim.kill()
    assert job(registry, job_id)["state"] == "running"
    done = wait_job(registry, job_id)
    assert done["state"] == "completed", done
    assert done["files_done"] == 600 and done["files_failed"] == 0 and done["pass"] >= 2, done

    alive = workers[1:]
    stat = json.loads(admin(registry, "stat", f"s3://{bucket}/k/d1", "--json").stdout)
    assert len(stat) == 1 + 150 and all(row["percent_cached"] == 100.0 for row in stat), stat[:3]
    before = ufs(alive)
    mount = procs.mount(f"s3://{bucket}/k", registry=registry.url)
    read_tree(mount, files)
    assert ufs(alive) == before, "a file was not cached on its new owner"


def test_registry_crash_mid_job_resumes_and_fetches_each_page_once(procs, s3_server, bucket):
    procs.allow = unreachable(r"registry http://127\.0\.0\.1:\d+")
    files = upload(s3_server.client(), bucket, "r", 600, size=lambda i: 4096)
    registry, workers = cluster(procs, ttl="10s")
    job_id = submit(registry, f"s3://{bucket}/r", bandwidth=300 << 10)
    wait_for(lambda: job(registry, job_id)["files_done"] >= 100, timeout=60, what="some progress")
    registry.restart(crash=True)
    assert "resuming job " + job_id in registry.log_text()
    done = wait_job(registry, job_id)
    assert done["state"] == "completed" and done["files_done"] >= 600 and done["files_failed"] == 0, done
    assert ufs(workers, "read") == 600  # batches sent again were answered from the cache
    before = ufs(workers)
    mount = procs.mount(f"s3://{bucket}/r", registry=registry.url)
    read_tree(mount, files)
    assert ufs(workers) == before


def test_cancel_stops_the_workers_fetching(procs, s3_server, bucket):
    upload(s3_server.client(), bucket, "c", 800, size=lambda i: 4096)
    registry, workers = cluster(procs)
    follower = subprocess.Popen(
        [sys.executable, "-m", "dorafs.cli.admin", "--registry", registry.url, "load", f"s3://{bucket}/c",
         "--recursive", "--bandwidth", "100KiB/s", "--progress"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=_env())
    try:
        job_id = wait_for(lambda: (jobs := httpx.get(f"{registry.url}/v1/jobs").json()["jobs"]) and jobs[0]["id"],
                          what="the job")
        wait_for(lambda: ufs(workers, "read") >= 30, timeout=60, what="fetching to start")
        result = admin(registry, "job", "cancel", job_id)
        assert result.returncode == 0 and "cancelled" in result.stdout, result.stderr
        out, err = follower.communicate(timeout=30)
    finally:
        if follower.poll() is None:
            follower.kill()
            follower.wait()
    assert follower.returncode == 1, (out, err)
    assert "cancelled" in out
    stopped = ufs(workers, "read")
    time.sleep(2.5)
    assert ufs(workers, "read") == stopped, "workers kept fetching after the cancel"
    assert stopped < 400
    state = job(registry, job_id)
    assert state["state"] == "cancelled" and state["files_done"] < 800


def test_failed_files_are_retried_once_and_reported(procs, s3_server, bucket):
    procs.allow = CORRUPT
    s3 = s3_server.client()
    upload(s3, bucket, "f", 40, dirs=1)
    registry, workers = cluster(procs, n=2)
    # Cache the listing, then change one object: a load that trusts the cached listing asks
    # for a version that is gone, and the worker's conditional read says so.
    assert admin(registry, "load", f"s3://{bucket}/f", "-r", "--metadata-only", "--progress").returncode == 0
    s3.put_object(Bucket=bucket, Key="f/d0/f00007.bin", Body=b"changed")
    result = admin(registry, "load", f"s3://{bucket}/f", "-r", "--skip-cached", "--progress")
    assert result.returncode == 1
    assert "39 of 40 files" in result.stdout and "1 failed" in result.stdout, result.stdout
    assert f"failed: s3://{bucket}/f/d0/f00007.bin: " in result.stderr and "changed" in result.stderr, result.stderr
    (latest, _) = json.loads(admin(registry, "job", "list", "--json").stdout)
    detail = json.loads(admin(registry, "job", "status", latest["id"], "--json").stdout)
    assert detail["state"] == "failed" and detail["files_failed"] == 1
    assert detail["failed_files"][0]["errno"] == "ESTALE"
    # Tried twice: once in the walk, once in the retry at the end.
    assert ufs(workers, "read") == 39 + 2

    # A fresh load (metadata from the UFS) picks the new version and completes.
    assert admin(registry, "load", f"s3://{bucket}/f", "-r", "--progress").returncode == 0

    # --verify re-reads every cached page: a page corrupted on disk is found and fetched again.
    page = workers[0].page_files()[0]
    page.write_bytes(b"\0" * page.stat().st_size)
    reads = ufs(workers, "read")
    verified = admin(registry, "load", f"s3://{bucket}/f", "-r", "--skip-cached", "--verify", "--progress", "--json")
    assert verified.returncode == 0, verified.stderr
    summary = json.loads(verified.stdout)
    assert summary["pages_repaired"] == 1 and summary["pages_fetched"] == 0 and summary["files_done"] == 40
    assert ufs(workers, "read") == reads + 1
    assert workers[0].counter("dorafs_worker_corrupt_pages_total") == 1


def test_free_makes_the_next_read_go_to_the_ufs(procs, s3_server, bucket):
    files = upload(s3_server.client(), bucket, "fr", 60, dirs=2)
    registry, workers = cluster(procs, n=2)
    assert admin(registry, "load", f"s3://{bucket}/fr", "-r", "--progress").returncode == 0
    assert sum(w.metrics()["dorafs_worker_pages"] for w in workers) == 60
    one = admin(registry, "free", f"s3://{bucket}/fr/d0/f00000.bin")
    assert one.returncode == 0 and "1 pages dropped" in one.stdout, one.stdout + one.stderr
    assert sum(w.metrics()["dorafs_worker_pages"] for w in workers) == 59
    result = admin(registry, "free", f"s3://{bucket}/fr", "--recursive")
    assert result.returncode == 0 and "59 pages dropped" in result.stdout, result.stdout + result.stderr
    assert sum(w.metrics()["dorafs_worker_pages"] for w in workers) == 0

    reads, stats = ufs(workers, "read"), ufs(workers, "stat")
    mount = procs.mount(f"s3://{bucket}/fr", registry=registry.url)
    assert mount.path("d1/f00001.bin").read_bytes() == files["d1/f00001.bin"]
    assert ufs(workers, "read") == reads + 1
    assert ufs(workers, "stat") > stats  # the metadata went too


# -- in-process pieces ---------------------------------------------------------------------

def test_token_bucket_holds_its_rate():
    import trio
    import trio.testing

    from worker.loader import TokenBucket

    async def main():
        bucket = TokenBucket(100)  # bytes per second, a burst of one second's worth
        start = trio.current_time()
        for _ in range(10):
            await bucket.take(100)
        assert trio.current_time() - start == pytest.approx(9.0, abs=0.01)
        async with trio.open_nursery() as nursery:  # concurrent takers share the rate
            for _ in range(4):
                nursery.start_soon(bucket.take, 250)
        assert trio.current_time() - start == pytest.approx(19.0, abs=0.01)

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_job_state_survives_a_round_trip_through_json():
    from dorafs.ufs import FileStatus
    from registry.jobs import Batch, Job, JobSpec

    job = Job(id="j1", spec=JobSpec.from_body({"uri": "s3://b/p/", "recursive": True, "bandwidth": 1 << 20}),
              stack=[{"dir": "s3://b/p", "after": "x"}], members=["w1", "w2"])
    batch = Batch(0, "w1", [], filling=False)
    batch.add("s3://b/p/x", FileStatus("x", False, 10, 1.5, '"etag"'))
    job.batches[0] = batch
    job.counters["files_listed"] = 1
    job.fail_file("s3://b/p/y", "boom", "EIO")
    again = Job.from_dict(json.loads(json.dumps(job.to_dict())))
    assert again.spec.uri == "s3://b/p" and again.spec.bandwidth == 1 << 20
    assert again.batches == job.batches and again.stack == job.stack

    def lasting(job: Job) -> dict:  # `elapsed` is counted up to now, at each call: what it counts from is `created`
        return {k: v for k, v in job.detail().items() if k != "elapsed"}

    assert lasting(again) == lasting(job) and again.created == job.created

    # A state file written before a batch's `filling` had its name (it was `open`) loads the same.
    saved = json.loads(json.dumps(job.to_dict()))
    for b in saved["batches"]:
        b["open"] = b.pop("filling")
    assert Job.from_dict(saved).batches == job.batches


@pytest.mark.parametrize("body", [{}, {"uri": "nope"}, {"uri": "s3://b/p", "kind": "x"},
                                  {"uri": "s3://b/p", "bandwidth": "1MiB"}, {"uri": "s3://b/p", "verify": 1}])
def test_job_spec_rejects_bad_requests(body):
    from dorafs.errors import InvalidRequest
    from registry.jobs import JobSpec

    with pytest.raises(InvalidRequest):
        JobSpec.from_body(body)
