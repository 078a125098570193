"""The worker's side of membership: one heartbeat loop, whatever the source.

A source says how to register, beat and deregister (`Registration`: the embedded
registry in dorafs/membership/registry.py, etcd in dorafs/membership/etcd.py); this loop
says when:

- Register, then beat every `interval` seconds. A beat that finds the source has
  forgotten the worker (the registry restarted or expired it; the etcd lease is gone or
  its key was deleted) registers again at once.
- A source that cannot be reached is an `Outage`, logged once when it starts and once
  when it ends; the loop keeps trying every interval.
- `task_status.started()` comes after the first attempt, answered or not, so a worker
  never waits on a dead registry.
- On the way out (cancelled) it deregisters, shielded and bounded by
  `DEREGISTER_TIMEOUT`, so clients see the worker leave at once rather than after the TTL.
"""

from __future__ import annotations

import logging
from typing import Protocol

import trio

from dorafs.membership.view import Outage, describe

log = logging.getLogger(__name__)

DEREGISTER_TIMEOUT = 1.0  # a stopping worker does not wait longer than this for its source


class Registration(Protocol):
    """One worker's entry in one membership source."""

    source: str  # "registry http://..." or "etcd etcd://...", for the outage messages
    failures: tuple[type[Exception], ...]  # what an unreachable or confused source raises

    async def register(self) -> bool:
        """Enter the worker; False when the source refused (tried again next interval)."""

    async def beat(self) -> bool:
        """Say the worker is alive; False when the source forgot it (register again)."""

    async def deregister(self) -> None:
        """Leave, if the worker may be registered; failures are ignored (the TTL expires)."""

    async def aclose(self) -> None:
        """Close the connections."""


async def keep_registered(registration: Registration, interval: float, *,
                          task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Register and beat every `interval` seconds until cancelled; then deregister."""
    outage = Outage(registration.source, log)
    registered = started = False
    try:
        while True:
            try:
                if not registered:
                    registered = await registration.register()
                elif not await registration.beat():
                    registered = False
                    continue
                outage.end()
            except registration.failures as exc:
                outage.begin(describe(exc), f"retrying every {interval:.1f}s")
            if not started:
                task_status.started()
                started = True
            await trio.sleep(interval)
    finally:
        with trio.CancelScope(shield=True):
            with trio.move_on_after(DEREGISTER_TIMEOUT):
                try:
                    await registration.deregister()
                except registration.failures:
                    pass  # the source expires the worker after its TTL
            await registration.aclose()
