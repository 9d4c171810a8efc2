"""The command plane's messages: one pydantic model per verb, and the reply envelope.

Requests arrive from other programs over NATS, so they are validated as strictly as the
config: unknown fields are refused (a typo like ``"too": "site-b"`` must not silently become
"fail over anywhere"), types are not coerced (``"app": 5`` is an error, not ``"5"``), and
names must be valid subject tokens because they end up in subjects and KV keys.
"""

from __future__ import annotations

import json
from enum import StrEnum
from typing import Annotated, Any, ClassVar

from pydantic import BaseModel, ConfigDict, StringConstraints, ValidationError

from agent.application import NAME_PATTERN
from agent.config import SITE_PATTERN

MAX_REQUEST_BYTES = 64 * 1024
"""Anything larger is refused before parsing: no legitimate request comes close."""

AppName = Annotated[str, StringConstraints(pattern=NAME_PATTERN)]
SiteName = Annotated[str, StringConstraints(pattern=SITE_PATTERN)]
Note = Annotated[str, StringConstraints(max_length=500)]


class Verb(StrEnum):
    FAILOVER = "failover"
    DRAIN = "drain"
    UNDRAIN = "undrain"
    FENCE = "fence"
    RESUME = "resume"
    PING = "ping"


APP_VERBS = frozenset({Verb.FAILOVER, Verb.FENCE, Verb.RESUME, Verb.PING})
"""Verbs also served on ``harmony.cmd.app.<name>.<verb>`` by the application's holder."""


class Request(BaseModel):
    """Fields every request may carry. ``by`` names the requester for the audit trail."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)
    verb: ClassVar[Verb]

    by: Note | None = None


class FailoverRequest(Request):
    """Planned move of an application's active instance, without overlap or expiry wait."""

    verb: ClassVar[Verb] = Verb.FAILOVER
    app: AppName
    to: SiteName | None = None
    """Target site; None lets the placement preference order choose."""


class DrainRequest(Request):
    """Move every application off ``site`` and keep them off until undrained."""

    verb: ClassVar[Verb] = Verb.DRAIN
    site: SiteName
    reason: Note | None = None


class UndrainRequest(Request):
    verb: ClassVar[Verb] = Verb.UNDRAIN
    site: SiteName


class FenceRequest(Request):
    """Stop ``app`` everywhere and hold it stopped until resumed."""

    verb: ClassVar[Verb] = Verb.FENCE
    app: AppName
    reason: Note | None = None


class ResumeRequest(Request):
    verb: ClassVar[Verb] = Verb.RESUME
    app: AppName


class PingRequest(Request):
    """Liveness of the command plane itself: answers with the serving agent's id."""

    verb: ClassVar[Verb] = Verb.PING


AnyRequest = (
    FailoverRequest | DrainRequest | UndrainRequest | FenceRequest | ResumeRequest | PingRequest
)

REQUEST_MODELS: dict[Verb, type[Request]] = {
    Verb.FAILOVER: FailoverRequest,
    Verb.DRAIN: DrainRequest,
    Verb.UNDRAIN: UndrainRequest,
    Verb.FENCE: FenceRequest,
    Verb.RESUME: ResumeRequest,
    Verb.PING: PingRequest,
}


class Reply(BaseModel):
    """``{"ok": true, ...}`` or ``{"ok": false, "error": "..."}`` (CONTRACT section 7).

    Extra fields are allowed so each verb can say what it did (``changed``, ``site``...).
    """

    model_config = ConfigDict(extra="allow")

    ok: bool
    error: str | None = None

    @classmethod
    def success(cls, **fields: Any) -> Reply:
        return cls(ok=True, **fields)

    @classmethod
    def failure(cls, error: str, **fields: Any) -> Reply:
        return cls(ok=False, error=error, **fields)

    @property
    def fields(self) -> dict[str, Any]:
        """The verb-specific fields (everything but ``ok`` and ``error``)."""
        return dict(self.model_extra or {})

    def encode(self) -> bytes:
        body: dict[str, Any] = {"ok": self.ok}
        if self.error is not None:
            body["error"] = self.error
        body.update(self.fields)
        return json.dumps(body, separators=(",", ":"), default=str).encode()

    @classmethod
    def decode(cls, data: bytes) -> Reply:
        """Parse a reply; a malformed one becomes a failure reply (never raises)."""
        try:
            raw = json.loads(data)
            if not isinstance(raw, dict):
                raise ValueError("not a JSON object")
            return cls.model_validate(raw)
        except (ValueError, ValidationError, RecursionError) as exc:
            return cls.failure(f"malformed reply: {str(exc).splitlines()[0][:200]}")
