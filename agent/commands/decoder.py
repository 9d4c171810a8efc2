"""Bytes off the wire to a request, or to the one-line reason it is not one. Never raises.

This is the command plane's only parser and it faces any program allowed to publish on
``harmony.cmd.>``: a bug here must not be able to take an agent down, so every failure,
including ones we did not think of (deep nesting, invalid UTF-8, a non-object), becomes a
``DecodeError`` that the server turns into an error reply.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from agent.commands.models import (
    APP_VERBS,
    MAX_REQUEST_BYTES,
    REQUEST_MODELS,
    AnyRequest,
    Verb,
)


@dataclass(frozen=True)
class DecodeError:
    """Why a message is not a request. ``code`` is a stable token for metrics and tests."""

    code: str
    """``too_large`` | ``unknown_verb`` | ``malformed`` | ``invalid``"""
    message: str


def _field_error(exc: ValidationError) -> str:
    first = exc.errors()[0]
    loc = ".".join(str(p) for p in first["loc"])
    if first["type"] == "extra_forbidden":
        msg = "unknown field"
    elif first["type"] == "missing":
        msg = "field required"
    else:
        msg = first["msg"].removeprefix("Value error, ")
    return f"{loc}: {msg}" if loc else msg


def decode_request(
    verb: str,
    data: bytes,
    *,
    app: str | None = None,
    max_bytes: int = MAX_REQUEST_BYTES,
) -> AnyRequest | DecodeError:
    """Decode ``data`` sent for ``verb``; ``app`` is set when it came on an app subject.

    An empty body is ``{}``: on an app subject the application is the subject's, so
    ``nats req harmony.cmd.app.ledger.fence ''`` is a complete request.
    """
    try:
        return _decode(verb, data, app=app, max_bytes=max_bytes)
    except Exception as exc:  # the contract is "never raises": last line of defence
        return DecodeError("malformed", f"cannot decode request: {type(exc).__name__}")


def _decode(verb: str, data: bytes, *, app: str | None, max_bytes: int) -> AnyRequest | DecodeError:
    if len(data) > max_bytes:
        return DecodeError("too_large", f"request too large: {len(data)} bytes > {max_bytes}")
    try:
        known = Verb(verb)
    except ValueError:
        names = ", ".join(v.value for v in Verb)
        return DecodeError("unknown_verb", f"unknown verb {verb[:64]!r} (known: {names})")
    if app is not None and known not in APP_VERBS:
        names = ", ".join(sorted(v.value for v in APP_VERBS))
        return DecodeError(
            "unknown_verb",
            f"verb {known.value!r} is not served on application subjects "
            f"(there: {names}); send it to harmony.cmd.<site>.<node>.{known.value}",
        )
    body: Any
    if data.strip():
        try:
            body = json.loads(data)
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            detail = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
            return DecodeError("malformed", f"malformed JSON: {detail}")
    else:
        body = {}
    if not isinstance(body, dict):
        return DecodeError("malformed", f"request must be a JSON object, not {type(body).__name__}")
    model = REQUEST_MODELS[known]
    if app is not None and "app" in model.model_fields:
        given = body.get("app", app)
        if given != app:
            return DecodeError("invalid", f"app: {given!r} does not match the subject's {app!r}")
        body = {**body, "app": app}
    try:
        request = model.model_validate(body)
    except ValidationError as exc:
        return DecodeError("invalid", _field_error(exc))
    except RecursionError:
        return DecodeError("malformed", "request nested too deeply")
    return request  # type: ignore[return-value]
