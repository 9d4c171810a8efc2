"""Keep this node's trust bundle file equal to the mesh's ``harmony-trust`` entries.

When a site is added or revoked, every agent rewrites its bundle (atomically, only when it
changed) and, if it runs the site's nats-server, sends it SIGHUP: nats-server reloads TLS
for gateways and leafnodes at once and uses the new bundle for every new route and client
connection, so a revoked site can no longer connect.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path

import structlog
from nats.js.kv import KeyValue

from mesh.trust import bundle, write_atomically

log = structlog.get_logger("agent.trust")


async def sync_bundle(
    kv: KeyValue, path: Path, *, server_pid: Callable[[], int | None] | None = None
) -> None:
    """Watch every ``ca.*`` entry for ever; rewrite ``path`` and reload on each change."""
    entries: dict[str, bytes] = {}
    watcher = await kv.watch("ca.*", include_history=False)
    try:
        async for entry in watcher:
            if entry is None:  # end of the initial values
                _apply(entries, path, server_pid)
                continue
            if entry.operation in ("DEL", "PURGE") or not entry.value:
                entries.pop(entry.key, None)
            else:
                entries[entry.key] = entry.value
            _apply(entries, path, server_pid)
    finally:
        await watcher.stop()  # type: ignore[no-untyped-call]


def _apply(
    entries: dict[str, bytes], path: Path, server_pid: Callable[[], int | None] | None
) -> None:
    data = bundle(list(entries.values()))
    if not data:
        # An empty bundle would lock every peer out at once; keep the last good one.
        log.warning("trust bundle would be empty; keeping the current file", path=str(path))
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    if not write_atomically(path, data):
        return
    log.info("trust bundle updated", path=str(path), sites=len(entries))
    pid = server_pid() if server_pid else None
    if pid:
        os.kill(pid, signal.SIGHUP)
        log.info("nats-server reloaded", pid=pid)
