"""The FUSE layer: random 4 KiB reads that reach the mount, dorafs against a pyfuse3 ceiling.

    python3 bench/fuselayer.py [--runtime S] [--rounds N] [--jobs 1,4] [--repo DIR ...]

One run mounts, side by side and in turns:
- dorafs from each `--repo` checkout (default: this one), over a local directory
  (`file://`) holding the quick dataset's large/big.bin (256 MiB), with `-o direct_io`
  so that every read reaches the mount; the file is read once first, so its pages are
  held by the embedded worker (and read from its page files: short circuit);
- bench/ceiling.py: a minimal pyfuse3 server answering the same bytes from memory, its
  opens direct_io too;
- bench/sessionceiling.py: the same memory file system on dorafs's own FUSE session, so
  the two FUSE layers' costs per request can be told apart from dorafs's read path.
Each is read by fio (random 4 KiB, O_DIRECT so the ceiling's reads reach it too, psync,
`--jobs` readers), and the table gives IOPS, the ratio to the ceiling of the same round,
and the CPU the mount process spent per request (its worker's apart). Rounds alternate
the systems, so drifting machine load hits them alike. Needs fio and pyfuse3 (bench/setup.sh).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from dataset import SPECS, object_key, read_range  # noqa: E402
from procs import REPO, WORK, children, cpu_seconds, is_mounted, unmount, wait_for  # noqa: E402

SIZE = SPECS["quick"].large_size
REL = "large/big.bin"


def make_file(ufs: Path) -> Path:
    path = ufs / REL
    if path.exists() and path.stat().st_size == SIZE:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    key = object_key(SPECS["quick"], REL)
    with open(path, "wb") as f:
        for off in range(0, SIZE, 1 << 20):
            f.write(read_range(key, SIZE, off, 1 << 20))
    return path


class Mounted:
    def __init__(self, name: str, argv: list[str], mnt: Path, log: Path, env: dict | None = None,
                 cwd: Path | None = None):
        self.name, self.mnt = name, mnt
        mnt.mkdir(parents=True, exist_ok=True)
        self.log = open(log, "wb")
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=env, cwd=cwd)
        wait_for(lambda: is_mounted(mnt) or self.proc.poll() is not None, timeout=60, what=f"{name} mount")
        if self.proc.poll() is not None:
            raise SystemExit(f"{name} did not mount; see {log}")
        wait_for(lambda: (mnt / REL).exists(), timeout=60, what=f"{name} serving")

    def cpu(self) -> tuple[float, float]:
        """CPU seconds of the mount process and of its children (the embedded worker)."""
        kids = children(self.proc.pid)
        return cpu_seconds(self.proc.pid), sum(cpu_seconds(k) for k in kids if os.path.exists(f"/proc/{k}"))

    def stop(self) -> None:
        unmount(self.mnt)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def fio(path: Path, jobs: int, runtime: int) -> float:
    out = subprocess.run(
        ["fio", "--name=rand4k", f"--filename={path}", "--rw=randread", "--bs=4k", "--direct=1",
         "--ioengine=psync", f"--numjobs={jobs}", "--group_reporting", "--time_based",
         f"--runtime={runtime}", f"--size={SIZE}", "--randrepeat=1", "--randseed=20261121",
         "--output-format=json"], capture_output=True, text=True, check=True).stdout
    return json.loads(out[out.index("{"):])["jobs"][0]["read"]["iops"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runtime", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--jobs", default="1,4")
    ap.add_argument("--repo", action="append", help="a dorafs checkout with its .venv (repeatable; the "
                    "checkout's own code runs, even where its .venv is a link to another's)")
    args = ap.parse_args()
    if not shutil.which("fio"):
        raise SystemExit("fio is missing (bench/setup.sh)")
    repos = [Path(r).resolve() for r in (args.repo or [REPO])]
    work = WORK / "fuselayer"
    work.mkdir(parents=True, exist_ok=True)
    ufs = work / "ufs"
    make_file(ufs)
    python = str(REPO / ".venv" / "bin" / "python")
    systems: list[Mounted] = []
    try:
        systems.append(Mounted("ceiling (pyfuse3, memory)", [python, str(REPO / "bench" / "ceiling.py"), "quick",
                                                             str(work / "mnt-ceiling")],
                               work / "mnt-ceiling", work / "ceiling.log", env=dict(os.environ, CEILING_DIRECT_IO="1")))
        systems.append(Mounted("memory on the dorafs session", [python, str(REPO / "bench" / "sessionceiling.py"),
                                                                "quick", str(work / "mnt-session")],
                               work / "mnt-session", work / "sessionceiling.log",
                               env=dict(os.environ, CEILING_DIRECT_IO="1")))
        for i, repo in enumerate(repos):
            cache = work / f"cache{i}"
            shutil.rmtree(cache, ignore_errors=True)
            mnt = work / f"mnt-dorafs{i}"
            argv = [str(repo / ".venv" / "bin" / "python"), "-m", "dorafs.cli.main", "mount", f"file://{ufs}",
                    str(mnt), "--foreground", "-o", f"direct_io,cache_dir={cache},staging_dir={work / f'staging{i}'}"]
            label = f"dorafs {repo.name} ({_commit(repo)})"
            # Run from the checkout, its packages first: a .venv may be shared between
            # checkouts (an editable install points at one of them).
            env = dict(os.environ, PYTHONPATH=str(repo))
            systems.append(Mounted(label, argv, mnt, work / f"dorafs{i}.log", env=env, cwd=repo))
            with open(mnt / REL, "rb") as f:  # warm: every page into the embedded worker
                while f.read(1 << 20):
                    pass
        results: dict[tuple[str, int], list[tuple[float, float, float]]] = {}
        for _ in range(args.rounds):
            for jobs in [int(j) for j in args.jobs.split(",")]:
                for s in systems:
                    before, before_kids = s.cpu()
                    iops = fio(s.mnt / REL, jobs, args.runtime)
                    after, after_kids = s.cpu()
                    requests = iops * args.runtime
                    results.setdefault((s.name, jobs), []).append(
                        (iops, (after - before) / requests * 1e6, (after_kids - before_kids) / requests * 1e6))
        print(f"\nrandom 4 KiB reads reaching the mount: fio psync O_DIRECT, {args.runtime} s x {args.rounds} rounds, "
              f"{SIZE >> 20} MiB file; medians")
        print(f"{'system':44} {'jobs':>4} {'IOPS':>9} {'x ceiling':>9} {'mount CPU us/req':>17} {'worker us/req':>14}")
        for jobs in [int(j) for j in args.jobs.split(",")]:
            ceiling = statistics.median(r[0] for r in results[(systems[0].name, jobs)])
            for s in systems:
                rows = results[(s.name, jobs)]
                iops = statistics.median(r[0] for r in rows)
                print(f"{s.name:44} {jobs:>4} {iops:>9,.0f} {iops / ceiling:>9.2f} "
                      f"{statistics.median(r[1] for r in rows):>17.1f} {statistics.median(r[2] for r in rows):>14.1f}")
        print("each round's IOPS:", json.dumps({f"{k[0]} j{k[1]}": [round(r[0]) for r in v] for k, v in results.items()}))
    finally:
        for s in systems:
            s.stop()


def _commit(repo: Path) -> str:
    try:
        return subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True).stdout.strip()
    except OSError:
        return "?"


if __name__ == "__main__":
    main()
