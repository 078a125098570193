"""Logging set-up shared by every dorafs process: one line per record, journald-friendly."""

from __future__ import annotations

import logging
import os
import sys


def setup_logging(process: str, level: str | int | None = None) -> None:
    level = level or os.environ.get("DORAFS_LOG_LEVEL", "INFO")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"%(asctime)s {process}[%(process)d] %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level if isinstance(level, int) else str(level).upper())
    # Libraries chatter at INFO about every connection; keep their warnings only.
    for noisy in ("httpx", "httpcore", "botocore", "boto3", "urllib3", "s3transfer", "fsspec"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
