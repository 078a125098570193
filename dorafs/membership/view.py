"""The client's view of the live workers, what a worker says of itself, and outages.

Subtleties:
- The registry is never on the I/O path (design decision 1). A `Membership` keeps the last
  list it knew while its source is unreachable and retries in the background with capped
  backoff; an `Outage` is logged once when it starts and once when it ends.
- `run()` reports itself started once the first view is known, or after a short bounded
  wait when the source does not answer, so a mount never hangs on a dead registry.
- Listeners are plain sync callbacks (they rebuild the hash ring); one that raises is
  logged and the others still run.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass

import httpx
import trio

from dorafs.addresses import parse_hostport

log = logging.getLogger(__name__)

STARTUP_WAIT = 2.0  # run() reports started after this long even if the source is down
MAX_BACKOFF = 5.0  # retry delay cap while a source is unreachable: recovery within seconds
CONNECT_TIMEOUT = 2.0
REQUEST_TIMEOUT = 5.0


def describe(exc: BaseException) -> str:
    """One line for a failed call to a membership source."""
    if isinstance(exc, httpx.HTTPStatusError) and exc.response.status_code == 401:
        return "HTTP 401: missing or wrong cluster secret"
    return str(exc) or type(exc).__name__


class Outage:
    """A membership source's outage, logged once when it starts and once when it ends."""

    def __init__(self, source: str, logger: logging.Logger = log):
        self.source = source
        self.log = logger
        self.active = False

    def begin(self, reason: str, meanwhile: str) -> None:
        if not self.active:
            self.log.warning("%s unreachable (%s); %s", self.source, reason, meanwhile)
            self.active = True

    def end(self, detail: str = "") -> None:
        if self.active:
            self.log.info("%s reachable again%s", self.source, detail)
            self.active = False


def _check_int(d: dict, name: str, minimum: int) -> int:
    value = d.get(name)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name!r} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name!r} must be at least {minimum}, got {value}")
    return value


@dataclass(frozen=True)
class WorkerInfo:
    id: str  # stable identity (persisted by the worker), used on the hash ring
    address: str  # "host:port" clients connect to
    page_size: int
    capacity: int  # cache bytes

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> WorkerInfo:
        """Validate and build; extra keys are ignored. Raises ValueError saying what is wrong."""
        if not isinstance(d, dict):
            raise ValueError("worker info must be a JSON object")
        wid, address = d.get("id"), d.get("address")
        if not isinstance(wid, str) or not wid.strip():
            raise ValueError(f"'id' must be a non-empty string, got {wid!r}")
        if not isinstance(address, str) or ":" not in address:
            raise ValueError(f"'address' must be a 'host:port' string, got {address!r}")
        parse_hostport(address)  # raises ValueError naming the address
        return cls(wid, address, _check_int(d, "page_size", 1), _check_int(d, "capacity", 0))


class Membership:
    """The client's view of live workers, kept fresh by `run()`."""

    def __init__(self):
        self.version = 0
        self.workers: dict[str, WorkerInfo] = {}
        self._listeners: list[Callable[[], None]] = []

    def add_listener(self, callback: Callable[[], None]) -> None:
        self._listeners.append(callback)

    def _update(self, workers: dict[str, WorkerInfo], version: int | None = None) -> None:
        """Install a new view; listeners run only if the set of workers changed."""
        changed = workers != self.workers
        self.version = version if version is not None else self.version + int(changed)
        if not changed:
            return
        added = workers.keys() - self.workers.keys()
        removed = self.workers.keys() - workers.keys()
        self.workers = dict(workers)
        log.info("membership version %d: %d workers (+%d -%d)", self.version, len(workers), len(added), len(removed))
        for callback in list(self._listeners):
            try:
                callback()
            except Exception:
                log.exception("membership listener %r failed", callback)

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        raise NotImplementedError

    async def _run_until_first_view(self, loop, first: trio.Event, task_status) -> None:
        """Run `loop(first)`; report started when `first` is set or after STARTUP_WAIT."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(loop, first)
            with trio.move_on_after(STARTUP_WAIT):
                await first.wait()
            task_status.started()
