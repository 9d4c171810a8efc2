"""structlog setup: JSON lines for machines, colour for humans, site and node on every line.

Every line has a stable ``event`` name per kind (``lease_acquired``, ``command_refused``:
what to grep and alert on) and the sentence for humans in ``msg``; call sites write both
(``log.info("lease_acquired", msg=f"acquired lease {name} with token {term}", ...)``).
Deadlines appear as wall-clock UTC times (``mesh.clock.wall_iso``), never as the
CLOCK_BOOTTIME seconds the agent computes with. The console shows ``msg`` first.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

from mesh.redact import structlog_processor as redact_secrets

FIRST = ("timestamp", "level", "event", "msg", "site", "node")
"""Keys every JSON line starts with, in this order (the line's own fields follow)."""


def configure(level: str = "info", fmt: str = "auto", **bound: Any) -> None:
    """Configure structlog once per process; logs go to stderr so stdout stays for output.

    ``bound`` (site, node) is added to every line of every thread: the session thread runs
    its own event loop, where context variables bound here are not visible."""
    json_out = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if json_out
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty(), event_key="msg")
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            _add(bound),
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            redact_secrets,  # after tracebacks are text: no secret reaches a log line
            _ordered,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    structlog.contextvars.clear_contextvars()


EventDict = MutableMapping[str, Any]


def _add(bound: dict[str, Any]) -> Any:
    def add(_: Any, __: str, event: EventDict) -> EventDict:
        for key, value in bound.items():
            event.setdefault(key, value)
        return event

    return add


def _ordered(_: Any, __: str, event: EventDict) -> EventDict:
    """``timestamp, level, event, msg, site, node`` first. A call not yet given a sentence
    of its own (a module outside the agent core) has its event text as ``msg`` too, so
    every line carries both fields."""
    event.setdefault("msg", event.get("event", ""))
    head = {key: event.pop(key) for key in FIRST if key in event}
    return {**head, **event}
