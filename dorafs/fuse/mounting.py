"""Mounting and unmounting a FUSE file system: the kernel side of /dev/fuse.

As root, dorafs opens /dev/fuse and calls mount(2) itself, passing the device's
descriptor in the mount data (`fd=N,rootmode=...,user_id=...,group_id=...`). Anyone
else goes through the setuid `fusermount3`, which mounts and hands the opened device
back over a socket pair (the `_FUSE_COMMFD` environment variable names our end; the
descriptor comes as SCM_RIGHTS ancillary data). Unmounting mirrors it: umount2 with
MNT_DETACH as root, `fusermount3 -u -z` otherwise.

Options (the strings `dorafs mount -o` takes for FUSE):
- `ro`: MS_RDONLY; `allow_other`, `default_permissions`: kernel mount options;
- `fsname=NAME` (the mount's source, as `mount` shows it), `subtype=NAME` (type `fuse.NAME`);
- `debug`: the session's, ignored here.
nosuid and nodev are always set, as FUSE mounts usually are.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import socket
import stat
import subprocess

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MNT_DETACH = 2
FUSERMOUNT = "fusermount3"
SESSION_ONLY = {"debug"}  # options of the session, not of the mount

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


class MountFailed(OSError):
    """The kernel or fusermount3 refused the mount; the message says why."""


def _split(options: set[str]) -> tuple[dict[str, str], set[str]]:
    named, flags = {}, set()
    for option in options:
        name, eq, value = option.partition("=")
        if eq:
            named[name] = value
        elif option not in SESSION_ONLY:
            flags.add(option)
    unknown = flags - {"ro", "rw", "allow_other", "default_permissions", "nosuid", "nodev"}
    unknown |= set(named) - {"fsname", "subtype"}
    if unknown:
        raise ValueError(f"unknown FUSE mount options: {', '.join(sorted(unknown))}")
    return named, flags


def mount(mountpoint: str, options: set[str]) -> int:
    """Mount a FUSE file system at `mountpoint`; returns the /dev/fuse descriptor
    (close-on-exec, blocking) the session is to serve."""
    named, flags = _split(options)
    if os.geteuid() == 0:
        return _mount_directly(mountpoint, named, flags)
    return _mount_with_fusermount(mountpoint, named, flags)


def _mount_directly(mountpoint: str, named: dict[str, str], flags: set[str]) -> int:
    mode = os.stat(mountpoint).st_mode
    fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    try:
        data = [f"fd={fd}", f"rootmode={stat.S_IFMT(mode):o}", f"user_id={os.getuid()}",
                f"group_id={os.getgid()}"]
        data += sorted(flags & {"allow_other", "default_permissions"})
        ms = MS_NOSUID | MS_NODEV | (MS_RDONLY if "ro" in flags else 0)
        source = named.get("fsname", "fuse")
        fstype = f"fuse.{named['subtype']}" if "subtype" in named else "fuse"
        if _libc.mount(source.encode(), os.fsencode(mountpoint), fstype.encode(), ms,
                       ",".join(data).encode()) != 0:
            code = ctypes.get_errno()
            raise MountFailed(code, f"mount(2) of {mountpoint}: {os.strerror(code)}")
    except BaseException:
        os.close(fd)
        raise
    return fd


def _mount_with_fusermount(mountpoint: str, named: dict[str, str], flags: set[str]) -> int:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        opts = sorted(flags | {"nosuid", "nodev"}) + [f"{k}={v}" for k, v in sorted(named.items())]
        env = dict(os.environ, _FUSE_COMMFD=str(theirs.fileno()))
        proc = subprocess.run([FUSERMOUNT, "-o", ",".join(opts), "--", mountpoint], env=env,
                              pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL,
                              capture_output=True, text=True)
        theirs.close()
        if proc.returncode != 0:
            message = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"status {proc.returncode}"
            raise MountFailed(errno.EPERM, f"{FUSERMOUNT}: {message}")
        _, fds, _, _ = socket.recv_fds(ours, 16, 1)
        if not fds:
            raise MountFailed(errno.EIO, f"{FUSERMOUNT} mounted {mountpoint} but sent no descriptor")
        os.set_inheritable(fds[0], False)
        return fds[0]
    finally:
        theirs.close()
        ours.close()


def unmount(mountpoint: str) -> None:
    """Detach the mount at `mountpoint` if it is still there (lazily: open files keep it
    alive until closed). Errors are the caller's to log."""
    if not is_mounted(mountpoint):
        return
    if os.geteuid() == 0:
        if _libc.umount2(os.fsencode(mountpoint), MNT_DETACH) != 0:
            code = ctypes.get_errno()
            if code not in (errno.EINVAL, errno.ENOENT):  # not mounted (any more)
                raise OSError(code, f"umount2 of {mountpoint}: {os.strerror(code)}")
        return
    proc = subprocess.run([FUSERMOUNT, "-u", "-q", "-z", "--", mountpoint], stdin=subprocess.DEVNULL,
                          capture_output=True, text=True)
    if proc.returncode != 0 and is_mounted(mountpoint):
        raise OSError(errno.EPERM, f"{FUSERMOUNT} -u {mountpoint}: {proc.stderr.strip()}")


def is_mounted(mountpoint: str) -> bool:
    target = os.path.abspath(mountpoint)
    with open("/proc/self/mounts", "rb") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 2 and _unescape(fields[1]) == target:
                return True
    return False


def _unescape(field: bytes) -> str:
    """/proc/self/mounts writes space, tab, newline and backslash as octal escapes."""
    text = os.fsdecode(field)
    if "\\" not in text:
        return text
    out, i = [], 0
    while i < len(text):
        if text[i] == "\\" and i + 3 < len(text) and text[i + 1:i + 4].isdigit():
            out.append(chr(int(text[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(text[i])
            i += 1
    return "".join(out)
