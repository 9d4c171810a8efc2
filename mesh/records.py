"""The three kinds of value stored in a lease store, and how their keys are read.

Who wrote a value is read from its *key* (``...<site>.<node>``), never from the value: with
per-agent NATS permissions only that agent can publish on its keys, so the key is the
server-vouched identity, while a value says whatever its writer wanted.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from mesh import codec
from mesh.clock import now_rfc3339


class SessionState(StrEnum):
    ALIVE = "alive"
    CLOSED = "closed"


class ClaimState(StrEnum):
    HELD = "held"
    RELEASED = "released"
    HANDOVER = "handover"


@dataclass(frozen=True, slots=True)
class SessionRecord:
    """``sess.<site>.<node>.live``: one epoch of an agent's session in one store."""

    epoch: str
    state: SessionState
    ttl: float
    seq: int = 0
    """The writer's own counter: lets it recognise a renewal of its own that landed late."""

    def encode(self) -> bytes:
        return codec.dump(
            {
                "epoch": self.epoch,
                "state": self.state.value,
                "ttl": self.ttl,
                "seq": self.seq,
                "time": now_rfc3339(),
            }
        )


@dataclass(frozen=True, slots=True)
class ExpiryRecord:
    """``sess.<site>.<node>.expired.<by>``: a contender ended ``epoch`` in this store."""

    epoch: str

    def encode(self) -> bytes:
        return codec.dump({"epoch": self.epoch, "time": now_rfc3339()})


@dataclass(frozen=True, slots=True)
class ClaimRecord:
    """``lease.<app>.<site>.<node>`` / ``slot.<app>.<site>.<node>``: a claim of a lease.

    ``term`` is the fencing token: every new holder writes 1 + the highest term it read in
    the family across a quorum of stores (and at least the wall-clock milliseconds), so it
    strictly increases with every new holder (docs/leases.md).
    """

    epoch: str
    """The holder's session epoch *in this store*: the claim lives exactly as long."""
    term: int
    state: ClaimState = ClaimState.HELD
    to: str | None = None
    """With ``handover``: the agent id or site allowed to take it at once."""
    ttl: float = 0.0

    def encode(self) -> bytes:
        body: dict[str, object] = {
            "epoch": self.epoch,
            "term": self.term,
            "state": self.state.value,
            "ttl": self.ttl,
            "time": now_rfc3339(),
        }
        if self.to is not None:
            body["to"] = self.to
        return codec.dump(body)


def parse_session(raw: bytes | None, key: str = "", revision: int = 0) -> SessionRecord | None:
    data = codec.load_object(raw, kind="session", key=key, revision=revision)
    if data is None:
        return None
    epoch = codec.text(data, "epoch")
    state = codec.text(data, "state", SessionState.ALIVE.value)
    if not epoch or state not in SessionState.__members__.values():
        codec.reject("session", key, revision, "no epoch or unknown state")
        return None
    return SessionRecord(
        epoch, SessionState(state), codec.number(data, "ttl"), codec.integer(data, "seq")
    )


def parse_expiry(raw: bytes | None, key: str = "", revision: int = 0) -> ExpiryRecord | None:
    data = codec.load_object(raw, kind="expiry", key=key, revision=revision)
    if data is None or not codec.text(data, "epoch"):
        return None
    return ExpiryRecord(codec.text(data, "epoch"))


def parse_claim(raw: bytes | None, key: str = "", revision: int = 0) -> ClaimRecord | None:
    data = codec.load_object(raw, kind="claim", key=key, revision=revision)
    if data is None:
        return None
    state = codec.text(data, "state", ClaimState.HELD.value)
    term = codec.integer(data, "term", -1)
    if state not in ClaimState.__members__.values() or term < 0:
        codec.reject("claim", key, revision, "unknown state or no term")
        return None
    to = codec.text(data, "to") or None
    return ClaimRecord(
        codec.text(data, "epoch"), term, ClaimState(state), to, codec.number(data, "ttl")
    )


@dataclass(frozen=True, slots=True)
class KeyParts:
    """What a store key says about itself."""

    kind: str
    """``session``, ``expiry``, ``lease`` or ``slot``; ``other`` for anything else."""
    agent: str = ""
    """The agent the key belongs to (session owner, or claimant)."""
    by: str = ""
    """For an expiry: the contender who wrote it."""
    app: str = ""
    family: str = ""
    """The family filter this key belongs to (``sess.s.n.>``, ``lease.app.>``...)."""


def parse_key(key: str) -> KeyParts:
    """Classify a store key; never raises (unknown shapes are ``other``)."""
    parts = key.split(".")
    if parts[0] == "sess" and len(parts) >= 4:
        agent = f"{parts[1]}/{parts[2]}"
        family = f"sess.{parts[1]}.{parts[2]}.>"
        if len(parts) == 4 and parts[3] == "live":
            return KeyParts("session", agent=agent, family=family)
        if len(parts) == 6 and parts[3] == "expired":
            return KeyParts("expiry", agent=agent, by=f"{parts[4]}/{parts[5]}", family=family)
    elif parts[0] == "lease" and len(parts) == 4:
        return KeyParts(
            "lease", agent=f"{parts[2]}/{parts[3]}", app=parts[1], family=f"lease.{parts[1]}.>"
        )
    elif parts[0] == "slot" and len(parts) == 4:
        return KeyParts(
            "slot",
            agent=f"{parts[2]}/{parts[3]}",
            app=parts[1],
            family=f"slot.{parts[1]}.{parts[2]}.>",
        )
    return KeyParts("other")
