"""Run ``lease_holder.py`` as a separate process and read its event log (JSON lines)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

HOLDER = Path(__file__).with_name("lease_holder.py")


def holder_argv(servers: list[str], site: str, events: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        str(HOLDER),
        "--servers",
        ",".join(servers),
        "--site",
        site,
        "--events",
        str(events),
        *extra,
    ]


def spawn_holder(argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def kill9(proc: subprocess.Popen[bytes]) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def read_events(path: Path, ev: str | None = None) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            item = json.loads(line)
        except ValueError:
            continue  # a line cut short by kill -9
        if ev is None or item.get("ev") == ev:
            out.append(item)
    return out
