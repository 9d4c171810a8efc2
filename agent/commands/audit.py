"""The operators' audit trail: ``harmony.audit.<user>.<verb>`` in the ``harmony-events`` stream.

Why the identity is a subject token: the server's permission lets an operator publish only
``harmony.audit.<own user>.>`` (``mesh.authz``), so the token is the identity the server
vouched for at the TLS handshake, whatever the body claims. Readers (``harmony-agent
events``) take the user from the subject, never from the body.

Who ``<user>`` is, first match wins:

1. the person in the client certificate (``CN=<user>,OU=operators`` or, as the Kubernetes
   generator issues them, an e-mail SAN ``operator-<user>@<site>.harmony``);
2. the ``--user`` of a password login;
3. ``$HARMONY_AUDIT_USER``, else the login name: a mesh with one shared account vouches
   for nobody, so the token is then only what the operator configured (docs/security.md).

Every mutating verb (apply, delete, drain, undrain, fence, resume, failover) publishes one
event after it acted, with the target and the outcome, through JetStream so that the CLI
knows the stream stored it.
"""

from __future__ import annotations

import getpass
import json
import os
import re
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mesh.authz import identity_of
from mesh.clock import now_rfc3339
from mesh.names import audit_subject

if TYPE_CHECKING:
    from nats.js import JetStreamContext

AUDIT_USER_ENV = "HARMONY_AUDIT_USER"
TOKEN = re.compile(r"^[a-z0-9_-]{1,63}$")


def token(name: str) -> str:
    """``name`` as a subject token ([a-z0-9_-], at most 63), e.g. ``Jane.Doe`` -> ``jane-doe``."""
    cleaned = re.sub(r"[^a-z0-9_-]+", "-", name.lower()).strip("-")[:63]
    return cleaned or "unknown"


@dataclass(frozen=True)
class Auditor:
    """Who the CLI acts as; ``vouched`` when the server authenticated that name."""

    user: str
    vouched: bool

    @classmethod
    def of(cls, cert_file: str | None, login_user: str | None) -> Auditor:
        identity = identity_of(cert_file)
        if identity is not None and identity.user is not None:
            return cls(identity.user, True)
        if login_user:
            return cls(token(login_user), True)
        configured = os.environ.get(AUDIT_USER_ENV)
        if configured:
            return cls(token(configured), False)
        try:
            return cls(token(getpass.getuser()), False)
        except (KeyError, OSError):
            return cls("unknown", False)

    async def publish(
        self, js: JetStreamContext, verb: str, fields: dict[str, Any], timeout: float
    ) -> int:
        """Publish one audit event; returns its sequence in the stream (raises when the
        stream did not store it: refused by the server, no stream, no answer)."""
        body = {"verb": verb, "user": self.user, "time": now_rfc3339(), **fields}
        ack = await js.publish(
            audit_subject(self.user, verb),
            json.dumps(body, separators=(",", ":"), default=str).encode(),
            timeout=timeout,
        )
        return int(ack.seq)


def new_request_id() -> str:
    return uuid.uuid4().hex


def outcome(ok: bool, error: str | None) -> dict[str, Any]:
    return {"outcome": "ok"} if ok else {"outcome": "refused", "error": error}
