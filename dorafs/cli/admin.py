"""`dorafs-admin`: look at and operate a dorafs cluster.

  dorafs-admin [--registry URL] workers [--json]    live workers with their heartbeat age

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


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="Look at and operate a dorafs cluster.")
    p.add_argument("--registry", default=os.environ.get("DORAFS_REGISTRY") or DEFAULT_REGISTRY,
                   help=f"registry URL (default: $DORAFS_REGISTRY, else {DEFAULT_REGISTRY})")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=_Parser)
    workers = sub.add_parser("workers", help="list live workers")
    workers.add_argument("--json", action="store_true", help="print the registry's answer as JSON")
    workers.set_defaults(func=cmd_workers)
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
