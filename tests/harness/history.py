"""Rebuild workload lifetimes from a ticker history file and check them.

Every instance (one process of one application, started with one fencing token) appends a
line ``time_ns app site pid token`` every 10 ms (``tests/workloads/ticker.py``). An
instance's interval is [first tick, last tick]; two instances overlap when their intervals
intersect. For a stateful application any overlap means two copies ran at once; for a
stateless one, two copies in the same site.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

NS = 1_000_000_000


@dataclass(frozen=True, order=True)
class Tick:
    time_ns: int
    app: str
    site: str
    pid: int
    token: int


@dataclass(frozen=True)
class Instance:
    app: str
    site: str
    pid: int
    token: int
    first_ns: int
    last_ns: int
    ticks: int
    max_gap_ns: int
    """Longest pause between two consecutive ticks of this instance."""

    @property
    def key(self) -> tuple[str, str, int, int]:
        return (self.app, self.site, self.pid, self.token)

    def covers(self, start_ns: int, end_ns: int) -> bool:
        return self.first_ns <= start_ns and self.last_ns >= end_ns

    def __str__(self) -> str:
        span = (self.last_ns - self.first_ns) / NS
        return (
            f"{self.app}@{self.site} pid {self.pid} token {self.token}: "
            f"{span:.2f}s, {self.ticks} ticks, max gap {self.max_gap_ns / 1e6:.0f}ms"
        )


@dataclass(frozen=True)
class Overlap:
    a: Instance
    b: Instance

    @property
    def duration_ns(self) -> int:
        return min(self.a.last_ns, self.b.last_ns) - max(self.a.first_ns, self.b.first_ns)

    def __str__(self) -> str:
        return f"overlap {self.duration_ns / 1e6:.1f}ms: [{self.a}] and [{self.b}]"


def parse(lines: Iterable[str]) -> list[Tick]:
    ticks: list[Tick] = []
    for line in lines:
        parts = line.split()
        if len(parts) != 5:
            continue  # a torn last line of a killed writer
        with contextlib.suppress(ValueError):
            ticks.append(Tick(int(parts[0]), parts[1], parts[2], int(parts[3]), int(parts[4])))
    ticks.sort()
    return ticks


def load(path: Path) -> list[Tick]:
    if not path.exists():
        return []
    return parse(path.read_text(errors="replace").splitlines())


def instances(ticks: Iterable[Tick], app: str | None = None) -> list[Instance]:
    """One Instance per (app, site, pid, token), sorted by first tick."""
    groups: dict[tuple[str, str, int, int], list[int]] = defaultdict(list)
    for t in ticks:
        if app is None or t.app == app:
            groups[(t.app, t.site, t.pid, t.token)].append(t.time_ns)
    out = []
    for (a, site, pid, token), times in groups.items():
        times.sort()
        gap = max((b - a_ for a_, b in itertools.pairwise(times)), default=0)
        out.append(Instance(a, site, pid, token, times[0], times[-1], len(times), gap))
    out.sort(key=lambda i: (i.first_ns, i.key))
    return out


def overlaps(insts: Iterable[Instance], *, per_site: bool = False) -> list[Overlap]:
    """Pairs of instances of the same app (and site, if ``per_site``) alive at once."""
    found: list[Overlap] = []
    groups: dict[tuple[str, str], list[Instance]] = defaultdict(list)
    for inst in insts:
        groups[(inst.app, inst.site if per_site else "")].append(inst)
    for group in groups.values():
        group.sort(key=lambda i: i.first_ns)
        for i, a in enumerate(group):
            for b in group[i + 1 :]:
                if b.first_ns > a.last_ns:
                    break
                found.append(Overlap(a, b))
    return found


def handover_gaps(insts: Iterable[Instance]) -> list[float]:
    """Seconds between one instance's last tick and the next instance's first tick.

    Instances are ordered by first tick; a negative value would be an overlap (reported by
    ``overlaps``), so only the forward gaps between successive holders are returned.
    """
    ordered = sorted(insts, key=lambda i: i.first_ns)
    gaps = []
    for a, b in itertools.pairwise(ordered):
        gaps.append((b.first_ns - a.last_ns) / NS)
    return gaps


def running_at(insts: Iterable[Instance], t_ns: int, slack_ns: int = 0) -> list[Instance]:
    return [i for i in insts if i.first_ns - slack_ns <= t_ns <= i.last_ns + slack_ns]


def last_tick_ns(ticks: list[Tick]) -> int:
    return ticks[-1].time_ns if ticks else 0


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100]); NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), math.ceil(q / 100 * len(ordered))))
    return ordered[rank - 1]


def describe(insts: Iterable[Instance]) -> str:
    return "\n".join(str(i) for i in insts)
