"""systemd's readiness protocol (sd_notify(3)) without a dependency: one datagram per state.

``kmsfs@.service`` is ``Type=notify``: the daemon says ``READY=1`` only once the mount serves,
and ``STOPPING=1`` when it begins a clean unmount. Outside systemd (no ``$NOTIFY_SOCKET``) every
call is a no-op.
"""

import logging
import os
import socket

log = logging.getLogger(__name__)


def notify(state: str) -> bool:
    """Send ``state`` (e.g. "READY=1\\nSTATUS=...") to $NOTIFY_SOCKET; True if sent."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]  # an abstract socket
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError as exc:
        log.warning("cannot notify systemd (%s): %s", address.lstrip("\0"), exc.strerror)
        return False
    return True
