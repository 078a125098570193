"""What each fault costs a reader: read latency impact and time to failover, per case.

    python3 bench/faults.py [--size-mib 16] [--repeat N] [--only NAME,...]

Runs the cases of tests/test_faults.py with real processes (moto S3, behind the fault
proxy where S3 misbehaves; workers; a registry or a 3-member etcd cluster; a FUSE mount
with default options: worker_timeout 5s, ufs_attempts 4, ufs_deadline 4s, ufs_timeout
2s) and prints one row per case:

- baseline: the same read (a fresh file of the same size, cold) without the fault;
- faulted: the read during which the fault is injected (at a quarter of the file);
- longest read(): the longest single 256 KiB read() after the fault, i.e. the stall a
  reader sees before the next candidate (or the UFS) serves: the time to failover;
- after: how the case ended (bytes checked, EIO after how long, membership change seen).

The registry's worker TTL is 3 s here (the tests' value; the default is 10 s).

"S3 at 1 MB/s per connection" limits every S3 connection (of the worker and the mount)
for the whole faulted read. "complete takes 10 s" writes a file through the mount (in
256 KiB write() calls, then close) instead of reading one: the S3 server answers the
CompleteMultipartUpload 10 s late; "longest" is then the close() call, and "bytes" says
whether the object landed exact with each byte sent once.
"""

from __future__ import annotations

import argparse
import errno
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import httpx  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from dorafs.pages import object_id  # noqa: E402
from dorafs.ring import HashRing  # noqa: E402
from tests.cluster import ProcessSet  # noqa: E402
from tests.faultproxy import FaultProxy  # noqa: E402
from tests.support import S3Server, free_port, wait_for  # noqa: E402

MiB = 1 << 20
CHUNK = 256 * 1024


class Reader:
    """Reads a file in 256 KiB read() calls, timing each; injects `fault` at `at` bytes."""

    def __init__(self, path: Path, data: bytes, fault=None, at: int = 0):
        self.latencies: list[float] = []
        self.after_fault: list[float] = []
        self.error: OSError | None = None
        got = bytearray()
        injected = False
        injecting = 0.0
        start = t = time.perf_counter()
        try:
            with open(path, "rb") as f:
                while True:
                    t = time.perf_counter()
                    chunk = f.read(CHUNK)
                    dt = time.perf_counter() - t
                    self.latencies.append(dt)
                    if injected:
                        self.after_fault.append(dt)
                    if not chunk:
                        break
                    got += chunk
                    if fault is not None and not injected and len(got) >= at:
                        t = time.perf_counter()
                        fault()
                        injecting = time.perf_counter() - t  # killing a process is not reading
                        injected = True
        except OSError as exc:
            self.error = exc
            self.after_fault.append(time.perf_counter() - t)
        self.seconds = time.perf_counter() - start - injecting
        self.ok = self.error is None and bytes(got) == data

    @property
    def mib_s(self) -> float:
        return len(self.latencies) * CHUNK / MiB / self.seconds if self.seconds else 0.0

    @property
    def longest_after(self) -> float:
        return max(self.after_fault, default=0.0)


class Bench:
    def __init__(self, size: int, work: Path):
        self.size = size
        self.work = work
        self.s3 = S3Server(work)
        os.environ.update(self.s3.env)
        self.client = self.s3.client()
        self.bucket = "faults"
        self.client.create_bucket(Bucket=self.bucket)
        self.n = 0

    def file(self, prefix: str) -> tuple[str, bytes]:
        self.n += 1
        name = f"f{self.n}.bin"
        data = os.urandom(self.size)
        self.client.put_object(Bucket=self.bucket, Key=f"{prefix}/{name}", Body=data)
        return name, data

    def mount(self, procs: ProcessSet, prefix: str, **kw):
        """A mount of s3://bucket/prefix (a marker object makes the prefix exist)."""
        self.client.put_object(Bucket=self.bucket, Key=f"{prefix}/.keep", Body=b"")
        return procs.mount(f"s3://{self.bucket}/{prefix}", **kw)

    def owner(self, workers, uri: str):
        ids = {httpx.get(f"http://{w.address}/v1/info", timeout=5).json()["id"]: w for w in workers}
        return ids[HashRing(list(ids)).owner(uri)]

    def pair(self, procs, prefix: str, mount, fault_for, *, at_fraction=0.25):
        """Baseline read of one fresh file, then a faulted read of another."""
        base_name, base_data = self.file(prefix)
        name, data = self.file(prefix)  # both exist before the mount looks at either
        baseline = Reader(mount.path(base_name), base_data)
        fault = fault_for(f"s3://{self.bucket}/{prefix}/{name}")
        faulted = Reader(mount.path(name), data, fault, int(self.size * at_fraction))
        return baseline, faulted


def healthz(port: int) -> dict:
    return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).json()


def timed_until(predicate, timeout: float) -> float | None:
    start = time.perf_counter()
    try:
        wait_for(predicate, timeout=timeout, interval=0.05)
    except TimeoutError:
        return None
    return time.perf_counter() - start


# -- the cases: each returns (baseline, faulted, note) --------------------------------------

def case_sigkill(b: Bench, procs: ProcessSet):
    registry = procs.registry()
    workers = [procs.worker(registry=registry.url) for _ in range(2)]
    wait_for(lambda: len(registry.workers()) == 2)
    port = free_port()
    mount = b.mount(procs, "kill", registry=registry.url, options=f"metrics_listen=127.0.0.1:{port}")
    killed = {}

    def fault_for(uri):
        victim = b.owner(workers, uri)
        return lambda: (victim.kill(), killed.setdefault("at", time.perf_counter()))

    baseline, faulted = b.pair(procs, "kill", mount, fault_for)
    dropped = timed_until(lambda: healthz(port)["workers"] == 1, 30)
    since = (time.perf_counter() - killed["at"]) if dropped is not None else None
    return baseline, faulted, f"ring rebuilt {since:.1f}s after the kill" if since else "ring not rebuilt"


def case_sigstop(b: Bench, procs: ProcessSet):
    workers = [procs.worker(), procs.worker()]
    mount = b.mount(procs, "stop", workers=[w.address for w in workers])
    stopped = []

    def fault_for(uri):
        victim = b.owner(workers, uri)
        return lambda: (os.kill(victim.pid, signal.SIGSTOP), stopped.append(victim))

    try:
        baseline, faulted = b.pair(procs, "stop", mount, fault_for)
    finally:
        for victim in stopped:
            os.kill(victim.pid, signal.SIGCONT)
    return baseline, faulted, "stall bounded by worker_timeout (5s), then the next candidate"


def case_restart(b: Bench, procs: ProcessSet):
    workers = [procs.worker(), procs.worker()]
    mount = b.mount(procs, "restart", workers=[w.address for w in workers])
    baseline, faulted = b.pair(procs, "restart", mount, lambda uri: b.owner(workers, uri).restart)
    return baseline, faulted, "worker back on the same port with its cache"


def case_registry(b: Bench, procs: ProcessSet):
    registry = procs.registry()
    [procs.worker(registry=registry.url) for _ in range(2)]
    wait_for(lambda: len(registry.workers()) == 2)
    mount = b.mount(procs, "reg", registry=registry.url)
    baseline, faulted = b.pair(procs, "reg", mount, lambda uri: registry.kill)
    return baseline, faulted, "last known membership kept"


def case_etcd_member(b: Bench, procs: ProcessSet):
    etcd = procs.etcd()
    [procs.worker(registry=etcd.url) for _ in range(2)]
    port = free_port()
    mount = b.mount(procs, "em", registry=etcd.url, options=f"metrics_listen=127.0.0.1:{port}")
    wait_for(lambda: healthz(port)["workers"] == 2)
    baseline, faulted = b.pair(procs, "em", mount, lambda uri: (lambda: etcd.kill(0)))
    third = procs.worker(registry=etcd.url)
    seen = timed_until(lambda: healthz(port)["workers"] == 3, 30)
    return baseline, faulted, (f"a new worker seen {seen:.1f}s after it started (through a live member)"
                               if seen is not None and third.alive() else "new worker not seen")


def case_etcd_down(b: Bench, procs: ProcessSet):
    etcd = procs.etcd()
    [procs.worker(registry=etcd.url) for _ in range(2)]
    port = free_port()
    mount = b.mount(procs, "ed", registry=etcd.url, options=f"metrics_listen=127.0.0.1:{port}")
    wait_for(lambda: healthz(port)["workers"] == 2)

    def down():
        for i in range(3):
            etcd.kill(i)

    baseline, faulted = b.pair(procs, "ed", mount, lambda uri: down)
    for i in range(3):
        etcd.start(i)
    for member in etcd.members:
        member.wait_healthy()
    procs.worker(registry=etcd.url)
    seen = timed_until(lambda: healthz(port)["workers"] == 3, 30)
    return baseline, faulted, (f"after restart, a new worker seen in {seen:.1f}s" if seen is not None
                               else "new worker not seen")


def _proxied(b: Bench, procs: ProcessSet, prefix: str, proxy: FaultProxy):
    env = proxy.env(b.s3.env)
    worker = procs.worker(env=env)
    return b.mount(procs, prefix, workers=[worker.address], env=env)


def case_s3_503(b: Bench, procs: ProcessSet, proxy: FaultProxy):
    mount = _proxied(b, procs, "slow", proxy)
    baseline, faulted = b.pair(procs, "slow", mount, lambda uri: (lambda: proxy.fail(3, 503, "SlowDown")))
    return baseline, faulted, f"{proxy.injected} × 503 SlowDown absorbed by retries"


def _eio_case(b: Bench, procs: ProcessSet, proxy: FaultProxy, prefix: str, arm):
    mount = _proxied(b, procs, prefix, proxy)
    baseline, faulted = b.pair(procs, prefix, mount, lambda uri: arm)
    proxy.passthrough()
    time.sleep(0.5)  # the client's FAILURE_MEMORY
    code = errno.errorcode.get(faulted.error.errno, "?") if faulted.error else "no error"
    again_name, again_data = b.file(prefix)
    recovered = Reader(mount.path(again_name), again_data).ok
    return baseline, faulted, (f"{code} after {faulted.longest_after:.1f}s; mount serves again: "
                               f"{'yes' if recovered else 'NO'}")


def case_s3_500(b: Bench, procs: ProcessSet, proxy: FaultProxy):
    return _eio_case(b, procs, proxy, "err", lambda: proxy.fail(None, 500, "InternalError"))


def case_s3_hang(b: Bench, procs: ProcessSet, proxy: FaultProxy):
    return _eio_case(b, procs, proxy, "hang", proxy.hang)


def case_s3_slow_link(b: Bench, procs: ProcessSet, proxy: FaultProxy):
    mount = _proxied(b, procs, "link", proxy)

    def fault_for(uri):
        proxy.limit(1_000_000)  # from the faulted read's first request on
        return lambda: None

    baseline, faulted = b.pair(procs, "link", mount, fault_for, at_fraction=0)
    proxy.limit(None)
    return baseline, faulted, "every S3 connection at 1 MB/s for the whole read; no error"


class Writer:
    """Writes `data` to a new file in 256 KiB write() calls, then closes it, timing each."""

    def __init__(self, path: Path, data: bytes):
        self.latencies: list[float] = []
        self.error: OSError | None = None
        start = t = time.perf_counter()
        try:
            with open(path, "wb", buffering=0) as f:
                for offset in range(0, len(data), CHUNK):
                    t = time.perf_counter()
                    f.write(data[offset:offset + CHUNK])
                    self.latencies.append(time.perf_counter() - t)
                t = time.perf_counter()
        except OSError as exc:
            self.error = exc
        self.after_fault = [time.perf_counter() - t]  # the close: the commit
        self.latencies.append(self.after_fault[0])
        self.seconds = time.perf_counter() - start
        self.ok = False
        self.size = len(data)

    @property
    def mib_s(self) -> float:
        return self.size / MiB / self.seconds if self.seconds else 0.0

    @property
    def longest_after(self) -> float:
        return max(self.after_fault)


def case_slow_complete(b: Bench, procs: ProcessSet, proxy: FaultProxy):
    mount = _proxied(b, procs, "complete", proxy)
    results = []
    for name, delay in (("base.bin", 0), ("late.bin", 10)):
        if delay:
            proxy.delay(delay, 1, lambda seen: seen.op == "complete")
        data = os.urandom(b.size)
        sent = proxy.payload("upload_part") + proxy.payload("put_object")
        w = Writer(mount.path(name), data)
        landed = b.client.get_object(Bucket=b.bucket, Key=f"complete/{name}")["Body"].read()
        once = proxy.payload("upload_part") + proxy.payload("put_object") - sent == len(data)
        w.ok = w.error is None and landed == data and once
        results.append(w)
    late = results[1]
    return results[0], late, (f"close() {late.longest_after:.1f}s, object exact, each byte sent once"
                              if late.ok else f"close: {late.error or 'object wrong or bytes resent'}")


def case_disk_full(b: Bench, procs: ProcessSet):
    disk = b.work / f"tmpfs-{os.getpid()}"
    disk.mkdir(exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)], check=True)
    try:
        healthy = procs.worker()
        full = procs.worker(cache_dir=disk / "cache")
        mount_ok = b.mount(procs, "full", workers=[healthy.address])
        mount_full = b.mount(procs, "full", workers=[full.address])
        name, data = b.file("full")
        baseline = Reader(mount_ok.path(name), data)
        name, data = b.file("full")
        faulted = Reader(mount_full.path(name), data)
        status = httpx.get(f"http://{full.address}/healthz", timeout=5).json()
        for proc in list(procs.started):
            proc.stop()
        return baseline, faulted, f"cold read on a 4 MiB tmpfs cache; /healthz: {status.get('status')}"
    finally:
        if subprocess.run(["umount", str(disk)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def case_corrupt(b: Bench, procs: ProcessSet):
    worker = procs.worker()
    first = b.mount(procs, "rot", workers=[worker.address], name="rot1")
    files = [b.file("rot") for _ in range(2)]
    for name, data in files:
        Reader(first.path(name), data)
    first.unmount()
    # Rot the pages of the second file only: the first one is the warm baseline.
    etag = b.client.head_object(Bucket=b.bucket, Key=f"rot/{files[1][0]}")["ETag"]
    oid = object_id(f"s3://{b.bucket}/rot/{files[1][0]}", etag)
    rotted = [p for p in worker.page_files() if p.name.startswith(oid)]
    for page in rotted:
        raw = bytearray(page.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        page.write_bytes(raw)
    second = b.mount(procs, "rot", workers=[worker.address], name="rot2")
    baseline = Reader(second.path(files[0][0]), files[0][1])
    faulted = Reader(second.path(files[1][0]), files[1][1])
    return baseline, faulted, f"warm reads; {len(rotted)} rotten pages detected and refetched"


def case_s3_down_loaded(b: Bench, procs: ProcessSet):
    """S3 down, data loaded: a bucket loaded into two workers (`dorafs-admin load`), one
    file's pages freed; S3 (behind a relay) goes down; a mount of the bucket starts
    then, reads a loaded file (the faulted read), fails the freed one with EIO, and
    reads it once S3 is back. The baseline: the same kind of read with S3 up."""
    from tests.relay import Relay

    bucket = f"outage{b.n}"
    b.n += 1
    b.client.create_bucket(Bucket=bucket)
    files = {f"f{i}.bin": os.urandom(b.size) for i in range(3)}
    for name, data in files.items():
        b.client.put_object(Bucket=bucket, Key=name, Body=data)
    relay = Relay(b.s3.port)
    try:
        env = relay.env(b.s3.env)
        registry = procs.registry()
        [procs.worker(registry=registry.url, env=env) for _ in range(2)]
        wait_for(lambda: len(registry.workers()) == 2)

        def admin(*args):
            subprocess.run([sys.executable, "-m", "dorafs.cli.admin", "--registry", registry.url, *args],
                           check=True, capture_output=True, cwd=REPO, timeout=300)

        uri = f"s3://{bucket}"
        admin("load", uri, "--recursive", "--progress")
        admin("free", f"{uri}/f2.bin")
        admin("load", uri, "--recursive", "--metadata-only", "--progress")  # free drops the listing
        up = procs.mount(uri, registry=registry.url, env=env, name=f"{bucket}-up")
        baseline = Reader(up.path("f0.bin"), files["f0.bin"])
        up.unmount()
        relay.down()
        start = time.perf_counter()
        mount = procs.mount(uri, registry=registry.url, env=env, name=f"{bucket}-down")
        started = time.perf_counter() - start
        faulted = Reader(mount.path("f1.bin"), files["f1.bin"], lambda: None, 0)
        cold = Reader(mount.path("f2.bin"), files["f2.bin"])
        code = errno.errorcode.get(cold.error.errno, "?") if cold.error else "no error"
        relay.up()
        back = timed_until(lambda: Reader(mount.path("f2.bin"), files["f2.bin"]).ok, 30)
    finally:
        relay.close()
    return baseline, faulted, (f"mount started in {started:.1f}s with S3 down; the unloaded file: {code} "
                               f"after {cold.seconds:.1f}s; read {back:.1f}s after S3 came back"
                               if back is not None else "the unloaded file never came back")


CASES = {
    "worker SIGKILL mid-read": case_sigkill,
    "worker SIGSTOP mid-read": case_sigstop,
    "worker restart mid-read": case_restart,
    "registry killed": case_registry,
    "one etcd member killed": case_etcd_member,
    "whole etcd cluster down": case_etcd_down,
    "S3 503 SlowDown ×3, then OK": case_s3_503,
    "S3 500 forever": case_s3_500,
    "S3 hanging": case_s3_hang,
    "S3 at 1 MB/s per connection": case_s3_slow_link,
    "complete takes 10 s": case_slow_complete,
    "cache directory full": case_disk_full,
    "page files corrupted": case_corrupt,
    "S3 down, data loaded": case_s3_down_loaded,
}
PROXIED = {case_s3_503, case_s3_500, case_s3_hang, case_s3_slow_link, case_slow_complete}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size-mib", type=int, default=16)
    p.add_argument("--only", help="comma-separated case names (substrings)")
    p.add_argument("--repeat", type=int, default=1, help="runs per case; medians are printed (all stalls listed)")
    args = p.parse_args()
    chosen = {k: v for k, v in CASES.items()
              if not args.only or any(s.strip().lower() in k.lower() for s in args.only.split(","))}
    with tempfile.TemporaryDirectory(prefix="dorafs-faults-") as tmp:
        work = Path(tmp)
        bench = Bench(args.size_mib * MiB, work)
        table = Table(title=f"dorafs under faults: {args.size_mib} MiB files, 256 KiB read() calls, "
                            f"{args.repeat} run(s) per case (medians), load {os.getloadavg()[0]:.1f}")
        for column in ("case", "baseline MiB/s", "faulted MiB/s", "slowdown", "p90 read()",
                       "longest read() after fault", "bytes", "after"):
            table.add_column(column, justify="left" if column in ("case", "after") else "right")
        try:
            run = 0
            for title, case in chosen.items():
                results = []
                for _ in range(args.repeat):
                    run += 1
                    with ProcessSet(work / f"case{run}") as procs:
                        (work / f"case{run}").mkdir(exist_ok=True)
                        procs.allow = (".*",)
                        if case in PROXIED:
                            proxy = FaultProxy(bench.s3.endpoint)
                            try:
                                results.append(case(bench, procs, proxy))
                            finally:
                                proxy.close()
                        else:
                            results.append(case(bench, procs))
                med = statistics.median
                base = med(b.mib_s for b, _, _ in results)
                hurt = med(f.mib_s for _, f, _ in results)
                slow = med(b.mib_s / f.mib_s if f.mib_s else float("inf") for b, f, _ in results)
                p90 = med(statistics.quantiles(f.latencies, n=10)[-1] for _, f, _ in results)
                longest = sorted(f.longest_after for _, f, _ in results)
                outcome = {"exact" if f.ok else ("error" if f.error else "WRONG") for _, f, _ in results}
                table.add_row(title, f"{base:.0f}", f"{hurt:.0f}", f"{slow:.1f}×", f"{p90 * 1000:.1f} ms",
                              ", ".join(f"{x:.2f}" for x in longest) + " s", "/".join(sorted(outcome)),
                              results[-1][2])
                print(f"done: {title}", file=sys.stderr)
        finally:
            bench.s3.stop()
        Console(width=200).print(table)


if __name__ == "__main__":
    main()
