"""Keep secrets out of every line we print: logs, status replies, events, errors.

Two defences: passwords inside URLs (``nats://user:secret@host``), nkey seeds and private
key PEM blocks are masked wherever a string passes through ``redact``; and every secret
value the process reads (a password file, the system user's password, a credentials file's
seed) is *registered*, after which ``redact`` replaces it anywhere it appears. The structlog
processor applies both to every log event, so a secret that reaches a log call by accident
is still not written.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Mapping, MutableMapping
from typing import Any

MASK = "***"
_URL_CREDS = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^:@/\s]*):(?P<pw>[^@/\s]+)@")
_SEED = re.compile(r"\bS[A-Z]{1}[A-Z2-7]{56}\b")
"""An nkey seed (``SU...``, ``SA...``): never printable."""
_PEM_KEY = re.compile(
    r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----.*?(-----END [A-Z0-9 ]*PRIVATE KEY-----|$)", re.S
)
"""A private key's PEM block (also a truncated one): its contents never leave the file."""
_MIN_SECRET = 4

_lock = threading.Lock()
_secrets: set[str] = set()


def register(secret: str) -> str:
    """Remember ``secret`` so that ``redact`` masks it from now on; returns it unchanged."""
    value = secret.strip()
    if len(value) >= _MIN_SECRET:
        with _lock:
            _secrets.add(value)
    return secret


def registered() -> frozenset[str]:
    with _lock:
        return frozenset(_secrets)


def redact(text: str) -> str:
    """``text`` with URL passwords, nkey seeds and every registered secret masked."""
    out = _URL_CREDS.sub(lambda m: f"{m.group('head')}:{MASK}@", text)
    out = _SEED.sub(MASK, out)
    out = _PEM_KEY.sub(MASK, out)
    for secret in sorted(registered(), key=len, reverse=True):
        if secret in out:
            out = out.replace(secret, MASK)
    return out


def redact_value(value: Any) -> Any:
    """Redact strings inside dicts, lists and tuples (status replies, event bodies)."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, Mapping):
        return {k: redact_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(redact_value(v) for v in value)
    if isinstance(value, BaseException):
        return redact(repr(value))
    return value


def structlog_processor(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """structlog processor: every value of every event goes through ``redact_value``."""
    for key, value in list(event_dict.items()):
        event_dict[key] = redact_value(value)
    return event_dict
