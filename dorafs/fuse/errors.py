"""The one error boundary between dorafs and the kernel.

Only `FUSEError` should leave an operation (the session answers anything else EIO and
logs a traceback), so every operation is wrapped: a `DoraError` becomes its errno, an
`OSError` keeps the errno it carries, anything unexpected becomes EIO, and each is
logged once at a level fitting how surprising it is.
"""

from __future__ import annotations

import errno
import functools
import logging

from dorafs.errors import DoraError
from dorafs.fuse.metrics import ERRORS
from dorafs.fuse.types import FUSEError
from dorafs.log import new_request_id

log = logging.getLogger("dorafs.fuse")

# Ordinary answers to what an application asked (rmdir of a full directory, creating a
# name that exists): the mount is fine, nothing for its operator to look at.
_QUIET = {errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.EROFS, errno.ENOTSUP, errno.ENODATA, errno.ENOTEMPTY,
          errno.EEXIST}


def fuse_operation(fn):
    @functools.wraps(fn)
    async def wrapper(*args, **kwargs):
        new_request_id("f")
        try:
            return await fn(*args, **kwargs)
        except FUSEError as exc:
            if exc.counted:
                _count(exc.errno)
            raise
        except DoraError as exc:
            level = logging.DEBUG if exc.errno in _QUIET else logging.WARNING
            log.log(level, "%s: %s (%s)", fn.__name__, exc, errno.errorcode.get(exc.errno, exc.errno))
            _count(exc.errno)
            raise FUSEError(exc.errno) from None
        except OSError as exc:  # from the local disk (staging) or the system: its own errno
            code = exc.errno or errno.EIO
            log.warning("%s: %s (%s)", fn.__name__, exc, errno.errorcode.get(code, code))
            _count(code)
            raise FUSEError(code) from None
        except Exception:
            log.exception("%s failed unexpectedly; answering EIO", fn.__name__)
            _count(errno.EIO)
            raise FUSEError(errno.EIO) from None

    return wrapper


def _count(code: int) -> None:
    ERRORS.labels(errno.errorcode.get(code, str(code))).inc()
