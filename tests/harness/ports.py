"""Free loopback ports for test servers.

Ports are taken below the kernel's ephemeral range: a port the kernel hands out for
``bind(0)`` is released at once and can be handed out again, to the source port of an
outgoing connection, before the test server binds it (seen: nats-server exiting with
"address already in use" on its route port). Ports given out by this process are never
given out twice.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

_GIVEN: set[int] = set()
_LOW = 20000


def _ephemeral_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    high = _ephemeral_start()
    if high - _LOW > 1000:
        for _ in range(200):
            port = random.randrange(_LOW, high)
            if port not in _GIVEN and _bindable(port):
                _GIVEN.add(port)
                return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:  # a narrow range: the kernel
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    _GIVEN.add(port)
    return port
