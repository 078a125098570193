"""Membership through dorafs's own registry (registry/), over HTTP.

Subtleties:
- Clients long-poll `/v1/workers?since=VERSION&wait=...`: a change is pushed within a
  round trip, and an idle client costs one request per `POLL_WAIT`.
- A registry that restarted with an empty state counts versions from zero again: its
  `epoch` (random, per state file) tells the client to take the new list at once instead
  of waiting for a version number it has already seen.
- A worker's heartbeat answered 404 means the registry forgot it (restart, or expired):
  it registers again. A registration cancelled while in flight may still have been
  taken, so the worker deregisters then too.
- Every request presents the process's `Credentials` (cluster secret, TLS CA).
"""

from __future__ import annotations

import logging

import httpx
import trio

from dorafs.addresses import registry_url
from dorafs.membership.view import (CONNECT_TIMEOUT, MAX_BACKOFF, REQUEST_TIMEOUT, Membership, Outage, WorkerInfo,
                                    describe)
from dorafs.security import Credentials

log = logging.getLogger(__name__)

POLL_WAIT = 30  # seconds the registry may hold a long poll open


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
        delay, known, outage = 0.2, False, Outage(f"registry {self.url}", log)
        while True:
            try:
                body = await self._fetch(known)
                workers = {w.id: w for w in map(WorkerInfo.from_dict, body["workers"])}
                version = int(body["version"])
            except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
                self.reachable = False
                outage.begin(describe(exc), f"keeping the last known {len(self.workers)} workers and retrying")
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


class RegistryRegistration:
    """A worker's entry in the registry: POST /v1/workers, /v1/heartbeat, /v1/deregister."""

    failures = (httpx.HTTPError, ValueError)

    def __init__(self, url: str, info: WorkerInfo, interval: float, credentials: Credentials | None = None):
        self.url = registry_url(url)
        self.source = f"registry {self.url}"
        self.info = info
        self.interval = interval
        self._http = httpx.AsyncClient(timeout=httpx.Timeout(max(interval, 1.0) + REQUEST_TIMEOUT,
                                                             connect=CONNECT_TIMEOUT),
                                       **(credentials or Credentials()).httpx_options())
        self._maybe_registered = False
        self._warned_ttl = False

    async def register(self) -> bool:
        self._maybe_registered = True  # cancelled while this is in flight, the registry may still take it
        response = await self._http.post(f"{self.url}/v1/workers", json=self.info.to_dict())
        if response.status_code != 200:
            self._maybe_registered = False
            log.error("registry %s refused registration: HTTP %d %s",
                      self.url, response.status_code, response.text[:200])
            return False
        ttl = float(response.json().get("ttl", 0))
        log.info("registered with %s as %s at %s", self.url, self.info.id, self.info.address)
        if ttl and self.interval * 2 > ttl and not self._warned_ttl:
            log.warning("heartbeat interval %.1fs is too long for the registry's %.1fs TTL", self.interval, ttl)
            self._warned_ttl = True
        return True

    async def beat(self) -> bool:
        response = await self._http.post(f"{self.url}/v1/heartbeat", json={"id": self.info.id})
        if response.status_code == 404:
            log.info("registry %s forgot worker %s; registering again", self.url, self.info.id)
            return False
        if response.status_code != 200:
            log.warning("registry %s refused a heartbeat: HTTP %d", self.url, response.status_code)
        return True

    async def deregister(self) -> None:
        if self._maybe_registered:
            await self._http.post(f"{self.url}/v1/deregister", json={"id": self.info.id})

    async def aclose(self) -> None:
        await self._http.aclose()
