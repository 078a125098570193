"""Small file helpers shared by the daemons and the mount."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path


def write_atomic(path: Path, text: str) -> None:
    """Replace `path` with `text` so readers see the old or the new content, never half."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def lock_directory(directory: Path) -> int | None:
    """Take the directory's exclusive lock (creating both); the fd, or None if held elsewhere.

    One daemon per cache or state directory: the lock lives as long as the fd.
    """
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(directory / "lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd
