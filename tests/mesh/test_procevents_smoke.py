"""The kernel-event history (``tests/harness/procevents.py``) sees what it must: two
copies alive at once are an overlap, one after the other are not, and a launcher that
execs the workload is one life."""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.harness import history
from tests.harness.procevents import ProcHistory, available
from tests.harness.wait import eventually

pytestmark = pytest.mark.skipif(not available(), reason="needs root and the proc connector")


def _start(app: int, site: str, *, launcher: bool = False) -> subprocess.Popen[bytes]:
    argv = ["sleep", f"100000.{app}"]
    if launcher:
        argv = ["setpriv", "--pdeathsig", "KILL", "--", *argv]
    env = {"PATH": os.environ.get("PATH", os.defpath), "HARMONY_SITE": site}
    return subprocess.Popen(argv, env={**env, "HARMONY_FENCING_TOKEN": "7"})


async def test_overlaps_and_sequences_are_told_apart() -> None:
    procs = ProcHistory(rb"sleep\x00100000\.(\d+)\x00")
    procs.start()
    started: list[subprocess.Popen[bytes]] = []
    try:
        a = _start(900_001, "site-a")
        b = _start(900_001, "site-b")  # a second copy while the first runs
        started += [a, b]
        await eventually(lambda: len(procs.running().get("900001", [])) == 2, what="2 lives")
        for p in (a, b):
            p.kill()
            p.wait()
        c = _start(900_002, "site-a", launcher=True)
        started.append(c)
        await eventually(lambda: "900002" in procs.running(), what="the launched one")
        c.kill()
        c.wait()
        d = _start(900_002, "site-b")
        started.append(d)
        await eventually(lambda: d.pid in procs.running().get("900002", []), what="the next")
    finally:
        for p in started:
            if p.poll() is None:
                p.kill()
                p.wait()
        procs.stop()
    insts = procs.instances()
    lives = {(i.app, i.site): i for i in insts}
    assert lives[("900001", "site-a")].token == 7
    assert [(o.a.app, o.b.app) for o in history.overlaps(insts)] == [("900001", "900001")]
    assert sum(1 for i in insts if i.app == "900002") == 2, "the launcher and its exec: one life"
