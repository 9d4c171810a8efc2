"""Keep this node's trust bundle equal to the *signed* ``harmony-trust`` entries (issue 12).

Every ``ca.<site>`` entry is checked (``mesh.trust.verify_entry``): signed by the configured
trust-admin key, stored under ``ca.<OU>``, a proper site CA, a serial newer than anything
accepted before for that site. Anything else is ignored, counted in
``harmony_trust_rejected_total{reason}``, listed in the status, and never stops the task: a
forged or malformed entry changes nothing on disk. A site's own CA is always in its own
bundle. The highest serial per site is persisted next to the bundle so that replaying an
old entry after a revoke (or after a restart) is still refused.

When the set of trusted CAs changes, the bundle file is rewritten (atomically) and
``on_change`` is awaited with what was evicted: the agent reloads its embedded server and
disconnects whatever the evicted CAs authenticated (``agent.security``).
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections import Counter as Tally
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ed25519
from nats.js.errors import KeyNotFoundError, NoKeysError
from nats.js.kv import KeyValue
from prometheus_client import Counter

from mesh.trust import (
    Rejected,
    TrustError,
    TrustState,
    fingerprint,
    parse_admin_public_key,
    rfc3339,
    verify_entry,
    write_atomically,
)
from mesh.watch import Change, KvWatch

log = structlog.get_logger("agent.trust")

TRUST_REJECTED = Counter(
    "harmony_trust_rejected",
    "harmony-trust entries ignored by this agent, by reason (unsigned, bad_signature, ...)",
    ["reason"],
)
KEEP_REJECTIONS = 20


@dataclass(frozen=True)
class BundleChange:
    """What a bundle rewrite changed, by CA fingerprint (sites as the KV keys name them)."""

    evicted: tuple[x509.Certificate, ...]
    added: tuple[x509.Certificate, ...]
    trusted: tuple[x509.Certificate, ...]
    path: Path


def read_bundle(path: Path) -> list[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(path.read_bytes())
    except (FileNotFoundError, ValueError):
        return []


class TrustSync:
    """The ``trust-sync`` task: watch ``ca.*``, verify, persist, rewrite, notify."""

    def __init__(
        self,
        kv: KeyValue,
        bundle_path: Path,
        admin_key: ed25519.Ed25519PublicKey | None,
        *,
        own_site: str | None = None,
        own_ca: x509.Certificate | None = None,
        state_path: Path | None = None,
        on_change: Callable[[BundleChange], Awaitable[None]] | None = None,
        on_synced: Callable[[], Awaitable[None]] | None = None,
        resync: float = 30.0,
    ) -> None:
        self.kv = kv
        self.path = bundle_path
        self.admin_key = admin_key
        self.own_site = own_site
        self.own_ca = own_ca
        self.state_path = state_path or bundle_path.with_name(bundle_path.name + ".state.json")
        self.on_change = on_change
        self.on_synced = on_synced
        fresh = not self.state_path.exists()
        self.state = self._load_state()
        if fresh and bundle_path.exists():
            # First start: the installed bundle is the operator's bootstrap trust.
            self.state.seed(bundle_path.read_bytes())
        self.rejected: Tally[str] = Tally()
        self.last_rejected: deque[dict[str, Any]] = deque(maxlen=KEEP_REJECTIONS)
        self.last_error: str | None = None
        self.resync = resync
        self.revisions: dict[str, int] = {}
        """KV revision last handled per key: a re-delivered entry is not handled twice."""
        self.synced = asyncio.Event()
        """Set once the initial entries have been applied (and the bundle written)."""
        self.changes = 0

    def _load_state(self) -> TrustState:
        try:
            return TrustState.load(self.state_path)
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
            log.error(
                "trust_state_unreadable",
                msg=f"trust state {self.state_path} unreadable; starting empty",
                path=str(self.state_path),
            )
            return TrustState()

    # --- entries -------------------------------------------------------------------------

    def _reject(self, key: str, reason: str, detail: str) -> None:
        TRUST_REJECTED.labels(reason=reason).inc()
        self.rejected[reason] += 1
        self.last_rejected.append(
            {"key": key, "reason": reason, "detail": detail, "at": rfc3339_now()}
        )
        log.warning(
            "trust_entry_ignored",
            msg=f"trust entry {key} ignored: {reason}: {detail}",
            key=key,
            reason=reason,
            detail=detail,
        )

    def handle(self, key: str, value: bytes | None, operation: str | None) -> bool:
        """Apply one watched entry; True when the trusted set changed. Never raises."""
        try:
            if operation in ("DEL", "PURGE") or not value:
                # Only a signed tombstone revokes: a bare delete changes nothing.
                self._reject(key, "unsigned_delete", f"{operation or 'empty'} is not a revoke")
                return False
            if self.admin_key is None:
                self._reject(key, "no_admin_key", "trust.admin_public_key is not configured")
                return False
            entry = verify_entry(key, value, self.admin_key)
            changed = self.state.apply(entry)
        except Rejected as exc:
            self._reject(key, exc.reason, exc.detail)
            return False
        except Exception as exc:  # a bug must not take the agent down with it
            self._reject(key, "internal", repr(exc))
            return False
        self._persist()
        what = "revoked" if entry.certificate is None else "trusted"
        log.info(
            "trust_entry_accepted",
            msg=f"trust entry {key} accepted: {what} (serial {entry.serial})",
            key=key,
            state=what,
            serial=entry.serial,
        )
        return changed

    def _persist(self) -> None:
        self.state_path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(self.state_path, self.state.to_json().encode(), mode=0o600)

    # --- the bundle ----------------------------------------------------------------------

    async def flush(self) -> bool:
        """Rewrite the bundle if it differs; notify with what was evicted. Never raises."""
        data = self.state.bundle(self.own_site, self.own_ca)
        if not data:
            log.warning(
                "trust_bundle_empty",
                msg=f"trust bundle would be empty; keeping {self.path}",
                path=str(self.path),
            )
            return False
        before = read_bundle(self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not write_atomically(self.path, data):
            return False
        self.changes += 1
        after = x509.load_pem_x509_certificates(data)
        now_fps = {fingerprint(c) for c in after}
        old_fps = {fingerprint(c) for c in before}
        change = BundleChange(
            evicted=tuple(c for c in before if fingerprint(c) not in now_fps),
            added=tuple(c for c in after if fingerprint(c) not in old_fps),
            trusted=tuple(after),
            path=self.path,
        )
        log.info(
            "trust_bundle_updated",
            msg=f"trust bundle {self.path} now holds {', '.join(sorted(self.state.trusted()))}",
            path=str(self.path),
            sites=sorted(self.state.trusted()),
            evicted=[fingerprint(c) for c in change.evicted],
        )
        if self.on_change is not None:
            try:
                await self.on_change(change)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.last_error = f"after bundle change: {exc!r}"
                log.error(
                    "bundle_change_failed",
                    msg=f"reacting to the bundle change failed: {exc!r}",
                    error=repr(exc),
                )
        return True

    async def run(self) -> None:
        """Watch for ever; a lost watch is re-established (the task never ends by itself).

        The watch is an ordered consumer with 1 s heartbeats (``mesh.watch.KvWatch``): when
        its server goes away (say, the evicted site held the stream's leader) it is
        recreated within seconds. Every ``resync`` seconds all entries are also read
        directly, in case a watch is stuck; entries already seen (same revision) are
        skipped, so nothing is counted twice.
        """
        backoff = 0.5
        while True:
            try:
                await self._watch_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.last_error = f"watch: {exc!r}"
                log.warning(
                    "trust_watch_failed",
                    msg=f"trust watch failed: {exc!r}; retrying in {backoff:g}s",
                    error=repr(exc),
                    backoff=backoff,
                )
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 10.0)

    def _fresh(self, key: str, revision: int) -> bool:
        if self.revisions.get(key, -1) >= revision:
            return False
        self.revisions[key] = revision
        return True

    async def _first_sync(self) -> None:
        await self.flush()
        self.synced.set()
        if self.on_synced is not None:
            try:
                await self.on_synced()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.last_error = f"after the first sync: {exc!r}"
                log.error(
                    "trust_first_sync_failed",
                    msg=f"reacting to the first sync failed: {exc!r}",
                    error=repr(exc),
                )

    async def _watch_once(self) -> None:
        queue: asyncio.Queue[Change] = asyncio.Queue()
        watch = KvWatch(self.kv._js, self.kv._name, "ca.*", queue.put_nowait, heartbeat=1.0)
        await watch.start()
        try:
            ready = asyncio.ensure_future(watch.ready.wait())
            try:
                while not ready.done() or not queue.empty():
                    getter = asyncio.ensure_future(queue.get())
                    await asyncio.wait([getter, ready], return_when=asyncio.FIRST_COMPLETED)
                    if getter.done():
                        self._apply(getter.result())
                    else:
                        getter.cancel()
            finally:
                ready.cancel()
            if not self.synced.is_set():
                await self._first_sync()
            else:
                await self.flush()
            while True:
                try:
                    change = await asyncio.wait_for(queue.get(), self.resync)
                except TimeoutError:
                    await self._resync()
                    continue
                if self._apply(change):
                    await self.flush()
        finally:
            await watch.stop()

    def _apply(self, change: Change) -> bool:
        if not self._fresh(change.key, change.revision):
            return False
        op = None if change.value is not None else "DEL"
        return self.handle(change.key, change.value, op)

    async def _resync(self) -> None:
        """Read every entry directly (a safety net for a stuck watch)."""
        try:
            keys = await self.kv.keys()
        except NoKeysError:
            return
        changed = False
        for key in keys:
            if not key.startswith("ca."):
                continue
            try:
                entry = await self.kv.get(key)
            except KeyNotFoundError:
                continue
            revision = entry.revision or 0
            if self._fresh(key, revision):
                changed = self.handle(key, entry.value, entry.operation) or changed
        if changed:
            await self.flush()

    # --- status --------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        sites = {}
        for site, pem in sorted(self.state.trusted().items()):
            cert = x509.load_pem_x509_certificate(pem.encode())
            sites[site] = {
                "fingerprint": fingerprint(cert),  # recomputed, never read from an entry
                "not_after": rfc3339(cert.not_valid_after_utc),
                "serial": self.state.serials.get(site),
            }
        own_revoked = self.own_site is not None and self.own_site in self.state.revoked
        return {
            "bundle_file": str(self.path),
            "synced": self.synced.is_set(),
            "sites": sites,
            "bootstrap_only": sorted(set(self.state.seeded) - set(self.state.serials)),
            "revoked": sorted(self.state.revoked),
            "own_site_revoked": own_revoked,
            "rejected": dict(self.rejected),
            "last_rejected": list(self.last_rejected),
            "last_error": self.last_error,
        }


def rfc3339_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def admin_key_or_none(text: str | None) -> ed25519.Ed25519PublicKey | None:
    if text is None:
        return None
    try:
        return parse_admin_public_key(text)
    except TrustError:
        return None


async def sync_bundle(
    kv: KeyValue,
    path: Path,
    *,
    server_pid: Callable[[], int | None] | None = None,
    admin_public_key: str | None = None,
    own_site: str | None = None,
    own_ca: x509.Certificate | None = None,
) -> None:
    """The v1 entry point (the daemon calls it until it uses ``agent.security``): verified
    sync, then SIGHUP to the embedded server on every change."""

    async def reload(_: BundleChange) -> None:
        pid = server_pid() if server_pid else None
        if pid:
            os.kill(pid, signal.SIGHUP)
            log.info("nats_server_reloaded", msg=f"nats-server {pid} reloaded", pid=pid)

    sync = TrustSync(
        kv,
        path,
        admin_key_or_none(admin_public_key),
        own_site=own_site,
        own_ca=own_ca,
        on_change=reload,
    )
    await sync.run()
