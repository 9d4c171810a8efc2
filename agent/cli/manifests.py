"""``harmony-agent manifests``: one site's Kubernetes manifests, generated from typed models.

Imports of the generator stay inside the command, so ``harmony-agent --help`` stays fast.
"""

from __future__ import annotations

import click

from agent.cli.common import EXIT_BAD_INPUT, fail


def _csv(value: str | None) -> tuple[str, ...]:
    return tuple(v.strip() for v in (value or "").split(",") if v.strip())


@click.command()
@click.option("--site", required=True, help="This cluster's site name ([a-z0-9-]{1,63}).")
@click.option(
    "--nodes",
    required=True,
    help="This cluster's Kubernetes node names, comma-separated (`kubectl get nodes -o "
    "jsonpath='{.items[*].metadata.name}'`): one agent certificate and NATS user per node.",
)
@click.option(
    "--peers",
    default="",
    help="Other sites' NATS route addresses, comma-separated SITE=HOST[:PORT] (one per "
    "server, e.g. site-b=nats-0.b.example.net:6222,...).",
)
@click.option("--peer-cidrs", default="", help="CIDRs the peer sites' routes come from.")
@click.option("--client-cidrs", default="", help="Extra CIDRs allowed to the client port.")
@click.option(
    "--external-domain",
    default=None,
    help="DNS domain under which peers reach this site's servers as nats-<i>.<domain>.",
)
@click.option("--namespace", default="harmony", show_default=True, help="Agent namespace.")
@click.option("--system-namespace", default="harmony-system", show_default=True)
@click.option(
    "--ca-namespace",
    default="cert-manager",
    show_default=True,
    help="cert-manager's cluster resource namespace (holds the site CA key).",
)
@click.option("--image", default=None, help="Agent image (default: what `make image` builds).")
@click.option("--nats-image", default=None, help="NATS image (default: the agent image).")
@click.option("--nats-replicas", default=3, show_default=True, type=int)
@click.option("--storage", default="5Gi", show_default=True, help="JetStream volume size.")
@click.option("--storage-class", default=None)
@click.option(
    "--route-service",
    type=click.Choice(["LoadBalancer", "NodePort", "ClusterIP"]),
    default="LoadBalancer",
    show_default=True,
    help="Service type exposing each NATS pod's route port to the peers.",
)
@click.option("--lease-ttl", default="10s", show_default=True)
@click.option(
    "--max-stop-timeout",
    default="30s",
    show_default=True,
    help="Slowest workload stop_timeout: terminationGracePeriodSeconds = this + 15 s.",
)
@click.option("--operators", default="", help="Operator user names (NATS users), comma-separated.")
@click.option(
    "--trust-admin-public-key",
    default=None,
    metavar="ed25519:KEY",
    help="The trust-admin's public key: agents then sync the signed trust bundle into the "
    "NATS pods' bundle ConfigMap.",
)
def manifests(
    site: str,
    nodes: str,
    peers: str,
    peer_cidrs: str,
    client_cidrs: str,
    external_domain: str | None,
    namespace: str,
    system_namespace: str,
    ca_namespace: str,
    image: str | None,
    nats_image: str | None,
    nats_replicas: int,
    storage: str,
    storage_class: str | None,
    route_service: str,
    lease_ttl: str,
    max_stop_timeout: str,
    operators: str,
    trust_admin_public_key: str | None,
) -> None:
    """Print one site's Kubernetes manifests (YAML) on stdout."""
    import dataclasses
    from typing import Literal, cast

    from agent.deploy.site import Peer, SiteSpec, SpecError, generate, to_yaml
    from scores.duration import parse_duration

    parsed_peers = []
    for item in _csv(peers):
        peer_site, sep, address = item.partition("=")
        host, _, port = address.partition(":")
        if not sep or not host or (port and not port.isdigit()):
            fail(f"--peers: {item!r} is not SITE=HOST[:PORT]", EXIT_BAD_INPUT)
        parsed_peers.append(Peer(peer_site, host, int(port) if port else 6222))
    try:
        stop = parse_duration(max_stop_timeout)
        parse_duration(lease_ttl)
    except ValueError as exc:
        fail(f"duration: {exc}", EXIT_BAD_INPUT)
    spec = SiteSpec(
        site=site,
        nodes=_csv(nodes),
        peers=tuple(parsed_peers),
        peer_cidrs=_csv(peer_cidrs),
        client_cidrs=_csv(client_cidrs),
        external_domain=external_domain,
        namespace=namespace,
        system_namespace=system_namespace,
        ca_namespace=ca_namespace,
        nats_image=nats_image,
        nats_replicas=nats_replicas,
        storage=storage,
        storage_class=storage_class,
        route_service_type=cast(Literal["LoadBalancer", "NodePort", "ClusterIP"], route_service),
        lease_ttl=lease_ttl,
        max_stop_timeout=stop,
        operators=_csv(operators),
        trust_admin_public_key=trust_admin_public_key,
    )
    if image:
        spec = dataclasses.replace(spec, image=image)
    try:
        resources = generate(spec)
    except SpecError as exc:
        fail(str(exc), EXIT_BAD_INPUT)
    click.echo(to_yaml(resources), nl=False)
