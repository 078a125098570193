"""`dorafs-worker`: the cache worker daemon."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import uuid
from pathlib import Path

import trio

from dorafs.config import ConfigError, WorkerConfig, load_config
from dorafs.files import lock_directory, write_atomic
from dorafs.log import setup_logging
from dorafs.notify import notify
from dorafs.ufs import RetryPolicy, UfsSet
from worker.metrics import WorkerMetrics
from worker.server import build_server
from worker.service import WorkerService

log = logging.getLogger("dorafs.worker")


def parse_args(argv: list[str] | None) -> tuple[WorkerConfig, str]:
    p = argparse.ArgumentParser(prog="dorafs-worker", description="Run a dorafs cache worker.")
    p.add_argument("--config", help="TOML config file (default /etc/dorafs/dorafs.toml if present)")
    p.add_argument("--registry", help="registry URL (http://HOST:PORT, or etcd://HOST:PORT[,HOST:PORT...]); "
                                      "omit for a standalone worker")
    p.add_argument("--listen", help="HOST:PORT to bind (port 0: any free port; default 127.0.0.1:29998)")
    p.add_argument("--advertise", help="HOST:PORT clients should use (default: the bound address)")
    p.add_argument("--cache-dir", help="page cache directory")
    p.add_argument("--cache-size", help="page cache capacity, e.g. 10GiB")
    p.add_argument("--page-size", help="page size, e.g. 1MiB")
    p.add_argument("--status-ttl", help="how long a cached file status is trusted, e.g. 10s")
    p.add_argument("--listing-ttl", help="how long a cached directory listing is trusted, e.g. 10s")
    p.add_argument("--ufs-attempts", help="tries per S3 request (throttling, 5xx, timeouts)")
    p.add_argument("--ufs-deadline", help="a UFS request and its retries end by this, e.g. 4s")
    p.add_argument("--ufs-timeout", help="connect and read timeout of one S3 attempt, e.g. 2s")
    p.add_argument("--heartbeat-interval", help="time between heartbeats to the registry, e.g. 2s")
    p.add_argument("--port-file", help="write the bound HOST:PORT here once serving")
    p.add_argument("--log-level", default=None)
    args = p.parse_args(argv)
    cli = {k: v for k, v in vars(args).items() if k not in ("config", "log_level") and v is not None}
    try:
        config = load_config("worker", cli, config_path=args.config)
    except ConfigError as exc:
        p.exit(2, f"dorafs-worker: error: {exc}\n")
    return config, args.log_level


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


async def run(config: WorkerConfig, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    from dorafs.membership import WorkerInfo, heartbeat_loop

    ufs = UfsSet(threads=config.ufs_threads,
                 retry=RetryPolicy(config.ufs_attempts, config.ufs_deadline, config.ufs_timeout))
    service = WorkerService(config, ufs, WorkerMetrics())
    await service.start()
    wid = _worker_id(config.cache_dir)
    try:
        async with trio.open_nursery() as nursery:
            info: dict = {"id": wid, "page_size": config.page_size, "capacity": config.cache_size}
            server = build_server(service, info)
            host, port = await nursery.start(server.serve, *config.listen)
            address = config.advertise or f"{host}:{port}"
            info["address"] = address
            if config.registry:
                worker = WorkerInfo(id=wid, address=address, page_size=config.page_size, capacity=config.cache_size)
                await nursery.start(heartbeat_loop, config.registry, worker, config.heartbeat_interval)
            if config.port_file:
                write_atomic(config.port_file, address + "\n")
            log.info("worker %s serving on %s (cache %s, %d bytes, page %d)",
                     wid, address, config.cache_dir, config.cache_size, config.page_size)
            notify("READY=1", f"STATUS=serving on {address}")
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
    config, level = parse_args(argv)
    setup_logging("dorafs-worker", level)
    lock = _lock_cache_dir(config.cache_dir)
    try:
        trio.run(run, config)
    except KeyboardInterrupt:
        pass
    finally:
        os.close(lock)
    sys.exit(0)


if __name__ == "__main__":
    main()
