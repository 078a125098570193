"""Random 4 KiB reads through a worker that is not read directly, against a FUSE server
answering from memory, side by side in one run.

    python3 bench/remote.py [--runtime 10] [--rounds 3] [--random-read 64KiB,0] [--repo DIR ...]

Needs the quick dataset in s3rver (`bash bench/run.sh` once). Starts s3rver, a registry
and two workers on loopback (tests/cluster.py's real daemons), and a dorafs mount of the
registry's cluster with `-o short_circuit=0,direct_io` (every page comes over HTTP from
the worker that owns the file, as on every node but the file's owner). The 256 MiB object
is read once through the mount first, so the workers hold all its pages (warm). Then, in
turns, fio reads 4 KiB at random offsets of it (O_DIRECT, psync, one job) for `--runtime`
seconds through: the memory file system on dorafs's own FUSE session
(bench/sessionceiling.py, the same bytes, no network) and dorafs with each `random_read`
setting (0: whole 1 MiB pages, as before the setting existed). A fresh mount per turn, so
the mount's page buffer starts empty each time. Prints IOPS, the ratio to the memory
server of the same round, and the mount's CPU µs per read.

With `--repo` (repeatable), each checkout gets its own registry, workers and mounts
(its code on PYTHONPATH and as their working directory), all measured in the same
rounds, so an older commit and this one are compared side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent))

from procs import WORK, cpu_seconds  # noqa: E402
from servers import S3rver  # noqa: E402

import tests.cluster  # noqa: E402
from tests.cluster import ProcessSet  # noqa: E402
from tests.support import wait_for  # noqa: E402

FILE = "large/big.bin"


@contextmanager
def checkout(repo: Path):
    """Processes started meanwhile run `repo`'s code (tests.cluster reads REPO at each start)."""
    saved = tests.cluster.REPO
    tests.cluster.REPO = repo
    try:
        yield
    finally:
        tests.cluster.REPO = saved


def _commit(repo: Path) -> str:
    out = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return out.stdout.strip() or "?"


def fio(path: Path, runtime: int) -> float:
    out = subprocess.run(["fio", "--name=rand", f"--filename={path}", "--readonly", "--rw=randread", "--bs=4k",
                          "--direct=1", "--ioengine=psync", "--time_based", f"--runtime={runtime}",
                          "--output-format=json"], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)["jobs"][0]["read"]["iops"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runtime", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--random-read", default="64KiB,0", help="random_read settings to measure, comma-separated")
    p.add_argument("--repo", action="append", help="a dorafs checkout to measure (repeatable; default: this one)")
    args = p.parse_args()
    settings = args.random_read.split(",")
    repos = [Path(r).resolve() for r in (args.repo or [BENCH.parent])]
    labels = {repo: (f"{repo.name} ({_commit(repo)}) " if args.repo else "dorafs ") for repo in repos}
    work = WORK / "remote"
    work.mkdir(parents=True, exist_ok=True)
    server = S3rver(work)
    results: dict[str, list[float]] = {"memory": []} | {
        f"{labels[repo]}random_read={s}": [] for repo in repos for s in settings}
    cpu: dict[str, list[float]] = {k: [] for k in results}
    ratios: dict[str, list[float]] = {k: [] for k in results}
    try:
        env = dict(os.environ) | server.env
        with tempfile.TemporaryDirectory(dir=work) as tmp, ProcessSet(Path(tmp)) as procs:
            registries = {}
            for repo in repos:
                with checkout(repo):
                    registry = registries[repo] = procs.registry(env=env)
                    for _ in range(2):
                        procs.worker(registry=registry.url, env=env)
                    wait_for(lambda: len(registry.workers()) == 2, what="two workers")
                    warm = procs.mount("s3://bench/quick", registry=registry.url, env=env, options="short_circuit=0")
                subprocess.run(["cat", str(warm.path(FILE))], stdout=subprocess.DEVNULL, check=True)
                warm.unmount()
            mnt = Path(tmp) / "memory-mnt"
            mnt.mkdir()
            for n in range(args.rounds):
                memory = subprocess.Popen([sys.executable, str(BENCH / "sessionceiling.py"), "quick", str(mnt)],
                                          env=env | {"CEILING_DIRECT_IO": "1"})
                try:
                    wait_for(lambda: os.path.ismount(mnt), what="the memory server")
                    before = cpu_seconds(memory.pid)
                    iops = fio(mnt / FILE, args.runtime)
                    results["memory"].append(iops)
                    cpu["memory"].append((cpu_seconds(memory.pid) - before) / (iops * args.runtime) * 1e6)
                finally:
                    subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True)
                    memory.wait(30)
                for (r, repo), setting in ((r, s) for r in enumerate(repos) for s in settings):
                    name = f"{labels[repo]}random_read={setting}"
                    with checkout(repo):
                        mount = procs.mount("s3://bench/quick", registry=registries[repo].url, env=env,
                                            options=f"short_circuit=0,direct_io,random_read={setting}",
                                            name=f"m{n}r{r}{setting.replace('KiB', 'k')}")
                    before = cpu_seconds(mount.proc.pid)
                    iops = fio(mount.path(FILE), args.runtime)
                    cpu[name].append((cpu_seconds(mount.proc.pid) - before) / (iops * args.runtime) * 1e6)
                    mount.unmount()
                    results[name].append(iops)
                for name in results:
                    ratios[name].append(results[name][-1] / results["memory"][-1])
                print(f"round {n + 1}: " + ", ".join(f"{k} {v[-1]:,.0f}" for k, v in results.items()), flush=True)
    finally:
        server.stop()
    print(f"\nrandom 4 KiB reads, O_DIRECT, 1 job, {args.runtime} s x {args.rounds} rounds "
          f"(medians; {time.strftime('%H:%M UTC', time.gmtime())}, load {os.getloadavg()[0]:.1f})")
    print(f"{'system':44} {'IOPS':>8} {'x memory':>9} {'mount CPU µs/read':>18}")
    for name in results:
        print(f"{name:44} {statistics.median(results[name]):>8,.0f} {statistics.median(ratios[name]):>9.3f} "
              f"{statistics.median(cpu[name]):>18.1f}")


if __name__ == "__main__":
    main()
