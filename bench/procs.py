"""Processes and mounts the harness starts, and how it always stops them.

Discipline (as in tests/cluster.py): every mount is unmounted (`fusermount3 -u`, then a
lazy `-uz`) and every process is stopped by its own pid (SIGTERM, then SIGKILL), on
success, on error and on Ctrl-C. Children run in their own session so a Ctrl-C reaches
only the harness, which then tears down in order: mounts first, then servers.

Pids are also written to a pid file; a harness killed with SIGKILL leaves it behind and
the next run stops those pids (after checking each is still the command we started) and
unmounts stale mounts under its own work directory, nothing else.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
CACHE = BENCH / ".cache"
WORK = CACHE / "work"
PIDFILE = CACHE / "pids.json"


def own_cpu() -> float:
    """CPU seconds (user and system) this process has spent so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def each_at_once(items, at_once: int, work, per_thread=lambda: None) -> None:
    """`work(item, mine)` for every item in order, `at_once` threads each taking the next
    one as it finishes (`mine`: what `per_thread()` made for that thread, a buffer or a
    client, closed at the thread's end if it has `close`); the first failure is raised
    here once every thread has stopped."""
    pending = list(items)[::-1]
    lock = threading.Lock()
    failures: list[BaseException] = []

    def run() -> None:
        mine = None
        try:
            mine = per_thread()
            while True:
                with lock:
                    if not pending or failures:
                        return
                    item = pending.pop()
                work(item, mine)
        except BaseException as exc:  # reported on the calling thread
            failures.append(exc)
        finally:
            if hasattr(mine, "close"):
                mine.close()

    threads = [threading.Thread(target=run) for _ in range(at_once)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if failures:
        raise failures[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def wait_for(predicate, timeout: float = 30.0, interval: float = 0.02, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")


def mounts() -> set[str]:
    with open("/proc/mounts") as f:
        return {line.split()[1] for line in f}


def is_mounted(path: Path) -> bool:
    return str(Path(path).resolve()) in mounts()


def unmount(path: Path, timeout: float = 15.0) -> None:
    """`fusermount3 -u`, wait; then `fusermount3 -uz` if it is still there."""
    path = Path(path).resolve()
    if not is_mounted(path):
        return
    if subprocess.run(["fusermount3", "-u", str(path)], capture_output=True).returncode != 0 and is_mounted(path):
        subprocess.run(["umount", str(path)], capture_output=True)  # not FUSE: the native system's bind mount
    deadline = time.monotonic() + timeout
    while is_mounted(path) and time.monotonic() < deadline:
        time.sleep(0.05)
    if is_mounted(path):
        subprocess.run(["fusermount3", "-uz", str(path)], capture_output=True)


def children(pid: int) -> list[int]:
    """Direct children of a process (from /proc/PID/task/*/children)."""
    found: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                found += [int(x) for x in f.read().split()]
    except OSError:
        pass
    return found


def cpu_seconds(pid: int, user_only: bool = False) -> float:
    """User and system CPU seconds of a process (with `user_only`, user only: the
    interpreter's share, apart from the kernel's copies)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().split(")")[-1].split()
    return (int(fields[11]) + (0 if user_only else int(fields[12]))) / os.sysconf("SC_CLK_TCK")


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def stop_pid(pid: int, timeout: float = 10.0) -> None:
    """SIGTERM, wait, SIGKILL: only this pid."""
    if not alive(pid):
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if alive(pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


# -- memory ----------------------------------------------------------------------------------

def _status_kib(pid: int, field: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak_rss(pid: int) -> bool:
    """Reset VmHWM (peak RSS) to the current RSS: `echo 5 > /proc/PID/clear_refs`."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mib(pid: int) -> float | None:
    kib = _status_kib(pid, "VmHWM")
    return None if kib is None else kib / 1024


def rss_mib(pid: int) -> float | None:
    kib = _status_kib(pid, "VmRSS")
    return None if kib is None else kib / 1024


# -- tracked processes -----------------------------------------------------------------------

class Tracked:
    """A child process started in its own session, logging to a file."""

    def __init__(self, name: str, argv: list[str], log_path: Path, env: dict[str, str] | None = None,
                 cwd: Path | None = None):
        self.name = name
        self.argv = [str(a) for a in argv]
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as log:
            log.write(f"\n$ {' '.join(self.argv)}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                         env=env, cwd=cwd or REPO, start_new_session=True)
        self.pid = self.proc.pid
        REGISTRY.add(self)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, n: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)
        REGISTRY.discard(self)

    def wait_exit(self, timeout: float) -> bool:
        try:
            self.proc.wait(timeout)
            return True
        except subprocess.TimeoutExpired:
            return False


class _Registry:
    """Everything started and not yet stopped, mirrored into the pid file."""

    def __init__(self):
        self.procs: list[Tracked] = []
        self.mountpoints: list[Path] = []
        self.extra_pids: dict[int, str] = {}  # grandchildren (the embedded worker)

    def add(self, proc: Tracked) -> None:
        self.procs.append(proc)
        self._save()

    def discard(self, proc: Tracked) -> None:
        if proc in self.procs:
            self.procs.remove(proc)
            self._save()

    def add_pid(self, pid: int, cmd: str) -> None:
        self.extra_pids[pid] = cmd
        self._save()

    def _save(self) -> None:
        CACHE.mkdir(parents=True, exist_ok=True)
        data = [{"pid": p.pid, "cmd": p.argv[0]} for p in self.procs]
        data += [{"pid": pid, "cmd": cmd} for pid, cmd in self.extra_pids.items()]
        tmp = PIDFILE.with_suffix(".tmp")
        tmp.write_text(json.dumps(data))
        tmp.replace(PIDFILE)

    def teardown(self) -> None:
        """Unmount every mount we made, then stop every process, newest first."""
        for mnt in list(self.mountpoints):
            try:
                unmount(mnt)
            except Exception as exc:  # keep tearing down the rest
                print(f"bench: unmount of {mnt} failed: {exc!r}")
        self.mountpoints.clear()
        for proc in reversed(list(self.procs)):
            try:
                proc.stop()
            except Exception as exc:
                print(f"bench: stopping {proc.name} (pid {proc.pid}) failed: {exc!r}")
        for pid in list(self.extra_pids):
            stop_pid(pid)
        self.extra_pids.clear()
        self._save()


REGISTRY = _Registry()


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def clean_stale() -> list[str]:
    """Undo what a killed earlier run left: mounts under our work dir, pids in our pid file."""
    done = []
    work = str(WORK.resolve())
    for mnt in sorted(mounts()):
        if mnt.startswith(work + "/"):
            unmount(Path(mnt))
            done.append(f"unmounted stale {mnt}")
    try:
        stale = json.loads(PIDFILE.read_text())
    except (OSError, ValueError):
        stale = []
    for entry in stale:
        pid, cmd = entry["pid"], entry["cmd"]
        line = _cmdline(pid)
        if line and os.path.basename(cmd) in line:
            stop_pid(pid)
            done.append(f"stopped stale pid {pid} ({cmd})")
    PIDFILE.unlink(missing_ok=True)
    return done
