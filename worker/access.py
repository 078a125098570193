"""What a worker agrees to read: well-formed UFS URIs, under the roots it serves.

A worker reads its UFS with the cluster's credentials, so a request is a capability: a
client that may name any URI may read anything those credentials reach (`file:///etc/
shadow` on a worker running as root). Two checks stand between a request and the UFS:

- `check_uri`: one canonical form (`dorafs.ufs.normalize`), no control characters, no
  empty, `.` or `..` path segments (fsspec's local store would resolve `..`; the mount
  never asks for such names, see docs/SECURITY.md), bounded lengths. Percent signs are
  not decoded anywhere past the HTTP query string, so `%2F` stays a literal character.
- `UfsRoots`: with `ufs_roots` configured, a URI must be one of the roots or below one;
  a `file://` URI must also still be below a root once symlinks are resolved, so a link
  inside a dataset cannot lead the worker out of it. No roots means any URI (the open
  default, for clusters whose secret-holders are all trusted).

Page files never take a path from a request: their names are hashes and integers
(`worker.pagestore`), so nothing a client sends can place or read a file in the cache
directory by name.
"""

from __future__ import annotations

import os
import re

import trio

from dorafs.errors import InvalidRequest, PermissionDenied
from dorafs.ufs import normalize

MAX_URI_CHARS = 4096  # PATH_MAX; S3 keys stop at 1024 bytes
MAX_SEGMENT_BYTES = 1024  # an S3 key may be one long segment
MAX_FILE_NAME_BYTES = 255  # NAME_MAX: a longer local name is a bad request, not a UFS failure
MAX_VERSION_CHARS = 1024
_SCHEME = re.compile(r"[a-z][a-z0-9+.-]{0,31}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def check_uri(raw: str) -> str:
    """The canonical form of a URI from a request; InvalidRequest (400) saying why not."""
    if len(raw) > MAX_URI_CHARS:
        raise InvalidRequest(f"URI longer than {MAX_URI_CHARS} characters")
    if _CONTROL.search(raw):
        raise InvalidRequest("URI contains a control character")
    try:
        uri = normalize(raw)
    except ValueError as exc:
        raise InvalidRequest(str(exc)) from None
    scheme, _, rest = uri.partition("://")
    if not _SCHEME.fullmatch(scheme):
        raise InvalidRequest(f"bad URI scheme {scheme[:40]!r}")
    path = rest[1:] if scheme == "file" else rest
    longest = MAX_FILE_NAME_BYTES if scheme == "file" else MAX_SEGMENT_BYTES
    if path:
        for segment in path.split("/"):
            if segment in ("", ".", ".."):
                raise InvalidRequest(f"URI has an empty, '.' or '..' path segment: {uri[:200]!r}")
            if len(segment.encode("utf-8", "surrogatepass")) > longest:
                raise InvalidRequest(f"URI has a path segment longer than {longest} bytes")
    return uri


def check_version(version: str) -> str:
    if len(version) > MAX_VERSION_CHARS or _CONTROL.search(version):
        raise InvalidRequest("malformed version")
    return version


def _within(uri: str, root: str) -> bool:
    return uri == root or uri.startswith(root if root.endswith("/") else root + "/")


class UfsRoots:
    """The allow-list of UFS roots; empty allows every URI."""

    def __init__(self, roots: list[str]):
        self.roots = [check_uri(root) for root in roots]
        # file:// roots also by their real path, for the check after symlinks are resolved.
        self._real = [root for root in self.roots if not root.startswith("file://")]
        self._real += ["file://" + os.path.realpath(root[len("file://"):])
                       for root in self.roots if root.startswith("file://")]

    def __bool__(self) -> bool:
        return bool(self.roots)

    async def check(self, uri: str) -> str:
        """`uri` if this worker may read it, else PermissionDenied (403)."""
        if not self.roots:
            return uri
        if not any(_within(uri, root) for root in self.roots):
            raise PermissionDenied(f"{uri} is outside the UFS roots this worker serves")
        if uri.startswith("file://"):
            real = "file://" + await trio.to_thread.run_sync(os.path.realpath, uri[len("file://"):])
            if not any(_within(real, root) for root in self._real):
                raise PermissionDenied(f"{uri} leads outside the UFS roots this worker serves")
        return uri
