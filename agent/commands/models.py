"""The command plane's messages: one pydantic model per verb, and the reply envelope.

Requests arrive from other programs over NATS, so they are validated as strictly as the
config: unknown fields are refused (a typo like ``"too": "site-b"`` must not silently become
"fail over anywhere"), types are not coerced (``"app": 5`` is an error, not ``"5"``), and
names must be valid subject tokens because they end up in subjects and KV keys.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, ClassVar

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from agent.commands.reply import Reply as Reply  # noqa: PLC0414 (re-exported)
from agent.patterns import NAME_PATTERN, SITE_PATTERN

MAX_REQUEST_BYTES = 64 * 1024
"""Anything larger is refused before parsing: no legitimate request comes close."""
MAX_LOG_BYTES = 256 * 1024
"""The most workload output one ``logs`` reply carries (NATS' default max_payload is 1 MiB)."""
MAX_LOG_LINES = 10_000

AppName = Annotated[str, StringConstraints(pattern=NAME_PATTERN)]
SiteName = Annotated[str, StringConstraints(pattern=SITE_PATTERN)]
Note = Annotated[str, StringConstraints(max_length=500)]
RequestId = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{1,64}$")]


class Verb(StrEnum):
    FAILOVER = "failover"
    DRAIN = "drain"
    UNDRAIN = "undrain"
    FENCE = "fence"
    RESUME = "resume"
    PING = "ping"
    LOGS = "logs"


APP_VERBS = frozenset({Verb.FAILOVER, Verb.FENCE, Verb.RESUME, Verb.PING})
"""Verbs also served on ``harmony.cmd.app.<name>.<verb>`` by the application's holder."""


class Request(BaseModel):
    """Fields every request may carry. ``by`` names the requester (as it says: the audit
    trail's identity is the operator's own ``harmony.audit.<user>.<verb>`` subject);
    ``request_id`` makes a retry idempotent: an agent answers a repeated id with the answer
    it gave the first time, without acting again."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)
    verb: ClassVar[Verb]

    by: Note | None = None
    request_id: RequestId | None = None


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


class LogsRequest(Request):
    """The tail of ``app``'s workload output on this agent, or what follows ``offset``.

    Without ``offset``: the last ``tail`` lines. With it: the bytes after ``offset`` (a
    follower passes back the ``offset`` of the previous reply; ``inode`` tells it when the
    file was rotated, and it then starts again at the new file's beginning). At most
    ``max_bytes`` per reply, so a reply always fits in a NATS message.
    """

    verb: ClassVar[Verb] = Verb.LOGS
    app: AppName
    tail: Annotated[int, Field(ge=0, le=MAX_LOG_LINES)] = 100
    offset: Annotated[int, Field(ge=0)] | None = None
    inode: int | None = None
    max_bytes: Annotated[int, Field(ge=1, le=MAX_LOG_BYTES)] = MAX_LOG_BYTES


AnyRequest = (
    FailoverRequest
    | DrainRequest
    | UndrainRequest
    | FenceRequest
    | ResumeRequest
    | PingRequest
    | LogsRequest
)

REQUEST_MODELS: dict[Verb, type[Request]] = {
    Verb.FAILOVER: FailoverRequest,
    Verb.DRAIN: DrainRequest,
    Verb.UNDRAIN: UndrainRequest,
    Verb.FENCE: FenceRequest,
    Verb.RESUME: ResumeRequest,
    Verb.PING: PingRequest,
    Verb.LOGS: LogsRequest,
}
