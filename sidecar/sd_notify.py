"""systemd's readiness protocol (``Type=notify``), spoken without a dependency.

systemd passes a unix datagram socket in ``$NOTIFY_SOCKET`` (a path, or an abstract
name written with a leading ``@``); the service sends ``KEY=VALUE`` lines to it:
``READY=1`` once it accepts connections, ``RELOADING=1`` then ``READY=1`` around a
SIGHUP reload, ``STOPPING=1`` when it begins to drain. Outside systemd (no variable)
every call is a no-op, so the server calls these unconditionally.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from typing import Final

log = logging.getLogger("sidecar.server")

NOTIFY_SOCKET_ENV: Final = "NOTIFY_SOCKET"


def socket_address(value: str) -> str | bytes | None:
    """``$NOTIFY_SOCKET`` -> the address to send to (None: not usable).

    An abstract socket is written ``@name``; its address is the name after a NUL byte.
    """
    if not value:
        return None
    if value[0] == "@":
        return b"\0" + value[1:].encode()
    if value[0] == "/":
        return value
    return None  # vsock (vsock:CID:PORT) and relative paths: not for a plain service


def monotonic_usec() -> int:
    """CLOCK_MONOTONIC in microseconds, for ``RELOADING=1``'s ``MONOTONIC_USEC``."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def notify(*lines: str, env: dict[str, str] | None = None) -> bool:
    """Send ``lines`` (``"READY=1"``, ``"STATUS=..."``) as one datagram; True when sent.

    Never raises: a service manager that went away must not take the server down.
    """
    value = (os.environ if env is None else env).get(NOTIFY_SOCKET_ENV, "")
    address = socket_address(value)
    if address is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto("\n".join(lines).encode(), address)
    except OSError as exc:
        log.warning("sd_notify to %s failed: %s", value, exc)
        return False
    return True


def ready(status: str) -> bool:
    return notify("READY=1", f"STATUS={status}")


def reloading() -> bool:
    return notify("RELOADING=1", f"MONOTONIC_USEC={monotonic_usec()}")


def stopping() -> bool:
    return notify("STOPPING=1", "STATUS=draining")
