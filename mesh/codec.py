"""Decoding values read from the mesh: never raise, log each bad value once, count it.

Anything in a bucket may have been written by a buggy or hostile client, so every decoder of
a mesh value goes through ``load_object``. A value that is too large, nested too deeply
(``json.loads`` raises RecursionError on a few thousand brackets, well under 1 MB) or not a
JSON object becomes ``None`` and a ``harmony_rejected_values_total{kind}`` count; the
watch, task or agent reading it carries on.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from functools import cache
from typing import Any

MAX_VALUE_BYTES = 64 * 1024
"""Buckets are created with this ``max_msg_size`` too; nothing legitimate comes close."""
MAX_DEPTH = 16


@cache
def _rejected() -> Any:
    """The metric, made on first use: the CLI decodes mesh values too and must not pay for
    importing prometheus_client and structlog at start-up."""
    from prometheus_client import Counter

    return Counter(
        "harmony_rejected_values", "Values read from the mesh that could not be decoded", ["kind"]
    )


_seen: OrderedDict[tuple[str, str, int], None] = OrderedDict()


def _too_deep(raw: bytes, limit: int) -> bool:
    depth = 0
    in_string = escaped = False
    for byte in raw:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):  # [ {
            depth += 1
            if depth > limit:
                return True
        elif byte in (0x5D, 0x7D):
            depth -= 1
    return False


def reject(kind: str, key: str, revision: int, why: str) -> None:
    """Count a bad value and log it once per (kind, key, revision)."""
    import structlog

    _rejected().labels(kind).inc()
    mark = (kind, key, revision)
    if mark in _seen:
        return
    _seen[mark] = None
    if len(_seen) > 4096:
        _seen.popitem(last=False)
    structlog.get_logger("mesh.codec").error(
        "rejected a value read from the mesh", kind=kind, key=key, revision=revision, why=why
    )


def load_object(
    raw: bytes | None, *, kind: str, key: str = "", revision: int = 0
) -> dict[str, Any] | None:
    """The JSON object in ``raw``; None (counted and logged once) for anything else."""
    if raw is None:
        return None
    if len(raw) > MAX_VALUE_BYTES:
        reject(kind, key, revision, f"{len(raw)} bytes > {MAX_VALUE_BYTES}")
        return None
    if _too_deep(raw, MAX_DEPTH):
        reject(kind, key, revision, f"nested deeper than {MAX_DEPTH}")
        return None
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        reject(kind, key, revision, f"not JSON: {str(exc)[:80]}")
        return None
    if not isinstance(data, dict):
        reject(kind, key, revision, f"a JSON {type(data).__name__}, not an object")
        return None
    return data


def text(data: dict[str, Any], name: str, default: str = "") -> str:
    value = data.get(name, default)
    return value if isinstance(value, str) else default


def number(data: dict[str, Any], name: str, default: float = 0.0) -> float:
    value = data.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return default
    return float(value)


def integer(data: dict[str, Any], name: str, default: int = 0) -> int:
    value = data.get(name, default)
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def dump(data: dict[str, Any]) -> bytes:
    return json.dumps(data, separators=(",", ":")).encode()
