"""Small file helpers shared by the daemons and the mount."""

from __future__ import annotations

import fcntl
import os
import uuid
from pathlib import Path


def write_atomic(path: Path, text: str) -> None:
    """Replace `path` with `text` so readers see the old or the new content, never half,
    and a crash leaves one of them on the disk (the file and its directory are synced).

    Each write has a temporary name of its own: two writes of one file at once (a job
    saved by its run and by an API call, from two threads) must not rename each other's
    temporary file away."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


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
