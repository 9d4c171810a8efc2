"""Audit trail: each controller transition on ``harmony.events.<site>.<node>.<event>``.

Publishing is a core NATS publish captured by the ``harmony-events`` stream: it never
blocks the control loop, and while the mesh is unreachable the client buffers it.
"""

from __future__ import annotations

import json
from typing import Any

import structlog
from nats.aio.client import Client
from nats.errors import Error as NatsError

from mesh.clock import now_rfc3339
from mesh.names import event_subject

log = structlog.get_logger("agent.controller")


class EventPublisher:
    def __init__(self, nc: Client, site: str, node: str) -> None:
        self.nc = nc
        self.site = site
        self.node = node
        self.published = 0

    async def publish(self, event: str, app: str, token: int | None, **fields: Any) -> None:
        body = {
            "event": event,
            "app": app,
            "agent": f"{self.site}/{self.node}",
            "site": self.site,
            "node": self.node,
            "fencing_token": token,
            "time": now_rfc3339(),
            **fields,
        }
        try:
            await self.nc.publish(
                event_subject(self.site, self.node, event), json.dumps(body).encode()
            )
            self.published += 1
        except (NatsError, OSError) as exc:
            log.debug(
                "event_not_published",
                msg=f"{app}: event {event} not published: {exc!r}",
                event_name=event,
                error=repr(exc),
            )
