"""The Role API for replicated Scores, now in ``scores/base.py`` (re-exported here)."""

from scores.base import (
    REPLICATION_EXTRA,
    PrimaryInfo,
    ReplicatedInterpret,
    ReplicationStatus,
    Role,
)

__all__ = ["REPLICATION_EXTRA", "PrimaryInfo", "ReplicatedInterpret", "ReplicationStatus", "Role"]
