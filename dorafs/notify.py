"""systemd's readiness protocol (sd_notify) without a dependency.

Under a `Type=notify` unit systemd sets NOTIFY_SOCKET; each daemon sends `READY=1` once
it serves and `STOPPING=1` when it begins to stop. Outside systemd this does nothing. A
datagram to a local socket does not block in practice, so it is sent from the trio
thread directly.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


def notify(*fields: str) -> bool:
    """Send `fields` (e.g. "READY=1", "STATUS=...") to systemd; False when not under it."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # an abstract socket
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall("\n".join(fields).encode())
    except OSError as exc:
        log.warning("cannot notify systemd at %s: %s", address, exc)
        return False
    return True
