"""`dorafs`: the user's command (`dorafs mount UFS_URI MOUNTPOINT`)."""

from __future__ import annotations

import argparse
import sys

from dorafs import __version__
from dorafs.cli.mount import add_mount_arguments, mount_command


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="dorafs", description="Mount a UFS (S3, file://, ...) through the dorafs cache.")
    p.add_argument("--version", action="version", version=f"dorafs {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    add_mount_arguments(sub.add_parser("mount", help="mount a UFS URI on a directory"))
    args = p.parse_args(argv)
    if args.command == "mount":
        sys.exit(mount_command(args, argv[1:]))


if __name__ == "__main__":
    main()
