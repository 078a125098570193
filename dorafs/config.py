"""Typed configuration for the mount, the worker and the registry.

Sizes accept `1MiB`, `10GiB`, `512k`; durations accept `500ms`, `10s`, `2m`, or plain
seconds. Each default carries the reason it was chosen.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

_SIZE_UNITS = {
    "": 1, "b": 1,
    "k": 1 << 10, "kb": 1000, "kib": 1 << 10,
    "m": 1 << 20, "mb": 1000**2, "mib": 1 << 20,
    "g": 1 << 30, "gb": 1000**3, "gib": 1 << 30,
    "t": 1 << 40, "tb": 1000**4, "tib": 1 << 40,
}
_DURATION_UNITS = {"": 1.0, "s": 1.0, "ms": 0.001, "m": 60.0, "min": 60.0, "h": 3600.0}


def parse_size(text: str | int) -> int:
    """`'1MiB'` -> 1048576. Raises ValueError with the offending text."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _SIZE_UNITS:
        raise ValueError(f"not a size: {text!r} (use e.g. 1MiB, 10GiB, 4096)")
    number, unit = m.group(1), _SIZE_UNITS[m.group(2).lower()]
    return int(number) * unit if number.isdigit() else int(float(number) * unit)


def parse_duration(text: str | float) -> float:
    """`'500ms'` -> 0.5; `-1` means never (callers decide what never means)."""
    if isinstance(text, (int, float)):
        return float(text)
    m = re.fullmatch(r"\s*(-?\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _DURATION_UNITS:
        raise ValueError(f"not a duration: {text!r} (use e.g. 500ms, 10s, 2m)")
    return float(m.group(1)) * _DURATION_UNITS[m.group(2).lower()]


def parse_hostport(text: str, default_host: str = "127.0.0.1") -> tuple[str, int]:
    """`'127.0.0.1:29998'`, `':29998'` or `'29998'` -> (host, port)."""
    host, sep, port = str(text).rpartition(":")
    if not sep:
        host, port = "", text
    if not port.isascii() or not port.isdigit() or (host.count(":") and not host.startswith("[")):
        raise ValueError(f"not HOST:PORT: {text!r} (IPv6 hosts go in brackets: [::1]:29998)")
    number = int(port)
    if not 0 <= number <= 65535:
        raise ValueError(f"port out of range in {text!r}")
    return (host.strip("[]") or default_host, number)


def user_cache_dir() -> Path:
    """Where the embedded cluster keeps its cache: $XDG_CACHE_HOME/dorafs."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "dorafs"


DEFAULT_PAGE_SIZE = 1 << 20  # 1 MiB: eight 128 KiB kernel reads per fetch, small read amplification


@dataclass
class WorkerConfig:
    listen: tuple[str, int] = ("127.0.0.1", 29998)  # loopback unless told otherwise
    advertise: str | None = None  # address clients use; defaults to the bound address
    registry: str | None = None  # URL of the registry; None for a standalone worker
    cache_dir: Path = field(default_factory=lambda: user_cache_dir() / "worker")
    cache_size: int = 10 << 30  # 10 GiB: a dataset shard, small enough for a laptop disk
    page_size: int = DEFAULT_PAGE_SIZE
    status_ttl: float = 10.0  # seconds a cached status is trusted; bounds staleness
    listing_ttl: float = 10.0  # seconds a cached directory listing is trusted
    metadata_entries: int = 100_000  # in-memory status/listing entries before LRU eviction
    ufs_threads: int = 16  # blocking UFS calls in flight; matches boto3's connection pool
    heartbeat_interval: float = 2.0  # a dead worker is dropped after a few missed beats
    port_file: Path | None = None  # where to write the bound address (for listen port 0)


@dataclass
class RegistryConfig:
    listen: tuple[str, int] = ("127.0.0.1", 19998)
    state_dir: Path = field(default_factory=lambda: user_cache_dir() / "registry")
    worker_ttl: float = 10.0  # five missed 2 s heartbeats before a worker is dropped
    port_file: Path | None = None


@dataclass
class MountConfig:
    ufs_uri: str = ""
    mountpoint: Path = Path()
    registry: str | None = None
    workers: list[str] = field(default_factory=list)
    foreground: bool = False
    cache_dir: Path | None = None  # embedded worker's cache (default: user cache dir)
    cache_size: int = 10 << 30
    page_size: int = DEFAULT_PAGE_SIZE
    attr_timeout: float = 1.0  # kernel attribute cache; short so changes show quickly
    entry_timeout: float = 1.0  # kernel name cache
    status_ttl: float = 10.0  # worker-side status TTL for the embedded worker
    listing_ttl: float = 10.0
    buffer_size: int = 64 << 20  # client page buffer: 64 pages, enough for 4 readers' readahead
    readahead_pages: int = 8  # pages fetched ahead of a sequential reader
    worker_timeout: float = 5.0  # a worker slower than this is skipped for the next candidate
    connect_timeout: float = 1.0
    direct_io: bool = False  # bypass the kernel page cache (benchmarks, tests of the read path)
    allow_other: bool = False
    fuse_tasks: int = 64  # concurrent kernel requests served
    debug: bool = False
