"""The reply envelope of the command plane: ``{"ok": true, ...}`` or
``{"ok": false, "error": "..."}`` (CONTRACT section 7).

A plain class rather than a pydantic model: the CLI decodes a reply on every ``cmd``, and
importing pydantic (and building models) would cost it more than the whole round trip.
The names follow the pydantic API the server and controller already use
(``model_copy(update=...)``).
"""

from __future__ import annotations

import json
from typing import Any


class Reply:
    """Extra fields are allowed so each verb can say what it did (``changed``, ``site``...)."""

    __slots__ = ("_fields", "error", "ok")

    def __init__(self, *, ok: bool, error: str | None = None, **fields: Any) -> None:
        if not isinstance(ok, bool):
            raise TypeError("ok must be a bool")
        if error is not None and not isinstance(error, str):
            raise TypeError("error must be a string or None")
        self.ok = ok
        self.error = error
        self._fields = fields

    @classmethod
    def success(cls, **fields: Any) -> Reply:
        return cls(ok=True, **fields)

    @classmethod
    def failure(cls, error: str, **fields: Any) -> Reply:
        return cls(ok=False, error=error, **fields)

    @property
    def fields(self) -> dict[str, Any]:
        """The verb-specific fields (everything but ``ok`` and ``error``)."""
        return dict(self._fields)

    def model_copy(self, *, update: dict[str, Any] | None = None) -> Reply:
        """A copy with ``update`` applied (``ok`` and ``error`` included)."""
        body: dict[str, Any] = {"ok": self.ok, "error": self.error, **self._fields}
        body.update(update or {})
        return Reply(**body)

    def encode(self) -> bytes:
        body: dict[str, Any] = {"ok": self.ok}
        if self.error is not None:
            body["error"] = self.error
        body.update(self._fields)
        return json.dumps(body, separators=(",", ":"), default=str).encode()

    @classmethod
    def decode(cls, data: bytes) -> Reply:
        """Parse a reply; a malformed one becomes a failure reply (never raises)."""
        try:
            raw = json.loads(data)
            if not isinstance(raw, dict):
                raise ValueError("not a JSON object")
            if not all(isinstance(k, str) for k in raw):
                raise ValueError("keys must be strings")
            return cls(**raw)
        except (ValueError, TypeError, RecursionError) as exc:
            detail = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
            return cls.failure(f"malformed reply: {detail}")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Reply):
            return NotImplemented
        return (self.ok, self.error, self._fields) == (other.ok, other.error, other._fields)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        extra = "".join(f", {k}={v!r}" for k, v in self._fields.items())
        return f"Reply(ok={self.ok!r}, error={self.error!r}{extra})"
