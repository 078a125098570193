"""Membership in etcd, through its v3 HTTP/JSON gateway (httpx; no gRPC dependency).

`etcd://HOST:PORT[,HOST:PORT...][/NAMESPACE]` names the cluster's client endpoints ('+'
also separates them, for `mount -o registry=...` where ',' separates options);
workers live under the key prefix `/NAMESPACE/workers/` (default `/dorafs/workers/`),
one key per worker id whose value is its `WorkerInfo` as JSON.

Workers (a `Registration` for the heartbeat loop in dorafs/membership/heartbeat.py):
grant a lease (TTL five heartbeat intervals, at least 2 s), put their key with
it, and keep the lease alive every heartbeat interval. A keep-alive answered without a
TTL means the lease is gone (expired during a partition, or a rebuilt cluster): grant a
new one and put the key again. Every tenth heartbeat the worker also checks its key is
still there (an operator may have deleted it). On the way out the lease is revoked, so
clients see the worker leave at once rather than after the TTL.

Clients: range-read the prefix, then watch it from the next revision. Events update the
view; a watch cancelled by the server (compaction: `compact_revision`, or the member
losing its leader: the `hasleader` metadata asks etcd to cancel instead of going
silent) or a broken stream leads to a fresh read and a new watch. The watch is also
renewed every `WATCH_RENEW` seconds, which bounds how long a member that stopped
answering can hold a client. Through an outage of the whole cluster the client keeps the
last view it had (design decision 1), retrying with capped backoff.

Endpoints are tried in turn: a request that cannot reach one member (or that member
answers with an error) goes to the next, so one member down costs one failed connect.
"""

from __future__ import annotations

import base64
import json
import logging
import math

import httpx
import trio

from dorafs.addresses import parse_etcd_url as parse_url
from dorafs.membership.view import Membership, Outage, WorkerInfo

__all__ = ["EtcdClient", "EtcdError", "EtcdMembership", "EtcdRegistration", "list_workers", "parse_url",
           "prefix_end"]

log = logging.getLogger(__name__)

API = "/v3"  # etcd 3.4 serves /v3 (and /v3beta); 3.5 only /v3
CONNECT_TIMEOUT = 1.0
REQUEST_TIMEOUT = 5.0
WATCH_RENEW = 60.0  # seconds a watch stream is trusted before a fresh read
MAX_BACKOFF = 5.0
MIN_LEASE_TTL = 2  # etcd rounds shorter leases up to about this anyway
CHECK_EVERY = 10  # heartbeats between checks that our key is still there
LEADER_HEADER = {"Grpc-Metadata-hasleader": "true"}


class EtcdError(Exception):
    """No endpoint answered, or the answer was an error."""


def _b64(text: str | bytes) -> str:
    return base64.b64encode(text.encode() if isinstance(text, str) else text).decode()


def _unb64(text: str) -> bytes:
    return base64.b64decode(text or "")


def prefix_end(prefix: str) -> str:
    """The range_end that makes a range cover every key starting with `prefix`."""
    raw = bytearray(prefix.encode())
    raw[-1] += 1
    return _b64(bytes(raw))


def _describe(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


class EtcdClient:
    """JSON calls to the gateway, moving to the next endpoint when one fails."""

    def __init__(self, endpoints: list[str], *, timeout: float = REQUEST_TIMEOUT):
        self.endpoints = endpoints
        self._current = 0
        self._http = httpx.AsyncClient(timeout=httpx.Timeout(timeout, connect=CONNECT_TIMEOUT))

    @property
    def endpoint(self) -> str:
        return self.endpoints[self._current]

    def next_endpoint(self) -> None:
        self._current = (self._current + 1) % len(self.endpoints)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def call(self, path: str, body: dict) -> dict:
        errors = []
        for _ in range(len(self.endpoints)):
            endpoint = self.endpoint
            try:
                response = await self._http.post(f"{endpoint}{API}{path}", json=body, headers=LEADER_HEADER)
                answer = response.json()
                if response.status_code != 200:
                    raise EtcdError(f"HTTP {response.status_code}: {answer.get('message') or answer.get('error')}")
                return answer
            except (httpx.HTTPError, ValueError, EtcdError, AttributeError) as exc:
                errors.append(f"{endpoint}: {_describe(exc)}")
                self.next_endpoint()
        raise EtcdError("; ".join(errors))

    async def range_prefix(self, prefix: str) -> tuple[list[dict], int]:
        answer = await self.call("/kv/range", {"key": _b64(prefix), "range_end": prefix_end(prefix)})
        return answer.get("kvs", []), int(answer["header"]["revision"])

    def watch_stream(self, prefix: str, start_revision: int):
        """An httpx streaming response of the watch (the caller enters it)."""
        body = {"create_request": {"key": _b64(prefix), "range_end": prefix_end(prefix),
                                   "start_revision": start_revision, "progress_notify": True}}
        timeout = httpx.Timeout(None, connect=CONNECT_TIMEOUT)
        return self._http.stream("POST", f"{self.endpoint}{API}/watch", json=body, headers=LEADER_HEADER,
                                 timeout=timeout)


def _worker_from_kv(kv: dict) -> WorkerInfo:
    return WorkerInfo.from_dict(json.loads(_unb64(kv.get("value", ""))))


def _view(kvs: list[dict], prefix: str) -> dict:
    workers = {}
    for kv in kvs:
        key = _unb64(kv.get("key", "")).decode(errors="replace")
        try:
            info = _worker_from_kv(kv)
        except (ValueError, TypeError) as exc:
            log.warning("ignoring a malformed worker entry %s in etcd: %s", key, exc)
            continue
        workers[key[len(prefix):]] = info
    return workers


class _WatchCancelled(Exception):
    pass


class EtcdMembership(Membership):
    """The prefix read once, then followed by a watch; the last view kept in outages."""

    def __init__(self, url: str):
        super().__init__()
        self.url = url
        self.endpoints, self.prefix = parse_url(url)
        self.reachable = False
        self.watch_renew = WATCH_RENEW

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        self._etcd = EtcdClient(self.endpoints)
        try:
            await self._run_until_first_view(self._loop, trio.Event(), task_status)
        finally:
            with trio.CancelScope(shield=True):
                await self._etcd.aclose()

    async def _loop(self, first: trio.Event) -> None:
        delay, outage = 0.2, Outage(f"etcd {self.url}", log)
        while True:
            try:
                kvs, revision = await self._etcd.range_prefix(self.prefix)
            except (EtcdError, KeyError, ValueError, TypeError) as exc:
                self.reachable = False
                outage.begin(_describe(exc), f"keeping the last known {len(self.workers)} workers and retrying")
                await trio.sleep(delay)
                delay = min(delay * 2, MAX_BACKOFF)
                continue
            outage.end(f" (revision {revision}, {len(kvs)} workers)")
            self.reachable, delay = True, 0.2
            workers = _view(kvs, self.prefix)
            self._update(workers)
            first.set()
            try:
                with trio.move_on_after(self.watch_renew):
                    await self._watch(dict(workers), revision + 1)
            except _WatchCancelled as exc:
                log.info("etcd watch on %s cancelled (%s); reading the workers again", self.url, exc)
            except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
                log.info("etcd watch on %s ended (%s); reading the workers again", self._etcd.endpoint,
                         _describe(exc))
                self._etcd.next_endpoint()
                await trio.sleep(0.1)

    async def _watch(self, workers: dict, start: int) -> None:
        async with self._etcd.watch_stream(self.prefix, start) as response:
            if response.status_code != 200:
                raise ValueError(f"watch answered HTTP {response.status_code}")
            async for line in response.aiter_lines():
                if not line.strip():
                    continue
                message = json.loads(line)
                if "error" in message:
                    raise _WatchCancelled(_describe(ValueError(str(message["error"])[:200])))
                result = message.get("result", {})
                if result.get("canceled") or result.get("compact_revision"):
                    reason = result.get("cancel_reason") or f"compacted at {result.get('compact_revision')}"
                    raise _WatchCancelled(reason)
                events = result.get("events", [])
                for event in events:
                    kv = event.get("kv", {})
                    wid = _unb64(kv.get("key", "")).decode(errors="replace")[len(self.prefix):]
                    if event.get("type") == "DELETE":
                        workers.pop(wid, None)
                    else:
                        try:
                            workers[wid] = _worker_from_kv(kv)
                        except (ValueError, TypeError) as exc:
                            log.warning("ignoring a malformed worker entry %s in etcd: %s", wid, exc)
                if events:
                    self._update(dict(workers))
        raise httpx.ReadError("watch stream closed")


class EtcdRegistration:
    """A worker's key under the prefix, held by a lease that each beat keeps alive."""

    failures = (EtcdError, ValueError, TypeError)

    def __init__(self, url: str, info: WorkerInfo, interval: float):
        endpoints, prefix = parse_url(url)
        self.url = url
        self.source = f"etcd {url}"
        self.info = info
        self.key = prefix + info.id
        self.ttl = max(MIN_LEASE_TTL, math.ceil(interval * 5))
        self._etcd = EtcdClient(endpoints, timeout=max(interval, 1.0) + REQUEST_TIMEOUT)
        self._lease: str | None = None
        self._beats = 0

    async def register(self) -> bool:
        grant = await self._etcd.call("/lease/grant", {"TTL": self.ttl})
        if not grant.get("ID"):
            raise EtcdError(f"lease grant refused: {grant}")
        value = json.dumps(self.info.to_dict())
        await self._etcd.call("/kv/put", {"key": _b64(self.key), "value": _b64(value), "lease": grant["ID"]})
        self._lease = grant["ID"]
        log.info("registered in etcd %s as %s at %s (lease %s, TTL %ds)",
                 self.url, self.info.id, self.info.address, self._lease, self.ttl)
        return True

    async def beat(self) -> bool:
        answer = await self._etcd.call("/lease/keepalive", {"ID": self._lease})
        if int(answer.get("result", {}).get("TTL", 0)) <= 0:
            log.info("etcd lease %s of worker %s expired; registering again", self._lease, self.info.id)
            self._lease = None
            return False
        self._beats += 1
        if self._beats % CHECK_EVERY == 0:
            found = await self._etcd.call("/kv/range", {"key": _b64(self.key), "keys_only": True})
            if not found.get("kvs"):
                log.info("worker %s's key vanished from etcd; registering again", self.info.id)
                await self._etcd.call("/lease/revoke", {"ID": self._lease})
                self._lease = None
                return False
        return True

    async def deregister(self) -> None:
        if self._lease is not None:
            await self._etcd.call("/lease/revoke", {"ID": self._lease})

    async def aclose(self) -> None:
        await self._etcd.aclose()


def list_workers(url: str) -> dict:
    """The registry's `/v1/workers` shape, read from etcd (blocking; for dorafs-admin)."""
    endpoints, prefix = parse_url(url)
    errors = []
    for endpoint in endpoints:
        try:
            with httpx.Client(timeout=httpx.Timeout(REQUEST_TIMEOUT, connect=CONNECT_TIMEOUT)) as http:
                answer = http.post(f"{endpoint}{API}/kv/range",
                                   json={"key": _b64(prefix), "range_end": prefix_end(prefix)}).raise_for_status().json()
                workers = []
                for kv in answer.get("kvs", []):
                    entry = json.loads(_unb64(kv.get("value", "")))
                    lease = kv.get("lease")
                    if lease:
                        ttl = http.post(f"{endpoint}{API}/kv/lease/timetolive", json={"ID": lease}).json()
                        granted, left = int(ttl.get("grantedTTL", 0)), int(ttl.get("TTL", 0))
                        if granted and left >= 0:
                            entry["last_heartbeat_age"] = granted - left
                    workers.append(entry)
                return {"version": int(answer["header"]["revision"]), "workers": workers}
        except (httpx.HTTPError, ValueError, KeyError) as exc:
            errors.append(f"{endpoint}: {_describe(exc)}")
    raise EtcdError("; ".join(errors))
