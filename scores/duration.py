"""Durations as operators write them (``500ms``, ``5s``, ``1m``, ``1h`` or plain seconds).

Lives in ``scores`` because both Scores (``stop_timeout``) and the agent configuration
(``lease.ttl``) need it, and ``scores`` is the lowest layer both may import.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Annotated, Any

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_PATTERN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")


def parse_duration(value: Any) -> float:
    """Return seconds; raise ValueError with a message fit for a one-line config error."""
    if isinstance(value, bool):
        raise ValueError("expected a duration like 500ms, 5s, 1m or a number of seconds")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        match = _PATTERN.match(value)
        if not match:
            raise ValueError(
                f"invalid duration {value!r}: expected e.g. 500ms, 5s, 1m or a number of seconds"
            )
        seconds = float(match.group(1)) * _UNITS[match.group(2) or "s"]
    else:
        raise ValueError("expected a duration like 500ms, 5s, 1m or a number of seconds")
    if seconds < 0:
        raise ValueError("duration must not be negative")
    return seconds


def format_duration(seconds: float) -> str:
    if seconds < 1 and seconds * 1000 == int(seconds * 1000):
        return f"{int(seconds * 1000)}ms"
    if seconds == int(seconds):
        return f"{int(seconds)}s"
    return f"{seconds}s"


def _duration_type() -> Any:
    from pydantic import BeforeValidator, PlainSerializer

    return Annotated[
        float,
        BeforeValidator(parse_duration),
        PlainSerializer(format_duration, return_type=str, when_used="json"),
    ]


if TYPE_CHECKING:
    from pydantic import BeforeValidator, PlainSerializer

    Duration = Annotated[
        float,
        BeforeValidator(parse_duration),
        PlainSerializer(format_duration, return_type=str, when_used="json"),
    ]
    """A duration in seconds, parsed from the operator's notation."""
else:

    def __getattr__(name: str) -> Any:
        # ``Duration`` is built on first use, so that parsing a ``--timeout`` (the CLI)
        # does not import pydantic; models that annotate with it import pydantic anyway.
        if name == "Duration":
            globals()["Duration"] = value = _duration_type()
            return value
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
