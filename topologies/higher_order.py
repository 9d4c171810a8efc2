"""Higher-order topologies (ADR 015): ``FailoverTopology[T]`` and ``MultisiteTopology[T]``.

Harmony's Rust original gives ``FailoverTopology<T>`` every capability ``T`` has through
blanket trait impls. Python has no conditional methods, so the same guarantee is split in two:

* statically, an Interpret that needs capability ``C`` accepts ``Provides[C]``: either a
  ``C`` itself, or a higher-order topology *of* ``Provides[C]``. ``T`` is covariant, so
  ``FailoverTopology[LocalhostTopology]`` is accepted where ``Provides[ProcessRuntime]`` is
  wanted, and ``FailoverTopology[KubernetesTopology]`` is a mypy error there;
  ``resolve()`` then hands the Interpret the member that should act.
* at runtime, ``capabilities()`` is the intersection of the members' capabilities.

The higher-order topology decides *which member acts* (the active one of a failover pair,
the local site of a multisite); orchestration across members belongs to the agent.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Generic, TypeAlias, TypeVar, Union, cast

from topologies.base import Topology

T_co = TypeVar("T_co", covariant=True)
C = TypeVar("C")


class FailoverTopology(Generic[T_co]):
    """A primary and a replica of the same kind; one of them is active."""

    kind = "failover"

    def __init__(self, primary: T_co, replica: T_co) -> None:
        _topology(primary)
        _topology(replica)
        self.primary = primary
        self.replica = replica
        self._replica_active = False

    @property
    def active(self) -> T_co:
        return self.replica if self._replica_active else self.primary

    def fail_over(self) -> None:
        """Make the replica act from now on (and the primary after a second call)."""
        self._replica_active = not self._replica_active

    def capabilities(self) -> frozenset[type]:
        return _topology(self.primary).capabilities() & _topology(self.replica).capabilities()

    async def close(self) -> None:
        await _topology(self.primary).close()
        await _topology(self.replica).close()


class MultisiteTopology(Generic[T_co]):
    """Named sites of the same kind; Interprets act on the local one."""

    kind = "multisite"

    def __init__(self, sites: Mapping[str, T_co], local: str) -> None:
        if local not in sites:
            raise ValueError(f"local site {local!r} is not one of {sorted(sites)}")
        for site in sites.values():
            _topology(site)
        self.sites = dict(sites)
        self.local = local

    @property
    def active(self) -> T_co:
        return self.sites[self.local]

    def capabilities(self) -> frozenset[type]:
        members = [_topology(site).capabilities() for site in self.sites.values()]
        return frozenset.intersection(*members)

    async def close(self) -> None:
        for site in self.sites.values():
            await _topology(site).close()


Provides: TypeAlias = Union[C, "FailoverTopology[Provides[C]]", "MultisiteTopology[Provides[C]]"]
"""A topology providing capability ``C`` directly or through any nesting of higher orders."""


def resolve(topology: Provides[C]) -> C:
    """The concrete topology that acts for ``topology`` now."""
    while isinstance(topology, FailoverTopology | MultisiteTopology):
        topology = cast("Provides[C]", topology.active)
    return topology


def _topology(member: object) -> Topology:
    # T is not bound to Topology so that Provides[C] can nest; members still must be one.
    if not isinstance(member, Topology):
        raise TypeError(f"{type(member).__name__} is not a Topology")
    return member
