"""The registry's membership table: who is alive, since which version.

Subtleties:
- `version` counts membership changes (a worker added, removed, or changing its address,
  page size or capacity). Heartbeats only refresh a worker's clock: long-polling clients
  wake up for real changes only.
- `epoch` names one history of versions. It is created with a fresh (or unreadable) state
  file and kept across restarts, so a client that knows version 7 of another epoch is
  answered at once instead of waiting for the new registry to reach 7 again.
- A worker registering at the address of another id takes that address over: the old id
  is a previous life of the same process (its cache directory was wiped), and leaving it
  in place would route keys to an address whose owner no longer has them.
- The table is saved to `registry.json` (temp file, fsync, rename, in a thread) after
  every change. On load, every saved worker gets a fresh TTL, so a registry restart does
  not empty the cluster; workers that died meanwhile expire one TTL later.
- Saves are serialised by a lock and each one writes the state current when it runs, so
  the file always ends up with the newest state even when changes race.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from pathlib import Path

import trio

from dorafs.files import write_atomic
from dorafs.membership import WorkerInfo

log = logging.getLogger(__name__)

STATE_FILE = "registry.json"
FORMAT = 1


def _new_epoch() -> str:
    return uuid.uuid4().hex[:12]


class MembershipTable:
    def __init__(self, ttl: float, path: Path | None = None, *, version: int = 0, epoch: str | None = None,
                 clock=time.monotonic):
        self.ttl = ttl
        self.path = path
        self.version = version
        self.epoch = epoch or _new_epoch()
        self._clock = clock
        self._workers: dict[str, WorkerInfo] = {}
        self._last_seen: dict[str, float] = {}
        self._changed = trio.Event()
        self._save_lock = trio.Lock()
        self._save_failing = False

    @classmethod
    def load(cls, state_dir: Path, ttl: float, *, clock=time.monotonic) -> MembershipTable:
        """Read the saved table (blocking: call it before serving or in a thread)."""
        path = state_dir / STATE_FILE
        try:
            raw = path.read_text()
        except FileNotFoundError:
            log.info("no saved state at %s: starting with an empty cluster", path)
            return cls(ttl, path, clock=clock)
        try:
            data = json.loads(raw)
            version, epoch = data["version"], data["epoch"]
            if isinstance(version, bool) or not isinstance(version, int) or version < 0:
                raise ValueError(f"bad version {version!r}")
            if not isinstance(epoch, str) or not epoch:
                raise ValueError(f"bad epoch {epoch!r}")
            workers = [WorkerInfo.from_dict(w) for w in data["workers"]]
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("saved state %s is unreadable (%s): starting with an empty cluster", path, exc)
            return cls(ttl, path, clock=clock)
        table = cls(ttl, path, version=version, epoch=epoch, clock=clock)
        now = clock()
        for info in workers:
            table._workers[info.id] = info
            table._last_seen[info.id] = now
        log.info("loaded state %s: version %d, %d workers (each has %.1fs to heartbeat)",
                 path, version, len(workers), ttl)
        return table

    # -- queries --------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._workers)

    def __contains__(self, wid: str) -> bool:
        return wid in self._workers

    def snapshot(self) -> dict:
        now = self._clock()
        workers = [
            info.to_dict() | {"last_heartbeat_age": round(max(0.0, now - self._last_seen[wid]), 3)}
            for wid, info in sorted(self._workers.items())
        ]
        return {"version": self.version, "epoch": self.epoch, "workers": workers}

    async def wait_for_change(self, since: int, epoch: str | None, timeout: float) -> None:
        """Return when the version moves past `since`, or after `timeout` seconds."""
        if since != self.version or (epoch is not None and epoch != self.epoch):
            return
        with trio.move_on_after(timeout):
            await self._changed.wait()

    # -- changes --------------------------------------------------------------------

    def _bump(self) -> None:
        self.version += 1
        self._changed.set()
        self._changed = trio.Event()

    def register(self, info: WorkerInfo) -> bool:
        """Add or refresh a worker; True if the membership changed."""
        changed = False
        for other_id, other in list(self._workers.items()):
            if other_id != info.id and other.address == info.address:
                log.info("worker %s takes over address %s from %s", info.id, info.address, other_id)
                self._forget(other_id)
                changed = True
        old = self._workers.get(info.id)
        if old != info:
            if old is None:
                log.info("worker %s joined at %s", info.id, info.address)
            else:
                log.info("worker %s changed: %s -> %s", info.id, old, info)
            self._workers[info.id] = info
            changed = True
        self._last_seen[info.id] = self._clock()
        if changed:
            self._bump()
        return changed

    def heartbeat(self, wid: str) -> bool:
        """Refresh a worker's clock; False if the worker is unknown (it must register)."""
        if wid not in self._workers:
            return False
        self._last_seen[wid] = self._clock()
        return True

    def deregister(self, wid: str) -> bool:
        if wid not in self._workers:
            return False
        log.info("worker %s left", wid)
        self._forget(wid)
        self._bump()
        return True

    def expire(self) -> list[str]:
        """Drop workers silent for longer than the TTL; returns their ids."""
        deadline = self._clock() - self.ttl
        gone = [wid for wid, seen in self._last_seen.items() if seen < deadline]
        for wid in gone:
            log.warning("worker %s at %s expired (no heartbeat for %.1fs)", wid, self._workers[wid].address, self.ttl)
            self._forget(wid)
        if gone:
            self._bump()
        return gone

    def _forget(self, wid: str) -> None:
        del self._workers[wid]
        del self._last_seen[wid]

    # -- persistence ----------------------------------------------------------------

    async def save(self) -> None:
        if self.path is None:
            return
        async with self._save_lock:
            data = {
                "format": FORMAT,
                "version": self.version,
                "epoch": self.epoch,
                "workers": [info.to_dict() for _, info in sorted(self._workers.items())],
            }
            try:
                await trio.to_thread.run_sync(write_atomic, self.path, json.dumps(data, indent=1) + "\n")
            except OSError as exc:
                # Membership still works from memory; only a restart would lose it.
                if not self._save_failing:
                    log.error("cannot save state to %s (%s); serving from memory", self.path, exc)
                self._save_failing = True
                return
            if self._save_failing:
                log.info("state saved to %s again", self.path)
            self._save_failing = False
