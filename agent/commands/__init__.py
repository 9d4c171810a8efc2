"""The command plane (CONTRACT section 7): request models, a never-raising decoder, the
per-agent ``CommandServer``, operator marks (drain/fence) in the mesh, and the CLI client.

The names below are imported on first use (PEP 562), so that the CLI importing
``agent.commands.client`` or ``agent.commands.marks`` does not also load the server, its
pydantic models and structlog.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from agent.commands.decoder import DecodeError, decode_request
    from agent.commands.marks import drain_key, fence_key, parse_mark, read_marks
    from agent.commands.models import (
        APP_VERBS,
        MAX_REQUEST_BYTES,
        AnyRequest,
        DrainRequest,
        FailoverRequest,
        FenceRequest,
        LogsRequest,
        PingRequest,
        ResumeRequest,
        UndrainRequest,
        Verb,
    )
    from agent.commands.reply import Reply
    from agent.commands.server import CommandServer, FailoverHandler

_WHERE = {
    "DecodeError": "decoder",
    "decode_request": "decoder",
    "drain_key": "marks",
    "fence_key": "marks",
    "parse_mark": "marks",
    "read_marks": "marks",
    "APP_VERBS": "models",
    "MAX_REQUEST_BYTES": "models",
    "AnyRequest": "models",
    "DrainRequest": "models",
    "FailoverRequest": "models",
    "FenceRequest": "models",
    "LogsRequest": "models",
    "PingRequest": "models",
    "Reply": "reply",
    "ResumeRequest": "models",
    "UndrainRequest": "models",
    "Verb": "models",
    "CommandServer": "server",
    "FailoverHandler": "server",
}

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
    "LogsRequest",
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


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value
