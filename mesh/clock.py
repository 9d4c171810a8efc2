"""The one clock every lease deadline is measured on: CLOCK_BOOTTIME.

Why not ``time.monotonic``: CLOCK_MONOTONIC stops while the machine is suspended (a laptop
lid, a VM frozen by its hypervisor). A holder resumed after a 30 s freeze would believe its
lease still had its last seconds of validity, while every other site already took over.
CLOCK_BOOTTIME keeps counting through suspend, so a resumed holder (and the fence process,
which reads the same clock) sees at once that its deadline passed. It is system-wide, so
two processes on one machine can hand each other deadlines.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from datetime import UTC, datetime

Clock = Callable[[], float]


def boottime() -> float:
    return time.clock_gettime(time.CLOCK_BOOTTIME)


def now_rfc3339() -> str:
    """Wall-clock time for humans (logs, status); no decision ever compares two of these."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def wall_ms() -> int:
    return time.time_ns() // 1_000_000


def wall_iso(at: float, clock: Clock = boottime) -> str | None:
    """A CLOCK_BOOTTIME instant (a deadline) as wall-clock UTC, for logs and humans only;
    None when there is none (minus infinity: nothing held)."""
    if not math.isfinite(at):
        return None
    wall = time.time() + (at - clock())
    return (
        datetime.fromtimestamp(wall, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    )
