"""The registry's HTTP API.

  POST /v1/workers     WorkerInfo JSON            -> {"version", "ttl"}   (register / refresh)
  POST /v1/heartbeat   {"id"}                     -> {"version"}; 404 if unknown: register again
  POST /v1/deregister  {"id"}                     -> {"version"} (idempotent)
  GET  /v1/workers[?since=V&wait=S&epoch=E]       -> {"version", "epoch", "workers": [WorkerInfo
                                                      + "last_heartbeat_age"]}
        With `since` equal to the current version (and `epoch`, if given, the current one)
        the answer waits up to `wait` seconds (default 30, at most 60) for a change.
  POST /v1/jobs        {"uri", "kind": load|free, "recursive", "bandwidth", "verify",
                        "metadata_only", "skip_cached"}   -> the job's summary (with its "id")
  GET  /v1/jobs                                   -> {"jobs": [summaries, newest first]}
  GET  /v1/job?id=                                -> the job's summary and its "failed_files"
  POST /v1/job/cancel?id=                         -> the same, once cancelled
        (jobs: registry/scheduler.py)
  GET  /healthz, GET /metrics

Bad bodies answer 400 with a message saying which field is wrong; the daemon keeps serving.
"""

from __future__ import annotations

import logging
from pathlib import Path

import trio
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, generate_latest

from dorafs.files import write_atomic
from dorafs.config import RegistryConfig
from dorafs.errors import NotFound
from dorafs.http.server import HttpError, HttpServer, Request, Response, json_response
from dorafs.membership import WorkerInfo
from dorafs.security import Credentials, ServerSecurity, client_context
from registry.jobs import STATES, JobSpec
from registry.scheduler import Scheduler
from registry.state import MembershipTable

log = logging.getLogger("dorafs.registry")

DEFAULT_WAIT = 30.0  # long poll: well under common proxy idle timeouts (60 s)
MAX_WAIT = 60.0


class RegistryMetrics:
    def __init__(self, table: MembershipTable):
        self.registry = r = CollectorRegistry()
        self.workers = Gauge("dorafs_registry_workers", "Live workers", registry=r)
        self.workers.set_function(lambda: len(table))
        self.version = Gauge("dorafs_registry_membership_version", "Current membership version", registry=r)
        self.version.set_function(lambda: table.version)
        self.registrations = Counter("dorafs_registry_registrations", "Worker registrations received", registry=r)
        self.heartbeats = Counter("dorafs_registry_heartbeats", "Heartbeats from known workers", registry=r)
        self.expirations = Counter("dorafs_registry_expirations", "Workers dropped for missed heartbeats", registry=r)
        self.deregistrations = Counter("dorafs_registry_deregistrations", "Workers that left cleanly", registry=r)
        self.jobs_submitted = Counter("dorafs_registry_jobs_submitted", "Load and free jobs submitted", registry=r)
        self.jobs = Gauge("dorafs_registry_jobs", "Jobs known to the scheduler by state", ["state"], registry=r)

    def watch_jobs(self, scheduler: Scheduler) -> None:
        for state in STATES:
            self.jobs.labels(state).set_function(
                lambda state=state: sum(1 for j in scheduler.jobs.values() if j.state == state))


def _worker_id(req: Request) -> str:
    wid = req.json().get("id")
    if not isinstance(wid, str) or not wid:
        raise HttpError(400, f"'id' must be a non-empty string, got {wid!r}")
    return wid


def _wait_arg(req: Request) -> float:
    raw = req.query.get("wait")
    if raw is None:
        return DEFAULT_WAIT
    try:
        wait = float(raw)
    except ValueError:
        raise HttpError(400, f"query parameter 'wait' is not a number: {raw!r}") from None
    if not wait >= 0:  # also rejects NaN
        raise HttpError(400, "query parameter 'wait' must not be negative")
    return min(wait, MAX_WAIT)


def build_server(table: MembershipTable, metrics: RegistryMetrics, scheduler: Scheduler) -> HttpServer:
    server = HttpServer("dorafs-registry", metrics.registry, "dorafs_registry")

    @server.route("POST", "/v1/jobs")
    async def submit_job(req: Request) -> Response:
        job = await scheduler.submit(JobSpec.from_body(req.json()))
        metrics.jobs_submitted.inc()
        return json_response(job.summary())

    @server.route("GET", "/v1/jobs")
    async def list_jobs(req: Request) -> Response:
        jobs = sorted(scheduler.jobs.values(), key=lambda j: j.created, reverse=True)
        return json_response({"jobs": [j.summary() for j in jobs]})

    @server.route("GET", "/v1/job")
    async def get_job(req: Request) -> Response:
        return json_response(scheduler.get(req.arg("id")).detail())

    @server.route("POST", "/v1/job/cancel")
    async def cancel_job(req: Request) -> Response:
        return json_response((await scheduler.cancel(req.arg("id"))).detail())

    @server.route("POST", "/v1/workers")
    async def register(req: Request) -> Response:
        try:
            info = WorkerInfo.from_dict(req.json())
        except ValueError as exc:
            raise HttpError(400, f"bad worker info: {exc}") from None
        metrics.registrations.inc()
        if table.register(info):
            await table.save()
        return json_response({"version": table.version, "ttl": table.ttl})

    @server.route("POST", "/v1/heartbeat")
    async def heartbeat(req: Request) -> Response:
        wid = _worker_id(req)
        if not table.heartbeat(wid):
            raise NotFound(f"unknown worker {wid!r}: register first")
        metrics.heartbeats.inc()
        return json_response({"version": table.version})

    @server.route("POST", "/v1/deregister")
    async def deregister(req: Request) -> Response:
        if table.deregister(_worker_id(req)):
            metrics.deregistrations.inc()
            await table.save()
        return json_response({"version": table.version})

    @server.route("GET", "/v1/workers")
    async def workers(req: Request) -> Response:
        if "since" in req.query:
            since = req.int_arg("since")
            await table.wait_for_change(since, req.query.get("epoch"), _wait_arg(req))
        return json_response(table.snapshot())

    @server.route("GET", "/healthz")
    async def healthz(req: Request) -> Response:
        return json_response({"status": "ok"})

    @server.route("GET", "/metrics")
    async def metrics_page(req: Request) -> Response:
        return Response(200, generate_latest(metrics.registry), content_type=CONTENT_TYPE_LATEST)

    return server


async def expire_loop(table: MembershipTable, metrics: RegistryMetrics) -> None:
    """Drop silent workers; checks a few times per TTL so expiry is late by a fraction of it."""
    interval = max(0.05, min(1.0, table.ttl / 4))
    while True:
        await trio.sleep(interval)
        gone = table.expire()
        if gone:
            metrics.expirations.inc(len(gone))
            await table.save()


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def run(config: RegistryConfig, security: ServerSecurity | None = None, *,
              task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Serve the registry until cancelled; `task_status.started` gets the bound "host:port"."""
    security = security or ServerSecurity()
    state_dir = Path(config.state_dir)
    await trio.to_thread.run_sync(lambda: state_dir.mkdir(parents=True, exist_ok=True, mode=0o700))
    table = await trio.to_thread.run_sync(MembershipTable.load, state_dir, config.worker_ttl)
    metrics = RegistryMetrics(table)
    # The scheduler calls workers as any client does: with the secret, over TLS if told.
    scheduler = Scheduler(state_dir, table, Credentials(security.secret, client_context(config.tls_ca)))
    await trio.to_thread.run_sync(scheduler.load)
    metrics.watch_jobs(scheduler)
    server = build_server(table, metrics, scheduler)
    security.apply(server)
    async with trio.open_nursery() as nursery:
        await nursery.start(scheduler.run)
        host, port = await nursery.start(server.serve, *config.listen)
        if config.metrics_listen:
            metrics_at = await nursery.start(server.view("dorafs-registry", {"/metrics", "/healthz"}).serve,
                                             *config.metrics_listen)
            log.info("metrics on http://%s:%d/metrics", *metrics_at)
        address = format_address(host, port)
        nursery.start_soon(expire_loop, table, metrics)
        if config.port_file:
            await trio.to_thread.run_sync(write_atomic, Path(config.port_file), address + "\n")
        log.info("registry serving on %s (state %s, worker TTL %.1fs, version %d, %d workers; %s)",
                 address, state_dir, config.worker_ttl, table.version, len(table), security.describe())
        task_status.started(address)
