"""Random 1 MiB reads of the large object, cold: how much of a file a random reader's
groups bring, and what it pays for them.

    .venv/bin/python bench/sparse.py --baseline DIR [--io-size 16M,64M] [--rounds 3]

Each pass mounts this checkout's dorafs, or the one at DIR, on an empty cache over s3rver
(the full dataset: bench/harness.py --full uploads it) and runs fio with 4 jobs of random
1 MiB reads of `large/big.bin`, `--io-size` per job, the same offsets every pass
(`--randseed`). 16M per job reads 64 MiB of the 1 GiB object (sparse: most groups of pages a
read brings are never read again); 64M reads a quarter of it. Printed per pass: fio's rate
and mean latency and the S3 requests s3rver logged. The two checkouts alternate, the first
of each round changing, so the machine's drift shows as a spread, not as a difference.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
from procs import WORK  # noqa: E402
from servers import S3rver  # noqa: E402

REPO = BENCH.parent


def one_pass(server: S3rver, tree: Path, work: Path, io_size: str) -> tuple[float, float, int]:
    """(MiB/s, mean latency in ms, S3 requests) of one cold pass through `tree`'s mount."""
    mnt, cache = work / "mnt", work / "cache"
    mnt.mkdir(exist_ok=True)
    shutil.rmtree(cache, ignore_errors=True)
    env = dict(os.environ, **server.env, PYTHONPATH=str(tree))
    with open(work / "mount.log", "w") as log:
        mount = subprocess.Popen([sys.executable, "-m", "dorafs.cli.main", "mount", "s3://bench/full", str(mnt),
                                  "--foreground", "--cache-dir", str(cache), "-o", "ro"],
                                 env=env, cwd=tree, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while not os.path.ismount(mnt):
            if time.monotonic() > deadline or mount.poll() is not None:
                raise SystemExit(f"sparse: the mount did not start (see {work / 'mount.log'})")
            time.sleep(0.1)
        before = server.requests()
        out = subprocess.run(["fio", "--name=sparse", f"--filename={mnt}/large/big.bin", "--readonly",
                              "--rw=randread", "--bs=1M", "--numjobs=4", f"--io_size={io_size}", "--randrepeat=1",
                              "--randseed=7", "--group_reporting", "--output-format=json"],
                             capture_output=True, text=True, check=True)
        read = json.loads(out.stdout)["jobs"][0]["read"]
        return read["bw_bytes"] / (1 << 20), read["clat_ns"]["mean"] / 1e6, server.requests() - before
    finally:
        subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True)
        try:
            mount.wait(30)
        except subprocess.TimeoutExpired:
            mount.kill()
            mount.wait()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--baseline", type=Path, required=True, help="another checkout of dorafs to run beside this one")
    p.add_argument("--io-size", default="16M,64M", help="fio's io_size per job, comma-separated")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    if not S3rver.available() or shutil.which("fio") is None:
        print("sparse: needs s3rver and fio (bash bench/setup.sh)", file=sys.stderr)
        return 1
    work = WORK / "sparse"
    work.mkdir(parents=True, exist_ok=True)
    trees = [("this", REPO), ("baseline", args.baseline.resolve())]
    server = S3rver(work)
    try:
        print("| io_size per job | checkout | MiB/s | mean latency ms | S3 requests |")
        print("|---|---|---|---|---|")
        for io_size in args.io_size.split(","):
            for r in range(args.rounds):
                for name, tree in trees if r % 2 == 0 else trees[::-1]:
                    mib, latency, requests = one_pass(server, tree, work, io_size)
                    print(f"| {io_size} | {name} | {mib:.1f} | {latency:.1f} | {requests} |", flush=True)
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
