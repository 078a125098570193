"""Which workers are alive: the client's view of the cluster, and the worker's heartbeat.

Subtleties:
- The registry is never on the I/O path (design decision 1). A `Membership` keeps the last
  list it knew while its source is unreachable and retries in the background with capped
  backoff; an outage is logged once when it starts and once when it ends.
- `run()` reports itself started once the first view is known, or after a short bounded
  wait when the source does not answer, so a mount never hangs on a dead registry.
- Listeners are plain sync callbacks (they rebuild the hash ring); one that raises is
  logged and the others still run.
- A registry that restarted with an empty state counts versions from zero again: the
  registry's `epoch` (random, per state file) tells the client to take the new list at
  once instead of waiting for a version number it has already seen.
- `heartbeat_loop` re-registers when the registry answers 404 (it forgot the worker:
  restart, or the worker was expired) and deregisters, bounded and shielded, on the way out.
- Every client here presents the process's `Credentials` (cluster secret, TLS CA); static
  workers are probed over https when a CA is configured.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass

import httpx
import trio

from dorafs.config import parse_hostport
from dorafs.security import Credentials

log = logging.getLogger(__name__)

STARTUP_WAIT = 2.0  # run() reports started after this long even if the source is down
POLL_WAIT = 30  # seconds the registry may hold a long poll open
MAX_BACKOFF = 5.0  # retry delay cap while a source is unreachable: recovery within seconds
STATIC_RECHECK = 5.0  # how often static workers are re-probed (catches a changed identity)
CONNECT_TIMEOUT = 2.0
REQUEST_TIMEOUT = 5.0
DEREGISTER_TIMEOUT = 1.0  # a stopping worker does not wait longer than this for the registry


def registry_url(text: str) -> str:
    """`'127.0.0.1:19998'` or `'http://host:port/'` -> `'http://host:port'`."""
    text = text.strip().rstrip("/")
    return text if "://" in text else f"http://{text}"


def _describe(exc: Exception) -> str:
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


class StaticMembership(Membership):
    """A fixed list of worker addresses; each one's identity comes from its /v1/info."""

    def __init__(self, addresses: list[str], *, recheck: float = STATIC_RECHECK,
                 credentials: Credentials | None = None):
        super().__init__()
        self.credentials = credentials or Credentials()
        for address in addresses:
            parse_hostport(address)
        self.addresses = list(dict.fromkeys(addresses))
        self.recheck = recheck
        self._by_address: dict[str, WorkerInfo] = {}

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        http = httpx.AsyncClient(timeout=httpx.Timeout(REQUEST_TIMEOUT, connect=CONNECT_TIMEOUT),
                                 **self.credentials.httpx_options())
        try:
            pending = set(self.addresses)
            first = trio.Event()
            if not pending:
                first.set()

            async def probes(first: trio.Event) -> None:
                async with trio.open_nursery() as nursery:
                    for address in self.addresses:
                        nursery.start_soon(self._probe_loop, http, address, pending, first)

            await self._run_until_first_view(probes, first, task_status)
        finally:
            with trio.CancelScope(shield=True):
                await http.aclose()

    async def _probe_loop(self, http: httpx.AsyncClient, address: str, pending: set, first: trio.Event) -> None:
        delay, down = 0.2, False
        while True:
            try:
                response = await http.get(f"{self.credentials.scheme}://{address}/v1/info")
                response.raise_for_status()
                info = WorkerInfo.from_dict(response.json())
            except (httpx.HTTPError, ValueError) as exc:
                if not down:
                    log.warning("worker %s unreachable (%s); retrying in the background", address, _describe(exc))
                down = True
                ok = False
            else:
                if down:
                    log.info("worker %s (%s) answers again", address, info.id)
                down, ok, delay = False, True, 0.2
                # Clients reach the worker at the address they were given, whatever it advertises.
                info = WorkerInfo(info.id, address, info.page_size, info.capacity)
                if self._by_address.get(address) != info:
                    self._by_address[address] = info
                    self._update({w.id: w for w in self._by_address.values()})
            # A static worker that stops answering stays in the view: a dead worker is a
            # cache miss (the ring's next candidate), and its keys stay where they were.
            pending.discard(address)
            if not pending:
                first.set()
            if ok:
                await trio.sleep(self.recheck)
            else:
                await trio.sleep(delay)
                delay = min(delay * 2, self.recheck)


class RegistryMembership(Membership):
    """Long-polls the registry's worker list; keeps the last one through an outage."""

    def __init__(self, url: str, *, poll_wait: float = POLL_WAIT, max_backoff: float = MAX_BACKOFF,
                 credentials: Credentials | None = None):
        super().__init__()
        self.credentials = credentials or Credentials()
        self.url = registry_url(url)
        self.poll_wait = poll_wait
        self.max_backoff = max_backoff
        self.epoch: str | None = None
        self.reachable = False

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        timeout = httpx.Timeout(self.poll_wait + REQUEST_TIMEOUT, connect=CONNECT_TIMEOUT)
        self._http = httpx.AsyncClient(timeout=timeout, **self.credentials.httpx_options())
        try:
            await self._run_until_first_view(self._poll_loop, trio.Event(), task_status)
        finally:
            with trio.CancelScope(shield=True):
                await self._http.aclose()

    async def _fetch(self, known: bool) -> dict:
        params = {}
        if known:
            params = {"since": self.version, "wait": self.poll_wait}
            if self.epoch:
                params["epoch"] = self.epoch
        response = await self._http.get(f"{self.url}/v1/workers", params=params)
        response.raise_for_status()
        body = response.json()
        if not isinstance(body, dict) or not isinstance(body.get("workers"), list):
            raise ValueError(f"unexpected answer from the registry: {str(body)[:200]}")
        return body

    async def _poll_loop(self, first: trio.Event) -> None:
        delay, known, outage = 0.2, False, Outage(f"registry {self.url}")
        while True:
            try:
                body = await self._fetch(known)
                workers = {w.id: w for w in map(WorkerInfo.from_dict, body["workers"])}
                version = int(body["version"])
            except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
                self.reachable = False
                outage.begin(_describe(exc), f"keeping the last known {len(self.workers)} workers and retrying")
                known = False  # after the outage, resync at once instead of long-polling first
                await trio.sleep(delay)
                delay = min(delay * 2, self.max_backoff)
                continue
            outage.end(f" (version {version}, {len(workers)} workers)")
            self.reachable, delay = True, 0.2
            epoch = body.get("epoch")
            if epoch != self.epoch and self.epoch is not None:
                log.info("registry %s restarted with a new state (epoch %s)", self.url, epoch)
            self.epoch = epoch
            self._update(workers, version)
            known = True
            first.set()


def open_membership(registry: str | None, workers: list[str], credentials: Credentials | None = None) -> Membership:
    """The membership source a client was configured with: a registry (`http://` for the
    embedded registry, `etcd://` for etcd, see dorafs/etcd.py), or a fixed list."""
    if registry and workers:
        raise ValueError("give either a registry or a list of workers, not both")
    if registry:
        from dorafs import etcd

        if etcd.is_etcd(registry):
            return etcd.EtcdMembership(registry)
        return RegistryMembership(registry, credentials=credentials)
    return StaticMembership(workers, credentials=credentials)


async def heartbeat_loop(registry: str, info: WorkerInfo, interval: float, *,
                         credentials: Credentials | None = None, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Register with the registry and heartbeat every `interval` seconds until cancelled."""
    from dorafs import etcd

    if etcd.is_etcd(registry):
        return await etcd.register_loop(registry, info, interval, task_status=task_status)
    url = registry_url(registry)
    http = httpx.AsyncClient(timeout=httpx.Timeout(max(interval, 1.0) + REQUEST_TIMEOUT, connect=CONNECT_TIMEOUT),
                             **(credentials or Credentials()).httpx_options())
    registered = registering = started = warned_ttl = False
    outage = Outage(f"registry {url}")
    try:
        while True:
            try:
                if not registered:
                    registering = True  # cancelled while this is in flight, the registry may still take it
                    response = await http.post(f"{url}/v1/workers", json=info.to_dict())
                    registering = False
                    if response.status_code == 200:
                        registered = True
                        ttl = float(response.json().get("ttl", 0))
                        log.info("registered with %s as %s at %s", url, info.id, info.address)
                        if ttl and interval * 2 > ttl and not warned_ttl:
                            log.warning("heartbeat interval %.1fs is too long for the registry's %.1fs TTL",
                                        interval, ttl)
                            warned_ttl = True
                    else:
                        log.error("registry %s refused registration: HTTP %d %s",
                                  url, response.status_code, response.text[:200])
                else:
                    response = await http.post(f"{url}/v1/heartbeat", json={"id": info.id})
                    if response.status_code == 404:
                        log.info("registry %s forgot worker %s; registering again", url, info.id)
                        registered = False
                        continue
                    if response.status_code != 200:
                        log.warning("registry %s refused a heartbeat: HTTP %d", url, response.status_code)
                outage.end()
            except (httpx.HTTPError, ValueError) as exc:
                outage.begin(_describe(exc), f"retrying every {interval:.1f}s")
            if not started:
                task_status.started()
                started = True
            await trio.sleep(interval)
    finally:
        with trio.CancelScope(shield=True):
            if registered or registering:
                with trio.move_on_after(DEREGISTER_TIMEOUT):
                    try:
                        await http.post(f"{url}/v1/deregister", json={"id": info.id})
                    except httpx.HTTPError:
                        pass  # the registry will expire us after its TTL
            await http.aclose()
