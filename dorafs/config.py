"""Typed configuration for the mount, the worker and the registry.

One TOML file (default `/etc/dorafs/dorafs.toml`, or `--config PATH`, or
`$DORAFS_CONFIG`) has a section per program: `[worker]`, `[registry]`, `[mount]`.
Precedence, lowest first: the defaults below, the file, the environment
(`DORAFS_WORKER_CACHE_SIZE=...`), the command line. An unknown key or a bad value is a
`ConfigError` whose one-line message names the key and where it came from.

Each option is a dataclass field whose metadata holds its parser and its documentation;
docs/CONFIG.md is checked against these fields by a test. Sizes accept `1MiB`, `10GiB`,
`4096`; durations accept `500ms`, `10s`, `2m`, or plain seconds.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from dorafs.addresses import is_etcd, parse_etcd_url, parse_hostport, registry_url

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


def user_cache_dir() -> Path:
    """Where the embedded cluster keeps its cache: $XDG_CACHE_HOME/dorafs."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "dorafs"


DEFAULT_PAGE_SIZE = 1 << 20  # 1 MiB: eight 128 KiB kernel reads per fetch, small read amplification
DEFAULT_CONFIG_PATH = Path("/etc/dorafs/dorafs.toml")


class ConfigError(ValueError):
    """A bad configuration value; the message is one line naming the key."""


# -- value parsers: each takes a TOML value or a string from the environment / CLI ------

def _size(value) -> int:
    number = parse_size(value) if not isinstance(value, bool) else None
    if number is None or number <= 0:
        raise ValueError(f"must be a positive size, got {value!r}")
    return number


def _size_or_zero(value) -> int:
    number = parse_size(value) if not isinstance(value, bool) else None
    if number is None or number < 0:
        raise ValueError(f"must be a size (0: none), got {value!r}")
    return number


def _duration(value) -> float:
    if isinstance(value, bool):
        raise ValueError(f"not a duration: {value!r}")
    return parse_duration(value)


def _positive_duration(value) -> float:
    seconds = _duration(value)
    if seconds <= 0:
        raise ValueError(f"must be positive, got {value!r}")
    return seconds


def _count(value) -> int:
    if isinstance(value, bool) or not str(value).strip().isdigit():
        raise ValueError(f"must be a whole number, got {value!r}")
    return int(value)


def _positive_count(value) -> int:
    number = _count(value)
    if number <= 0:
        raise ValueError(f"must be at least 1, got {value!r}")
    return number


def _part_size(value) -> int:
    number = _size(value)
    if number < 5 << 20:
        raise ValueError(f"must be at least 5MiB (S3's smallest part), got {value!r}")
    return number


def _flag(value) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on", ""):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"must be true or false, got {value!r}")


def _text(value) -> str:
    if not isinstance(value, str):
        raise ValueError(f"must be a string, got {value!r}")
    return value


def _optional(parse: Callable) -> Callable:
    def parse_optional(value):
        return None if value in (None, "") else parse(value)

    return parse_optional


def _url(value) -> str:
    text = _text(value).strip().rstrip("/")
    if is_etcd(text):
        parse_etcd_url(text)  # raises ValueError naming what is wrong
    return registry_url(text)


def _addresses(value) -> list[str]:
    items = value if isinstance(value, list) else str(value).replace("+", ",").split(",")
    found = [str(item).strip() for item in items if str(item).strip()]
    for item in found:
        parse_hostport(item)
    return found


def _path(value) -> Path:
    return Path(_text(value)).expanduser()


def _mode(value) -> int:
    """Permission bits: `'0644'`/`'644'` (octal text) or a TOML integer such as `0o644`."""
    if isinstance(value, bool):
        raise ValueError(f"not a file mode: {value!r}")
    if isinstance(value, int):
        number = value
    else:
        text = str(value).strip().lower().removeprefix("0o")
        if not text or any(c not in "01234567" for c in text):
            raise ValueError(f"not an octal file mode: {value!r} (use e.g. 0644)")
        number = int(text, 8)
    if not 0 <= number <= 0o7777:
        raise ValueError(f"file mode out of range: {value!r}")
    return number


def _id(value) -> int:
    number = _count(value)
    if number >= 1 << 32:
        raise ValueError(f"not a user or group id: {value!r}")
    return number


def _uris(value) -> list[str]:
    from dorafs.ufs.base import normalize

    items = value if isinstance(value, list) else str(value).replace("+", ",").split(",")
    return [normalize(str(item).strip()) for item in items if str(item).strip()]


# Security options, the same in every section (see dorafs/security.py and docs/SECURITY.md).
_SECRET_DOC = "file holding the cluster secret, mode 0600 (else $DORAFS_SECRET; unset: no authentication)"
_TLS_CA_DOC = "CA bundle to verify TLS peers with; set, every link to workers and the registry is TLS"


def option(default, parse: Callable, doc: str, *, factory: Callable | None = None):
    """A configuration field: its default, how to parse it, and one line of documentation."""
    metadata = {"parse": parse, "doc": doc}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class WorkerConfig:
    listen: tuple[str, int] = option(("127.0.0.1", 29998), parse_hostport,
                                     "HOST:PORT to bind; loopback unless told otherwise; port 0 picks one")
    advertise: str | None = option(None, _optional(_text), "HOST:PORT clients use (default: the bound address)")
    registry: str | None = option(None, _optional(_url),
                                  "registry URL (http://HOST:PORT or etcd://HOST:PORT,...); unset: standalone")
    cache_dir: Path = option(None, _path, "directory of the page cache (created 0700)",
                             factory=lambda: user_cache_dir() / "worker")
    cache_size: int = option(10 << 30, _size, "page cache capacity; 10GiB fits a shard and a laptop disk")
    page_size: int = option(DEFAULT_PAGE_SIZE, _size,
                            "page size; 1MiB serves eight 128 KiB kernel reads per fetch")
    seal_min_size: int = option(DEFAULT_PAGE_SIZE, _size_or_zero,
                                "an object version this big or bigger that a mount on this machine reads from the "
                                "worker's files is kept as one file (what such a mount hands to the kernel): its pages "
                                "are written into it as they arrive, or copied into it once its last page is cached; "
                                "0: only when a mount or load job asks")
    status_ttl: float = option(300.0, _duration, "how long a cached status is trusted when a request names no TTL "
                               "(-1 never recheck, 0 always)")
    listing_ttl: float = option(300.0, _duration, "the same for a cached directory listing")
    negative_ttl: float = option(30.0, _duration, "the same for a cached \"no such path\"")
    metadata_entries: int = option(100_000, _count, "statuses and listing entries kept in memory (LRU); "
                                   "the rest stay on disk in CACHE_DIR/metadata.db")
    ufs_threads: int = option(16, _count, "blocking UFS calls in flight; matches boto3's connection pool")
    ufs_attempts: int = option(4, _count, "tries per S3 request (throttling, 5xx, timeouts); 412 and 404 never retried")
    ufs_deadline: float = option(4.0, _positive_duration,
                                 "a UFS request and its retries end by this, plus 1s per 64KiB it moves "
                                 "(a slow transfer is never cut short while bytes come)")
    ufs_timeout: float = option(2.0, _positive_duration, "an S3 attempt that makes no progress this long "
                                "(connect, or no byte) is abandoned and retried")
    heartbeat_interval: float = option(2.0, _positive_duration,
                                       "seconds between heartbeats; a few missed ones drop the worker")
    port_file: Path | None = option(None, _optional(_path), "write the bound HOST:PORT here once serving")
    secret_file: Path | None = option(None, _optional(_path), _SECRET_DOC)
    tls_cert: Path | None = option(None, _optional(_path), "TLS certificate chain (PEM); with tls_key, the port speaks TLS only")
    tls_key: Path | None = option(None, _optional(_path), "TLS private key (PEM) of tls_cert")
    tls_ca: Path | None = option(None, _optional(_path), _TLS_CA_DOC)
    metrics_auth: bool = option(True, _flag, "/metrics needs the secret like the API (false: open to anyone reaching the port)")
    metrics_listen: tuple[str, int] | None = option(None, _optional(parse_hostport),
                                                    "HOST:PORT of a second, plain listener with only /metrics and /healthz")
    ufs_roots: list[str] = option(None, _uris, "UFS URIs this worker may read, e.g. s3://bucket,file:///data "
                                  "(empty: any; see docs/SECURITY.md)", factory=list)


@dataclass
class RegistryConfig:
    listen: tuple[str, int] = option(("127.0.0.1", 19998), parse_hostport, "HOST:PORT to bind")
    state_dir: Path = option(None, _path, "where the membership is saved across restarts",
                             factory=lambda: user_cache_dir() / "registry")
    worker_ttl: float = option(10.0, _positive_duration, "drop a worker silent this long (five 2 s heartbeats)")
    port_file: Path | None = option(None, _optional(_path), "write the bound HOST:PORT here once serving")
    secret_file: Path | None = option(None, _optional(_path), _SECRET_DOC)
    tls_cert: Path | None = option(None, _optional(_path), "TLS certificate chain (PEM); with tls_key, the port speaks TLS only")
    tls_key: Path | None = option(None, _optional(_path), "TLS private key (PEM) of tls_cert")
    tls_ca: Path | None = option(None, _optional(_path), "CA bundle the scheduler verifies workers' TLS with; "
                                 "set, load jobs reach workers over TLS")
    metrics_auth: bool = option(True, _flag, "/metrics needs the secret like the API (false: open to anyone reaching the port)")
    metrics_listen: tuple[str, int] | None = option(None, _optional(parse_hostport),
                                                    "HOST:PORT of a second, plain listener with only /metrics and /healthz")


@dataclass
class MountConfig:
    ufs_uri: str = ""  # positional on the command line, not a configuration key
    mountpoint: Path = Path()  # positional
    registry: str | None = option(None, _optional(_url),
                                  "registry URL, http:// or etcd:// (unset with no workers: embedded cluster)")
    workers: list[str] = option(None, _addresses, "static worker list HOST:PORT,HOST:PORT ('+' also separates)",
                                factory=list)
    foreground: bool = option(False, _flag, "stay in the foreground instead of detaching")
    cache_dir: Path | None = option(None, _optional(_path),
                                    "embedded worker's cache (default ~/.cache/dorafs/embedded)")
    cache_size: int = option(10 << 30, _size, "embedded worker's cache capacity")
    page_size: int = option(DEFAULT_PAGE_SIZE, _size, "embedded worker's page size")
    status_ttl: float = option(300.0, _duration, "how long this mount trusts a cached status (-1 never recheck, "
                               "0 always); workers answer within it, the kernel keeps attributes for it")
    listing_ttl: float = option(300.0, _duration, "how long this mount trusts a cached directory listing")
    negative_ttl: float = option(30.0, _duration, "how long this mount trusts a cached \"no such path\"")
    attr_timeout: float | None = option(None, _optional(_duration),
                                        "seconds the kernel keeps attributes (default: status_ttl)")
    entry_timeout: float | None = option(None, _optional(_duration),
                                         "seconds the kernel keeps names (default: status_ttl; "
                                         "missing names: negative_ttl)")
    buffer_size: int = option(128 << 20, _size, "mount's page buffer; 128 pages cover the readahead in "
                                  "flight across the mount's readers (at most 96 pages)")
    read_ahead_kb: int = option(1024, _count, "kernel readahead of the mount (its bdi's read_ahead_kb, set when "
                                "permitted); 1024 lets the kernel ask for a whole page per request (0: leave it)")
    readahead_pages: int = option(64, _count, "pages fetched ahead of a sequential reader, in runs "
                                  "filled by one UFS read each; a read of 256 KiB or more elsewhere in a "
                                  "file brings its aligned group of 8 pages as such a run, 16 once most such reads of "
                                  "the file land in pages already coming; a smaller read elsewhere that misses brings "
                                  "its group of 16 once most of the file's such misses found a page of their group "
                                  "coming (0: none of these)")
    worker_timeout: float = option(5.0, _positive_duration, "a worker silent this long (no byte, no "
                                   "\"still working\" signal) is skipped for the next")
    connect_timeout: float = option(1.0, _positive_duration, "time to connect to a worker")
    random_read: int = option(64 << 10, _size_or_zero, "a random reader's read of a page that is neither buffered nor "
                              "read from a local worker's files fetches this much of the page around it, "
                              "aligned (0: the whole page); bench/README.md has the measurements")
    short_circuit: bool = option(True, _flag, "read pages of a worker on this machine from its page files "
                                 "(checked against their checksums) instead of over HTTP")
    ufs_attempts: int = option(4, _count, "tries per S3 request when the mount reads the UFS itself")
    ufs_deadline: float = option(4.0, _positive_duration, "a UFS request of the mount and its retries end by this, "
                                 "plus 1s per 64KiB it moves")
    ufs_timeout: float = option(2.0, _positive_duration, "an S3 attempt of the mount that makes no progress this "
                                "long (connect, or no byte) is abandoned and retried")
    direct_io: bool | None = option(None, _optional(_flag), "read past the kernel page cache: 1 in every open "
                                    "(benchmarks, read-path tests); 0 only where another version is open; "
                                    "unset: also in a cold open of a file later opens get by passthrough, "
                                    "unless it or its process was read in small pieces or footer first (docs/SEMANTICS.md)")
    passthrough: bool | None = option(None, _optional(_flag), "hand files wholly cached by a worker on this "
                                      "machine to the kernel (FUSE passthrough: needs root and kernel 6.9+; "
                                      "default: on unless direct_io, see docs/SEMANTICS.md)")
    passthrough_min_size: int = option(1 << 20, _size, "files smaller than this are read page by page, never "
                                       "from a held object file nor passthrough: one or two reads of them "
                                       "cost less than asking for and checking the whole file")
    allow_other: bool = option(False, _flag, "let other users access the mount (FUSE allow_other)")
    fuse_tasks: int = option(64, _count, "kernel requests served concurrently")
    metrics_listen: tuple[str, int] | None = option(None, _optional(parse_hostport),
                                                    "HOST:PORT for the mount's /metrics and /healthz (unset: off)")
    debug: bool = option(False, _flag, "FUSE debug output and DEBUG logs")
    secret_file: Path | None = option(None, _optional(_path), _SECRET_DOC)
    tls_ca: Path | None = option(None, _optional(_path), _TLS_CA_DOC)
    default_permissions: bool = option(True, _flag, "the kernel checks the mode bits below (FUSE default_permissions)")
    uid: int | None = option(None, _optional(_id), "owner shown for every file (default: the mounting user)")
    gid: int | None = option(None, _optional(_id), "group shown for every file (default: the mounting user's)")
    file_mode: int = option(0o644, _mode, "permission bits of files, e.g. 0640")
    dir_mode: int = option(0o755, _mode, "permission bits of directories, e.g. 0750")
    read_only: bool = option(False, _flag, "refuse every change with EROFS (`-o ro`)")
    staging_dir: Path | None = option(None, _optional(_path),
                                      "where files being written are staged (default ~/.cache/dorafs/staging)")
    staging_size: int = option(10 << 30, _size, "staging space for files being written; past it, ENOSPC")
    upload_part_size: int = option(8 << 20, _part_size,
                                   "part of a multipart upload (at least 5MiB, S3's minimum; 10000 parts per file)")
    upload_concurrency: int = option(4, _positive_count, "parts uploaded at once across the mount; memory is "
                                     "about this many parts")


SECTIONS: dict[str, type] = {"worker": WorkerConfig, "registry": RegistryConfig, "mount": MountConfig}


def options(cls: type) -> dict[str, Any]:
    """The configurable fields of a config class, by name."""
    return {f.name: f for f in fields(cls) if "parse" in f.metadata}


def _parse(cls: type, section: str, key: str, value, source: str):
    spec = options(cls).get(key)
    if spec is None:
        known = ", ".join(sorted(options(cls)))
        raise ConfigError(f"{source}: unknown key {section}.{key} (known: {known})")
    try:
        return spec.metadata["parse"](value)
    except ValueError as exc:
        raise ConfigError(f"{source}: {section}.{key}: {exc}") from None


def _read_file(path: Path, required: bool) -> dict:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        if required:
            raise ConfigError(f"config file {path} does not exist") from None
        return {}
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path}: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"config file {path}: {exc.strerror}") from None
    for name, value in data.items():
        if name not in SECTIONS:
            raise ConfigError(f"config file {path}: unknown section [{name}] (known: {', '.join(SECTIONS)})")
        if not isinstance(value, dict):
            raise ConfigError(f"config file {path}: {name} must be a [{name}] table")
    return data


def load_config(section: str, cli: Mapping[str, Any], *, config_path: str | Path | None = None,
                env: Mapping[str, str] | None = None, **positional):
    """Build the config of one program: defaults, then file, then environment, then `cli`.

    `cli` holds only the options given on the command line (raw strings or values).
    """
    cls = SECTIONS[section]
    env = os.environ if env is None else env
    explicit = config_path or env.get("DORAFS_CONFIG")
    path = Path(explicit) if explicit else DEFAULT_CONFIG_PATH
    values: dict[str, Any] = {}
    for key, value in _read_file(path, required=bool(explicit)).get(section, {}).items():
        values[key] = _parse(cls, section, key, value, f"config file {path}")
    prefix = f"DORAFS_{section.upper()}_"
    for name, value in env.items():
        if name.startswith(prefix):
            key = name[len(prefix):].lower()
            values[key] = _parse(cls, section, key, value, f"environment {name}")
    for key, value in cli.items():
        if value is not None:
            values[key] = _parse(cls, section, key, value, "command line")
    return cls(**positional, **values)


# -- the reference page -------------------------------------------------------------------

def _format_default(value) -> str:
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return f"{value[0]}:{value[1]}"
    if isinstance(value, Path):
        return str(value).replace(os.path.expanduser("~"), "~", 1)
    if isinstance(value, list):
        return ", ".join(value) or "empty"
    return str(value)


def _default_of(spec) -> Any:
    from dataclasses import MISSING

    if spec.default_factory is not MISSING:
        return spec.default_factory()
    return spec.default


_SIZE_UNITS_HUMAN = {1 << 40: "TiB", 1 << 30: "GiB", 1 << 20: "MiB", 1 << 10: "KiB"}


def _human(spec, value) -> str:
    parse = spec.metadata["parse"]
    if parse in (_size, _part_size) and isinstance(value, int):
        for unit, name in _SIZE_UNITS_HUMAN.items():
            if value % unit == 0:
                return f"{value // unit}{name}"
    if parse in (_duration, _positive_duration):
        return f"{value:g}s"
    if parse is _mode:
        return f"{value:04o}"
    return _format_default(value)


def reference_markdown() -> str:
    """The option tables of docs/CONFIG.md, generated from the fields above."""
    lines = []
    for section, cls in SECTIONS.items():
        lines += [f"### [{section}]", "", "| key | default | environment | meaning |", "|---|---|---|---|"]
        for name, spec in options(cls).items():
            env = f"DORAFS_{section.upper()}_{name.upper()}"
            lines.append(f"| `{name}` | `{_human(spec, _default_of(spec))}` | `{env}` | {spec.metadata['doc']} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    print(reference_markdown())
