"""``kind: PostgreSQL``: a primary where the lease is held, streaming replicas elsewhere."""

from scores.postgres.interpret import PostgresInterpret
from scores.postgres.spec import PostgresSite, PostgresSpec, PostgresTls

__all__ = ["PostgresInterpret", "PostgresSite", "PostgresSpec", "PostgresTls"]
