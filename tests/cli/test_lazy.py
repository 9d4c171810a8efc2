"""Start-up stays lazy: what each command imports is checked here (its timing lives in
bench/cli.py, never in tests). A heavy import creeping back into ``agent.cli`` or into the
path of ``cmd`` fails these tests, whatever the machine's speed."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import AsyncIterator

import pytest

from agent.commands import CommandServer
from tests.cli.conftest import Mesh
from tests.commands.helpers import seed_world

HEAVY = {
    "aiohttp",
    "cryptography",
    "nats",
    "pydantic",
    "pydantic_settings",
    "rich",
    "structlog",
    "uvloop",
    "yaml",
}

DRIVER = """
import atexit, sys
def report():
    top = {m.split(".")[0] for m in sys.modules}
    sys.stderr.write("MODULES " + " ".join(sorted(top)) + "\\n")
atexit.register(report)
sys.argv = ["harmony-agent", *sys.argv[1:]]
from agent.cli import main
main()
"""


def imported(*args: str) -> tuple[int, set[str]]:
    """(exit code, top-level modules loaded) of one real CLI run."""
    done = subprocess.run(
        [sys.executable, "-c", DRIVER, *args], capture_output=True, text=True, check=False
    )
    line = next(x for x in done.stderr.splitlines() if x.startswith("MODULES "))
    return done.returncode, set(line.split()[1:])


@pytest.mark.parametrize("args", [["--version"], ["--help"], ["cmd", "--help"], ["nope"]])
def test_version_and_help_import_no_heavy_library(args: list[str]) -> None:
    code, modules = imported(*args)
    assert code in (0, 2)
    assert not modules & HEAVY, sorted(modules & HEAVY)


@pytest.fixture
async def served(mesh: Mesh) -> AsyncIterator[Mesh]:
    await seed_world(mesh.buckets, mesh.nc)
    server = CommandServer(mesh.nc, mesh.buckets.state, site="site-a", node="node-1")
    await server.start()
    try:
        yield mesh
    finally:
        await server.stop()


async def test_cmd_imports_nats_without_aiohttp_pydantic_or_rich(served: Mesh) -> None:
    code, modules = await asyncio.to_thread(imported, "cmd", "ping", "-s", served.url)
    assert code == 0
    assert "nats" in modules
    assert not modules & {"aiohttp", "pydantic", "pydantic_settings", "rich", "structlog"}


async def test_status_json_does_not_import_rich(served: Mesh) -> None:
    code, modules = await asyncio.to_thread(imported, "status", "-o", "json", "-s", served.url)
    assert code == 0
    assert not modules & {"aiohttp", "rich", "structlog", "pydantic_settings", "uvloop"}, (
        modules & {"aiohttp", "rich", "structlog", "pydantic_settings", "uvloop"}
    )


def test_listed_short_help_matches_each_command() -> None:
    """``--help`` lists commands from a table, without importing them: it must say what
    each command's own docstring says (first sentence)."""
    import click

    from agent.cli import COMMANDS, cli

    ctx = click.Context(cli)
    for name, _, short in COMMANDS:
        command = cli.get_command(ctx, name)
        assert command is not None and command.help is not None
        first = command.help.strip().split("\n\n")[0].replace("\n", " ")
        assert short == first.split(". ")[0].rstrip(".") + ".", name
