"""The systems under test, each started and stopped the same way.

A system gives *sessions*; a session owns one cache (a fresh, empty one when it starts)
and can be mounted any number of times. Cold = the first mount of a fresh session; warm
= a later mount of the same session: the system's own cache is kept, the kernel's page
and dentry caches of the old mount are gone with it (a FUSE mount's page cache lives and
dies with its superblock, so no host-wide drop_caches is needed).

Configurations (each peer with its cache on and its documented performance options):

- dorafs: `dorafs mount s3://bench/<mode> MNT --foreground --cache-dir DIR` — the embedded
  single-node cluster with all defaults (1 MiB pages, readahead 8 pages, 64 MiB buffer,
  status/listing TTL 10 s, attr/entry timeout 1 s). `dorafs-w` is the same mount with
  `--workers` pointing at one `dorafs-worker` process the session keeps running.
- s3fs (Debian's s3fs-fuse 1.90): `-o use_cache=DIR` (local disk cache), `kernel_cache`
  (keep the kernel page cache across opens), `max_stat_cache_size=100000`,
  `use_path_request_style`, `ro`; everything else at its defaults (parallel_count=5,
  multipart_size=10 MiB, stat_cache_expire=900 s).
- rclone (Debian's rclone 1.60): `rclone mount --vfs-cache-mode full --cache-dir DIR
  --read-only`, everything else at its defaults (vfs-read-chunk-size 128M, buffer-size
  16M, dir-cache-time 5m, attr-timeout 1s).
- ceiling: bench/ceiling.py, pyfuse3 serving the same bytes from memory.
- native: the same bytes as plain files on the disk the caches are on (bench/.cache/native/),
  bind-mounted read-only (bench/native.py): what reading them needs no FUSE for. Cold: the
  kernel's page cache of those files dropped first (disk reads); warm: as the cold pass
  left it, as it is for the other systems' cache files.

dorafs mounts are read-only (`-o ro`), as the peers' are; so passthrough of wholly cached
files (docs/SEMANTICS.md, promise 32) is on.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

from procs import BENCH, CACHE, REGISTRY, Tracked, children, free_port, is_mounted, stop_pid, unmount, wait_for

PY = sys.executable


def _rm(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


class Mounted:
    """One live mount: where it is and which pids to watch for memory."""

    def __init__(self, system: "System", path: Path, proc: Tracked):
        self.system = system
        self.path = path
        self.proc = proc
        self.rss_pids: dict[str, int] = {"mount": proc.pid}
        self.metrics_port: int | None = None  # a dorafs mount's /metrics (what its reads went through)


class Session:
    def __init__(self, system: "System", root: Path):
        self.system = system
        self.root = root
        self.cache = root / "cache"
        _rm(root)
        self.cache.mkdir(parents=True)
        self.mounts = 0
        self.extra: dict[str, Tracked] = {}

    @contextmanager
    def mount(self):
        self.mounts += 1
        mnt = self.root / f"mnt{self.mounts}"
        mnt.mkdir(parents=True, exist_ok=True)
        argv, env = self.system.mount_argv(self, mnt)
        metrics_port = self.system.metrics_port
        proc = Tracked(f"{self.system.name}-mount", argv, self.root / "mount.log", env=env, cwd=self.system.cwd)
        REGISTRY.mountpoints.append(mnt.resolve())
        grandchildren: list[int] = []
        try:
            def ready():
                if not proc.alive():
                    raise RuntimeError(f"{self.system.name} mount exited with {proc.proc.returncode}:\n"
                                       f"{proc.log_tail()}")
                return is_mounted(mnt)
            wait_for(ready, timeout=60, what=f"the {self.system.name} mount")
            wait_for(lambda: os.path.isdir(mnt / "large"), timeout=30, what=f"{self.system.name} to serve")
            m = Mounted(self.system, mnt, proc)
            m.metrics_port = metrics_port
            self.system.on_mounted(self, m)
            for pid in children(proc.pid):  # the embedded worker
                grandchildren.append(pid)
                REGISTRY.add_pid(pid, "python")
            yield m
        finally:
            unmount(mnt)
            if not proc.wait_exit(20):
                proc.stop()
            REGISTRY.discard(proc)
            for pid in grandchildren:
                stop_pid(pid)
                REGISTRY.extra_pids.pop(pid, None)
            if mnt.resolve() in REGISTRY.mountpoints:
                REGISTRY.mountpoints.remove(mnt.resolve())

    def close(self) -> None:
        for proc in self.extra.values():
            proc.stop()
        _rm(self.root)


class System:
    name = "?"
    is_peer = False
    is_dorafs = False
    config = ""
    cwd: Path | None = None  # where its mount runs (None: this checkout)
    metrics_port: int | None = None  # set by mount_argv for a mount that serves /metrics

    def __init__(self, s3, mode: str, workdir: Path):
        self.s3 = s3
        self.mode = mode
        self.workdir = workdir / self.name
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._sessions = 0

    def session(self) -> Session:
        self._sessions += 1
        return Session(self, self.workdir / f"s{self._sessions}")

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(self.s3.env)
        return env

    def mount_argv(self, session: Session, mnt: Path) -> tuple[list, dict]:
        raise NotImplementedError

    def on_mounted(self, session: Session, m: Mounted) -> None:
        pass

    @staticmethod
    def available() -> str | None:
        """None when it can run here, else why not."""
        return None


class Dorafs(System):
    name = "dorafs"
    is_dorafs = True
    options = ""

    @property
    def config(self):
        opts = f" -o {self.options}" if self.options else ""
        return f"dorafs mount s3://bench/{self.mode} MNT --foreground --cache-dir DIR -o ro{opts} (embedded worker)"

    def env(self):
        env = super().env()
        env["PYTHONPATH"] = str(BENCH.parent) + os.pathsep + env.get("PYTHONPATH", "")
        env.setdefault("DORAFS_LOG_LEVEL", "INFO")
        return env

    def _options(self) -> str:
        """-o of a mount: read-only, the run's options, and a /metrics listener on loopback
        (scraped around each workload: which opens went through passthrough, how many READs
        reached the mount)."""
        self.metrics_port = free_port()
        return ",".join(o for o in ("ro", self.options, f"metrics_listen=127.0.0.1:{self.metrics_port}") if o)

    def mount_argv(self, session, mnt):
        argv = [PY, "-m", "dorafs.cli.main", "mount", f"s3://bench/{self.mode}", mnt, "--foreground",
                "--cache-dir", session.cache, "-o", self._options()]
        return argv, self.env()

    def on_mounted(self, session, m):
        kids = children(m.proc.pid)
        if kids:
            m.rss_pids["worker"] = kids[0]


class DorafsWorker(Dorafs):
    """The mount plus one separate `dorafs-worker` kept for the whole session."""

    name = "dorafs-w"

    @property
    def config(self):
        opts = f" -o {self.options}" if self.options else ""
        return (f"dorafs-worker --listen 127.0.0.1:0 --cache-dir DIR; "
                f"dorafs mount s3://bench/{self.mode} MNT --foreground --workers ADDR{opts}")

    def _worker(self, session: Session) -> str:
        if "worker" not in session.extra:
            port_file = session.root / "worker.addr"
            session.extra["worker"] = w = Tracked(
                "dorafs-worker", [PY, "-m", "worker.main", "--listen", "127.0.0.1:0", "--cache-dir",
                                  session.cache, "--port-file", port_file], session.root / "worker.log",
                env=self.env())

            def ready():
                if not w.alive():
                    raise RuntimeError(f"dorafs-worker exited:\n{w.log_tail()}")
                return port_file.exists() and port_file.read_text().strip()
            session.extra["address"] = wait_for(ready, what="dorafs-worker")
        return session.extra["address"]

    def mount_argv(self, session, mnt):
        address = self._worker(session)
        argv = [PY, "-m", "dorafs.cli.main", "mount", f"s3://bench/{self.mode}", mnt, "--foreground",
                "--workers", address, "-o", self._options()]
        return argv, self.env()

    def on_mounted(self, session, m):
        m.rss_pids["worker"] = session.extra["worker"].pid


class DorafsBaseline(Dorafs):
    """The same embedded mount running the code of another checkout (`--baseline DIR`):
    a change and the code before it, measured side by side in one run."""

    name = "dorafs-base"
    is_dorafs = False  # the targets and ratios stay those of the checkout under test
    checkout: Path | None = None

    @property
    def cwd(self):  # `python -m` puts the working directory first on sys.path
        return self.checkout

    @staticmethod
    def available():
        if DorafsBaseline.checkout is None:
            return "no --baseline checkout given"
        return None

    @property
    def config(self):
        return f"{super().config}, code of {self.checkout} ({_commit(self.checkout)})"

    def env(self):
        env = super().env()
        env["PYTHONPATH"] = str(self.checkout) + os.pathsep + env.get("PYTHONPATH", "")
        return env

    def mount_argv(self, session, mnt):
        argv, env = super().mount_argv(session, mnt)
        python = self.checkout / ".venv" / "bin" / "python"
        if python.exists():  # its own environment, its own dependencies
            argv[0] = str(python)
        return argv, env


def _commit(checkout: Path) -> str:
    try:
        return subprocess.run(["git", "-C", str(checkout), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"


class S3fs(System):
    name = "s3fs"
    is_peer = True
    config = ("s3fs bench:/MODE MNT -f -o url=ENDPOINT,use_path_request_style,ro,use_cache=DIR,"
              "kernel_cache,max_stat_cache_size=100000")

    def __init__(self, *args):
        super().__init__(*args)
        self.passwd = self.workdir / "passwd"
        self.passwd.write_text(f"{self.s3.key}:{self.s3.secret}\n")
        self.passwd.chmod(0o600)

    def mount_argv(self, session, mnt):
        opts = (f"url={self.s3.endpoint},use_path_request_style,passwd_file={self.passwd},ro,"
                f"use_cache={session.cache},kernel_cache,max_stat_cache_size=100000,dbglevel=warn")
        return ["s3fs", f"bench:/{self.mode}", mnt, "-f", "-o", opts], self.env()

    @staticmethod
    def available():
        return None if shutil.which("s3fs") else "s3fs not installed"


class Rclone(System):
    name = "rclone"
    is_peer = True
    config = "rclone mount bench:bench/MODE MNT --vfs-cache-mode full --cache-dir DIR --read-only"

    def __init__(self, *args):
        super().__init__(*args)
        self.conf = self.workdir / "rclone.conf"
        self.conf.write_text(
            "[bench]\ntype = s3\nprovider = Other\n"
            f"endpoint = {self.s3.endpoint}\naccess_key_id = {self.s3.key}\n"
            f"secret_access_key = {self.s3.secret}\nregion = us-east-1\nforce_path_style = true\n")

    def env(self):
        env = super().env()
        # rclone's AWS SDK refuses AWS_CA_BUNDLE with its own HTTP transport; the
        # endpoint is plain HTTP on loopback anyway.
        env.pop("AWS_CA_BUNDLE", None)
        return env

    def mount_argv(self, session, mnt):
        return ["rclone", "mount", f"bench:bench/{self.mode}", mnt, "--config", self.conf,
                "--vfs-cache-mode", "full", "--cache-dir", session.cache, "--read-only"], self.env()

    @staticmethod
    def available():
        return None if shutil.which("rclone") else "rclone not installed"


class Ceiling(System):
    name = "ceiling"
    options = ""  # dorafs's -o options: the ceiling takes the same kernel readahead

    @property
    def read_ahead_kb(self) -> int:
        from dorafs.config import load_config

        options = dict(o.split("=", 1) for o in self.options.split(",") if "=" in o)
        return load_config("mount", {"read_ahead_kb": options.get("read_ahead_kb")} if "read_ahead_kb" in options
                           else {}, env={}).read_ahead_kb

    @property
    def config(self):
        return (f"bench/ceiling.py: pyfuse3 + trio serving the same bytes from memory, "
                f"read_ahead_kb={self.read_ahead_kb} as dorafs")

    def mount_argv(self, session, mnt):
        return [PY, BENCH / "ceiling.py", self.mode, mnt, str(self.read_ahead_kb)], self.env()


class Native(System):
    name = "native"
    config = "the same files on the cache disk, bind-mounted read-only (bench/native.py); cold: page cache dropped"

    def _files(self) -> Path:
        """The dataset as plain files, written once per mode."""
        import dataset

        spec = dataset.SPECS[self.mode]
        root = CACHE / "native" / self.mode
        done = root / ".complete"
        if done.exists() and done.read_text() == spec.digest():
            return root / "data"
        _rm(root)
        for rel, size in spec.objects():
            path = root / "data" / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "wb") as f:
                for off in range(0, size, 64 << 20):
                    f.write(dataset.content(spec, rel, size, off, min(64 << 20, size - off)))
        done.write_text(spec.digest())
        return root / "data"

    def mount_argv(self, session, mnt):
        argv = [PY, BENCH / "native.py", self._files(), mnt]
        if session.mounts == 1:  # cold
            argv.append("--drop")
        return argv, self.env()

    @staticmethod
    def available():
        return None if os.geteuid() == 0 else "needs root (mount --bind)"


SYSTEMS = {cls.name: cls for cls in (Dorafs, DorafsWorker, DorafsBaseline, S3fs, Rclone, Ceiling, Native)}


def versions() -> dict[str, str]:
    def run(argv):
        try:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=20)
            return (out.stdout or out.stderr).strip().splitlines()[0]
        except Exception as exc:
            return f"unavailable ({exc.__class__.__name__})"
    try:
        import pyfuse3  # the ceiling's binding, installed by bench/setup.sh only
        ceiling = pyfuse3.__version__
    except ImportError:
        ceiling = "not installed"
    return {
        "s3fs": run(["s3fs", "--version"]),
        "rclone": run(["rclone", "version"]),
        "fio": run(["fio", "--version"]),
        "pyfuse3": ceiling,
        "python": sys.version.split()[0],
        "kernel": os.uname().release,
        "cpus": str(os.cpu_count()),
    }
