"""What every Topology has in common, beyond the capabilities it provides."""

from __future__ import annotations

from typing import Protocol, runtime_checkable


@runtime_checkable
class Topology(Protocol):
    """A place where workloads run.

    ``capabilities()`` must agree with the methods the class has; the runtime check of an
    Application (which mypy never sees, it comes from YAML) relies on it. Higher-order
    topologies compute it from their members.
    """

    @property
    def kind(self) -> str:
        """The ``topology.kind`` of the agent configuration, e.g. ``localhost``."""
        ...

    def capabilities(self) -> frozenset[type]: ...

    async def close(self) -> None:
        """Release connections; workloads are left as they are."""
        ...
