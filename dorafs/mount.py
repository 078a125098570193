"""Wiring of one mount: membership, client, optional embedded worker, FUSE session.

With neither a registry nor workers named, the mount starts an embedded single-node
cluster: one `dorafs-worker` child process on a loopback port with its cache under the
user's cache directory, stopped when the mount ends. It runs as its own process so the
worker's page I/O and the FUSE handlers use both cores.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from contextlib import AsyncExitStack, asynccontextmanager

import pyfuse3
import trio
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from dorafs.client import DoraClient
from dorafs.config import MountConfig, user_cache_dir
from dorafs.errors import DoraError, NotFound
from dorafs.files import lock_directory
from dorafs.fuse.metrics import REGISTRY, ClientCollector
from dorafs.fuse.operations import DoraOperations
from dorafs.http import HttpServer, Response, json_response
from dorafs.membership import open_membership
from dorafs.notify import notify
from dorafs.ufs import FileStatus, UfsSet, normalize

log = logging.getLogger("dorafs.mount")

EMBEDDED_START_TIMEOUT = 30.0


class MountError(Exception):
    """A mount that cannot start; the message is shown to the user as is."""


@asynccontextmanager
async def embedded_worker(config: MountConfig):
    """Start a local worker process; yield its address; stop it on exit."""
    cache_dir = config.cache_dir or (user_cache_dir() / "embedded")
    lock = lock_directory(cache_dir)  # probe only: the worker takes it for itself
    if lock is None:
        raise MountError(f"the cache directory {cache_dir} is in use by another worker "
                         "(another embedded mount?); choose another with --cache-dir")
    os.close(lock)
    # The worker writes its address here once serving; operators find it here too.
    port_file = cache_dir / "worker.addr"
    port_file.unlink(missing_ok=True)
    argv = [
        sys.executable, "-m", "worker.main", "--listen", "127.0.0.1:0",
        "--cache-dir", str(cache_dir), "--cache-size", str(config.cache_size),
        "--page-size", str(config.page_size), "--status-ttl", str(config.status_ttl),
        "--listing-ttl", str(config.listing_ttl), "--port-file", str(port_file),
    ]
    env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}  # readiness is the mount's to tell
    proc = await trio.lowlevel.open_process(argv, stdin=subprocess.DEVNULL, env=env)
    try:
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
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
                with trio.move_on_after(10):
                    await proc.wait()
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
            port_file.unlink(missing_ok=True)


def fuse_options(config: MountConfig) -> set[str]:
    options = set(pyfuse3.default_options)
    options |= {"fsname=dorafs", "subtype=dorafs"}
    if config.read_only:
        options.add("ro")
    if config.allow_other:
        options.add("allow_other")
    if config.debug:
        options.add("debug")
    return options


async def run_mount(config: MountConfig, ready=lambda: None) -> None:
    """Mount and serve until unmounted or signalled. `ready()` is called once serving."""
    root_uri = normalize(config.ufs_uri)
    mountpoint = os.path.abspath(config.mountpoint)
    if not os.path.isdir(mountpoint):
        raise MountError(f"mount point {mountpoint} is not a directory")
    async with AsyncExitStack() as stack:
        workers = list(config.workers)
        if not config.registry and not workers:
            workers = [await stack.enter_async_context(embedded_worker(config))]
        ufs = UfsSet()
        stack.push_async_callback(ufs.aclose)
        client = DoraClient(config, open_membership(config.registry, workers), ufs)
        nursery = await stack.enter_async_context(trio.open_nursery())
        stack.callback(nursery.cancel_scope.cancel)
        await nursery.start(client.run)
        root = await root_status(client, root_uri)
        operations = DoraOperations(client, config, root_uri, root)
        await nursery.start(operations.staging.run)
        try:
            pyfuse3.init(operations, mountpoint, fuse_options(config))
        except RuntimeError as exc:
            raise MountError(f"cannot mount on {mountpoint}: {exc} (is it already mounted? is /dev/fuse there?)")
        try:
            nursery.start_soon(_terminate_on_signal)
            if config.metrics_listen:
                address = await nursery.start(metrics_server(client).serve, *config.metrics_listen)
                log.info("metrics on http://%s:%d/metrics", *address)
            log.info("mounted %s on %s", root_uri, mountpoint)
            ready()
            notify("READY=1", f"STATUS=serving {root_uri} on {mountpoint}")
            await pyfuse3.main(max_tasks=config.fuse_tasks)
        finally:
            notify("STOPPING=1")
            pyfuse3.close(unmount=True)
            log.info("unmounted %s", mountpoint)


async def root_status(client: DoraClient, root_uri: str) -> FileStatus:
    """The mount root's status. An empty S3 prefix is an empty directory (how a user
    starts writing), as long as its bucket exists; any other missing root is an error."""
    try:
        root = await client.stat(root_uri)
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


async def _terminate_on_signal() -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            log.info("unmounting on %s", signal.Signals(signum).name)
            pyfuse3.terminate()
            return
