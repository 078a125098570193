"""The registry daemon as a real process on loopback, and the membership code against it.

Covers the registry's HTTP API (register, heartbeat, deregister, expiry, long poll,
persistence across restarts, bad requests, health and metrics), `RegistryMembership`
and `heartbeat_loop` from `dorafs.membership`, `StaticMembership` against an in-process
worker stand-in, and `dorafs-admin workers`.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import trio

from dorafs.http.server import HttpServer, json_response
from dorafs.membership import RegistryMembership, StaticMembership, WorkerInfo, heartbeat_loop, open_membership
from tests.support import free_port, stop_process, wait_for

REPO = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    return os.environ | {"PYTHONPATH": str(REPO), "DORAFS_LOG_LEVEL": "INFO"}


class Registry:
    """`python -m registry.main` on loopback; restartable on the same port."""

    def __init__(self, tmp: Path, *, ttl: str = "10s", state_dir: Path | None = None):
        self.tmp = tmp
        self.ttl = ttl
        self.state_dir = state_dir or tmp / "state"
        self.port = 0
        self.proc: subprocess.Popen | None = None
        self.logs: list[Path] = []
        self.start()

    def start(self, state_dir: Path | None = None) -> None:
        if state_dir is not None:
            self.state_dir = state_dir
        port_file = self.tmp / "registry.port"
        port_file.unlink(missing_ok=True)
        log = self.tmp / f"registry-{len(self.logs)}.log"
        self.logs.append(log)
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "registry.main", "--listen", f"127.0.0.1:{self.port}",
                 "--state-dir", str(self.state_dir), "--worker-ttl", self.ttl, "--port-file", str(port_file)],
                stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env=_env(),
            )
        proc = self.proc

        def bound():
            assert proc.poll() is None, f"registry exited: {self.log_text()}"
            return port_file.exists() and port_file.read_text().strip()

        address = wait_for(bound, timeout=15, what="registry port file")
        self.port = int(address.rpartition(":")[2])
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
            assert self.proc.returncode == 0, f"registry exited with {self.proc.returncode}: {self.log_text()}"

    def log_text(self) -> str:
        return "".join(p.read_text(errors="replace") for p in self.logs if p.exists())

    # -- HTTP helpers ---------------------------------------------------------------

    def get(self, path: str, **params) -> httpx.Response:
        return httpx.get(self.url + path, params=params, timeout=70)

    def post(self, path: str, body=None, *, content: bytes | None = None) -> httpx.Response:
        if content is not None:
            return httpx.post(self.url + path, content=content, timeout=10)
        return httpx.post(self.url + path, json=body, timeout=10)

    def register(self, wid: str, port: int, **extra) -> dict:
        info = {"id": wid, "address": f"127.0.0.1:{port}", "page_size": 1 << 20, "capacity": 1 << 30} | extra
        response = self.post("/v1/workers", info)
        assert response.status_code == 200, response.text
        return response.json()

    def workers(self) -> dict:
        response = self.get("/v1/workers")
        assert response.status_code == 200, response.text
        return response.json()

    def ids(self) -> list[str]:
        return [w["id"] for w in self.workers()["workers"]]


@pytest.fixture
def registry(tmp_path):
    reg = Registry(tmp_path)
    yield reg
    reg.stop()
    assert "Traceback" not in reg.log_text()


@pytest.fixture
def short_ttl_registry(tmp_path):
    reg = Registry(tmp_path, ttl="1s")
    yield reg
    reg.stop()
    assert "Traceback" not in reg.log_text()


def metric(reg: Registry, name: str) -> float:
    response = reg.get("/metrics")
    for line in response.text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"metric {name} not in {response.text}")


# -- the registry's API ----------------------------------------------------------------


def test_register_list_heartbeat_deregister(registry):
    assert registry.workers() == {"version": 0, "epoch": registry.workers()["epoch"], "workers": []}
    answer = registry.register("w1", 30001)
    assert answer == {"version": 1, "ttl": 10.0}
    registry.register("w2", 30002, page_size=4096, capacity=123)
    state = registry.workers()
    assert state["version"] == 2
    assert [w["id"] for w in state["workers"]] == ["w1", "w2"]
    w2 = state["workers"][1]
    assert w2["address"] == "127.0.0.1:30002" and w2["page_size"] == 4096 and w2["capacity"] == 123
    assert 0 <= w2["last_heartbeat_age"] < 5

    time.sleep(0.3)
    response = registry.post("/v1/heartbeat", {"id": "w1"})
    assert response.status_code == 200 and response.json() == {"version": 2}
    ages = {w["id"]: w["last_heartbeat_age"] for w in registry.workers()["workers"]}
    assert ages["w1"] < ages["w2"]

    unknown = registry.post("/v1/heartbeat", {"id": "nobody"})
    assert unknown.status_code == 404 and "register" in unknown.json()["message"]

    assert registry.post("/v1/deregister", {"id": "w1"}).json() == {"version": 3}
    assert registry.ids() == ["w2"]
    assert registry.post("/v1/deregister", {"id": "w1"}).status_code == 200  # idempotent
    assert registry.workers()["version"] == 3


def test_version_changes_only_with_membership(registry):
    registry.register("w1", 30001)
    for _ in range(5):
        assert registry.post("/v1/heartbeat", {"id": "w1"}).json() == {"version": 1}
    assert registry.register("w1", 30001)["version"] == 1  # same info again: no change
    assert registry.register("w1", 30009)["version"] == 2  # moved to another address
    # A new identity at w1's address replaces it (w1's cache directory was wiped).
    assert registry.register("w1b", 30009)["version"] == 3
    assert registry.ids() == ["w1b"]


def test_worker_expires_after_ttl(short_ttl_registry):
    reg = short_ttl_registry
    reg.register("alive", 30001)
    reg.register("silent", 30002)
    deadline = time.monotonic() + 1.6
    while time.monotonic() < deadline:  # keep one of them beating past the TTL
        assert reg.post("/v1/heartbeat", {"id": "alive"}).status_code == 200
        time.sleep(0.2)
    wait_for(lambda: reg.ids() == ["alive"], timeout=3, what="silent worker expired")
    assert reg.workers()["version"] == 3
    assert metric(reg, "dorafs_registry_expirations_total") == 1
    assert reg.post("/v1/heartbeat", {"id": "silent"}).status_code == 404
    assert "silent at 127.0.0.1:30002 expired" in reg.log_text()


def test_long_poll(registry):
    version = registry.workers()["version"]
    # Nothing changes: the answer comes after `wait`, with the same version.
    started = time.monotonic()
    assert registry.get("/v1/workers", since=version, wait=1).json()["version"] == version
    assert 0.9 <= time.monotonic() - started < 3
    # A version the client does not have, or another epoch: answered at once.
    started = time.monotonic()
    assert registry.get("/v1/workers", since=version + 5, wait=30).json()["version"] == version
    assert registry.get("/v1/workers", since=version, wait=30, epoch="other").json()["version"] == version
    assert time.monotonic() - started < 1

    # A change during the wait: the answer comes promptly with the new state.
    answer = {}

    def poll():
        answer["body"] = registry.get("/v1/workers", since=version, wait=20).json()
        answer["at"] = time.monotonic()

    thread = threading.Thread(target=poll)
    thread.start()
    time.sleep(0.5)
    joined = time.monotonic()
    registry.register("w1", 30001)
    thread.join(10)
    assert answer["body"]["version"] == version + 1
    assert [w["id"] for w in answer["body"]["workers"]] == ["w1"]
    assert answer["at"] - joined < 1


def test_state_survives_restart(tmp_path):
    reg = Registry(tmp_path)
    try:
        reg.register("w1", 30001)
        reg.register("w2", 30002)
        reg.register("w3", 30003)
        reg.post("/v1/deregister", {"id": "w3"})
        before = reg.workers()
        reg.stop()
        reg.start()
        after = reg.workers()
        assert after["version"] == before["version"] == 4
        assert after["epoch"] == before["epoch"]
        assert [{k: v for k, v in w.items() if k != "last_heartbeat_age"} for w in after["workers"]] == \
               [{k: v for k, v in w.items() if k != "last_heartbeat_age"} for w in before["workers"]]
        # The loaded workers got a fresh TTL, and the version goes on from the saved one.
        assert all(w["last_heartbeat_age"] < 5 for w in after["workers"])
        assert reg.register("w4", 30004)["version"] == 5
    finally:
        reg.stop()


def test_corrupt_state_file_starts_empty(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    (state / "registry.json").write_text('{"version": 3, "workers": [')
    reg = Registry(tmp_path, state_dir=state)
    try:
        assert reg.workers()["workers"] == []
        assert "unreadable" in reg.log_text()
        reg.register("w1", 30001)
        assert json.loads((state / "registry.json").read_text())["workers"][0]["id"] == "w1"
    finally:
        reg.stop()


@pytest.mark.parametrize("body, expect", [
    (b"not json", "not JSON"),
    (b"[1, 2]", "JSON object"),
    (b'{"address": "127.0.0.1:1", "page_size": 1, "capacity": 1}', "'id'"),
    (b'{"id": "w", "page_size": 1, "capacity": 1}', "'address'"),
    (b'{"id": "w", "address": "nowhere", "page_size": 1, "capacity": 1}', "'address'"),
    (b'{"id": "w", "address": "127.0.0.1:99999", "page_size": 1, "capacity": 1}', "out of range"),
    (b'{"id": "w", "address": "127.0.0.1:1", "page_size": "1MiB", "capacity": 1}', "'page_size'"),
    (b'{"id": "w", "address": "127.0.0.1:1", "page_size": 0, "capacity": 1}', "'page_size'"),
    (b'{"id": "w", "address": "127.0.0.1:1", "page_size": 1, "capacity": true}', "'capacity'"),
    (b'{"id": 7, "address": "127.0.0.1:1", "page_size": 1, "capacity": 1}', "'id'"),
])
def test_bad_registration_is_400(registry, body, expect):
    response = registry.post("/v1/workers", content=body)
    assert response.status_code == 400
    assert expect in response.json()["message"]
    assert registry.workers()["workers"] == []
    assert registry.get("/healthz").json() == {"status": "ok"}


def test_other_bad_requests(registry):
    assert registry.post("/v1/heartbeat", {}).status_code == 400
    assert "'id'" in registry.post("/v1/heartbeat", {"id": ""}).json()["message"]
    assert registry.post("/v1/deregister", content=b"{").status_code == 400
    assert registry.get("/v1/workers", since="x").status_code == 400
    assert registry.get("/v1/workers", since=0, wait="soon").status_code == 400
    assert registry.get("/v1/workers", since=0, wait="-1").status_code == 400
    assert registry.get("/v1/nothing").status_code == 404
    assert registry.post("/healthz", {}).status_code == 405
    registry.register("w1", 30001)
    assert registry.ids() == ["w1"]


def test_healthz_and_metrics(registry):
    assert registry.get("/healthz").json() == {"status": "ok"}
    registry.register("w1", 30001)
    registry.register("w2", 30002)
    registry.post("/v1/heartbeat", {"id": "w1"})
    registry.post("/v1/deregister", {"id": "w2"})
    response = registry.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    assert metric(registry, "dorafs_registry_workers") == 1
    assert metric(registry, "dorafs_registry_registrations_total") == 2
    assert metric(registry, "dorafs_registry_heartbeats_total") == 1
    assert metric(registry, "dorafs_registry_deregistrations_total") == 1
    assert metric(registry, "dorafs_registry_expirations_total") == 0
    assert metric(registry, "dorafs_registry_membership_version") == 3


def test_bad_arguments_one_line_exit_2(tmp_path):
    for args in (["--worker-ttl", "soon"], ["--listen", "host:port"], ["--worker-ttl", "0"], ["--bogus"]):
        result = subprocess.run([sys.executable, "-m", "registry.main", "--state-dir", str(tmp_path), *args],
                                capture_output=True, text=True, cwd=REPO, env=_env(), timeout=30)
        assert result.returncode == 2, result
        assert result.stderr.startswith("dorafs-registry: error:") and result.stderr.count("\n") == 1, result.stderr


# -- membership from dorafs.membership --------------------------------------------------


async def _until(predicate, timeout: float, what: str) -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.05)


async def _post(url: str, path: str, body: dict) -> None:
    async with httpx.AsyncClient() as http:
        (await http.post(url + path, json=body, timeout=5)).raise_for_status()


def test_registry_membership_follows_joins_and_leaves_and_survives_outage(registry, caplog):
    caplog.set_level(logging.INFO, logger="dorafs.membership")
    registry.register("w1", 30001)

    async def main():
        membership = RegistryMembership(registry.url, poll_wait=5, max_backoff=0.3)
        changes = []
        membership.add_listener(lambda: changes.append(sorted(membership.workers)))
        async with trio.open_nursery() as nursery:
            await nursery.start(membership.run)
            assert sorted(membership.workers) == ["w1"] and membership.version == 1
            assert membership.workers["w1"] == WorkerInfo("w1", "127.0.0.1:30001", 1 << 20, 1 << 30)

            info = {"id": "w2", "address": "127.0.0.1:30002", "page_size": 4096, "capacity": 10}
            started = trio.current_time()
            await _post(registry.url, "/v1/workers", info)
            await _until(lambda: "w2" in membership.workers, 3, "w2 seen")
            assert trio.current_time() - started < 1  # pushed by the long poll, not polled
            await _post(registry.url, "/v1/deregister", {"id": "w1"})
            await _until(lambda: "w1" not in membership.workers, 3, "w1 gone")
            assert changes == [["w1"], ["w1", "w2"], ["w2"]]
            version = membership.version

            # The registry goes away: the last view stays.
            await trio.to_thread.run_sync(registry.stop)
            await _until(lambda: not membership.reachable, 5, "outage noticed")
            await trio.sleep(1.0)
            assert sorted(membership.workers) == ["w2"] and membership.version == version

            # It comes back (same port, same state): the view follows again.
            await trio.to_thread.run_sync(registry.start)
            await _until(lambda: membership.reachable, 5, "registry back")
            await _post(registry.url, "/v1/workers", info | {"id": "w3", "address": "127.0.0.1:30003"})
            await _until(lambda: "w3" in membership.workers, 3, "w3 seen")
            nursery.cancel_scope.cancel()

    trio.run(main)
    outage = [r for r in caplog.records if "unreachable" in r.getMessage()]
    assert len(outage) == 1 and outage[0].levelname == "WARNING"  # once per outage, not per retry
    assert sum("reachable again" in r.getMessage() for r in caplog.records) == 1


def test_registry_membership_starts_when_registry_is_down():
    async def main():
        membership = open_membership(f"127.0.0.1:{free_port()}", [])
        assert isinstance(membership, RegistryMembership)
        async with trio.open_nursery() as nursery:
            started = trio.current_time()
            await nursery.start(membership.run)
            assert 1.5 < trio.current_time() - started < 4
            assert membership.workers == {}
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_heartbeat_loop_reregisters_after_registry_loses_state(registry, tmp_path):
    info = WorkerInfo("hb1", "127.0.0.1:30001", 1 << 20, 1 << 30)

    async def main():
        async with trio.open_nursery() as nursery:
            await nursery.start(heartbeat_loop, registry.url, info, 0.2)
            assert registry.ids() == ["hb1"]
            heartbeats = metric(registry, "dorafs_registry_heartbeats_total")
            await _until(lambda: metric(registry, "dorafs_registry_heartbeats_total") > heartbeats, 3, "a heartbeat")

            # The registry restarts on a fresh, empty state directory.
            await trio.to_thread.run_sync(registry.stop)
            await trio.sleep(0.5)  # a few failed heartbeats
            await trio.to_thread.run_sync(registry.start, tmp_path / "empty-state")
            await _until(lambda: registry.ids() == ["hb1"], 5, "worker registered again")
            nursery.cancel_scope.cancel()
        # Cancelled: the loop deregistered on its way out.
        assert registry.ids() == []

    trio.run(main)


def test_heartbeat_loop_starts_when_registry_is_down():
    info = WorkerInfo("hb2", "127.0.0.1:30001", 1 << 20, 1 << 30)

    async def main():
        async with trio.open_nursery() as nursery:
            with trio.fail_after(5):
                await nursery.start(heartbeat_loop, f"http://127.0.0.1:{free_port()}", info, 0.2)
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_static_membership():
    """Identities come from each worker's /v1/info; a late worker is added when it answers."""
    late_port = free_port()

    def fake_worker(wid: str) -> HttpServer:
        server = HttpServer("fake-worker")

        @server.route("GET", "/v1/info")
        async def info(req):
            return json_response({"id": wid, "address": "elsewhere:1", "page_size": 4096, "capacity": 5, "used": 0})

        return server

    async def main():
        async with trio.open_nursery() as nursery:
            host, port = await nursery.start(fake_worker("s1").serve, "127.0.0.1", 0)
            membership = StaticMembership([f"127.0.0.1:{port}", f"127.0.0.1:{late_port}"], recheck=0.3)
            await nursery.start(membership.run)
            assert membership.workers == {"s1": WorkerInfo("s1", f"127.0.0.1:{port}", 4096, 5)}
            await nursery.start(fake_worker("s2").serve, "127.0.0.1", late_port)
            await _until(lambda: "s2" in membership.workers, 5, "late worker added")
            assert membership.workers["s2"].address == f"127.0.0.1:{late_port}"
            nursery.cancel_scope.cancel()

    trio.run(main)


# -- dorafs-admin --------------------------------------------------------------------------


def _admin(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dorafs.cli.admin", *args],
                          capture_output=True, text=True, cwd=REPO, env=_env(), timeout=30)


def test_admin_workers(registry):
    registry.register("w1", 30001, page_size=4096, capacity=1 << 30)
    result = _admin("--registry", registry.url, "workers", "--json")
    assert result.returncode == 0, result.stderr
    body = json.loads(result.stdout)
    assert body["version"] == 1
    (w1,) = body["workers"]
    assert w1["id"] == "w1" and w1["address"] == "127.0.0.1:30001" and w1["page_size"] == 4096
    assert "last_heartbeat_age" in w1

    def table(columns: int) -> str:
        result = subprocess.run([sys.executable, "-m", "dorafs.cli.admin", "workers"], capture_output=True, text=True,
                                cwd=REPO, env=_env() | {"DORAFS_REGISTRY": f"127.0.0.1:{registry.port}",
                                                        "COLUMNS": str(columns)}, timeout=30)
        assert result.returncode == 0, result.stderr
        return result.stdout

    wide = table(200)
    assert "w1" in wide and "127.0.0.1:30001" in wide and "1 GiB" in wide
    # A narrow terminal wraps the cells rather than cutting them off with an ellipsis.
    narrow = table(60)
    assert "…" not in narrow and "1 GiB" in narrow
    address = "".join(line.split("│")[3].strip() for line in narrow.splitlines() if line.startswith("│"))
    assert address == "127.0.0.1:30001", narrow


def test_admin_registry_down():
    result = _admin("--registry", f"http://127.0.0.1:{free_port()}", "workers", "--json")
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.startswith("dorafs-admin: registry") and result.stderr.count("\n") == 1, result.stderr
