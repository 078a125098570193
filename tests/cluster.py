"""Real dorafs processes for tests: workers, registries and FUSE mounts.

Every process logs to a file in the test's temp dir; `check_log` fails a test on a
traceback, or on a WARNING or ERROR line it did not name in `procs.allow`. Mounts are always unmounted on
teardown: `fusermount3 -u`, then lazy `-uz`, then the process is killed by its pid.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.support import stop_process, wait_for

REPO = Path(__file__).resolve().parent.parent
_LEVELS = re.compile(r" (WARNING|ERROR|CRITICAL) ")

# Warnings a test names when it causes them (`procs.allow = (FAILOVER,)`), each matching
# one message of dorafs.
FAILOVER = r"WARNING dorafs\.client\.router .* worker 127\.0\.0\.1:\d+ failed \(.*\); using the next candidate"
EXPIRED = r"WARNING registry\.state .* worker \w+ at 127\.0\.0\.1:\d+ expired \(no heartbeat"
CORRUPT = (r"WARNING dorafs\.client\.workers .* from worker 127\.0\.0\.1:\d+ failed its checksum; asking the worker",
           r"WARNING worker\.service .* corrupt page \w+ in the cache \(checksum \w+, expected \w+\): "
           r"dropped, refetching")
REFUSED = (r"WARNING dorafs\.http\.server .* refused [A-Z]+ \S+ from 127\.0\.0\.1:\d+: "
           r"(no|a wrong) cluster secret \(401\)$")
ESTALE_READ = r'WARNING dorafs\.fuse .* read: (changed|deleted) since version "\w+": \S+ \(ESTALE\)$'
RESENT_BATCH = (r"WARNING dorafs\.registry\.scheduler .* job \w+: batch \d+ to worker \w+ failed \(.*\); "
                r"sending it again later$")


def unreachable(source: str) -> tuple[str, ...]:
    """A membership source down: the worker's heartbeat and the mount's view say so, once."""
    return (rf"WARNING dorafs\.membership\.heartbeat .* {source} unreachable \(.*\); retrying every",
            rf"WARNING dorafs\.membership\.\w+ .* {source} unreachable \(.*\); keeping the last known \d+ workers")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("DORAFS_LOG_LEVEL", "INFO")
    return env


class Process:
    """`env` adds to the process's environment (e.g. DORAFS_SECRET); `http` holds the httpx
    options (token headers, TLS `verify`) and `scheme` the URL scheme the helpers below use."""

    def __init__(self, name: str, argv: list[str], log_path: Path, *, env: dict | None = None,
                 http: dict | None = None):
        self.name = name
        self.argv = argv
        self.log_path = log_path
        self.env = dict(env or {})
        self.http = dict(http or {})
        self.scheme = "https" if self.http.get("verify") not in (None, True) else "http"
        self.proc: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                         env=_env() | self.env, cwd=REPO)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(10)

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def _await_address(self) -> str:
        """Wait for the daemon to write its address to `self.port_file`."""
        def ready():
            if not self.alive():
                raise RuntimeError(f"{self.name} exited:\n{self.log_text()[-3000:]}")
            return self.port_file.exists() and self.port_file.read_text().strip()
        return wait_for(ready, what=f"{self.name} to serve")

    def check_log(self, allow: tuple[str, ...] = ()) -> None:
        """Fail on a traceback, and on a WARNING, ERROR or CRITICAL line that no pattern of
        `allow` (the warnings the test expects) matches."""
        bad = [line for line in self.log_text().splitlines()
               if ("Traceback" in line or _LEVELS.search(line))
               and not any(re.search(pattern, line) for pattern in allow)]
        assert not bad, f"{self.name} logged unexpected warnings or errors:\n" + "\n".join(bad[:20]) + \
            f"\n--- full log {self.log_path} ---\n" + self.log_text()[-4000:]


class Worker(Process):
    def __init__(self, tmp: Path, name: str = "worker", *, registry: str | None = None,
                 cache_size: str = "1GiB", page_size: str = "1MiB", extra: list[str] = (),
                 env: dict | None = None, http: dict | None = None, cache_dir: Path | None = None):
        self.dir = tmp / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port_file = self.dir / "addr"
        self.cache_dir = cache_dir or self.dir / "cache"
        self.registry = registry
        self.cache_size = cache_size
        self.page_size = page_size
        self.extra = list(extra)
        self.address = ""
        argv = self._argv("127.0.0.1:0")
        super().__init__(name, argv, self.dir / "log", env=env, http=http)
        self.address = self._await_address()

    def _argv(self, listen: str) -> list[str]:
        argv = [sys.executable, "-m", "worker.main", "--listen", listen, "--cache-dir", str(self.cache_dir),
                "--cache-size", self.cache_size, "--page-size", self.page_size, "--port-file", str(self.port_file),
                "--heartbeat-interval", "0.5s", *self.extra]
        if self.registry:
            argv += ["--registry", self.registry]
        return argv


    def restart(self, same_port: bool = True) -> None:
        """Stop and start again on the same address, keeping the cache directory."""
        self.stop()
        self.port_file.unlink(missing_ok=True)
        self.argv = self._argv(self.address if same_port else "127.0.0.1:0")
        self.start()
        self.address = self._await_address()

    def metrics(self) -> dict[str, float]:
        """Samples by name (with labels folded in as name{k=v})."""
        text = httpx.get(f"{self.scheme}://{self.address}/metrics", timeout=10, **self.http).text
        samples: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
                samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
        return samples

    def counter(self, name: str) -> float:
        """Sum of a counter's samples across labels (e.g. all UFS request kinds)."""
        return sum(v for k, v in self.metrics().items() if k == name or k.startswith(name + "{"))

    def page_files(self) -> list[Path]:
        root = self.cache_dir / "pages"
        return [p for p in root.glob("??/*") if p.is_file()]

    def page_bytes(self) -> int:
        """The bytes of the page files on disk now (a file the worker evicts between the
        listing and its stat counts as gone)."""
        total = 0
        for path in self.page_files():
            try:
                total += path.stat().st_size
            except FileNotFoundError:
                pass
        return total


class Registry(Process):
    def __init__(self, tmp: Path, name: str = "registry", *, ttl: str = "3s", extra: list[str] = (),
                 env: dict | None = None, http: dict | None = None):
        self.dir = tmp / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port_file = self.dir / "addr"
        self.ttl = ttl
        self.extra = list(extra)
        super().__init__(name, self._argv("127.0.0.1:0"), self.dir / "log", env=env, http=http)
        self.address = self._await_address()
        self.url = f"{self.scheme}://{self.address}"

    def _argv(self, listen: str) -> list[str]:
        return [sys.executable, "-m", "registry.main", "--listen", listen, "--state-dir", str(self.dir / "state"),
                "--worker-ttl", self.ttl, "--port-file", str(self.port_file), *self.extra]


    def restart(self, *, crash: bool = False) -> None:
        """Stop (SIGKILL with `crash`) and start again on the same address and state."""
        self.kill() if crash else self.stop()
        self.port_file.unlink(missing_ok=True)
        self.argv = self._argv(self.address)
        self.start()
        self.address = self._await_address()

    def workers(self) -> list[dict]:
        return httpx.get(f"{self.url}/v1/workers", timeout=5, **self.http).json()["workers"]


def is_mounted(path: Path) -> bool:
    target = str(Path(path).resolve())
    with open("/proc/mounts") as f:
        return any(line.split()[1] == target for line in f)


class Mount(Process):
    """`dorafs mount --foreground` as a child process."""

    def __init__(self, tmp: Path, ufs_uri: str, *, name: str = "mount", workers: list[str] = (),
                 registry: str | None = None, options: str = "", extra: list[str] = (),
                 env: dict | None = None):
        self.mountpoint = tmp / f"{name}-mnt"
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        argv = [sys.executable, "-m", "dorafs.cli.main", "mount", ufs_uri, str(self.mountpoint), "--foreground"]
        if workers:
            argv += ["--workers", ",".join(workers)]
        if registry:
            argv += ["--registry", registry]
        if options:
            argv += ["-o", options]
        argv += list(extra)
        super().__init__(name, argv, tmp / f"{name}.log", env=env)

        def ready():
            if not self.alive():
                raise RuntimeError(f"mount exited with {self.proc.returncode}:\n{self.log_text()[-3000:]}")
            return is_mounted(self.mountpoint)
        wait_for(ready, timeout=30, what="the mount")

    def path(self, *parts: str) -> Path:
        return self.mountpoint.joinpath(*parts)

    def unmount(self) -> None:
        if is_mounted(self.mountpoint):
            subprocess.run(["fusermount3", "-u", str(self.mountpoint)], capture_output=True)
            deadline = time.monotonic() + 10
            while is_mounted(self.mountpoint) and time.monotonic() < deadline:
                time.sleep(0.05)
            if is_mounted(self.mountpoint):
                subprocess.run(["fusermount3", "-uz", str(self.mountpoint)], capture_output=True)
        if self.proc is not None:
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    stop = unmount


class ProcessSet:
    """Starts processes and always stops them, mounts first; then checks their logs."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.started: list[Process] = []
        self.allow: tuple[str, ...] = ()
        self._n = 0

    def _name(self, kind: str, kw: dict) -> str:
        self._n += 1
        return kw.pop("name", f"{kind}{self._n}")

    def worker(self, **kw) -> Worker:
        return self._add(Worker(self.tmp, self._name("worker", kw), **kw))

    def registry(self, **kw) -> Registry:
        return self._add(Registry(self.tmp, self._name("registry", kw), **kw))

    def mount(self, uri: str, **kw) -> Mount:
        return self._add(Mount(self.tmp, uri, name=self._name("mount", kw), **kw))

    def etcd(self, **kw) -> "Etcd":
        return self._add(Etcd(self.tmp, name=self._name("etcd", kw), **kw))

    def _add(self, proc):
        self.started.append(proc)
        return proc

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        # Mounts first, then the rest in the reverse of their start (workers before the
        # registry they beat to, so they leave it cleanly); etcd last, so stopping workers
        # can still revoke their leases.
        for proc in sorted(reversed(self.started), key=lambda x: (not isinstance(x, Mount), isinstance(x, Etcd))):
            try:
                proc.stop()
            except Exception as error:  # keep tearing down the rest
                print(f"teardown of {proc.name} failed: {error!r}")
        if exc_type is None:
            failures = []
            for proc in self.started:
                try:
                    proc.check_log(self.allow)
                except AssertionError as failure:
                    failures.append(str(failure))
            assert not failures, "\n\n".join(failures)
        return False


class EtcdMember(Process):
    """One etcd member (Debian's etcd-server), started again with the same ports and data."""

    def check_log(self, allow: tuple[str, ...] = ()) -> None:
        pass  # etcd's own log reports the peers a test kills; it is not dorafs's log

    def wait_healthy(self, timeout: float = 30.0) -> None:
        def healthy():
            if not self.alive():
                raise RuntimeError(f"{self.name} exited:\n{self.log_text()[-3000:]}")
            try:
                return httpx.get(f"{self.client_url}/health", timeout=1).json().get("health") == "true"
            except (httpx.HTTPError, ValueError):
                return False
        wait_for(healthy, timeout=timeout, what=f"{self.name} to be healthy")


class Etcd:
    """A cluster of etcd members on loopback ports, data under the test's temp dir.

    `url` is the `etcd://` URL dorafs takes. Members are stopped by their pids.
    """

    def __init__(self, tmp: Path, members: int = 3, name: str = "etcd"):
        import uuid

        from tests.support import free_port

        self.dir = tmp / name
        self.dir.mkdir(parents=True, exist_ok=True)
        names = [f"{name}{i}" for i in range(members)]
        clients = [free_port() for _ in names]
        peers = [free_port() for _ in names]
        cluster = ",".join(f"{n}=http://127.0.0.1:{p}" for n, p in zip(names, peers))
        token = uuid.uuid4().hex[:12]
        self.members: list[EtcdMember] = []
        for n, client, peer in zip(names, clients, peers):
            argv = ["etcd", "--name", n, "--data-dir", str(self.dir / n),
                    "--listen-client-urls", f"http://127.0.0.1:{client}",
                    "--advertise-client-urls", f"http://127.0.0.1:{client}",
                    "--listen-peer-urls", f"http://127.0.0.1:{peer}",
                    "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
                    "--initial-cluster", cluster, "--initial-cluster-state", "new",
                    "--initial-cluster-token", token]
            member = EtcdMember(n, argv, self.dir / f"{n}.log")
            member.client_url = f"http://127.0.0.1:{client}"
            self.members.append(member)
        for member in self.members:
            member.wait_healthy()
        self.url = "etcd://" + ",".join(m.client_url.removeprefix("http://") for m in self.members)

    def kill(self, i: int) -> None:
        self.members[i].kill()

    def start(self, i: int) -> None:
        self.members[i].start()

    def stop(self) -> None:
        for member in self.members:
            member.stop()

    def check_log(self, allow: tuple[str, ...] = ()) -> None:
        pass

    def call(self, path: str, body: dict) -> dict:
        """One JSON call to the first live member's v3 gateway."""
        for member in self.members:
            if member.alive():
                try:
                    return httpx.post(f"{member.client_url}/v3{path}", json=body, timeout=5).json()
                except httpx.HTTPError:
                    continue
        raise RuntimeError("no etcd member answered")
