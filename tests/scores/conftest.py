"""Fixtures for Score tests: a run context in a temp state dir and process probes."""

from __future__ import annotations

import asyncio
import contextlib
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
async def localhost() -> AsyncIterator[LocalhostTopology]:
    """A localhost topology with its fence running (as the agent starts it)."""
    topology = LocalhostTopology()
    task = asyncio.create_task(topology.fence.run())
    await asyncio.wait_for(topology.fence.started.wait(), 15)
    topology.fence.session_deadline(float("inf"))
    try:
        yield topology
    finally:
        await topology.fence.close()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@pytest.fixture
async def make_process(
    localhost: LocalhostTopology,
) -> AsyncIterator[Callable[..., ProcessInterpret]]:
    """Build Process interprets on localhost; every one is stopped after the test."""
    made: list[ProcessInterpret] = []

    def make(command: list[str], **fields: object) -> ProcessInterpret:
        interpret = ProcessSpec.model_validate({"command": command, **fields}).interpret(localhost)
        made.append(interpret)
        return interpret

    yield make
    for interpret in made:
        await interpret.stop()
