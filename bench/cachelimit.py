"""A bound on the kernel's page cache for a group of processes (cgroup v1 memory).

    limit = CacheLimit("dlio-reader", 256 << 20)   # a child of this process's memory cgroup
    argv = limit.wrap(argv)                        # the command starts inside it
    limit.adopt(pid)                               # or: move a running process (and its children) in
    ...
    limit.close()                                  # stops what is left inside (ours only), removes it

cgroup v1 has one limit for everything a group is charged with: anonymous memory,
shared memory (PyTorch's DataLoader hands batches over in /dev/shm), kernel memory and
the page cache of the files its processes read first. A fixed limit would bound the page
cache only as well as one can guess the rest, and a DataLoader's memory changes from
epoch to epoch. So a control loop (every `period` s) keeps

    memory.limit_in_bytes = usage - file pages + budget

where `file pages` = active_file + inactive_file of memory.stat (the page cache: FUSE
files' pages, files read through FUSE passthrough, plain files; not shmem, which is on
the anonymous lists): whatever the group needs besides the page cache is granted as it
grows, and the kernel reclaims page cache past `budget` (a lowered limit makes the kernel
reclaim at once). A process that hits the limit with no page cache left to reclaim (its own
memory grew faster than one turn) waits for the next turn (`memory.oom_control` = 1: no
OOM kill in the group). Between two turns the cache can overshoot by what the group freed
meanwhile; `peak_file` (the largest page cache seen) shows how close it stayed.

Page cache is charged to the group of the process that first brings a page in and stays
charged there; pages already in memory when a process joins stay where they are.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

ROOT = Path("/sys/fs/cgroup/memory")


class Unavailable(RuntimeError):
    pass


def own_memory_cgroup() -> Path:
    with open("/proc/self/cgroup") as f:
        for line in f:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            if "memory" in controllers.split(","):
                return ROOT / path.lstrip("/")
    raise Unavailable("no cgroup v1 memory controller in /proc/self/cgroup")


def parse_size(text: str) -> int:
    """`256MiB`, `1GiB`, `512M`, `0`, `off` (= 0) -> bytes."""
    t = text.strip().lower().replace("ib", "").rstrip("b")
    if t in ("off", "none", ""):
        return 0
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    if t[-1] in units:
        return int(float(t[:-1]) * units[t[-1]])
    return int(t)


def _stat(path: Path) -> dict[str, int]:
    out = {}
    with open(path / "memory.stat") as f:
        for line in f:
            k, v = line.split()
            out[k] = int(v)
    return out


def _read_int(path: Path) -> int:
    return int(path.read_text().split()[0])


def _write(path: Path, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def remove_stale(prefix: str = "bench-") -> list[str]:
    """Remove empty groups an earlier killed run left under our own memory cgroup."""
    done = []
    try:
        base = own_memory_cgroup()
        for d in base.glob(f"{prefix}*"):
            if d.is_dir() and not (d / "cgroup.procs").read_text().split():
                try:
                    d.rmdir()
                    done.append(f"removed stale cgroup {d}")
                except OSError:
                    pass
    except (OSError, Unavailable):
        pass
    return done


class CacheLimit:
    def __init__(self, name: str, budget: int, period: float = 0.05):
        self.budget = budget
        self.period = period
        base = own_memory_cgroup()
        self.path = base / f"bench-{name}-{os.getpid()}"
        try:
            self.path.mkdir()
            _write(self.path / "memory.limit_in_bytes", str(budget + (64 << 20)))
            # A process that hits the limit with nothing left to reclaim waits for the
            # next turn of the loop (which raises the limit) instead of being killed.
            _write(self.path / "memory.oom_control", "1")
        except OSError as exc:
            try:
                self.path.rmdir()
            except OSError:
                pass
            raise Unavailable(f"cannot create a memory cgroup under {base} ({exc.strerror or exc}); "
                              f"cgroup v1 memory must be mounted and writable") from exc
        self.peak_file = 0
        self.peak_other = 0
        self.samples = 0
        self.limit_errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"cachelimit-{name}", daemon=True)
        self._thread.start()

    # -- joining -----------------------------------------------------------------------

    def wrap(self, argv: list[str]) -> list[str]:
        """argv, started inside the group (a shell writes its pid in, then execs argv)."""
        return ["/bin/sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', str(self.path)] + [str(a) for a in argv]

    def adopt(self, pid: int) -> None:
        """Move a running process and its descendants (all threads) into the group."""
        for p in [pid] + descendants(pid):
            try:
                _write(self.path / "cgroup.procs", str(p))
            except ProcessLookupError:
                pass

    def pids(self) -> list[int]:
        try:
            return [int(x) for x in (self.path / "cgroup.procs").read_text().split()]
        except OSError:
            return []

    # -- the control loop ----------------------------------------------------------------

    def _turn(self) -> None:
        stat = _stat(self.path)
        usage = _read_int(self.path / "memory.usage_in_bytes")
        file = stat.get("total_active_file", 0) + stat.get("total_inactive_file", 0)
        other = max(0, usage - file)
        self.peak_file = max(self.peak_file, file)
        self.peak_other = max(self.peak_other, other)
        self.samples += 1
        want = other + self.budget
        try:
            _write(self.path / "memory.limit_in_bytes", str(want))
        except OSError:  # EBUSY: could not reclaim down to it right now; next turn
            self.limit_errors += 1

    def _loop(self) -> None:
        while not self._stop.wait(self.period):
            try:
                self._turn()
            except OSError:
                if not self.path.exists():
                    return

    def stats(self) -> dict:
        out = {"budget_mib": self.budget / (1 << 20), "peak_file_mib": round(self.peak_file / (1 << 20), 1),
               "peak_other_mib": round(self.peak_other / (1 << 20), 1), "samples": self.samples,
               "limit_errors": self.limit_errors}
        try:
            out["failcnt"] = _read_int(self.path / "memory.failcnt")
            out["max_usage_mib"] = round(_read_int(self.path / "memory.max_usage_in_bytes") / (1 << 20), 1)
        except OSError:
            pass
        return out

    def reset_peaks(self) -> None:
        self.peak_file = self.peak_other = 0
        try:
            _write(self.path / "memory.max_usage_in_bytes", "0")
            _write(self.path / "memory.failcnt", "0")
        except OSError:
            pass

    # -- the end ---------------------------------------------------------------------------

    def close(self, timeout: float = 10.0) -> None:
        """Stop the loop, stop every process left inside (they are ours: only what we put
        there), remove the group (its page cache moves to the parent)."""
        self._stop.set()
        self._thread.join(timeout)
        left = self.pids()
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in left:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + timeout / 2
            while self.pids() and time.monotonic() < deadline:
                time.sleep(0.05)
            left = self.pids()
            if not left:
                break
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)


def descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    kids = [int(x) for x in f.read().split()]
                found += kids
                todo += kids
        except OSError:
            pass
    return found


def drop_page_cache(root: Path) -> int:
    """Write back and drop the page cache of every file under root (POSIX_FADV_DONTNEED);
    the number of files."""
    n = 0
    for base, _, names in os.walk(root):
        for name in names:
            try:
                fd = os.open(os.path.join(base, name), os.O_RDONLY | os.O_NOFOLLOW)
            except OSError:
                continue
            try:
                os.fdatasync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                n += 1
            except OSError:
                pass
            finally:
                os.close(fd)
    return n
