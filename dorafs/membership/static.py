"""A fixed list of worker addresses; each one's identity comes from its `/v1/info`.

Subtleties:
- A static worker that stops answering stays in the view: a dead worker is a cache miss
  (the ring's next candidate), and its keys stay where they were.
- Each worker is re-probed every `STATIC_RECHECK` seconds, which catches a changed
  identity; an unreachable one is probed with capped backoff and logged once.
- Workers are probed over https when the credentials carry a TLS CA.
"""

from __future__ import annotations

import logging

import httpx
import trio

from dorafs.addresses import parse_hostport
from dorafs.membership.view import CONNECT_TIMEOUT, REQUEST_TIMEOUT, Membership, WorkerInfo, describe
from dorafs.security import Credentials

log = logging.getLogger(__name__)

STATIC_RECHECK = 5.0  # how often static workers are re-probed (catches a changed identity)


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
                    log.warning("worker %s unreachable (%s); retrying in the background", address, describe(exc))
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
            pending.discard(address)
            if not pending:
                first.set()
            if ok:
                await trio.sleep(self.recheck)
            else:
                await trio.sleep(delay)
                delay = min(delay * 2, self.recheck)
