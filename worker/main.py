"""`dorafs-worker`: the cache worker daemon."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import uuid
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import trio

from dorafs.config import ConfigError, WorkerConfig, load_config
from dorafs.files import lock_directory, write_atomic
from dorafs.log import setup_logging
from dorafs.memory import keep_freed_memory, quiet_collector
from dorafs.notify import notify
from dorafs.security import Credentials, ServerSecurity
from dorafs.ufs import RetryPolicy, UfsSet
from worker.metrics import WorkerMetrics
from worker.server import build_server
from worker.service import WorkerService

log = logging.getLogger("dorafs.worker")


def parse_args(argv: list[str] | None) -> tuple[WorkerConfig, Security, str | None, int | None]:
    p = argparse.ArgumentParser(prog="dorafs-worker", description="Run a dorafs cache worker.",
                                allow_abbrev=False)  # `--secret` must not mean `--secret-file`
    p.add_argument("--config", help="TOML config file (default /etc/dorafs/dorafs.toml if present)")
    p.add_argument("--registry", help="registry URL (http://HOST:PORT, or etcd://HOST:PORT[,HOST:PORT...]); "
                                      "omit for a standalone worker")
    p.add_argument("--listen", help="HOST:PORT to bind (port 0: any free port; default 127.0.0.1:29998)")
    p.add_argument("--advertise", help="HOST:PORT clients should use (default: the bound address)")
    p.add_argument("--cache-dir", help="page cache directory")
    p.add_argument("--cache-size", help="page cache capacity, e.g. 10GiB")
    p.add_argument("--page-size", help="page size, e.g. 1MiB")
    p.add_argument("--seal-min-size", help="seal object versions this big or bigger that a mount on this machine "
                   "reads into one file as soon as their last page is cached, e.g. 1MiB (0: only when asked)")
    p.add_argument("--status-ttl", help="how long a cached status is trusted by default, e.g. 5m (-1 never recheck)")
    p.add_argument("--listing-ttl", help="how long a cached directory listing is trusted by default, e.g. 5m")
    p.add_argument("--negative-ttl", help="how long a cached \"no such path\" is trusted by default, e.g. 30s")
    p.add_argument("--metadata-entries", help="statuses and listing entries kept in memory, e.g. 100000")
    p.add_argument("--ufs-attempts", help="tries per S3 request (throttling, 5xx, timeouts)")
    p.add_argument("--ufs-deadline", help="a UFS request and its retries end by this, e.g. 4s")
    p.add_argument("--ufs-timeout", help="connect and read timeout of one S3 attempt, e.g. 2s")
    p.add_argument("--heartbeat-interval", help="time between heartbeats to the registry, e.g. 2s")
    p.add_argument("--port-file", help="write the bound HOST:PORT here once serving")
    p.add_argument("--ufs-roots", help="UFS URIs this worker may read, e.g. s3://bucket,file:///data")
    p.add_argument("--secret-file", help="file with the cluster secret, mode 0600 (the secret itself: $DORAFS_SECRET)")
    p.add_argument("--tls-cert", help="TLS certificate chain (PEM); with --tls-key the port speaks TLS")
    p.add_argument("--tls-key", help="TLS private key (PEM)")
    p.add_argument("--tls-ca", help="CA bundle to verify the registry's TLS certificate with")
    p.add_argument("--metrics-listen", help="HOST:PORT of a plain listener with only /metrics and /healthz")
    p.add_argument("--log-level", default=None)
    p.add_argument("--lifeline-fd", type=int, help=argparse.SUPPRESS)  # see _watch_lifeline
    args = p.parse_args(argv)
    cli = {k: v for k, v in vars(args).items()
           if k not in ("config", "log_level", "lifeline_fd") and v is not None}
    try:
        config = load_config("worker", cli, config_path=args.config)
        security = Security(Credentials.from_config(config), ServerSecurity.from_config(config))
    except ConfigError as exc:
        p.exit(2, f"dorafs-worker: error: {exc}\n")
    return config, security, args.log_level, args.lifeline_fd


@dataclass(frozen=True)
class Security:
    credentials: Credentials = Credentials()  # presented to the registry
    server: ServerSecurity = ServerSecurity()  # demanded of clients


def _lock_cache_dir(cache_dir: Path) -> int:
    """One worker per cache directory: a second one would corrupt the index."""
    fd = lock_directory(cache_dir)
    if fd is None:
        raise SystemExit(f"dorafs-worker: cache directory {cache_dir} is in use by another worker")
    return fd


def _worker_id(cache_dir: Path) -> str:
    """A stable identity, kept with the cache, so a restarted worker owns the same keys."""
    path = cache_dir / "worker-id"
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        wid = uuid.uuid4().hex[:16]
        write_atomic(path, wid + "\n")
        return wid


async def _watch_lifeline(fd: int, scope: trio.CancelScope) -> None:
    """Stop the worker when the process that started it ends, however it ends.

    That process (an embedded mount) holds the write end of this pipe and never writes:
    the kernel closes it when the process exits, SIGKILL included, and the read end sees
    end-of-file. (PR_SET_PDEATHSIG would follow the thread that forked us, not the
    process, and misses a parent that died before it was set.)
    """
    os.set_blocking(fd, False)
    while True:
        await trio.lowlevel.wait_readable(fd)
        try:
            if not os.read(fd, 4096):
                break
        except BlockingIOError:
            continue
    os.close(fd)
    log.info("the mount that started this worker has ended; stopping")
    notify("STOPPING=1")
    scope.cancel()


async def run(config: WorkerConfig, security: Security | None = None, *, lifeline: int | None = None,
              task_status=trio.TASK_STATUS_IGNORED) -> None:
    from dorafs.membership import WorkerInfo, heartbeat_loop

    security = security or Security()

    ufs = UfsSet(threads=config.ufs_threads,
                 retry=RetryPolicy(config.ufs_attempts, config.ufs_deadline, config.ufs_timeout))
    service = WorkerService(config, ufs, WorkerMetrics())
    wid = _worker_id(config.cache_dir)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(service.run)
            if lifeline is not None:
                nursery.start_soon(_watch_lifeline, lifeline, nursery.cancel_scope)
            info: dict = {"id": wid, "page_size": config.page_size, "capacity": config.cache_size}
            server = build_server(service, info)
            security.server.apply(server)
            host, port = await nursery.start(server.serve, *config.listen)
            if config.metrics_listen:
                metrics_at = await nursery.start(server.view("dorafs-worker", {"/metrics", "/healthz"}).serve,
                                                 *config.metrics_listen)
                log.info("metrics on http://%s:%d/metrics", *metrics_at)
            address = config.advertise or f"{host}:{port}"
            info["address"] = address
            if config.registry:
                worker = WorkerInfo(id=wid, address=address, page_size=config.page_size, capacity=config.cache_size)
                await nursery.start(partial(heartbeat_loop, credentials=security.credentials),
                                    config.registry, worker, config.heartbeat_interval)
            if config.port_file:
                write_atomic(config.port_file, address + "\n")
            log.info("worker %s serving on %s (cache %s, %d bytes, page %d; %s; UFS roots: %s)",
                     wid, address, config.cache_dir, config.cache_size, config.page_size,
                     security.server.describe(), ", ".join(config.ufs_roots) or "any")
            notify("READY=1", f"STATUS=serving on {address}")
            keep_freed_memory()  # run buffers beyond the pool: no fresh memory faulted in (dorafs/memory.py)
            quiet_collector()  # what is loaded by now lives as long as the worker (dorafs/memory.py)
            task_status.started(address)
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for signum in signals:
                    log.info("worker %s stopping on %s", wid, signal.Signals(signum).name)
                    notify("STOPPING=1")
                    nursery.cancel_scope.cancel()
                    break
    finally:
        with trio.CancelScope(shield=True):
            await ufs.aclose()


def main(argv: list[str] | None = None) -> None:
    config, security, level, lifeline = parse_args(argv)
    setup_logging("dorafs-worker", level)
    lock = _lock_cache_dir(config.cache_dir)
    try:
        trio.run(partial(run, config, security, lifeline=lifeline))
    except KeyboardInterrupt:
        pass
    finally:
        os.close(lock)
    sys.exit(0)


if __name__ == "__main__":
    main()
