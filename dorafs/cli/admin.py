"""`dorafs-admin`: look at and operate a dorafs cluster.

  dorafs-admin [--registry URL] workers [--json]    live workers with their heartbeat age
  dorafs-admin [--registry URL] report [--json]     cache totals, per worker and for the cluster,
                                                    read from each worker's /metrics

The registry URL comes from --registry, else $DORAFS_REGISTRY, else the local default.
Errors are one line on stderr and exit status 1 (2 for bad arguments).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import httpx
from rich.console import Console
from rich.table import Table

from dorafs import etcd
from dorafs.membership import registry_url

PROG = "dorafs-admin"
DEFAULT_REGISTRY = "http://127.0.0.1:19998"
TIMEOUT = httpx.Timeout(10.0, connect=3.0)


class AdminError(Exception):
    """A failure to report on one line."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:g} {unit}" if unit == "B" else f"{n:.4g} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _get(registry: str, path: str) -> dict:
    if path == "/v1/workers" and etcd.is_etcd(registry):
        try:
            return etcd.list_workers(registry)
        except (etcd.EtcdError, ValueError) as exc:
            raise AdminError(f"etcd {registry} unreachable: {exc}") from None
    url = f"{registry}{path}"
    try:
        response = httpx.get(url, timeout=TIMEOUT)
    except httpx.HTTPError as exc:
        raise AdminError(f"registry {registry} unreachable: {exc or type(exc).__name__}") from None
    if response.status_code != 200:
        raise AdminError(f"registry {registry} answered HTTP {response.status_code} for {path}: {response.text[:200]}")
    try:
        return response.json()
    except ValueError:
        raise AdminError(f"registry {registry} sent a non-JSON answer for {path}") from None


def cmd_workers(args) -> int:
    state = _get(args.registry, "/v1/workers")
    if args.json:
        print(json.dumps(state, indent=2))
        return 0
    workers = state.get("workers", [])
    table = Table(title=f"{len(workers)} live workers (membership version {state.get('version')})")
    for column in ("ID", "ADDRESS", "PAGE SIZE", "CAPACITY", "HEARTBEAT"):
        table.add_column(column, justify="right" if column in ("PAGE SIZE", "CAPACITY", "HEARTBEAT") else "left")
    for w in workers:
        table.add_row(
            str(w.get("id")), str(w.get("address")), _human_bytes(int(w.get("page_size", 0))),
            _human_bytes(int(w.get("capacity", 0))), f"{float(w.get('last_heartbeat_age', 0)):.1f}s ago",
        )
    Console().print(table)
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

    try:
        text = httpx.get(f"http://{address}/metrics", timeout=TIMEOUT).raise_for_status().text
    except httpx.HTTPError as exc:
        raise AdminError(f"worker {address}: {exc or type(exc).__name__}") from None
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
    table = Table(title=f"dorafs cluster: {len(rows)} workers reporting"
                        + (f", {len(unreachable)} unreachable" if unreachable else ""))
    for column in ("WORKER", "USED", "CAPACITY", "PAGES", "HIT RATE", "SERVED", "UFS REQUESTS", "UFS READ"):
        table.add_column(column, justify="left" if column == "WORKER" else "right")

    def add(name: str, f: dict) -> None:
        rate = "-" if f["hit_rate"] is None else f"{f['hit_rate']:.1%}"
        table.add_row(name, _human_bytes(int(f["used"])), _human_bytes(int(f["capacity"])), f"{f['pages']:.0f}",
                      rate, _human_bytes(int(f["bytes_served"])), f"{f['ufs_requests']:.0f}",
                      _human_bytes(int(f["ufs_bytes"])))

    for address, figures in sorted(rows.items()):
        add(address, figures)
    add("total", totals)
    Console().print(table)
    for address, error in unreachable.items():
        print(f"{PROG}: {error}", file=sys.stderr)
    return 1 if unreachable else 0


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="Look at and operate a dorafs cluster.")
    p.add_argument("--registry", default=os.environ.get("DORAFS_REGISTRY") or DEFAULT_REGISTRY,
                   help=f"registry URL (default: $DORAFS_REGISTRY, else {DEFAULT_REGISTRY})")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=_Parser)
    workers = sub.add_parser("workers", help="list live workers")
    workers.add_argument("--json", action="store_true", help="print the registry's answer as JSON")
    workers.set_defaults(func=cmd_workers)
    report = sub.add_parser("report", help="cache totals per worker and for the cluster")
    report.add_argument("--json", action="store_true", help="print the figures as JSON")
    report.set_defaults(func=cmd_report)
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.registry = registry_url(args.registry)
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
