"""`dorafs-admin`: look at and operate a dorafs cluster.

  dorafs-admin [--registry URL] workers [--json]    live workers: state, address, capacity,
                                                    used, hit rate, heartbeat age
  dorafs-admin [--registry URL] report [--json]     cache totals, per worker and for the cluster,
                                                    read from each worker's /metrics
  dorafs-admin [--registry URL] refresh UFS_URI [--recursive] [--workers A,B] [--json]
                                                    drop cached metadata of UFS_URI (and everything
                                                    under it) on every worker, and the pages of
                                                    objects that changed
  dorafs-admin load UFS_PATH [--recursive] [--bandwidth RATE] [--verify] [--metadata-only]
                   [--skip-cached] [--progress] [--json]    submit a load job (docs/ADMIN.md)
  dorafs-admin job list|status ID|cancel ID [--json]
  dorafs-admin free UFS_PATH [--recursive] [--json] drop cached pages and metadata
  dorafs-admin stat UFS_PATH [--json]               owner worker, version, percent cached
  dorafs-admin ring UFS_PATH [--json]               the workers tried for a path, in order

The registry URL comes from --registry, else $DORAFS_REGISTRY, else the local default.
The cluster secret from --secret-file (else $DORAFS_SECRET_FILE), else $DORAFS_SECRET;
with --tls-ca (else $DORAFS_TLS_CA) workers are reached over https.
Errors are one line on stderr and exit status 1 (2 for bad arguments).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import httpx
from rich.console import Console
from rich.table import Table

from dorafs.addresses import is_etcd, registry_url
from dorafs.config import ConfigError, parse_size
from dorafs.membership import WorkerInfo, etcd
from dorafs.routing import Routing, build_routing
from dorafs.security import Credentials, client_context, read_secret
from dorafs.ufs import join, normalize

PROG = "dorafs-admin"
DEFAULT_REGISTRY = "http://127.0.0.1:19998"
TIMEOUT = httpx.Timeout(10.0, connect=3.0)
credentials = Credentials()  # set by main() from the options; every request presents it


class AdminError(Exception):
    """A failure to report on one line."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _table(title: str, columns: tuple[str, ...], right: tuple[str, ...] = ()) -> Table:
    """A table whose cells wrap in a narrow terminal instead of being cut off: an
    address, a path or an id is only useful whole."""
    table = Table(title=title)
    for column in columns:
        table.add_column(column, justify="right" if column in right else "left", overflow="fold")
    return table


def _console(stderr: bool = False) -> Console:
    """A terminal's width; piped output gets wide lines rather than cut-off cells."""
    console = Console(stderr=stderr)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console = Console(stderr=stderr, width=200)
    return console


def _human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:g} {unit}" if unit == "B" else f"{n:.4g} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


_client: httpx.Client | None = None


def _http(method: str, url: str, what: str, *, params: dict | None = None, body: dict | None = None) -> httpx.Response:
    """Every HTTP request of the CLI goes through here (one place for auth headers).

    One client for the whole command: `stat` of a directory asks a worker per file, and
    kept-alive connections make that many times faster than a connection per request.
    """
    global _client
    if _client is None:
        _client = httpx.Client(timeout=TIMEOUT, **credentials.httpx_options())
    try:
        return _client.request(method, url, params=params, json=body)
    except httpx.HTTPError as exc:
        raise AdminError(f"{what} unreachable: {exc or type(exc).__name__}") from None


def call(method: str, base: str, path: str, *, params: dict | None = None, body: dict | None = None,
         what: str | None = None) -> dict:
    """One JSON call to the registry or a worker; AdminError with the daemon's message."""
    what = what or f"registry {base}"
    response = _http(method, f"{base}{path}", what, params=params, body=body)
    try:
        answer = response.json()
    except ValueError:
        if response.status_code == 200:
            raise AdminError(f"{what} sent a non-JSON answer for {path}") from None
        answer = None
    if response.status_code != 200:
        message = answer.get("message") if isinstance(answer, dict) else response.text[:200]
        raise AdminError(f"{what} answered HTTP {response.status_code} for {path}: {message}")
    return answer


def _get(registry: str, path: str) -> dict:
    if path == "/v1/workers" and is_etcd(registry):
        try:
            return etcd.list_workers(registry)
        except (etcd.EtcdError, ValueError) as exc:
            raise AdminError(f"etcd {registry} unreachable: {exc}") from None
    return call("GET", registry, path)


def _worker_call(worker: WorkerInfo | str, path: str, params: dict, method: str = "GET") -> dict:
    address = worker if isinstance(worker, str) else worker.address
    return call(method, f"{credentials.scheme}://{address}", path, params=params, what=f"worker {address}")


def _routing(registry: str) -> Routing:
    state = _get(registry, "/v1/workers")
    return build_routing({w["id"]: WorkerInfo.from_dict(w) for w in state.get("workers", [])})


def _uri(text: str) -> str:
    try:
        return normalize(text)
    except ValueError as exc:
        raise AdminError(str(exc)) from None


def _rate(text: str) -> int:
    """`'10MiB'` or `'10MiB/s'` -> bytes per second."""
    try:
        value = parse_size(text.removesuffix("/s"))
    except ValueError:
        raise AdminError(f"bad --bandwidth {text!r} (use e.g. 50MiB or 50MiB/s)") from None
    if value <= 0:
        raise AdminError(f"--bandwidth must be positive, got {text!r}")
    return value


def cmd_workers(args) -> int:
    state = _get(args.registry, "/v1/workers")
    routing = build_routing({w["id"]: WorkerInfo.from_dict(w) for w in state.get("workers", [])})
    for w in state.get("workers", []):
        w["state"] = "up" if w["id"] in routing.workers else "off ring (page size)"
        try:
            info = _worker_call(w["address"], "/v1/info", {})
            w["used"], w["pages"] = info.get("used"), info.get("pages")
            w["hit_rate"] = worker_figures(w["address"])["hit_rate"]
        except AdminError as exc:
            w["state"], w["used"], w["pages"], w["hit_rate"], w["error"] = "unreachable", None, None, None, str(exc)
    if args.json:
        print(json.dumps(state, indent=2))
        return 0
    workers = state.get("workers", [])
    right = ("PAGE SIZE", "CAPACITY", "USED", "HIT RATE", "HEARTBEAT")
    table = _table(f"{len(workers)} live workers (membership version {state.get('version')})",
                   ("ID", "STATE", "ADDRESS", *right), right)
    for w in workers:
        used = "-" if w["used"] is None else _human_bytes(int(w["used"]))
        rate = "-" if w["hit_rate"] is None else f"{w['hit_rate']:.1%}"
        table.add_row(
            str(w.get("id")), w["state"], str(w.get("address")), _human_bytes(int(w.get("page_size", 0))),
            _human_bytes(int(w.get("capacity", 0))), used, rate,
            f"{float(w.get('last_heartbeat_age', 0)):.1f}s ago",
        )
    _console().print(table)
    return 0


# Worker metrics the report reads, summed over their labels.
_REPORTED = {
    "pages": "dorafs_worker_pages",
    "used": "dorafs_worker_cache_used_bytes",
    "capacity": "dorafs_worker_cache_capacity_bytes",
    "hits": ("dorafs_worker_page_requests_total", {"result": "hit"}),
    "misses": ("dorafs_worker_page_requests_total", {"result": ("miss", "shared")}),
    "bytes_served": "dorafs_worker_bytes_served_total",
    "ufs_requests": "dorafs_worker_ufs_requests_total",
    "ufs_bytes": "dorafs_worker_ufs_bytes_total",
    "evictions": "dorafs_worker_evictions",
    "corrupt_pages": "dorafs_worker_corrupt_pages_total",
}


def worker_figures(address: str) -> dict:
    """The report's figures for one worker, from its Prometheus text."""
    from prometheus_client.parser import text_string_to_metric_families

    response = _http("GET", f"{credentials.scheme}://{address}/metrics", f"worker {address}")
    if response.status_code != 200:
        raise AdminError(f"worker {address} answered HTTP {response.status_code} for /metrics")
    text = response.text
    samples = [s for family in text_string_to_metric_families(text) for s in family.samples]
    figures = {}
    for key, spec in _REPORTED.items():
        name, want = (spec, {}) if isinstance(spec, str) else spec
        figures[key] = sum(
            s.value for s in samples if s.name == name and all(
                s.labels.get(k) in (v if isinstance(v, tuple) else (v,)) for k, v in want.items()))
    lookups = figures["hits"] + figures["misses"]
    figures["hit_rate"] = figures["hits"] / lookups if lookups else None
    return figures


def cmd_report(args) -> int:
    state = _get(args.registry, "/v1/workers")
    rows, unreachable = {}, {}
    for w in state.get("workers", []):
        try:
            rows[w["address"]] = worker_figures(w["address"])
        except AdminError as exc:
            unreachable[w["address"]] = str(exc)
    totals = {key: sum(r[key] for r in rows.values()) for key in _REPORTED}
    lookups = totals["hits"] + totals["misses"]
    totals["hit_rate"] = totals["hits"] / lookups if lookups else None
    report = {"workers": rows, "unreachable": unreachable, "cluster": totals}
    if args.json:
        print(json.dumps(report, indent=2))
        return 1 if unreachable else 0
    right = ("USED", "CAPACITY", "PAGES", "HIT RATE", "SERVED", "UFS REQUESTS", "UFS READ")
    table = _table(f"dorafs cluster: {len(rows)} workers reporting"
                   + (f", {len(unreachable)} unreachable" if unreachable else ""), ("WORKER", *right), right)

    def add(name: str, f: dict) -> None:
        rate = "-" if f["hit_rate"] is None else f"{f['hit_rate']:.1%}"
        table.add_row(name, _human_bytes(int(f["used"])), _human_bytes(int(f["capacity"])), f"{f['pages']:.0f}",
                      rate, _human_bytes(int(f["bytes_served"])), f"{f['ufs_requests']:.0f}",
                      _human_bytes(int(f["ufs_bytes"])))

    for address, figures in sorted(rows.items()):
        add(address, figures)
    add("total", totals)
    _console().print(table)
    for address, error in unreachable.items():
        print(f"{PROG}: {error}", file=sys.stderr)
    return 1 if unreachable else 0


def cmd_refresh(args) -> int:
    from dorafs.ufs import normalize

    try:
        uri = normalize(args.uri)
    except ValueError as exc:
        raise AdminError(str(exc)) from None
    if args.workers:
        addresses = [a.strip() for a in args.workers.split(",") if a.strip()]
    else:
        addresses = [w["address"] for w in _get(args.registry, "/v1/workers").get("workers", [])]
    if not addresses:
        raise AdminError("no workers to refresh (none registered, and no --workers given)")
    # Every worker: the path's status, its parent's listing and (recursively) whatever
    # lies under it may each be owned by a different worker.
    params = {"uri": uri, "recursive": int(args.recursive), "pages": "changed"}
    results, failed = {}, {}
    for address in addresses:
        try:
            response = _http("POST", f"{credentials.scheme}://{address}/v1/invalidate", f"worker {address}",
                             params=params)
        except AdminError as exc:
            failed[address] = str(exc)
            continue
        if response.status_code != 200:
            failed[address] = f"HTTP {response.status_code}: {response.text[:200]}"
        else:
            results[address] = response.json()
    if args.json:
        print(json.dumps({"uri": uri, "workers": results, "failed": failed}, indent=2))
    else:
        right = ("STATUSES", "LISTINGS", "PAGES")
        table = _table(f"refreshed {uri}" + (" and everything under it" if args.recursive else ""),
                       ("WORKER", *right), right)
        for address, counts in sorted(results.items()):
            table.add_row(address, str(counts.get("statuses")), str(counts.get("listings")), str(counts.get("pages")))
        Console().print(table)
    for address, error in failed.items():
        print(f"{PROG}: worker {address}: {error}", file=sys.stderr)
    return 1 if failed else 0
# -- jobs ---------------------------------------------------------------------------------

FINAL_STATES = ("completed", "failed", "cancelled")
POLL = 0.5  # seconds between progress polls
FOLLOW_OUTAGE = 30.0  # a registry restarting under `load --progress` is waited for this long


def _submit(args, kind: str, **extra) -> dict:
    body = {"uri": _uri(args.path), "kind": kind, "recursive": args.recursive, **extra}
    return call("POST", args.registry, "/v1/jobs", body=body)


def _job(registry: str, job_id: str) -> dict:
    return call("GET", registry, "/v1/job", params={"id": job_id})


def _rates(job: dict) -> tuple[float, float]:
    """(files/s, bytes/s) over the job's elapsed time."""
    elapsed = max(float(job.get("elapsed") or 0), 1e-6)
    return job["files_done"] / elapsed, job["bytes_done"] / elapsed


def _summary_line(job: dict) -> str:
    files_rate, bytes_rate = _rates(job)
    line = (f"job {job['id']} {job['state']}: {job['files_done']} of {job['files_listed']} files"
            f" ({job['files_cached']} already cached), {job['files_failed']} failed, "
            f"{_human_bytes(job['bytes_loaded'])} fetched in {float(job['elapsed']):.1f}s "
            f"({files_rate:.0f} files/s, {_human_bytes(int(bytes_rate))}/s)")
    if job.get("error"):
        line += f"; {job['error']}"
    return line


def _print_failures(job: dict, limit: int = 10) -> None:
    failed = job.get("failed_files") or []
    for item in failed[-limit:]:
        print(f"{PROG}: failed: {item['uri']}: {item['error']}", file=sys.stderr)
    if job["files_failed"] > limit:
        print(f"{PROG}: ... {job['files_failed']} failed in all (dorafs-admin job status {job['id']})",
              file=sys.stderr)


def _follow(registry: str, job: dict, show: bool) -> dict:
    """Poll the job until it ends, with a live progress bar when `show`."""
    from rich.progress import BarColumn, Progress, TextColumn

    columns = [TextColumn("[bold]{task.description}"), BarColumn(),
               TextColumn("{task.fields[files]}"), TextColumn("{task.fields[bytes]}"),
               TextColumn("{task.fields[rate]}"), TextColumn("ETA {task.fields[eta]}"),
               TextColumn("{task.fields[failures]}")]
    with Progress(*columns, console=_console(stderr=True), disable=not show, transient=False) as progress:
        task = progress.add_task(f"{job['kind']} {job['id']}", total=None, files="", bytes="", rate="",
                                 eta="-", failures="")
        while True:
            done = job["files_done"] + job["files_failed"]
            files_rate, bytes_rate = _rates(job)
            remaining = job["files_listed"] - done
            eta = "-"
            if job["listing_done"] and files_rate > 0:
                eta = f"{remaining / files_rate:.0f}s"
            progress.update(
                task, total=job["files_listed"] if job["listing_done"] else None, completed=done,
                files=f"{done}/{job['files_listed']}{'' if job['listing_done'] else '+'} files",
                bytes=f"{_human_bytes(job['bytes_done'])}/{_human_bytes(job['bytes_listed'])}",
                rate=f"{files_rate:.0f} files/s {_human_bytes(int(bytes_rate))}/s", eta=eta,
                failures=f"{job['files_failed']} failed" + (f", {job['retrying']} to retry" if job["retrying"] else ""))
            if job["state"] in FINAL_STATES:
                return job
            time.sleep(POLL)
            job = _poll(registry, job)


def _poll(registry: str, job: dict) -> dict:
    """The job's state; a registry restarting is waited for (FOLLOW_OUTAGE seconds)."""
    deadline = time.monotonic() + FOLLOW_OUTAGE
    while True:
        try:
            return _job(registry, job["id"])
        except AdminError:
            if time.monotonic() > deadline:
                raise
            time.sleep(POLL)


def cmd_load(args) -> int:
    options = {"verify": args.verify, "metadata_only": args.metadata_only, "skip_cached": args.skip_cached,
               "bandwidth": _rate(args.bandwidth) if args.bandwidth else 0}
    job = _submit(args, "load", **options)
    if not args.progress:
        if args.json:
            print(json.dumps(job, indent=2))
        else:
            print(f"submitted load job {job['id']} for {job['uri']} "
                  f"(follow it: {PROG} job status {job['id']}, or load --progress)")
        return 0
    try:
        job = _follow(args.registry, job, show=not args.json)
    except KeyboardInterrupt:
        print(f"{PROG}: job {job['id']} goes on; stop it with: {PROG} job cancel {job['id']}", file=sys.stderr)
        return 130
    return _report_end(job, args.json)


def _report_end(job: dict, as_json: bool) -> int:
    if as_json:
        print(json.dumps(job, indent=2))
    else:
        print(_summary_line(job))
        _print_failures(job)
    return 0 if job["state"] == "completed" else 1


def cmd_free(args) -> int:
    job = _follow(args.registry, _submit(args, "free"), show=False)
    if args.json:
        print(json.dumps(job, indent=2))
    else:
        print(f"freed {job['files_done']} files under {job['uri']}: {job['pages_freed']} pages dropped"
              + (f", {job['files_failed']} failed" if job["files_failed"] else ""))
        _print_failures(job)
    return 0 if job["state"] == "completed" else 1


def cmd_job(args) -> int:
    if args.action == "list":
        jobs = call("GET", args.registry, "/v1/jobs")["jobs"]
        if args.json:
            print(json.dumps(jobs, indent=2))
            return 0
        right = ("FILES", "FAILED", "FETCHED", "ELAPSED")
        table = _table(f"{len(jobs)} jobs", ("ID", "KIND", "STATE", "PATH", *right), right)
        for job in jobs:
            table.add_row(job["id"], job["kind"], job["state"], job["uri"] + ("/**" if job["recursive"] else ""),
                          f"{job['files_done']}/{job['files_listed']}", str(job["files_failed"]),
                          _human_bytes(job["bytes_loaded"]), f"{float(job['elapsed']):.1f}s")
        _console().print(table)
        return 0
    if not args.id:
        raise AdminError(f"job {args.action} needs a job id (see: {PROG} job list)")
    if args.action == "cancel":
        job = call("POST", args.registry, "/v1/job/cancel", params={"id": args.id})
    else:
        job = _job(args.registry, args.id)
    if args.json:
        print(json.dumps(job, indent=2))
        return 0
    print(_summary_line(job))
    _print_failures(job)
    return 0


# -- paths --------------------------------------------------------------------------------

def _cached(routing: Routing, uri: str, status: dict | None = None) -> dict:
    owner = routing.owner(uri)
    if owner is None:
        raise AdminError("no live workers")
    params = {"uri": uri}
    if status is not None:
        params |= {"version": status["version"], "size": status["size"]}
    answer = _worker_call(owner, "/v1/cached", params)
    pages = answer["pages"]
    percent = 100.0 if pages == 0 else 100.0 * answer["cached_pages"] / pages
    return answer | {"uri": uri, "owner": owner.id, "owner_address": owner.address, "percent_cached": percent}


def cmd_stat(args) -> int:
    uri = _uri(args.path)
    routing = _routing(args.registry)
    info = _cached(routing, uri)
    rows = [info]
    if info["status"]["is_dir"]:
        owner = routing.owner(uri)
        listing = _worker_call(owner, "/v1/list", {"uri": uri, "limit": args.limit})
        rows += [_cached(routing, join(uri, e["name"]), e) for e in listing["entries"] if not e["is_dir"]]
        info["entries_shown"] = len(rows) - 1
        info["more"] = listing.get("next") is not None
        files = rows[1:]
        total = sum(r["pages"] for r in files)
        info["percent_cached"] = 100.0 if not total else 100.0 * sum(r["cached_pages"] for r in files) / total
    if args.json:
        print(json.dumps(rows if len(rows) > 1 else info, indent=2))
        return 0
    table = _table(uri + (" (directory: its files" + (f", first {args.limit}" if info.get("more") else "")
                          + ")" if info["status"]["is_dir"] else ""),
                   ("PATH", "SIZE", "VERSION", "OWNER", "CACHED PAGES", "CACHED"), ("SIZE", "CACHED PAGES", "CACHED"))
    for row in rows:
        status = row["status"]
        table.add_row(row["uri"], "-" if status["is_dir"] else _human_bytes(status["size"]), status["version"] or "-",
                      f"{row['owner']} ({row['owner_address']})",
                      "-" if status["is_dir"] else f"{row['cached_pages']}/{row['pages']}",
                      f"{row['percent_cached']:.1f}%")
    _console().print(table)
    return 0


def cmd_ring(args) -> int:
    uri = _uri(args.path)
    routing = _routing(args.registry)
    candidates = [{"rank": i, "id": w.id, "address": w.address, "role": "owner" if i == 0 else "fallback"}
                  for i, w in enumerate(routing.candidates(uri))]
    if not candidates:
        raise AdminError("no live workers")
    if args.json:
        print(json.dumps({"uri": uri, "candidates": candidates, "left_out": routing.left_out}, indent=2))
        return 0
    table = _table(f"ring candidates for {uri} (tried in this order, then the UFS)", ("#", "WORKER", "ADDRESS", "ROLE"))
    for c in candidates:
        table.add_row(str(c["rank"]), c["id"], c["address"], c["role"])
    _console().print(table)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="Look at and operate a dorafs cluster.", allow_abbrev=False)
    p.add_argument("--registry", default=os.environ.get("DORAFS_REGISTRY") or DEFAULT_REGISTRY,
                   help=f"registry URL (default: $DORAFS_REGISTRY, else {DEFAULT_REGISTRY})")
    p.add_argument("--secret-file", default=os.environ.get("DORAFS_SECRET_FILE") or None,
                   help="file with the cluster secret, mode 0600 (default: $DORAFS_SECRET_FILE, else $DORAFS_SECRET)")
    p.add_argument("--tls-ca", default=os.environ.get("DORAFS_TLS_CA") or None,
                   help="CA bundle to verify the registry and workers with (default: $DORAFS_TLS_CA)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=_Parser)
    workers = sub.add_parser("workers", help="list live workers")
    workers.add_argument("--json", action="store_true", help="print the registry's answer as JSON")
    workers.set_defaults(func=cmd_workers)
    report = sub.add_parser("report", help="cache totals per worker and for the cluster")
    report.add_argument("--json", action="store_true", help="print the figures as JSON")
    report.set_defaults(func=cmd_report)
    refresh = sub.add_parser("refresh", help="drop cached metadata of a UFS path so the next access rechecks it")
    refresh.add_argument("uri", metavar="UFS_URI", help="e.g. s3://bucket/prefix/file")
    refresh.add_argument("--recursive", action="store_true", help="also everything under UFS_URI")
    refresh.add_argument("--workers", help="HOST:PORT,... to refresh instead of the registry's workers")
    refresh.add_argument("--json", action="store_true", help="print the counts as JSON")
    refresh.set_defaults(func=cmd_refresh)

    load = sub.add_parser("load", help="load a UFS path into the workers that own its files")
    load.add_argument("path", metavar="UFS_PATH", help="file or directory URI (s3://bucket/prefix, file:///data)")
    load.add_argument("--recursive", "-r", action="store_true", help="descend into subdirectories")
    load.add_argument("--bandwidth", metavar="RATE", help="UFS bandwidth for the whole job, e.g. 100MiB/s")
    load.add_argument("--verify", action="store_true", help="check every page's checksum on disk after loading")
    load.add_argument("--metadata-only", action="store_true", help="cache statuses and listings, no pages")
    load.add_argument("--skip-cached", action="store_true",
                      help="keep the workers' cached metadata: files already cached cost the UFS nothing")
    load.add_argument("--progress", action="store_true",
                      help="follow the job with a progress bar; exit 1 unless it completes")
    load.add_argument("--json", action="store_true", help="print the job as JSON")
    load.set_defaults(func=cmd_load)

    job = sub.add_parser("job", help="list, follow or cancel jobs")
    job.add_argument("action", choices=("list", "status", "cancel"))
    job.add_argument("id", nargs="?", help="the job id (status, cancel)")
    job.add_argument("--json", action="store_true", help="print JSON")
    job.set_defaults(func=cmd_job)

    free = sub.add_parser("free", help="drop the cached pages and metadata of a UFS path")
    free.add_argument("path", metavar="UFS_PATH")
    free.add_argument("--recursive", "-r", action="store_true", help="descend into subdirectories")
    free.add_argument("--json", action="store_true", help="print the job as JSON")
    free.set_defaults(func=cmd_free)

    stat = sub.add_parser("stat", help="owner, version and cached share of a path")
    stat.add_argument("path", metavar="UFS_PATH")
    stat.add_argument("--limit", type=int, default=1000, help="files of a directory shown (default 1000)")
    stat.add_argument("--json", action="store_true", help="print JSON")
    stat.set_defaults(func=cmd_stat)

    ring = sub.add_parser("ring", help="the workers tried for a path, owner first")
    ring.add_argument("path", metavar="UFS_PATH")
    ring.add_argument("--json", action="store_true", help="print JSON")
    ring.set_defaults(func=cmd_ring)
    return p


def main(argv: list[str] | None = None) -> None:
    global credentials
    parser = build_parser()
    args = parser.parse_args(argv)
    args.registry = registry_url(args.registry)
    try:
        credentials = Credentials(read_secret(args.secret_file), client_context(args.tls_ca))
    except ConfigError as exc:
        parser.error(str(exc))
    try:
        status = args.func(args)
    except AdminError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        status = 1
    except KeyboardInterrupt:
        status = 130
    sys.exit(status)


if __name__ == "__main__":
    main()
