"""Fixtures for Score tests: a run context in a temp state dir and process probes."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from scores.base import RunContext
from scores.process import ProcessInterpret, ProcessSpec
from topologies.localhost import LocalhostTopology


def alive(pid: int) -> bool:
    """True while ``pid`` runs; a zombie waiting to be reaped counts as dead."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.fixture
def ctx(tmp_path: Path) -> RunContext:
    return RunContext(
        app="ledger", site="site-a", node="node-1", fencing_token=7, state_dir=tmp_path
    )


@pytest.fixture
async def make_process() -> AsyncIterator[Callable[..., ProcessInterpret]]:
    """Build Process interprets on localhost; every one is stopped after the test."""
    made: list[ProcessInterpret] = []

    def make(command: list[str], **fields: object) -> ProcessInterpret:
        interpret = ProcessSpec.model_validate({"command": command, **fields}).interpret(
            LocalhostTopology()
        )
        made.append(interpret)
        return interpret

    yield make
    for interpret in made:
        await interpret.stop()
