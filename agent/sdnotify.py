"""A tiny sd_notify(3) client: readiness, status, watchdog pings and stopping for systemd.

No dependency: one AF_UNIX datagram per message to ``$NOTIFY_SOCKET`` (a path, or an abstract
socket when it starts with ``@``). Outside systemd (no ``$NOTIFY_SOCKET``) every call is a
no-op that returns False, so the daemon calls it unconditionally.

``Type=notify`` units learn that the agent is up from ``READY=1``; with ``WatchdogSec=`` set,
systemd exports ``$WATCHDOG_USEC`` (and ``$WATCHDOG_PID``) and restarts the unit when no
``WATCHDOG=1`` arrives within that time. The agent sends it from its control loop, so a
wedged loop (not merely a dead process) is restarted; ``watchdog_interval()`` says how often
(half the timeout, as sd_watchdog_enabled(3) recommends).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

NOTIFY_SOCKET = "NOTIFY_SOCKET"
WATCHDOG_USEC = "WATCHDOG_USEC"
WATCHDOG_PID = "WATCHDOG_PID"


def _address(raw: str) -> str | bytes | None:
    if raw.startswith("@"):
        # Abstract namespace: a leading NUL byte instead of the '@'.
        return b"\0" + raw[1:].encode()
    if raw.startswith("/"):
        return raw
    return None  # vsock and other forms are not used by the agent


def notify(*fields: str, env: Mapping[str, str] | None = None) -> bool:
    """Send ``FIELD=value`` lines as one datagram; True when a notify socket took it.

    Never raises: a service manager that went away must not take the agent with it.
    """
    environ = os.environ if env is None else env
    raw = environ.get(NOTIFY_SOCKET, "")
    address = _address(raw) if raw else None
    if address is None or not fields:
        return False
    payload = "\n".join(fields).encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(payload)
    except OSError:
        return False
    return True


def ready(status: str | None = None) -> bool:
    return notify("READY=1", *([f"STATUS={_one_line(status)}"] if status else []))


def status(text: str) -> bool:
    return notify(f"STATUS={_one_line(text)}")


def watchdog() -> bool:
    return notify("WATCHDOG=1")


def stopping(status: str | None = None) -> bool:
    return notify("STOPPING=1", *([f"STATUS={_one_line(status)}"] if status else []))


def watchdog_interval(env: Mapping[str, str] | None = None) -> float | None:
    """Seconds between ``WATCHDOG=1`` pings (half of ``WatchdogSec``), or None when disabled.

    Disabled when ``$WATCHDOG_USEC`` is missing, not a positive integer, or when
    ``$WATCHDOG_PID`` names another process (the variable leaked from a parent).
    """
    environ = os.environ if env is None else env
    usec = environ.get(WATCHDOG_USEC, "")
    if not usec.isdigit() or int(usec) <= 0:
        return None
    pid = environ.get(WATCHDOG_PID)
    if pid is not None and (not pid.isdigit() or int(pid) != os.getpid()):
        return None
    return int(usec) / 1_000_000 / 2


def _one_line(text: str) -> str:
    return " ".join(text.split())
