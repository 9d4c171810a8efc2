"""One timing model: every interval, timeout and grace period derived from the lease ttl.

Why one place: a topology command that may block for 30 s under a 10 s ttl, a shutdown grace
shorter than a workload's stop_timeout, a rank step longer than the handover window... each
was a bug hidden in a different file. Here they are derived together, and ``violations``
names each safety rule a configuration breaks, the way Patroni refuses
``loop_wait + 2 * retry_timeout > ttl``: the agent refuses to start with one line per rule.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Timing:
    ttl: float
    margin: float
    """Subtracted from every deadline: the holder stops this long before a contender may
    start. Covers the fence's reaction time and clock-rate drift between machines."""
    command_timeout: float = 10.0
    """Longest a topology command (ssh, systemctl, a Kubernetes call) may take."""

    @classmethod
    def from_ttl(
        cls, ttl: float, margin: float | None = None, command_timeout: float | None = None
    ) -> Timing:
        m = margin if margin is not None else max(0.05, ttl / 10)
        return cls(ttl, m, command_timeout if command_timeout is not None else min(10.0, ttl))

    @property
    def renew_interval(self) -> float:
        """Every store's session record is renewed this often."""
        return self.ttl / 3

    @property
    def cas_timeout(self) -> float:
        """Longest wait for one store's answer: an unanswered write buys nothing anyway."""
        return min(2.0, self.renew_interval)

    @property
    def rank_step(self) -> float:
        """A free lease goes to placement rank r after r steps: the best live site wins."""
        return min(0.25, self.ttl / 8)

    @property
    def handover_window(self) -> float:
        """A handover not taken by its target within this is free for everyone."""
        return self.ttl

    @property
    def control_interval(self) -> float:
        """Backstop cycle for what no event announces (polled Scores, cool-downs)."""
        return min(1.0, self.ttl / 3)

    @property
    def cooldown(self) -> float:
        """A site that gave an application up stays out of the race this long."""
        return max(10.0, 5 * self.ttl)

    @property
    def healthy_after(self) -> float:
        """A run this long resets the consecutive-failure count."""
        return max(5.0, 2 * self.ttl)

    @property
    def stall_limit(self) -> float:
        """The session thread stops renewing when the main loop is stuck this long."""
        return max(2 * self.ttl, 5.0)

    @property
    def release_budget(self) -> float:
        """At shutdown, how long releases may take to land before we close anyway."""
        return max(2.0, self.ttl)

    @property
    def handler_timeout(self) -> float:
        """A command handler (planned failover) gets this long."""
        return max(5.0, 2 * self.ttl)

    def shutdown_budget(self, stop_timeouts: list[float]) -> float:
        """SIGTERM to exit: workloads stop in parallel, then releases, then the close.
        systemd's TimeoutStopSec and Kubernetes' terminationGracePeriodSeconds must cover
        it (docs/operations.md)."""
        return max(stop_timeouts, default=0.0) + self.release_budget + 5.0

    def violations(self) -> list[str]:
        """Every safety rule this timing breaks, one line each (empty: fine)."""
        out = []
        if not 0 < self.margin < self.ttl / 2:
            out.append(
                f"lease.margin ({self.margin:g}s) must be above 0 and below ttl/2 "
                f"({self.ttl / 2:g}s): the holder must stop before a contender may start"
            )
        if self.command_timeout > self.ttl:
            out.append(
                f"topology.command_timeout ({self.command_timeout:g}s) must not exceed "
                f"lease.ttl ({self.ttl:g}s): a blocked command would outlive the lease"
            )
        if self.cas_timeout >= self.ttl - self.margin:
            out.append("lease.ttl too short for one store round trip (cas timeout >= ttl - margin)")
        return out
