"""Which workers are alive: the client's view of the cluster and the worker's heartbeat.

One package, one module per part:

- `view`: `WorkerInfo` (what a worker says of itself), `Membership` (the client's view,
  with listeners), `Outage` (logged once when it starts, once when it ends).
- `static`: a fixed list of worker addresses (`StaticMembership`).
- `registry`: dorafs's own registry over HTTP (`RegistryMembership`, `RegistryRegistration`).
- `etcd`: etcd's v3 HTTP gateway (`EtcdMembership`, `EtcdRegistration`, `list_workers`).
- `heartbeat`: the one heartbeat loop a worker runs against either source.

`open_membership` and `heartbeat_loop` pick the source from the URL's scheme: `etcd://`
is etcd, anything else the registry; no URL but a list of workers is the static list.
Every client here presents the process's `Credentials` (cluster secret, TLS CA).
"""

from __future__ import annotations

import trio

from dorafs.addresses import is_etcd, registry_url
from dorafs.membership.etcd import EtcdMembership, EtcdRegistration
from dorafs.membership.heartbeat import Registration, keep_registered
from dorafs.membership.registry import RegistryMembership, RegistryRegistration
from dorafs.membership.static import StaticMembership
from dorafs.membership.view import Membership, Outage, WorkerInfo
from dorafs.security import Credentials

__all__ = ["Membership", "Outage", "RegistryMembership", "StaticMembership", "EtcdMembership", "WorkerInfo",
           "heartbeat_loop", "open_membership", "open_registration", "registry_url"]


def open_membership(registry: str | None, workers: list[str], credentials: Credentials | None = None) -> Membership:
    """The membership source a client was configured with: a registry (`http://` for the
    embedded registry, `etcd://` for etcd), or a fixed list."""
    if registry and workers:
        raise ValueError("give either a registry or a list of workers, not both")
    if not registry:
        return StaticMembership(workers, credentials=credentials)
    if is_etcd(registry):
        return EtcdMembership(registry)
    return RegistryMembership(registry, credentials=credentials)


def open_registration(registry: str, info: WorkerInfo, interval: float,
                      credentials: Credentials | None = None) -> Registration:
    """A worker's entry in the source `registry` names (`etcd://` or the embedded registry)."""
    if is_etcd(registry):
        return EtcdRegistration(registry, info, interval)
    return RegistryRegistration(registry, info, interval, credentials)


async def heartbeat_loop(registry: str, info: WorkerInfo, interval: float, *,
                         credentials: Credentials | None = None, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Register with `registry` and heartbeat every `interval` seconds until cancelled."""
    await keep_registered(open_registration(registry, info, interval, credentials), interval,
                          task_status=task_status)
