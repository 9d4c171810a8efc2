"""The command plane (CONTRACT section 7): request models, a never-raising decoder, the
per-agent ``CommandServer``, operator marks (drain/fence) in the mesh, and the CLI client."""

from agent.commands.decoder import DecodeError, decode_request
from agent.commands.marks import drain_key, fence_key, parse_mark, read_marks
from agent.commands.models import (
    APP_VERBS,
    MAX_REQUEST_BYTES,
    AnyRequest,
    DrainRequest,
    FailoverRequest,
    FenceRequest,
    PingRequest,
    Reply,
    ResumeRequest,
    UndrainRequest,
    Verb,
)
from agent.commands.server import CommandServer, FailoverHandler

__all__ = [
    "APP_VERBS",
    "MAX_REQUEST_BYTES",
    "AnyRequest",
    "CommandServer",
    "DecodeError",
    "DrainRequest",
    "FailoverHandler",
    "FailoverRequest",
    "FenceRequest",
    "PingRequest",
    "Reply",
    "ResumeRequest",
    "UndrainRequest",
    "Verb",
    "decode_request",
    "drain_key",
    "fence_key",
    "parse_mark",
    "read_marks",
]
