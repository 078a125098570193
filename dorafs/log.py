"""Logging set-up shared by every dorafs process: one line per record, journald-friendly.

Every record carries a request id (`[r12]`): the FUSE boundary gives each kernel request
one, the client sends it to workers in `X-Request-Id`, and the worker's HTTP server logs
under it, so one read can be followed across processes. Under systemd (JOURNAL_STREAM
set) lines start with a syslog priority (`<4>`) and leave timestamps to the journal.
Credentials are never passed to a logger: UFS errors are logged with the operation,
bucket and key only.
"""

from __future__ import annotations

import contextvars
import itertools
import logging
import os
import sys

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")
_ids = itertools.count(1)

_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}


def new_request_id(prefix: str = "r") -> str:
    """A fresh id, unique within this process, set as the current one."""
    value = f"{prefix}{next(_ids)}"
    request_id.set(value)
    return value


class _Context(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id.get()
        record.priority = _PRIORITY.get(record.levelno, 6)
        return True


def setup_logging(process: str, level: str | int | None = None) -> None:
    level = level or os.environ.get("DORAFS_LOG_LEVEL", "INFO")
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_Context())
    if os.environ.get("JOURNAL_STREAM"):
        fmt = f"<%(priority)d>{process}: %(levelname)s %(name)s [%(request_id)s] %(message)s"
    else:
        fmt = f"%(asctime)s {process}[%(process)d] %(levelname)s %(name)s [%(request_id)s] %(message)s"
    handler.setFormatter(logging.Formatter(fmt))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level if isinstance(level, int) else str(level).upper())
    # Libraries chatter at INFO about every connection; keep their warnings only.
    for noisy in ("httpx", "httpcore", "botocore", "boto3", "urllib3", "s3transfer", "fsspec"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
