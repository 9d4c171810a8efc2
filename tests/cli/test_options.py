"""Options anywhere: ``-s``, ``-o``, ``--timeout`` and the connection options are accepted
after the verb and its arguments (as kubectl and the nats CLI accept theirs), on groups
too, and the one nearest the verb wins."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import pytest

from agent.commands import CommandServer
from tests.cli.conftest import Invoke, Mesh
from tests.commands.conftest import FakeController
from tests.commands.helpers import seed_world
from tests.harness.ports import free_port


@pytest.fixture
async def served(mesh: Mesh) -> AsyncIterator[tuple[Mesh, FakeController]]:
    await seed_world(mesh.buckets, mesh.nc)
    controller = FakeController()
    server = CommandServer(
        mesh.nc, mesh.buckets.state, site="site-a", node="node-1", failover=controller.failover
    )
    await server.start()
    await server.sync_apps({"ledger"})
    try:
        yield mesh, controller
    finally:
        await server.stop()


async def test_failover_with_every_option_after_the_arguments(
    served: tuple[Mesh, FakeController], invoke: Invoke
) -> None:
    mesh, controller = served
    result = await invoke(
        "cmd",
        "failover",
        "ledger",
        "--to",
        "site-b",
        "-s",
        mesh.url,
        "-o",
        "json",
        "--timeout",
        "3s",
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["ok"] is True
    assert controller.calls == [("ledger", "site-b")]


@pytest.mark.parametrize(
    "argv",
    [
        ["-s", "{url}", "cmd", "ping"],
        ["cmd", "-s", "{url}", "ping"],
        ["cmd", "ping", "-s", "{url}"],
        ["cmd", "ping", "--server={url}", "--timeout", "2s"],
        ["--timeout", "2s", "cmd", "-o", "json", "ping", "--server", "{url}"],
    ],
)
async def test_ping_with_options_in_any_position(
    served: tuple[Mesh, FakeController], invoke: Invoke, argv: list[str]
) -> None:
    mesh, _ = served
    result = await invoke(*[a.format(url=mesh.url) for a in argv])
    assert result.exit_code == 0, result.output
    assert "site-a/node-1" in result.stdout


async def test_the_option_nearest_the_verb_wins(
    served: tuple[Mesh, FakeController], invoke: Invoke
) -> None:
    mesh, _ = served
    dead = f"nats://127.0.0.1:{free_port()}"
    wins = await invoke("-s", dead, "cmd", "-s", dead, "ping", "-s", mesh.url)
    assert wins.exit_code == 0, wins.output
    loses = await invoke("-s", mesh.url, "cmd", "ping", "-s", dead, "--timeout", "1s")
    assert loses.exit_code == 1 and f"mesh unreachable at {dead}" in loses.stderr
    # -o given to the group, then overridden by the verb
    text = await invoke("cmd", "-o", "json", "ping", "-o", "text", "-s", mesh.url)
    assert text.stdout.startswith("ok (served by ")


@pytest.mark.parametrize(
    "argv",
    [
        ["status", "-o", "json", "-s", "{url}"],
        ["status", "-s", "{url}", "--output=json", "--timeout", "3s"],
        ["-s", "{url}", "status", "-o", "json"],
        ["get", "app", "ledger", "-o", "json", "-s", "{url}"],
        ["events", "-o", "json", "-s", "{url}"],
        ["trust", "list", "-s", "{url}"],
        ["apply", "-f", "-", "--dry-run", "-s", "{url}"],
        ["delete", "nope", "-s", "{url}"],
        ["agent", "forget", "site-x/node-1", "-s", "{url}"],
    ],
)
async def test_every_mesh_command_takes_server_after_its_arguments(
    served: tuple[Mesh, FakeController], invoke: Invoke, argv: list[str]
) -> None:
    """Each reaches the mesh at {url} (a wrong server would fail with 'mesh unreachable')."""
    from tests.commands.helpers import APPS_YAML

    mesh, _ = served
    result = await invoke(*[a.format(url=mesh.url) for a in argv], input=APPS_YAML)
    assert "mesh unreachable" not in result.stderr, result.stderr
    if argv[0] in ("delete", "agent"):
        assert result.exit_code == 1  # reached the mesh, which has no such thing
    else:
        assert result.exit_code == 0, result.output
