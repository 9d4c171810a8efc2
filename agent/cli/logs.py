"""``harmony-agent logs APP``: a workload's output, from the agent that runs it.

The agent is found in the instance reports (``status``): the one running APP, or with
``--site`` the one on that site (``SITE`` or ``SITE/NODE``); a stateless application runs
on several sites, so it needs ``--site``. That agent's ``logs`` verb returns the tail of
``<state_dir>/workloads/<app>.log`` and an offset; ``-f`` polls from that offset.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

import click

from agent.cli.common import EXIT_BAD_INPUT, fail
from agent.cli.completion_names import complete_apps, complete_sites
from agent.cli.options import mesh_options, settings
from agent.patterns import NAME_PATTERN, NODE_PATTERN, SITE_PATTERN

if TYPE_CHECKING:
    from agent.cli.profile import Profile
    from agent.commands.client import MeshClient
    from agent.commands.reply import Reply

FOLLOW_POLL = 0.5


class BadInput(Exception):
    """A choice the operator must make (exit 2), e.g. which site of a stateless app."""


async def choose_agent(mesh: MeshClient, app: str, site: str | None) -> str:
    """The agent to ask for APP's output, from the mesh's instance reports."""
    from datetime import UTC, datetime

    from agent.commands.client import MeshError

    state = await mesh.read()
    snap = state.snapshot()
    if app not in snap.apps:
        raise MeshError(f"unknown application {app}")
    instances = snap.instances_of(app, datetime.now(UTC))
    if site is not None:
        want = [i for i in instances if i.agent == site or i.agent.split("/")[0] == site]
        if not want:
            raise MeshError(f"no agent on {site} reports {app}")
    else:
        # Where it runs now (reports of healthy agents first), else wherever it was.
        running = [i for i in instances if i.state == "running"]
        want = [i for i in running if not i.stale] or running or instances
        if not want:
            raise MeshError(f"no agent reports {app}: it has not run anywhere yet")
    agents = sorted({i.agent for i in want})
    if len(agents) > 1:
        raise BadInput(f"{app} is on {', '.join(agents)}: choose one with --site")
    return agents[0]


async def _ask(mesh: MeshClient, agent: str, body: dict[str, Any], timeout: float) -> Reply:
    from agent.commands.client import MeshError
    from mesh.names import agent_cmd_subject

    site, _, node = agent.partition("/")
    reply = await mesh.request(agent_cmd_subject(site, node, "logs"), body, timeout)
    if not reply.ok:
        raise MeshError(f"logs refused by {reply.fields.get('agent', agent)}: {reply.error}")
    return reply


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


async def show_logs(
    profile: Profile, timeout: float, app: str, site: str | None, tail: int, follow: bool
) -> None:
    import asyncio

    from agent.commands.client import open_mesh

    async with open_mesh(profile, timeout) as mesh:
        agent = await choose_agent(mesh, app, site)
        reply = await _ask(mesh, agent, {"app": app, "tail": tail}, timeout)
        _write(str(reply.fields.get("data", "")))
        offset, inode = reply.fields.get("offset"), reply.fields.get("inode")
        while follow:
            reply = await _ask(mesh, agent, {"app": app, "offset": offset, "inode": inode}, timeout)
            f = reply.fields
            if f.get("restarted"):
                click.echo(f"--- {app}: output file rotated or truncated on {agent}", err=True)
            _write(str(f.get("data", "")))
            offset, inode = f.get("offset"), f.get("inode")
            if not f.get("more"):
                await asyncio.sleep(FOLLOW_POLL)


@click.command()
@click.argument("app", shell_complete=complete_apps)
@click.option(
    "--site",
    default=None,
    metavar="SITE[/NODE]",
    shell_complete=complete_sites,
    help="The agent to read from (needed when APP runs on several sites).",
)
@click.option(
    "--tail",
    default=100,
    show_default=True,
    type=click.IntRange(0, 10_000),
    help="Lines of history to print first.",
)
@click.option("-f", "--follow", is_flag=True, help="Keep printing new output (polls every 0.5s).")
@mesh_options(timeout="5s")
@click.pass_context
def logs(ctx: click.Context, app: str, site: str | None, tail: int, follow: bool) -> None:
    """Print an application's workload output.

    The stdout and stderr of its Process workload, read from the agent that runs it.
    """
    import asyncio
    import contextlib
    import re

    from agent.commands.client import MeshError

    if not re.match(NAME_PATTERN, app):
        fail(f"APP: {app!r} is not a valid application name ([a-z0-9-]{{1,63}})", EXIT_BAD_INPUT)
    if site is not None:
        s, _, n = site.partition("/")
        if not re.match(SITE_PATTERN, s) or ("/" in site and not re.match(NODE_PATTERN, n)):
            fail(f"--site: {site!r} is not SITE or SITE/NODE", EXIT_BAD_INPUT)
    opts = settings(ctx)
    try:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(show_logs(opts.profile, opts.timeout, app, site, tail, follow))
    except BadInput as exc:
        fail(str(exc), EXIT_BAD_INPUT)
    except MeshError as exc:
        fail(str(exc))
