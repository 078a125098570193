"""Domain errors, each carrying the errno an application should see.

This is the one vocabulary of failure shared by the UFS adapters, the workers, the
client and the FUSE adapter. Errors cross the worker's HTTP API as a status code plus
the errno's name (see `to_wire` / `from_wire`), so a worker's ENOENT reaches the
application as ENOENT, not as a generic EIO.
"""

from __future__ import annotations

import errno as _errno


class DoraError(Exception):
    """Base class: an error with an errno and an HTTP status."""

    errno: int = _errno.EIO
    http_status: int = 500

    def __init__(self, message: str = "", *, errno: int | None = None):
        super().__init__(message or self.__class__.__name__)
        if errno is not None:
            self.errno = errno

    def to_wire(self) -> dict:
        return {"errno": _errno.errorcode.get(self.errno, "EIO"), "message": str(self)}


class NotFound(DoraError):
    errno = _errno.ENOENT
    http_status = 404


class NotADirectory(DoraError):
    errno = _errno.ENOTDIR
    http_status = 409


class IsADirectory(DoraError):
    errno = _errno.EISDIR
    http_status = 409


class StaleVersion(DoraError):
    """The object changed since its version was pinned: never serve mixed bytes."""

    errno = _errno.ESTALE
    http_status = 412


class InvalidRequest(DoraError):
    errno = _errno.EINVAL
    http_status = 400


class PermissionDenied(DoraError):
    """Not allowed: outside the UFS roots a worker serves, or without the cluster secret."""

    errno = _errno.EACCES
    http_status = 403


class UfsError(DoraError):
    """The under file system failed (after its own retries)."""

    errno = _errno.EIO
    http_status = 502


class CacheFull(DoraError):
    """A page could not be kept in the cache (no room, or the cache disk fails)."""

    errno = _errno.ENOSPC
    http_status = 507


class Unavailable(DoraError):
    """No worker answered; the caller may fall back to the UFS."""

    errno = _errno.EIO
    http_status = 503


class Exists(DoraError):
    errno = _errno.EEXIST
    http_status = 409


class NotEmpty(DoraError):
    errno = _errno.ENOTEMPTY
    http_status = 409


class NoSpace(DoraError):
    """The mount's staging space for written files is exhausted."""

    errno = _errno.ENOSPC
    http_status = 507


class ReadOnly(DoraError):
    """A change refused: the mount is read-only, or the store cannot be written."""

    errno = _errno.EROFS
    http_status = 403


_BY_STATUS = {cls.http_status: cls for cls in (NotFound, StaleVersion, InvalidRequest, PermissionDenied, UfsError,
                                               CacheFull, Unavailable)}
_BY_STATUS[401] = PermissionDenied  # a missing or wrong cluster secret


def from_wire(status: int, body: dict | None) -> DoraError:
    """Rebuild a DoraError from a daemon's error answer."""
    body = body or {}
    message = str(body.get("message") or f"HTTP {status}")
    code = getattr(_errno, str(body.get("errno", "")), None)
    if status == 409 and code == _errno.ENOTDIR:
        return NotADirectory(message)
    if status == 409 and code == _errno.EISDIR:
        return IsADirectory(message)
    cls = _BY_STATUS.get(status, DoraError)
    return cls(message, errno=code if isinstance(code, int) else None)


def sole(exc: BaseException) -> BaseException:
    """The one exception inside groups of one (a failure raised in a trio nursery arrives
    wrapped in an exception group): the error itself, to be told apart by its type; a
    group of several is returned as it is."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc
