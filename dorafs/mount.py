"""Wiring of one mount: membership, client, optional embedded worker, FUSE session.

`run_mount` builds every part and owns their lifetimes in one AsyncExitStack: the
embedded worker, the UFS adapters, and one nursery in which every background task of the
mount runs (the client's, the staging area's uploads, the FUSE session, passthrough's
sealing, metrics); leaving the stack cancels the nursery, then closes the rest.

With neither a registry nor workers named, the mount starts an embedded single-node
cluster: one `dorafs-worker` child process on a loopback port with its cache under the
user's cache directory, stopped when the mount ends. It runs as its own process so the
worker's page I/O and the FUSE handlers use both cores. Its loopback port is reachable by
every local user, so it is locked down: it demands a random secret made for this mount
(in `worker.secret`, mode 0600, next to `worker.addr` in the 0700 cache directory, where
the user finds both to query it; never on a command line), and it reads only below the
mount's UFS root (`--ufs-roots`). It ends with the mount however the mount ends: a clean
unmount stops it with SIGTERM, and it also watches a pipe whose write end only the mount
holds, which the kernel closes when the mount process dies (SIGKILL, a crash, a signal
that came too late for the mount to handle).
"""

from __future__ import annotations

import logging
import os
import secrets
import signal
import subprocess
import sys
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import trio
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from dorafs.client import DoraClient
from dorafs.client.writes import Staging
from dorafs.config import MountConfig, user_cache_dir
from dorafs.errors import DoraError, NotFound, UfsError
from dorafs.files import lock_directory
from dorafs.fuse import mounting
from dorafs.fuse import protocol as p
from dorafs.fuse.metrics import REGISTRY, ClientCollector
from dorafs.fuse.operations import DoraOperations, passthrough_wanted
from dorafs.fuse.session import WANTED, Session
from dorafs.http import HttpServer, Response, json_response
from dorafs.membership import open_membership
from dorafs.memory import keep_freed_memory, quiet_collector
from dorafs.notify import notify
from dorafs.security import SECRET_ENV, Credentials
from dorafs.ufs import FileStatus, RetryPolicy, UfsSet, normalize

log = logging.getLogger("dorafs.mount")

EMBEDDED_START_TIMEOUT = 30.0
# Always on (the kernel checks the permission bits the mount shows), as before.
DEFAULT_FUSE_OPTIONS = frozenset({"default_permissions"})


class MountError(Exception):
    """A mount that cannot start; the message is shown to the user as is."""


@asynccontextmanager
async def embedded_worker(config: MountConfig, secret: bytes):
    """Start a local worker process that demands `secret`; yield its address; stop it on exit."""
    cache_dir = config.cache_dir or (user_cache_dir() / "embedded")
    lock = lock_directory(cache_dir)  # probe only: the worker takes it for itself
    if lock is None:
        raise MountError(f"the cache directory {cache_dir} is in use by another worker "
                         "(another embedded mount?); choose another with --cache-dir")
    os.close(lock)
    # The worker writes its address here once serving; operators find it here too, and
    # the secret it demands next to it.
    port_file = cache_dir / "worker.addr"
    port_file.unlink(missing_ok=True)
    secret_file = cache_dir / "worker.secret"
    argv = [
        sys.executable, "-m", "worker.main", "--listen", "127.0.0.1:0",
        "--cache-dir", str(cache_dir), "--cache-size", str(config.cache_size),
        "--page-size", str(config.page_size), "--status-ttl", str(config.status_ttl),
        "--listing-ttl", str(config.listing_ttl), "--negative-ttl", str(config.negative_ttl),
        "--port-file", str(port_file),
        "--ufs-roots", normalize(config.ufs_uri), "--secret-file", str(secret_file),
        "--ufs-attempts", str(config.ufs_attempts), "--ufs-deadline", str(config.ufs_deadline),
        "--ufs-timeout", str(config.ufs_timeout),
    ]
    env = {k: v for k, v in os.environ.items()
           if k != "NOTIFY_SOCKET"  # readiness is the mount's to tell
           and k != SECRET_ENV and not k.startswith("DORAFS_WORKER_")}  # nothing meant for other workers
    proc = keep = None
    try:
        _write_private(secret_file, secret + b"\n")
        # Neither end is inherited by anything else this process starts; the worker gets
        # the read end only, so it sees end-of-file exactly when this process is gone.
        lifeline, keep = os.pipe()
        try:
            proc = await trio.lowlevel.open_process(argv + ["--lifeline-fd", str(lifeline)],
                                                    stdin=subprocess.DEVNULL, env=env, pass_fds=(lifeline,))
        finally:
            os.close(lifeline)
        with trio.move_on_after(EMBEDDED_START_TIMEOUT):
            while not port_file.exists():
                if proc.poll() is not None:
                    raise MountError(f"the embedded worker exited with status {proc.returncode} "
                                     f"(cache directory {cache_dir}; see the log above)")
                await trio.sleep(0.02)
        if not port_file.exists():
            raise MountError("the embedded worker did not start in time")
        address = port_file.read_text().strip()
        log.info("embedded worker pid %d on %s, cache %s", proc.pid, address, cache_dir)
        yield address
    finally:
        with trio.CancelScope(shield=True):
            if proc is not None and proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
                with trio.move_on_after(10):
                    await proc.wait()
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
            if keep is not None:
                os.close(keep)
            port_file.unlink(missing_ok=True)
            secret_file.unlink(missing_ok=True)


def _write_private(path, data: bytes) -> None:
    """Write a file only its owner may read (whatever the umask, whatever was there)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data)
    finally:
        os.close(fd)


def fuse_options(config: MountConfig) -> set[str]:
    options = set(DEFAULT_FUSE_OPTIONS)
    options |= {"fsname=dorafs", "subtype=dorafs"}
    if config.read_only:
        options.add("ro")
    if config.allow_other:
        options.add("allow_other")
    if config.default_permissions:
        options.add("default_permissions")
    if config.debug:
        options.add("debug")
    return options


async def run_mount(config: MountConfig, ready=lambda: None) -> None:
    """Mount and serve until unmounted or signalled. `ready()` is called once serving."""
    root_uri = normalize(config.ufs_uri)
    mountpoint = os.path.abspath(config.mountpoint)
    if not os.path.isdir(mountpoint):
        raise MountError(f"mount point {mountpoint} is not a directory")
    try:
        credentials = Credentials.from_config(config)
    except ValueError as exc:  # ConfigError: a bad secret file or CA
        raise MountError(str(exc)) from None
    async with AsyncExitStack() as stack:
        workers = list(config.workers)
        if not config.registry and not workers:
            # A loopback child of ours: no TLS, and its own secret, not the cluster's.
            credentials = Credentials(secrets.token_hex(32).encode(), None)
            workers = [await stack.enter_async_context(embedded_worker(config, credentials.secret))]
        ufs = UfsSet(retry=RetryPolicy(config.ufs_attempts, config.ufs_deadline, config.ufs_timeout))
        stack.push_async_callback(ufs.aclose)
        membership = open_membership(config.registry, workers, credentials)
        client = DoraClient(config, membership, ufs, credentials=credentials)
        keep_freed_memory()  # the page buffer's blocks: no fresh memory faulted in for each run (dorafs/memory.py)
        quiet_collector()  # what is loaded by now lives as long as the mount (dorafs/memory.py)
        # The mount's one nursery owns every background task: the client's (membership,
        # readahead, listings ahead), the staging area's uploads, the session and its
        # kernel notifications, passthrough's sealing, metrics; cancelled on the way out.
        nursery = await stack.enter_async_context(trio.open_nursery())
        stack.callback(nursery.cancel_scope.cancel)
        await nursery.start(client.run)
        root = await root_status(client, root_uri)
        staging = Staging(config, ufs)
        await nursery.start(staging.run)
        operations = DoraOperations(client, config, root_uri, root, staging)
        try:
            fd = mounting.mount(mountpoint, fuse_options(config))
        except OSError as exc:
            raise MountError(f"cannot mount on {mountpoint}: {exc} (is it already mounted? is /dev/fuse there?)")
        # Passthrough is asked for only where registering backing files can work: the
        # kernel demands CAP_SYS_ADMIN for it (an unprivileged mount would get EPERM).
        passthrough = passthrough_wanted(config) and os.geteuid() == 0
        session = Session(operations, fd, workers=config.fuse_tasks, debug=config.debug,
                          wanted=WANTED | (p.PASSTHROUGH if passthrough else 0),
                          max_stack_depth=1 if passthrough else 0)
        operations.kernel = session
        try:
            nursery.start_soon(_terminate_on_signal, session)
            if config.read_ahead_kb:
                nursery.start_soon(set_read_ahead, mountpoint, config.read_ahead_kb)
            if config.metrics_listen:
                address = await nursery.start(metrics_server(client).serve, *config.metrics_listen)
                log.info("metrics on http://%s:%d/metrics", *address)
            await nursery.start(session.serve)  # returns once INIT is answered
            operations.passthrough.started(fd, session.negotiated)
            operations.objects.started(nursery)
            log.info("mounted %s on %s", root_uri, mountpoint)
            ready()
            notify("READY=1", f"STATUS=serving {root_uri} on {mountpoint}")
            await session.ended.wait()
        finally:
            notify("STOPPING=1")
            session.terminate()
            try:
                mounting.unmount(mountpoint)
            except OSError as exc:
                log.warning("unmounting %s: %s", mountpoint, exc)
            operations.passthrough.close()
            operations.objects.close()
            os.close(fd)
            log.info("unmounted %s", mountpoint)


async def set_read_ahead(mountpoint: str, kib: int) -> None:
    """Raise the kernel's readahead for this mount, so a sequential reader's requests are
    as large as a page (1 MiB) rather than 128 KiB: one request, one page, a quarter of
    the per-request cost.

    The kernel offers FUSE its default readahead (128 KiB) at INIT and keeps the smaller
    of that and the answer, so the mount's bdi setting is written once INIT is done: a
    stat of the mount point, answered by this very loop, waits for it. Writing it needs
    root (or a writable sysfs); otherwise the default stays and this is logged.
    """
    try:
        device = (await trio.to_thread.run_sync(os.stat, mountpoint)).st_dev
        path = f"/sys/class/bdi/{os.major(device)}:{os.minor(device)}/read_ahead_kb"
        await trio.to_thread.run_sync(Path(path).write_text, f"{kib}\n")
    except OSError as exc:
        log.info("kernel readahead of %s left at its default: %s", mountpoint, exc)
    else:
        log.info("kernel readahead of %s set to %d KiB", mountpoint, kib)


async def root_status(client: DoraClient, root_uri: str) -> FileStatus:
    """The mount root's status. An empty S3 prefix is an empty directory (how a user
    starts writing), as long as its bucket exists; any other missing root is an error.

    It comes from the workers (the UFS only when none answers). When the UFS fails, a
    status the workers hold of the root, whatever its age, will do, and so will a
    listing of it they hold: the mount starts and serves what is cached."""
    try:
        root = await client.stat(root_uri)
    except UfsError as exc:
        if not await held_listing(client, root_uri):
            raise MountError(f"cannot mount {root_uri}: {exc}") from None
        log.warning("the UFS fails (%s); starting from the listing of %s the workers hold", exc, root_uri)
        return FileStatus(name="", is_dir=True)
    except NotFound as exc:
        bucket = bucket_root(root_uri)
        if bucket is None or bucket == root_uri:
            raise MountError(f"cannot mount {root_uri}: {exc}") from None
        try:
            await client.ufs.get(bucket).stat(bucket)
        except DoraError as error:
            raise MountError(f"cannot mount {root_uri}: {error}") from None
        return FileStatus(name="", is_dir=True)
    except DoraError as exc:
        raise MountError(f"cannot mount {root_uri}: {exc}") from None
    if not root.is_dir:
        raise MountError(f"cannot mount {root_uri}: it is a file, not a directory")
    return root


async def held_listing(client: DoraClient, uri: str) -> bool:
    """Whether the workers answer a listing of `uri` (what they hold, the UFS failing)."""
    batches = client.list_batches(uri)
    try:
        await batches.__anext__()
    except StopAsyncIteration:
        return True
    except DoraError:
        return False
    finally:
        await batches.aclose()
    return True


def bucket_root(uri: str) -> str | None:
    """`s3://bucket` for an S3 URI, None for other stores."""
    scheme, _, rest = uri.partition("://")
    if scheme not in ("s3", "s3a"):
        return None
    return f"{scheme}://{rest.partition('/')[0]}"


def metrics_server(client: DoraClient) -> HttpServer:
    """/metrics and /healthz of the mount process."""
    REGISTRY.register(ClientCollector(client))
    server = HttpServer("dorafs-mount")

    @server.route("GET", "/metrics")
    async def metrics(req):
        return Response(200, generate_latest(REGISTRY), content_type=CONTENT_TYPE_LATEST)

    @server.route("GET", "/healthz")
    async def healthz(req):
        return json_response({"status": "ok", "workers": len(client.ring)})

    return server


async def _terminate_on_signal(session: Session) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            log.info("unmounting on %s", signal.Signals(signum).name)
            session.terminate(signal.Signals(signum).name)
            return
