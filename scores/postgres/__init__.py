"""``kind: PostgreSQL``: a primary where the lease is held, streaming replicas elsewhere."""

from scores.postgres.spec import PostgresSite, PostgresSpec, PostgresTls

__all__ = ["PostgresSite", "PostgresSpec", "PostgresTls"]
