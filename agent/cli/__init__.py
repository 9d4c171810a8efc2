"""The ``harmony-agent`` command line (CONTRACT section 6, docs/cli.md).

Exit codes: 0 success, 1 runtime failure (unreachable mesh, refused command), 2 bad input.
Every error is one line on stderr; a traceback is a bug (``agent.cli.group``).

Importing this module must stay cheap: it is all that ``--version`` and ``--help`` load.
Subcommands are imported when they run (``COMMANDS`` below); heavy libraries (nats-py,
pydantic, rich) are imported inside the functions that need them.
"""

from __future__ import annotations

import click

from agent import __version__
from agent.cli.group import HarmonyGroup
from agent.cli.options import mesh_options

# name, "module:attribute", short help (shown by --help without importing the module).
COMMANDS = (
    ("run", "agent.cli.run:run", "Run the agent daemon in the foreground."),
    (
        "status",
        "agent.cli.status:status",
        "Show sites, agents, applications and trust, as the mesh stores them.",
    ),
    ("get", "agent.cli.get:get", "Print a stored resource (get app NAME)."),
    ("apply", "agent.cli.apply:apply", "Validate Applications, then store them in the mesh."),
    (
        "delete",
        "agent.cli.apply:delete",
        "Remove an Application from the mesh; its agents stop it.",
    ),
    (
        "check",
        "agent.cli.check:check",
        "Validate Applications, optionally against an agent's topology.",
    ),
    ("cmd", "agent.cli.cmd:cmd", "Operate the mesh: failover, drain/undrain, fence/resume, ping."),
    ("events", "agent.cli.events:events", "Print the mesh's event stream (harmony-events)."),
    ("logs", "agent.cli.logs:logs", "Print an application's workload output."),
    ("agent", "agent.cli.agents:agent", "Manage agent records (forget a departed agent)."),
    (
        "mesh",
        "agent.cli.mesh_cmd:mesh",
        "Create the mesh's buckets and lease stores, and show where they live.",
    ),
    ("context", "agent.cli.context:context", "Save and select mesh connections."),
    ("ca", "agent.cli.ca:ca", "This site's certificate authority."),
    (
        "trust",
        "agent.cli.ca:trust",
        "The trust bundle: every trusted site's public CA certificate.",
    ),
    (
        "completion",
        "agent.cli.completion:completion",
        "Print a shell completion script (bash, zsh or fish).",
    ),
    (
        "manifests",
        "agent.cli.manifests:manifests",
        "Print one site's Kubernetes manifests (YAML) on stdout.",
    ),
    (
        "demo",
        "agent.cli.demo:demo",
        "Three local sites, a stateful and a stateless application, a live failover.",
    ),
)


@click.group(
    cls=HarmonyGroup,
    lazy=COMMANDS,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.version_option(__version__, "-V", "--version", prog_name="harmony-agent")
@mesh_options()
def cli() -> None:
    """harmony-agent: self-healing multisite applications on a NATS JetStream mesh.

    Every command but run, check, ca and demo talks to the mesh; its connection options
    (-s, --context, --config, --creds, --tls-*, --user, --password-file, --timeout) are
    accepted before or after the command name.
    """


def main() -> None:
    cli.main(prog_name="harmony-agent")
