"""`dorafs-registry`: the service registry daemon."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path

import trio

from dorafs.config import ConfigError, RegistryConfig, load_config
from dorafs.files import lock_directory
from dorafs.log import setup_logging
from dorafs.notify import notify
from dorafs.security import ServerSecurity
from registry.server import run

log = logging.getLogger("dorafs.registry")

PROG = "dorafs-registry"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        """One line on stderr and exit 2 (argparse would print the usage too)."""
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def parse_args(argv: list[str] | None) -> tuple[RegistryConfig, ServerSecurity, str | None]:
    p = _Parser(prog=PROG, description="Run the dorafs registry: workers join, heartbeat and expire here; "
                "load jobs run here.", allow_abbrev=False)  # `--secret` must not mean `--secret-file`
    p.add_argument("--config", help="TOML config file (default /etc/dorafs/dorafs.toml if present)")
    p.add_argument("--listen", help="HOST:PORT to bind (port 0: any free port; default 127.0.0.1:19998)")
    p.add_argument("--state-dir", help="where the membership is saved")
    p.add_argument("--worker-ttl", help="drop a worker silent for this long (e.g. 10s)")
    p.add_argument("--port-file", help="write the bound HOST:PORT here once serving")
    p.add_argument("--secret-file", help="file with the cluster secret, mode 0600 (the secret itself: $DORAFS_SECRET)")
    p.add_argument("--tls-cert", help="TLS certificate chain (PEM); with --tls-key the port speaks TLS")
    p.add_argument("--tls-key", help="TLS private key (PEM)")
    p.add_argument("--tls-ca", help="CA bundle the scheduler verifies workers' TLS with")
    p.add_argument("--metrics-listen", help="HOST:PORT of a plain listener with only /metrics and /healthz")
    p.add_argument("--log-level", default=None, help="DEBUG, INFO, WARNING... (default: $DORAFS_LOG_LEVEL or INFO)")
    args = p.parse_args(argv)
    cli = {k: v for k, v in vars(args).items() if k not in ("config", "log_level") and v is not None}
    try:
        config = load_config("registry", cli, config_path=args.config)
        security = ServerSecurity.from_config(config)
    except ConfigError as exc:
        p.error(str(exc))
    if args.log_level and args.log_level.upper() not in logging.getLevelNamesMapping():
        p.error(f"unknown --log-level {args.log_level!r}")
    return config, security, args.log_level


def _lock_state_dir(state_dir: Path) -> int:
    """One registry per state directory: two would overwrite each other's state."""
    fd = lock_directory(state_dir)
    if fd is None:
        raise SystemExit(f"{PROG}: state directory {state_dir} is in use by another registry")
    return fd


async def _serve(config: RegistryConfig, security: ServerSecurity) -> None:
    async with trio.open_nursery() as nursery:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            address = await nursery.start(run, config, security)
            notify("READY=1", f"STATUS=serving on {address}")
            async for signum in signals:
                log.info("registry stopping on %s", signal.Signals(signum).name)
                notify("STOPPING=1")
                nursery.cancel_scope.cancel()
                break


def main(argv: list[str] | None = None) -> None:
    config, security, level = parse_args(argv)
    setup_logging(PROG, level)
    try:
        lock = _lock_state_dir(config.state_dir)
    except OSError as exc:
        sys.exit(f"{PROG}: cannot use state directory {config.state_dir}: {exc.strerror or exc}")
    try:
        trio.run(_serve, config, security)
    except KeyboardInterrupt:
        pass
    except OSError as exc:
        if exc.filename:  # the state or port file
            sys.exit(f"{PROG}: {exc.strerror or exc}: {exc.filename}")
        sys.exit(f"{PROG}: cannot listen on {config.listen[0]}:{config.listen[1]}: {exc.strerror or exc}")
    finally:
        os.close(lock)
    sys.exit(0)


if __name__ == "__main__":
    main()
