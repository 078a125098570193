"""Under file systems: the one table from URI scheme to adapter class.

`s3://` and `s3a://` go to the boto3 adapter; every other scheme fsspec knows goes to the
fsspec adapter. A `UfsSet` owns the adapter instances (one per scheme, created on first
use) and closes them.
"""

from __future__ import annotations

import fsspec

from dorafs.errors import InvalidRequest
from dorafs.ufs.base import FileStatus, UnderFileSystem, join, normalize
from dorafs.ufs.fsspec_ufs import FsspecUfs
from dorafs.ufs.retry import RetryPolicy
from dorafs.ufs.s3 import S3Ufs

__all__ = ["SCHEMES", "FileStatus", "FsspecUfs", "RetryPolicy", "S3Ufs", "UfsSet", "UnderFileSystem", "join", "normalize"]

SCHEMES: dict[str, type[S3Ufs]] = {"s3": S3Ufs, "s3a": S3Ufs}  # everything else: FsspecUfs


class UfsSet:
    """Adapter instances by scheme; `get` never blocks (adapters connect lazily)."""

    def __init__(self, threads: int = 16, retry: RetryPolicy | None = None):
        self._threads = threads  # per adapter: its thread limiter and connection pool
        self._retry = retry  # S3's retry policy (None: RetryPolicy's defaults)
        self._by_scheme: dict[str, UnderFileSystem] = {}

    def get(self, uri: str) -> UnderFileSystem:
        scheme, sep, _ = uri.partition("://")
        scheme = scheme.lower()
        if not sep or not scheme:
            raise InvalidRequest(f"not a UFS URI (expected scheme://...): {uri!r}")
        ufs = self._by_scheme.get(scheme)
        if ufs is None:
            if scheme in SCHEMES:
                ufs = SCHEMES[scheme](threads=self._threads, retry=self._retry)
            elif scheme in fsspec.available_protocols():
                ufs = FsspecUfs(scheme, threads=self._threads)
            else:
                raise InvalidRequest(f"unknown UFS scheme {scheme}:// in {uri!r}")
            self._by_scheme[scheme] = ufs
        return ufs

    async def aclose(self) -> None:
        adapters, self._by_scheme = list(self._by_scheme.values()), {}
        for ufs in adapters:
            await ufs.aclose()
