"""dorafs as an fsspec protocol: `dorafs://bucket/key` read through the workers, no mount.

    import fsspec
    fs = fsspec.filesystem("dorafs", registry="http://10.0.0.5:19998")
    with fsspec.open("dorafs://bucket/train/shard-0001.tar", registry=...) as f: ...
    pandas.read_parquet("dorafs://bucket/t.parquet", storage_options={"registry": ...})

The protocol is registered by the package's `fsspec.specs` entry point, so fsspec,
pandas, pyarrow (through fsspec) and anything else that takes an fsspec URL resolve it
once dorafs is installed. `dorafs://bucket/key` names `s3://bucket/key` (another UFS
scheme with the storage option `ufs="gs"` and so on).

It is the mount's client core (dorafs/client/) without the kernel: the same ring and
worker protocol, page-aligned reads, short-circuit reads of a worker's page files on
this machine when they are readable, failover to the next ring candidate and then to
the store, statuses and listings from the owning workers, a miss filled by the worker.
Every open file pins the version (ETag) its status had when it was opened: its bytes are
all of that version, or a read fails with ESTALE once the store no longer has it; never
a mix.

Configuration is the mount's (`[mount]` in the config file, `DORAFS_MOUNT_*` in the
environment, then the storage options, which win): `registry` or `workers`, the cluster
secret (`secret_file` or `$DORAFS_SECRET`), `tls_ca`, `status_ttl`, `listing_ttl`,
`worker_timeout`, `connect_timeout`, `short_circuit`, `readahead_pages`, `buffer_size`
and the `ufs_*` options of its own store reads. `config="PATH"` names the config file.
Unlike a mount, it never starts an embedded worker: name a registry or workers.

Read-only: every write (open for writing, rm, mkdir, mv, put) raises OSError EROFS.
Write to the store itself, or through a mount, whose conditional staged commit path
keeps writers from overwriting each other's changes unseen.

Concurrency: the client core is trio-based, so each process runs one private trio loop
on a daemon thread per filesystem instance, and calls from any thread are handed to it
(`trio.from_thread.run`, 35-100 µs a call on this project's loaded 2-core machine: the cost
of a call here over one inside the loop). After a fork (PyTorch DataLoader workers) the
child notices its pid changed and starts a loop of its own; the parent's loop, sockets
and kept page files are left untouched in the child (the thread that owned them does
not exist there). The child starts with the statuses the parent kept (a listing before
the DataLoader started keeps every file's), so its first open of each file asks no
worker: every loop's clock is the monotonic clock without trio's random offset, so a
status's expiry means the same in both.
"""

from __future__ import annotations

import atexit
import errno
import logging
import os
import threading
import time
import weakref
from typing import Any

import trio
from fsspec.spec import AbstractBufferedFile, AbstractFileSystem

from dorafs.client.client import DoraClient, OpenFile
from dorafs.client.prefetch import Prefetcher
from dorafs.client.statuses import StatusMemo
from dorafs.config import ConfigError, MountConfig, load_config
from dorafs.errors import DoraError, IsADirectory, NotADirectory, NotFound
from dorafs.membership import open_membership
from dorafs.security import Credentials
from dorafs.ufs import FileStatus, RetryPolicy, UfsSet, normalize

log = logging.getLogger(__name__)

PROTOCOL = "dorafs"
READ_ONLY = ("dorafs:// is read-only through fsspec; write to the store itself "
             "(e.g. s3://) or through a dorafs mount")
START_TIMEOUT = 60.0  # a loop that has not started by then is reported, not waited for
# Storage options fsspec itself (or a caller written for other filesystems) may pass,
# which are not dorafs configuration.
_FSSPEC_OPTIONS = frozenset({"skip_instance_cache", "use_listings_cache", "listings_expiry_time",
                             "max_paths", "asynchronous", "loop", "anon"})

_lock = threading.Lock()
_runtimes: weakref.WeakSet = weakref.WeakSet()
_abandoned: list = []  # a parent's runtimes, copied into a forked child: never touched there


def _after_fork_in_child() -> None:
    global _lock
    _lock = threading.Lock()  # the parent may have held it while forking
    _abandoned.extend(_runtimes)
    _runtimes.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)


class _MonotonicClock(trio.abc.Clock):
    """trio's system clock without its random offset: the same in a forked child."""

    def start_clock(self) -> None:
        pass

    def current_time(self) -> float:
        return time.perf_counter()

    def deadline_to_sleep_time(self, deadline: float) -> float:
        return deadline - time.perf_counter()


class _Runtime:
    """A DoraClient on a trio loop of its own, on a daemon thread of this process."""

    def __init__(self, config: MountConfig, credentials: Credentials, *, statuses: StatusMemo | None = None):
        self.pid = os.getpid()
        self.client: DoraClient | None = None
        self._statuses = statuses
        self._config = config
        self._credentials = credentials
        self._token: trio.lowlevel.TrioToken | None = None
        self._cancel: trio.CancelScope | None = None
        self._error: BaseException | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._main, name="dorafs-fsspec", daemon=True)
        self._thread.start()
        if not self._ready.wait(START_TIMEOUT):
            raise OSError(errno.ETIMEDOUT, "dorafs: the client did not start in time")
        if self._error is not None:
            raise self._error

    def _main(self) -> None:
        try:
            trio.run(self._serve, clock=_MonotonicClock())
        except BaseException as exc:  # reported to the thread that started us, or logged
            if not self._ready.is_set():
                self._error = exc
                self._ready.set()
            else:
                log.error("the dorafs client loop ended: %r", exc)

    async def _serve(self) -> None:
        config = self._config
        ufs = UfsSet(retry=RetryPolicy(config.ufs_attempts, config.ufs_deadline, config.ufs_timeout))
        try:
            membership = open_membership(config.registry, list(config.workers), self._credentials)
            client = DoraClient(config, membership, ufs, credentials=self._credentials)
            if self._statuses is not None:  # a forked child's: what the parent kept
                client.statuses = self._statuses
            async with trio.open_nursery() as nursery:
                self._cancel = nursery.cancel_scope
                await nursery.start(client.run)
                self.client = client
                self._token = trio.lowlevel.current_trio_token()
                self._ready.set()
        finally:
            with trio.CancelScope(shield=True):
                await ufs.aclose()

    def call(self, fn, *args):
        """Run the async `fn(*args)` on the loop, from any other thread of this process."""
        try:
            return trio.from_thread.run(fn, *args, trio_token=self._token)
        except trio.RunFinishedError:
            raise OSError(errno.ESHUTDOWN, "dorafs: the client was closed") from None

    def call_sync(self, fn, *args):
        try:
            return trio.from_thread.run_sync(fn, *args, trio_token=self._token)
        except trio.RunFinishedError:
            raise OSError(errno.ESHUTDOWN, "dorafs: the client was closed") from None

    def soon(self, fn, *args) -> None:
        """Run the sync `fn(*args)` on the loop soon, from any thread, its own included."""
        try:
            self._token.run_sync_soon(fn, *args)
        except trio.RunFinishedError:  # the loop has ended, and with it what fn would end
            pass

    def close(self) -> None:
        if self.pid != os.getpid() or not self._thread.is_alive():
            return
        try:
            trio.from_thread.run_sync(self._cancel.cancel, trio_token=self._token)
        except trio.RunFinishedError:
            pass
        self._thread.join(10)


@atexit.register
def _close_all() -> None:
    for runtime in list(_runtimes):
        runtime.close()


def _os_error(exc: DoraError, path: str) -> OSError:
    """The one conversion from dorafs's errors to what fsspec callers expect."""
    if isinstance(exc, NotFound):
        return FileNotFoundError(errno.ENOENT, str(exc), path)
    if isinstance(exc, IsADirectory):
        return IsADirectoryError(errno.EISDIR, str(exc), path)
    if isinstance(exc, NotADirectory):
        return NotADirectoryError(errno.ENOTDIR, str(exc), path)
    return OSError(exc.errno, str(exc), path)


def mount_config(options: dict[str, Any], *, config_path: str | None = None) -> MountConfig:
    """The mount's configuration (file, environment) with the storage options on top."""
    config = load_config("mount", options, config_path=config_path)
    if not config.registry and not config.workers:
        raise ConfigError("dorafs: name the workers: the storage option registry=URL or "
                          "workers=[HOST:PORT, ...] (or registry/workers in [mount] of the config "
                          "file, or $DORAFS_MOUNT_REGISTRY / $DORAFS_MOUNT_WORKERS)")
    if config.registry and config.workers:
        raise ConfigError("dorafs: give either a registry or a list of workers, not both")
    return config


class DoraFileSystem(AbstractFileSystem):
    """Read-only fsspec filesystem over a dorafs cluster (see the module's note)."""

    protocol = PROTOCOL
    root_marker = ""

    def __init__(self, *args, ufs: str = "s3", config: str | None = None, **storage_options):
        super().__init__(*args, ufs=ufs, config=config, **storage_options)
        options = {k: v for k, v in storage_options.items() if k not in _FSSPEC_OPTIONS}
        self.ufs_scheme = ufs.lower().removesuffix("://")
        self.config = mount_config(options, config_path=config)
        self.credentials = Credentials.from_config(self.config)
        self._runtime: _Runtime | None = None

    # -- the loop ---------------------------------------------------------------------

    @property
    def runtime(self) -> _Runtime:
        """This process's loop and client; a forked child starts its own."""
        runtime = self._runtime
        if runtime is None or runtime.pid != os.getpid():
            with _lock:
                runtime = self._runtime
                if runtime is None or runtime.pid != os.getpid():
                    inherited = runtime.client.statuses if runtime is not None and runtime.client else None
                    runtime = self._runtime = _Runtime(self.config, self.credentials, statuses=inherited)
                    _runtimes.add(runtime)
        return runtime

    def _call(self, path: str, fn, *args):
        try:
            return self.runtime.call(fn, *args)
        except DoraError as exc:
            raise _os_error(exc, path) from None

    def close(self) -> None:
        """Stop this instance's loop (it also stops when the interpreter exits)."""
        runtime, self._runtime = self._runtime, None
        if runtime is not None:
            runtime.close()

    def statistics(self) -> dict[str, Any]:
        """Where this process's reads were served from (the client's counters)."""
        stats = self.runtime.client.stats
        return {"worker_pages": stats.worker_pages, "short_circuit_pages": stats.short_circuit_pages,
                "ufs_fallback_pages": stats.ufs_fallback_pages,
                "ufs_fallback_metadata": stats.ufs_fallback_metadata, "failovers": stats.failovers,
                "by_worker": dict(stats.by_worker), "pid": self.runtime.pid}

    # -- names ------------------------------------------------------------------------

    def uri(self, path: str) -> str:
        """The UFS URI of an fsspec path (`bucket/key` or `dorafs://bucket/key`)."""
        path = self._strip_protocol(path)
        if not path:
            raise ValueError("dorafs: a path names at least a bucket (dorafs://bucket/key)")
        return normalize(f"{self.ufs_scheme}://{path}")

    def _info_of(self, path: str, status: FileStatus) -> dict[str, Any]:
        return {"name": path, "size": 0 if status.is_dir else status.size,
                "type": "directory" if status.is_dir else "file",
                "mtime": status.mtime, "version": status.version, "ETag": status.version}

    # -- metadata ---------------------------------------------------------------------

    def info(self, path, **kwargs):
        path = self._strip_protocol(path)
        status = self._call(path, self.runtime.client.stat, self.uri(path))
        return self._info_of(path, status)

    def ls(self, path, detail=True, **kwargs):
        path = self._strip_protocol(path)
        uri = self.uri(path)
        client = self.runtime.client

        async def listing() -> list[FileStatus]:
            entries = []
            async for batch in client.list_batches(uri):
                entries += batch
            return entries

        try:
            entries = self._call(path, listing)
        except NotADirectoryError:
            found = [self.info(path)]
        else:
            found = [self._info_of(f"{path}/{e.name}", e) for e in entries]
        return found if detail else [e["name"] for e in found]

    def invalidate_cache(self, path=None):
        """Forget the statuses this process keeps (the workers keep theirs for their TTLs)."""
        runtime = self._runtime
        if runtime is None or runtime.pid != os.getpid():
            return
        memo = runtime.client.statuses
        if path is None:
            runtime.call_sync(memo._held.clear)
        else:
            runtime.call_sync(lambda: memo.forget(self.uri(path), recursive=True))

    # -- data -------------------------------------------------------------------------

    def open_pinned(self, path: str) -> OpenFile:
        """An open file of `path`'s current version, for `read_pinned`."""
        path = self._strip_protocol(path)
        client = self.runtime.client
        status = self._call(path, client.stat, self.uri(path))
        if status.is_dir:
            raise IsADirectoryError(errno.EISDIR, "is a directory", path)
        return client.open_pinned(self.uri(path), status)

    def close_pinned(self, handle: OpenFile) -> None:
        """The open file is done: its readahead is cancelled, soon, on the loop. Never
        waits: a file closed by the garbage collector may be closed on the loop's thread."""
        runtime = self._runtime
        if runtime is None or runtime.pid != os.getpid() or runtime.client is None:
            return  # a forked child's handle from its parent: nothing of it runs here
        runtime.soon(runtime.client.close, handle)

    def read_pinned(self, handle: OpenFile, offset: int, length: int) -> bytes:
        """Bytes [offset, offset+length) of the open file's pinned version, short only at EOF."""
        client = self.runtime.client
        if handle.ahead is None or handle.ahead.reader is not client.reader:
            # A forked child reading a file its parent opened: readahead of its own.
            handle.ahead = Prefetcher(client.reader, handle)

        async def read() -> bytes:
            return bytes(await client.read(handle, offset, length))  # copied on the loop: buffers are reused

        return self._call(handle.uri, read)

    def cat_file(self, path, start=None, end=None, **kwargs):
        """Bytes [start, end) of the current version (negative: from the end), in one
        call to the loop: the status and the read together."""
        path = self._strip_protocol(path)
        uri = self.uri(path)
        client = self.runtime.client

        async def cat() -> bytes:
            status = await client.stat(uri)
            if status.is_dir:
                raise IsADirectory(f"{path} is a directory")
            size = status.size
            first = 0 if start is None else (max(0, size + start) if start < 0 else min(start, size))
            last = size if end is None else (max(0, size + end) if end < 0 else min(end, size))
            if last <= first:
                return b""
            opened = client.open_pinned(uri, status)
            try:
                return bytes(await client.read(opened, first, last - first))
            finally:
                client.close(opened)  # no readahead past what was asked for

        return self._call(path, cat)

    def _open(self, path, mode="rb", block_size=None, autocommit=True, cache_options=None, **kwargs):
        if mode != "rb":
            raise OSError(errno.EROFS, READ_ONLY, path)
        handle = self.open_pinned(path)
        return DoraFile(self, self._strip_protocol(path), handle, block_size=block_size,
                        cache_type=kwargs.get("cache_type", "none"), cache_options=cache_options)

    # -- writes are refused ------------------------------------------------------------

    def _read_only(self, *args, **kwargs):
        raise OSError(errno.EROFS, READ_ONLY)

    mkdir = makedirs = rmdir = rm_file = rm = _rm = touch = _read_only
    cp_file = mv = put_file = pipe_file = copy = _read_only


class DoraFile(AbstractBufferedFile):
    """A file open for reading, its version pinned at open (`self.handle.status`)."""

    def __init__(self, fs: DoraFileSystem, path: str, handle: OpenFile, *, block_size=None,
                 cache_type: str = "none", cache_options=None):
        self.handle = handle
        self._details = fs._info_of(path, handle.status)
        super().__init__(fs, path, mode="rb", block_size=block_size or fs.config.page_size,
                         cache_type=cache_type, cache_options=cache_options, size=handle.status.size)

    def _fetch_range(self, start: int, end: int) -> bytes:
        return self.fs.read_pinned(self.handle, start, end - start)

    def close(self) -> None:
        if not self.closed:
            self.fs.close_pinned(self.handle)
        super().close()
