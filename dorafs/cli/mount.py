"""`dorafs mount` and `mount.dorafs`.

`dorafs mount UFS_URI MOUNTPOINT` detaches like other mount tools: the parent starts the
mount as a child in a new session, waits until it serves (or fails), reports, and exits
0 (or 1 with the reason). `--foreground` keeps it in the terminal. Logs of a detached
mount go to the user's cache directory (`dorafs/logs/`).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from dorafs.config import ConfigError, MountConfig, load_config, user_cache_dir
from dorafs.errors import sole
from dorafs.security import Credentials

# mount(8) generic options that mean nothing to a FUSE file system of ours.
_IGNORED = {"defaults", "auto", "noauto", "user", "nouser", "users", "_netdev", "nofail", "exec", "noexec",
            "suid", "nosuid", "dev", "nodev", "atime", "noatime", "relatime"}


class UsageError(Exception):
    pass


def parse_options(text: str, into: dict) -> None:
    """`-o a=b,flag` into raw option values; a bare name means true. Checked by load_config,
    except `config=PATH`, which chooses the config file."""
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, has_value, value = item.partition("=")
        name = name.replace("-", "_")
        if name in _IGNORED:
            continue
        if name in ("ro", "rw") and not has_value:  # mount(8)'s read-only flag
            into["read_only"] = name == "ro"
            continue
        into[name] = value if has_value else True


def add_mount_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("ufs_uri", metavar="UFS_URI", help="s3://bucket/prefix, file:///path, ...")
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.add_argument("--config", help="TOML config file (default /etc/dorafs/dorafs.toml if present)")
    p.add_argument("--registry", help="registry URL (http://HOST:PORT, or etcd://HOST:PORT[,HOST:PORT...]); "
                                      "omit (with --workers) for an embedded single-node cluster")
    p.add_argument("--workers", help="static worker list HOST:PORT,HOST:PORT")
    p.add_argument("-f", "--foreground", action="store_true", default=None, help="stay in the foreground")
    p.add_argument("-o", dest="options", action="append", default=[], metavar="OPT[=VALUE],...",
                   help="mount options, e.g. cache_size=20GiB,page_size=4MiB,attr_timeout=1s")
    p.add_argument("--cache-dir", help="embedded worker's cache directory")
    p.add_argument("--cache-size", help="embedded worker's cache capacity, e.g. 10GiB")
    p.add_argument("--log-level", default=None)
    p.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)


def config_from_args(args: argparse.Namespace) -> MountConfig:
    cli: dict = {}
    for text in args.options:
        parse_options(text, cli)
    config_path = cli.pop("config", None) or args.config
    for key in ("registry", "workers", "foreground", "cache_dir", "cache_size"):
        if getattr(args, key) is not None:
            cli[key] = getattr(args, key)
    if "://" not in args.ufs_uri:
        raise UsageError(f"not a UFS URI: {args.ufs_uri!r} (expected e.g. s3://bucket/prefix or file:///data)")
    try:
        config = load_config("mount", cli, config_path=config_path, ufs_uri=args.ufs_uri,
                             mountpoint=Path(args.mountpoint))
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
    if config.registry and config.workers:
        raise UsageError("give a registry or a worker list, not both")
    if not config.mountpoint.is_dir():
        raise UsageError(f"mount point {config.mountpoint} does not exist or is not a directory")
    try:
        Credentials.from_config(config)  # a bad secret file or CA stops the mount here, in one line
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
    return config


def run_foreground(config: MountConfig, log_level: str | None, ready_fd: int | None) -> int:
    import trio

    from dorafs.log import setup_logging
    from dorafs.mount import MountError, run_mount

    setup_logging("dorafs-mount", "DEBUG" if config.debug else log_level)

    def ready() -> None:
        if ready_fd is not None:
            os.write(ready_fd, b"ok\n")
            os.close(ready_fd)

    try:
        trio.run(run_mount, config, ready)
    except KeyboardInterrupt:
        pass
    except BaseException as exc:
        exc = sole(exc)  # a MountError raised inside the mount's nursery arrives in an exception group
        if not isinstance(exc, MountError):
            raise
        print(f"dorafs: {exc}", file=sys.stderr)
        return 1
    return 0


def detach(argv: list[str], config: MountConfig) -> int:
    """Run the mount as a detached child and wait for it to serve."""
    log_dir = user_cache_dir() / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"mount-{str(config.mountpoint.resolve()).strip('/').replace('/', '_') or 'root'}.log"
    read_fd, write_fd = os.pipe()
    with open(log_path, "ab") as log_file:
        child = subprocess.Popen(
            [sys.executable, "-m", "dorafs.cli.main", "mount", *argv, "--foreground", "--ready-fd", str(write_fd)],
            stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file, pass_fds=(write_fd,),
            start_new_session=True,
        )
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as ready:
        answer = ready.read(3)
    if answer == b"ok\n":
        print(f"dorafs: mounted {config.ufs_uri} on {config.mountpoint} (pid {child.pid}, log {log_path})")
        return 0
    code = child.wait()
    reason = _last_error(log_path) or f"the mount process exited with status {code}"
    print(f"dorafs: mount failed: {reason} (log {log_path})", file=sys.stderr)
    return 1


def _last_error(log_path: Path) -> str:
    try:
        lines = log_path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    for line in reversed(lines[-50:]):
        if line.startswith("dorafs:") or " ERROR " in line:
            return line.removeprefix("dorafs: ")
    return ""


def mount_command(args: argparse.Namespace, argv: list[str]) -> int:
    try:
        config = config_from_args(args)
    except UsageError as exc:
        print(f"dorafs: {exc}", file=sys.stderr)
        return 2
    if config.foreground:
        return run_foreground(config, args.log_level, args.ready_fd)
    return detach(argv, config)


def mount_helper(argv: list[str] | None = None) -> None:
    """`mount.dorafs UFS_URI MOUNTPOINT [-o options]`, as called by mount(8): the same as
    `dorafs mount UFS_URI MOUNTPOINT -o options`."""
    p = argparse.ArgumentParser(prog="mount.dorafs")
    p.add_argument("ufs_uri")
    p.add_argument("mountpoint")
    p.add_argument("-o", dest="options", action="append", default=[])
    p.add_argument("-n", "-s", "-v", dest="ignored", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    forwarded = [args.ufs_uri, args.mountpoint]
    for text in args.options:
        forwarded += ["-o", text]
    command = argparse.ArgumentParser(prog="dorafs mount")
    add_mount_arguments(command)
    sys.exit(mount_command(command.parse_args(forwarded), forwarded))
