"""The scenarios: what is measured, how, and in which unit.

Every scenario runs per system in a fresh session (empty cache):

    cold  first mount of the session: every byte and every name touched for the first time
    warm  a remount of the same session: the system's own cache holds the data (the cold
          pass, completed by `prefill` where the cold pass reads only part of it, put it
          there); the kernel page and dentry caches went away with the old mount

`reread` has one phase instead, `kept`: a file read once, then read again through the same
mount, against the same two reads of a local file (`native`).

fio is used where a job shape fits (sequential and random reads of the large object); the
rest are small programs in workloads.py, timed inside the process they run in.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from dataset import MiB, Spec, content
from procs import BENCH, CACHE

PY = sys.executable


@dataclass
class Ctx:
    spec: Spec
    workdir: Path
    quick: bool
    timeout: float
    prime_gib: float = 0.0  # GiB of memory touched and freed just before each cold pass (bench/firsttouch.py)
    names_file: Path = field(init=False)
    flat_file: Path = field(init=False)
    # Set by the harness around a workload: waits until the mount has no background work
    # left that a later read would find done (a dorafs mount: no object file being
    # prepared); the seconds waited, or None where there is nothing to wait for.
    settle: Callable[[], float | None] = field(init=False, default=lambda: None)

    def __post_init__(self):
        self.names_file = self.workdir / "small-names.txt"
        self.names_file.write_text("\n".join(self.spec.small_names()) + "\n")
        self.flat_file = self.workdir / "flat-names.txt"
        self.flat_file.write_text("\n".join(self.spec.flat_names()) + "\n")

    @property
    def stat_seconds(self) -> int:
        return 20 if self.quick else 60

    @property
    def rand_runtime(self) -> int:
        return 5 if self.quick else 20

    def run_json(self, argv: list, timeout: float | None = None) -> dict:
        env = dict(os.environ, OMP_NUM_THREADS="1")
        out = subprocess.run([str(a) for a in argv], capture_output=True, text=True, env=env,
                             timeout=timeout or self.timeout)
        if out.returncode != 0:
            raise RuntimeError(f"{Path(str(argv[0])).name} {' '.join(map(str, argv[1:3]))} failed "
                               f"({out.returncode}): {out.stderr.strip()[-1500:]}")
        lines = [line for line in out.stdout.splitlines() if line.strip().startswith("{")]
        if not lines:
            raise RuntimeError(f"no JSON from {argv[:3]}: {out.stdout[-500:]} {out.stderr[-500:]}")
        return json.loads(lines[-1] if argv[0] != "fio" else out.stdout[out.stdout.index("{"):])

    def workload(self, *args, timeout=None) -> dict:
        return self.run_json([PY, BENCH / "workloads.py", *args], timeout)

    def fio(self, path: Path, *, rw: str, bs: str, jobs: int = 1, size: int | None = None,
            offset_increment: int | None = None, runtime: int | None = None, io_size: int | None = None,
            invalidate: int = 1) -> dict:
        argv = ["fio", "--name=bench", f"--filename={path}", "--readonly", "--ioengine=psync",
                f"--rw={rw}", f"--bs={bs}", f"--numjobs={jobs}", "--group_reporting", "--output-format=json",
                f"--invalidate={invalidate}", "--randrepeat=1", "--randseed=20261121"]
        if size:
            argv.append(f"--size={size}")
        if offset_increment:
            argv.append(f"--offset_increment={offset_increment}")
        if runtime:
            argv.append(f"--runtime={runtime}")
        if io_size:
            argv.append(f"--io_size={io_size}")
        data = self.run_json(argv)
        job = data["jobs"][0]
        read = job["read"]
        if job.get("error"):
            raise RuntimeError(f"fio error {job['error']}")
        clat = read.get("clat_ns", {})
        pct = clat.get("percentile", {})
        return {"iops": read["iops"], "mib_s": read["bw_bytes"] / MiB, "io_mib": read["io_bytes"] / MiB,
                "runtime_s": read["runtime"] / 1000, "lat_mean_us": clat.get("mean", 0) / 1000,
                "lat_p99_us": pct.get("99.000000", 0) / 1000}


class Scenario:
    name = "?"
    title = "?"
    unit = "?"
    higher_better = True
    phases = ("cold", "warm")
    rows: tuple[str, ...] = ()  # several result rows from one run (default: just `name`)

    def row_names(self) -> tuple[str, ...]:
        return self.rows or (self.name,)

    def run(self, ctx: Ctx, mnt: Path, phase: str) -> dict[str, tuple[float, dict]]:
        raise NotImplementedError

    def prefill(self, ctx: Ctx, mnt: Path) -> None:
        """Untimed, at the end of the cold mount: complete the data the warm pass reads."""

    def native(self, ctx: Ctx) -> float | None:
        return None


def _big(mnt: Path) -> Path:
    return mnt / "large" / "big.bin"


class SeqRead(Scenario):
    unit = "MiB/s"

    def __init__(self, readers: int):
        self.readers = readers
        self.name = f"seq{readers}"
        self.title = f"sequential read of {{large}}, {readers} reader{'s' if readers > 1 else ''} (fio 256k)"

    def run(self, ctx, mnt, phase):
        size = ctx.spec.large_size
        part = size // self.readers
        r = ctx.fio(_big(mnt), rw="read", bs="256k", jobs=self.readers, size=part,
                    offset_increment=part if self.readers > 1 else None)
        return {self.name: (r["mib_s"], r)}


class RandRead(Scenario):
    def __init__(self, bs_kib: int):
        self.bs = bs_kib
        self.name = f"rand{bs_kib}k"
        self.unit = "IOPS" if bs_kib <= 4 else "MiB/s"
        self.title = f"random {bs_kib} KiB reads of {{large}}, 4 jobs (fio, capped {{runtime}} s)"

    def run(self, ctx, mnt, phase):
        per_job = (16 if ctx.quick else 64) * MiB if self.bs <= 4 else ctx.spec.large_size // 4
        r = ctx.fio(_big(mnt), rw="randread", bs=f"{self.bs}k", jobs=4, runtime=ctx.rand_runtime,
                    io_size=per_job)
        return {self.name: (r["iops"] if self.unit == "IOPS" else r["mib_s"], r)}

    def prefill(self, ctx, mnt):
        ctx.workload("readall", _big(mnt))


class Reread(Scenario):
    """A file read once, then re-read at once (`reread`), then re-read again once the
    mount is idle (`reread-idle`): a dorafs mount seals and checks a version read to its
    end after its close, and an open meanwhile reads the kernel's page cache of the FUSE
    file instead of waiting; the third read shows the object file handed to the kernel
    (passthrough). Other systems re-read again at once."""

    name = "reread"
    title = "re-read of {large} with the kernel page cache kept (fio 256k), vs a local file"
    unit = "MiB/s"
    phases = ("kept",)
    rows = ("reread", "reread-idle")

    def run(self, ctx, mnt, phase):
        ctx.workload("readall", _big(mnt))
        r = ctx.fio(_big(mnt), rw="read", bs="256k", invalidate=0)
        waited = ctx.settle()
        again = ctx.fio(_big(mnt), rw="read", bs="256k", invalidate=0)
        if waited is not None:
            again["settle_s"] = waited
        return {self.name: (r["mib_s"], r), "reread-idle": (again["mib_s"], again)}

    def native(self, ctx):
        local = CACHE / "local" / f"{ctx.spec.mode}-big.bin"
        if not local.exists() or local.stat().st_size != ctx.spec.large_size:
            local.parent.mkdir(parents=True, exist_ok=True)
            tmp = local.with_suffix(".tmp")
            with open(tmp, "wb") as f:
                for off in range(0, ctx.spec.large_size, 64 * MiB):
                    f.write(content(ctx.spec, "large/big.bin", ctx.spec.large_size, off, 64 * MiB))
            tmp.replace(local)
        ctx.workload("readall", local)
        return ctx.fio(local, rw="read", bs="256k", invalidate=0)["mib_s"]


class SmallFiles(Scenario):
    name = "small"
    title = "{small} files of 128 KiB (100 per directory) in random order, 4 processes"
    unit = "files/s"

    def run(self, ctx, mnt, phase):
        r = ctx.workload("smallfiles", "--root", mnt / "small", "--names", ctx.names_file, "--procs", 4)
        r["mib_s"] = r["bytes"] / MiB / r["seconds"]
        return {self.name: (r["files"] / r["seconds"], r)}


class Loader(Scenario):
    name = "dataloader"
    title = "PyTorch DataLoader, num_workers=4, batch 32, over the {small} files"
    unit = "samples/s"
    rows = ("loader-e1", "loader-e2")

    def run(self, ctx, mnt, phase):
        r = ctx.workload("dataloader", "--root", mnt / "small", "--names", ctx.names_file, "--workers", 4,
                         "--epochs", 2)
        n = r["samples"]
        return {"loader-e1": (n / r["epochs"][0], {"seconds": r["epochs"][0]}),
                "loader-e2": (n / r["epochs"][1], {"seconds": r["epochs"][1]})}


class TimeToFirstByte(Scenario):
    name = "ttfb"
    title = "time to first byte: open + 1-byte read, median of {ttfb_n} files first touched"
    unit = "ms"
    higher_better = False

    def _paths(self, ctx, mnt):
        names = ctx.spec.small_names()
        n = 20 if ctx.quick else 50
        step = max(1, len(names) // n)
        return [mnt / "small" / x for x in names[::step][:n]] + [_big(mnt)]

    def run(self, ctx, mnt, phase):
        r = ctx.workload("ttfb", *self._paths(ctx, mnt))
        small = sorted(r["ms"][:-1])
        detail = {"median_ms": small[len(small) // 2], "max_ms": small[-1], "large_ms": r["ms"][-1]}
        return {self.name: (detail["median_ms"], detail)}

    def prefill(self, ctx, mnt):
        ctx.workload("readall", *self._paths(ctx, mnt))


class ListingCommand(Scenario):
    """A shell command over the flat directory, timed; it must report every file."""

    unit = "s"
    higher_better = False

    def __init__(self, name: str, title: str, argv: list[str], is_file):
        self.name, self.title, self.argv, self.is_file = name, title, argv, is_file

    def run(self, ctx, mnt, phase):
        start = time.perf_counter()
        argv = [str(mnt / "dir") if arg == "DIR" else arg for arg in self.argv]
        out = subprocess.run(argv, capture_output=True, text=True, timeout=ctx.timeout)
        seconds = time.perf_counter() - start
        entries = sum(1 for line in out.stdout.splitlines() if self.is_file(line))
        if out.returncode != 0 or entries != ctx.spec.flat_count:
            raise RuntimeError(f"{self.argv[0]} reported {entries} of {ctx.spec.flat_count} files: "
                               f"{out.stderr[-300:]}")
        return {self.name: (seconds, {"entries": entries})}


def list_long() -> ListingCommand:
    return ListingCommand("ls-l", "`ls -l` of a {flat}-entry directory", ["ls", "-l", "--color=never", "DIR"],
                          lambda line: line.startswith("-"))


def find_files() -> ListingCommand:
    return ListingCommand("find", "`find -type f` of a {flat}-entry directory", ["find", "DIR", "-type", "f"],
                          lambda line: bool(line))


class StatAll(Scenario):
    name = "stat"
    title = ("stat by name of the entries of a {flat}-entry directory, random order, no listing first "
             "(stops after {stat_s} s)")
    unit = "stat/s"

    def run(self, ctx, mnt, phase):
        r = ctx.workload("stat", "--root", mnt / "dir", "--names", ctx.flat_file, "--max-seconds", ctx.stat_seconds)
        return {self.name: (r["entries"] / r["seconds"], r)}


class OpenFiles(Scenario):
    name = "open64"
    title = "64 files ({medium}) open and read at once, one thread each (peak RSS)"
    unit = "MiB/s"

    def run(self, ctx, mnt, phase):
        paths = [mnt / "medium" / n for n in ctx.spec.medium_names()]
        r = ctx.workload("openfiles", *paths)
        return {self.name: (r["bytes"] / MiB / r["seconds"], r)}


def all_scenarios() -> list[Scenario]:
    return [SeqRead(1), SeqRead(4), RandRead(4), RandRead(256), Reread(), SmallFiles(), Loader(),
            TimeToFirstByte(), list_long(), find_files(), StatAll(), OpenFiles()]


def describe(s: Scenario, ctx: Ctx) -> str:
    spec = ctx.spec
    return s.title.format(large=f"a {spec.large_size // MiB} MiB object", small=f"{spec.small_count:,}",
                          runtime=ctx.rand_runtime, ttfb_n=20 if ctx.quick else 50,
                          medium=f"{spec.medium_size // MiB} MiB each", flat=f"{spec.flat_count:,}",
                          stat_s=ctx.stat_seconds)
