"""DLIO's reads without DLIO: every npz file of bench/dlio.py's dataset loaded once with
numpy (`np.load(path)["x"]`, as DLIO's npz reader does), by `--threads` threads, through
each system's mount, cold and warm; the time of each file, with nothing else running.

    python3 bench/npzread.py                           # dorafs, s3fs, rclone; 1 thread, then 2
    python3 bench/npzread.py --systems dorafs,s3fs --threads 1

It separates the wait for one file from the CPU the machine has left: DLIO with its
PyTorch data loader and simulated accelerator needs about half of this machine's two
cores itself. Same dataset, s3rver bucket, mounts and page cache bounds as bench/dlio.py
(`--kernel-cache`, `--daemon-cache`; the reader runs in DLIO's group). Per pass: files/s,
the median and 90th percentile of the seconds one file took, S3 GETs, the CPU of the
daemons and s3rver, and the load average; a table, also in bench/results/npzread-<timestamp>.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cachelimit import CacheLimit, Unavailable, descendants, drop_page_cache, parse_size, remove_stale  # noqa: E402
from dlio import PREFIX, cpu_seconds, dataset, limits, s3_requests  # noqa: E402
from procs import BENCH, REGISTRY, WORK, clean_stale  # noqa: E402


def read_all(root: Path, threads: int) -> dict:
    """Load every npz file under root/train once; the seconds each took."""
    import numpy as np

    files = sorted((root / "train").glob("*.npz"))

    def one(path: Path) -> float:
        t0 = time.perf_counter()
        with np.load(path) as npz:
            for name in npz.files:
                npz[name]
        return time.perf_counter() - t0

    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        took = list(pool.map(one, files))
    return {"seconds": time.perf_counter() - start, "files": len(files), "took": took}


def run_reader(root: Path, threads: int, limit: CacheLimit | None) -> dict:
    argv = [sys.executable, __file__, "--read", str(root), "--threads", str(threads)]
    if limit is not None:
        argv = limit.wrap(argv)
    done = subprocess.run(argv, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"reader failed: {done.stderr[-2000:]}")
    r = json.loads(done.stdout)
    took = sorted(r.pop("took"))
    r["files_s"] = r["files"] / r["seconds"]
    r["median_s"] = took[len(took) // 2]
    r["p90_s"] = took[int(len(took) * 0.9)]
    return r


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--systems", default="dorafs,s3fs,rclone")
    p.add_argument("--threads", default="1,2", help="readers side by side, a pass per count")
    p.add_argument("--files", type=int, default=96)
    p.add_argument("--record-mib", type=int, default=16)
    p.add_argument("--kernel-cache", default="256MiB")
    p.add_argument("--daemon-cache", default="256MiB")
    p.add_argument("--read", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.read:  # the reader itself, inside DLIO's group
        print(json.dumps(read_all(Path(args.read), int(args.threads))))
        return
    args.kernel_cache_bytes = parse_size(args.kernel_cache)
    args.daemon_cache_bytes = parse_size(args.daemon_cache)
    if args.kernel_cache_bytes or args.daemon_cache_bytes:
        try:
            CacheLimit("dlio-probe", 64 << 20).close()
        except Unavailable as exc:
            sys.exit(f"npzread.py: {exc}")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    # dataset() generates with DLIO when the files are missing: the same arguments as dlio.py's
    args.epochs, args.compute, args.batch, args.read_threads = 1, 0.0, 4, 2

    from servers import SERVERS
    from systems import SYSTEMS

    for line in clean_stale() + remove_stale("bench-dlio-"):
        print(line)
    work = WORK / "npzread"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    rows = []
    try:
        server = SERVERS["s3rver"](work)
        os.environ.update(server.env)
        dataset(args, server.client(), work)
        for threads in [int(t) for t in args.threads.split(",")]:
            for name in args.systems.split(","):
                system = SYSTEMS[name](server, PREFIX, work)
                session = system.session()
                try:
                    for phase in ("cold", "warm"):
                        drop_page_cache(session.cache)
                        with limits(args, f"{name}-{phase}") as (reader, daemons), session.mount() as m:
                            pids = [m.proc.pid] + descendants(m.proc.pid)
                            if daemons is not None:
                                for pid in pids:
                                    daemons.adopt(pid)
                            cpu0 = [cpu_seconds(pid) or 0.0 for pid in pids + [server.proc.pid]]
                            _, mark = s3_requests(server.proc.log_path, 0)
                            r = run_reader(m.path, threads, reader)
                            cpu1 = [cpu_seconds(pid) or 0.0 for pid in pids + [server.proc.pid]]
                            s3, _ = s3_requests(server.proc.log_path, mark)
                            r |= {"system": name, "phase": phase, "threads": threads, "gets": s3["ranged_get"]
                                  + s3["whole_get"], "daemon_cpu_s": round(sum(cpu1[:-1]) - sum(cpu0[:-1]), 1),
                                  "s3rver_cpu_s": round(cpu1[-1] - cpu0[-1], 1), "load": os.getloadavg()[0]}
                            rows.append(r)
                            print(f"{name} {phase} {threads} thread(s): {r['files_s']:.2f} files/s, one file "
                                  f"median {r['median_s'] * 1000:.0f} ms, p90 {r['p90_s'] * 1000:.0f} ms; "
                                  f"{r['gets']} GETs; CPU s daemons {r['daemon_cpu_s']}, s3rver "
                                  f"{r['s3rver_cpu_s']}; load {r['load']:.1f}", flush=True)
                finally:
                    session.close()
    finally:
        REGISTRY.teardown()
    lines = ["| system | pass | threads | files/s | one file: median, p90 ms | GETs | CPU s: daemons, s3rver | load |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['system']} | {r['phase']} | {r['threads']} | {r['files_s']:.2f} | "
                     f"{r['median_s'] * 1000:.0f}, {r['p90_s'] * 1000:.0f} | {r['gets']} | "
                     f"{r['daemon_cpu_s']}, {r['s3rver_cpu_s']} | {r['load']:.1f} |")
    text = "\n".join(lines)
    print("\n" + text)
    stamp = f"{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M%SZ}"
    (BENCH / "results").mkdir(exist_ok=True)
    (BENCH / "results" / f"npzread-{stamp}.md").write_text(f"`{' '.join(sys.argv)}`\n\n{text}\n")
    print(f"results: {BENCH}/results/npzread-{stamp}.md")


if __name__ == "__main__":
    main()
