"""What a warm or hot read costs by the path it takes, on one machine, in turns.

    python3 bench/warmpaths.py reread [--mib 256] [--rounds 5]
    python3 bench/warmpaths.py small [--files 500] [--rounds 2]

Both run embedded dorafs mounts (`-o ro`) over a `file://` directory of random bytes in a
temporary directory, so no S3 server is involved.

`reread`: the bench's `reread` scenario re-reads a file at once after a first read; a
dorafs mount then is still sealing and checking that version's object file, so the open
reads the kernel's page cache of the FUSE file (`keep_cache`); once the object file is
ready, the next open is handed to the kernel (passthrough). This reads the same bytes, all
in the page cache, three ways in turns with fio (256 KiB, sequential, `invalidate=0`,
`loops=4`): natively from the worker's object file, through a mount that hands it to the
kernel (passthrough), and through a second mount with `passthrough=0,short_circuit=0`
whose reads come from the FUSE file's page cache. It prints MiB/s and fio's own CPU
seconds per GiB (user + system): CPU is the steadier figure on a loaded machine.

`small`: per file, what `open`, reading to the end (1 MiB reads) and `close` cost, in one
process, for 128 KiB files: cold (first mount), again through the same mount (the kernel's
caches), and through a fresh mount over the warm cache (what the bench's `small` warm pass
measures with 4 processes), with how many READs reached the mount.
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
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from procs import free_port, unmount, wait_for  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


class Mount:
    def __init__(self, ufs: Path, mnt: Path, cache: Path, options: str = ""):
        self.mnt, self.port = mnt, free_port()
        mnt.mkdir(parents=True, exist_ok=True)
        opts = ",".join(o for o in ("ro", f"metrics_listen=127.0.0.1:{self.port}", options) if o)
        self.log = open(mnt.parent / f"{mnt.name}.log", "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "dorafs.cli.main", "mount", f"file://{ufs}", str(mnt),
                                      "--foreground", "--cache-dir", str(cache), "-o", opts], cwd=REPO,
                                     stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_for(lambda: os.path.ismount(mnt) and self.metrics() is not None, timeout=60, what="the mount")

    def metrics(self) -> dict[str, float] | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5) as r:
                text = r.read().decode()
        except OSError:
            return None
        return {line.rpartition(" ")[0]: float(line.rpartition(" ")[2]) for line in text.splitlines()
                if line.startswith("dorafs_mount_")}

    def settle(self) -> None:
        """Until nothing is being prepared (sealed and checked) three polls in a row."""
        idle = 0
        while idle < 3:
            idle = idle + 1 if self.metrics().get("dorafs_mount_object_files_preparing", 0) == 0 else 0
            time.sleep(0.05)

    def close(self) -> None:
        unmount(self.mnt)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.terminate()
            self.proc.wait(10)
        self.log.close()


def read_all(path: Path) -> None:
    buf = bytearray(1 << 20)
    fd = os.open(path, os.O_RDONLY)
    try:
        while os.readv(fd, [buf]):
            pass
    finally:
        os.close(fd)


def fio(path: Path) -> tuple[float, float]:
    """MiB/s and fio's CPU seconds per GiB of one sequential re-read, four loops."""
    out = subprocess.run(["fio", "--name=b", f"--filename={path}", "--readonly", "--ioengine=psync", "--rw=read",
                          "--bs=256k", "--invalidate=0", "--loops=4", "--output-format=json"],
                         capture_output=True, text=True, check=True).stdout
    job = json.loads(out[out.index("{"):])["jobs"][0]
    gib, seconds = job["read"]["io_bytes"] / 2**30, job["read"]["runtime"] / 1000
    return gib * 1024 / seconds, (job["usr_cpu"] + job["sys_cpu"]) / 100 * seconds / gib


def reread(root: Path, mib: int, rounds: int) -> None:
    ufs = root / "ufs"
    ufs.mkdir()
    with open(ufs / "big.bin", "wb") as f:
        for _ in range(mib):
            f.write(os.urandom(1 << 20))
    pt = Mount(ufs, root / "pt", root / "cache-pt")
    cached = Mount(ufs, root / "fc", root / "cache-fc", "passthrough=0,short_circuit=0")
    try:
        read_all(pt.mnt / "big.bin")
        pt.settle()
        read_all(cached.mnt / "big.bin")
        objects = [p for p in (root / "cache-pt" / "objects").rglob("*") if p.is_file() and p.suffix != ".sums"]
        if len(objects) != 1:
            raise SystemExit(f"expected one object file, found {objects}")
        paths = {"native (the object file)": objects[0], "passthrough": pt.mnt / "big.bin",
                 "FUSE page cache": cached.mnt / "big.bin"}
        before = pt.metrics()
        results: dict[str, list[tuple[float, float]]] = {name: [] for name in paths}
        for r in range(rounds):
            for name, path in paths.items():
                results[name].append(fio(path))
            print(f"round {r + 1}: " + ", ".join(f"{n} {v[-1][0]:,.0f} MiB/s {v[-1][1]:.3f} CPU-s/GiB"
                                                 for n, v in results.items()) +
                  f"; load {os.getloadavg()[0]:.1f}", flush=True)
        after = pt.metrics()
        granted = after.get('dorafs_mount_passthrough_opens_total{result="granted"}', 0) - \
            before.get('dorafs_mount_passthrough_opens_total{result="granted"}', 0)
        reads = after["dorafs_mount_reads_total"] - before["dorafs_mount_reads_total"]
        print(f"passthrough mount: {granted:.0f} opens granted (fio opens once per loop), {reads:.0f} READs reached it")
        for name, v in results.items():
            print(f"median {name:<26} {statistics.median(x[0] for x in v):>8,.0f} MiB/s "
                  f"{statistics.median(x[1] for x in v):.3f} CPU-s/GiB")
    finally:
        cached.close()
        pt.close()


def small(root: Path, files: int, rounds: int) -> None:
    ufs = root / "ufs" / "small"
    ufs.mkdir(parents=True)
    for i in range(files):
        (ufs / f"f{i:05d}").write_bytes(os.urandom(128 << 10))
    buf = bytearray(1 << 20)

    def walk(m: Mount, label: str) -> None:
        reads = m.metrics()["dorafs_mount_reads_total"]
        t_open = t_read = t_close = 0.0
        for i in range(files):
            a = time.perf_counter()
            fd = os.open(m.mnt / "small" / f"f{i:05d}", os.O_RDONLY)
            b = time.perf_counter()
            while os.readv(fd, [buf]):
                pass
            c = time.perf_counter()
            os.close(fd)
            d = time.perf_counter()
            t_open, t_read, t_close = t_open + b - a, t_read + c - b, t_close + d - c
        reads = m.metrics()["dorafs_mount_reads_total"] - reads
        print(f"{label:<34} per file: open {1e6 * t_open / files:6.0f} µs, read {1e6 * t_read / files:6.0f} µs, "
              f"close {1e6 * t_close / files:5.0f} µs; {files / (t_open + t_read + t_close):6,.0f} files/s; "
              f"{reads / files:.2f} READs/file; load {os.getloadavg()[0]:.1f}", flush=True)

    m = Mount(root / "ufs", root / "mnt0", root / "cache")
    try:
        walk(m, "cold (first mount)")
        walk(m, "same mount again (kernel caches)")
    finally:
        m.close()
    for r in range(rounds):
        m = Mount(root / "ufs", root / f"mnt{r + 1}", root / "cache")
        try:
            os.listdir(m.mnt / "small")
            walk(m, f"warm: fresh mount {r + 1}, after ls")
        finally:
            m.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("reread")
    a.add_argument("--mib", type=int, default=256)
    a.add_argument("--rounds", type=int, default=5)
    a = sub.add_parser("small")
    a.add_argument("--files", type=int, default=500)
    a.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="dorafs-warmpaths-") as tmp:
        if args.cmd == "reread":
            reread(Path(tmp), args.mib, args.rounds)
        else:
            small(Path(tmp), args.files, args.rounds)


if __name__ == "__main__":
    main()
