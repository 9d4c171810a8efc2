"""The contract's view of leases: ``harmony-leases`` ``app.<name>`` says who holds what.

Why a view and not the lease itself: the lease is decided in the per-site lease stores by a
majority (docs/leases.md); one replicated bucket on the decision path was exactly what made
a bystander's failure stall everyone. But tools, dashboards and people were promised
``harmony-leases`` with ``app.<name>`` (stateful) and ``app.<name>.<site>`` (stateless
slots) in CONTRACT section 7. So each holder publishes what it holds there, after the fact:

* written when a lease is acquired and when it is released or lost, never per renewal;
* best effort and off the critical path: a write that fails is retried in the background,
  and nothing ever waits for it;
* monotonic: a value is only replaced by one with a higher fencing token, or by its own
  holder's release, so a slow writer cannot put an old holder back.

It lags the truth by one write and can be stale while its writer is cut off: ``status``
reads the stores, and nothing in the agent reads this view.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from dataclasses import dataclass
from typing import Any

import structlog
from nats.errors import Error as NatsError
from nats.js.errors import Error as JsError
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from mesh.clock import now_rfc3339
from mesh.names import lease_view_key

log = structlog.get_logger("mesh.mirror")

RETRY_MAX = 5.0


@dataclass(frozen=True)
class _Value:
    key: str
    token: int
    state: str  # "held" | "released"


def _decode(raw: bytes | None) -> dict[str, Any]:
    try:
        data = json.loads(raw or b"")
    except (ValueError, RecursionError):
        return {}
    return data if isinstance(data, dict) else {}


class LeaseMirror:
    """Publishes this agent's acquisitions and releases into the ``harmony-leases`` view.

    ``acquired``/``lost`` are LeaseManager callbacks (event loop, never block); ``run`` is
    a supervised task that writes the latest value per key, in the background.
    """

    def __init__(self, kv: KeyValue, site: str, node: str) -> None:
        self.kv = kv
        self.site = site
        self.node = node
        self.agent = f"{site}/{node}"
        self._pending: dict[str, _Value] = {}
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()

    # --- LeaseManager callbacks ------------------------------------------------------------

    def acquired(self, name: str, term: int, _deadline: float) -> None:
        self._put(_Value(lease_view_key(name), term, "held"))

    def lost(self, name: str, term: int, _why: str) -> None:
        self._put(_Value(lease_view_key(name), term, "released"))

    def _put(self, value: _Value) -> None:
        self._pending[value.key] = value
        self._idle.clear()
        self._wake.set()

    # --- the writer task -------------------------------------------------------------------

    async def run(self) -> None:
        backoff = 0.2
        while True:
            await self._wake.wait()
            self._wake.clear()
            failed = False
            for key, value in list(self._pending.items()):
                try:
                    await self._write(value)
                except (NatsError, JsError, TimeoutError, OSError) as exc:
                    log.debug(
                        "lease_view_retry",
                        msg=f"lease view {key} not written; retrying: {exc!r}",
                        key=key,
                        error=repr(exc),
                    )
                    failed = True
                    continue
                if self._pending.get(key) == value:
                    del self._pending[key]
            if failed:
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, RETRY_MAX)
                self._wake.set()
            else:
                backoff = 0.2
            if not self._pending:
                self._idle.set()

    async def flush(self, timeout: float) -> bool:
        """At shutdown: give the last releases a moment to land (True when they did)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout)
        return self._idle.is_set()

    async def _write(self, value: _Value) -> None:
        for _ in range(5):
            try:
                entry = await self.kv.get(value.key)
            except KeyNotFoundError:
                entry = None
            if entry is not None:
                current = _decode(entry.value)
                token = current.get("token")
                theirs = isinstance(token, int) and (
                    token > value.token
                    or (token == value.token and current.get("holder") != self.agent)
                )
                if theirs:
                    return  # a newer holder already wrote: never put an old one back
                if token == value.token and current.get("state") == value.state:
                    return
            body = json.dumps(
                {
                    "holder": self.agent,
                    "site": self.site,
                    "node": self.node,
                    "token": value.token,
                    "state": value.state,
                    "time": now_rfc3339(),
                }
            ).encode()
            try:
                if entry is None:
                    await self.kv.create(value.key, body)
                else:
                    await self.kv.update(value.key, body, last=entry.revision)
                return
            except KeyWrongLastSequenceError:
                continue  # someone wrote in between: read again
