"""Every lease-store write the lease manager makes, with one retry policy.

All writes are family compare-and-sets (``mesh.stores``). The policy, written once here:

* a *conflict* is an answer: the family moved on; nothing is retried blindly, the caller
  decides again from what the store now shows (``Store.last``);
* *no answer* (timeout, store unreachable) is ambiguous: the write may still land. Claims and
  expiries are attempted once per decision (a later decision sees what landed through the
  watch); releases and handovers must finish, so ``retract`` retries until the store shows
  them done, shows someone else's write, or its deadline passes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass

import structlog
from nats.aio.client import Client

from mesh.clock import Clock, boottime
from mesh.names import expiry_key, session_family
from mesh.records import ClaimRecord, ExpiryRecord, parse_claim
from mesh.stores import Entry, Store, StoreError

log = structlog.get_logger("mesh.writer")


@dataclass(frozen=True, slots=True)
class Result:
    store: str
    seq: int | None
    """The new sequence when the write landed."""
    conflict: bool = False
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.seq is not None


class Writer:
    def __init__(
        self,
        nc: Client,
        stores: list[str],
        site: str,
        node: str,
        *,
        cas_timeout: float = 2.0,
        clock: Clock = boottime,
    ) -> None:
        self.stores = {name: Store(nc, name) for name in stores}
        self.site, self.node = site, node
        self.cas_timeout = cas_timeout
        self.clock = clock

    async def _one(self, store: str, key: str, value: bytes, family: str, expect: int) -> Result:
        try:
            seq = await self.stores[store].cas(key, value, family, expect, self.cas_timeout)
        except StoreError as exc:
            return Result(store, None, exc.conflict, str(exc))
        return Result(store, seq)

    async def claim(
        self, key: str, family: str, writes: Mapping[str, int], records: Mapping[str, ClaimRecord]
    ) -> dict[str, Result]:
        """Write our claim in every store of ``writes`` at once (store -> expected seq)."""
        results = await asyncio.gather(
            *(self._one(b, key, records[b].encode(), family, seq) for b, seq in writes.items())
        )
        return {r.store: r for r in results}

    async def expire(self, target: str, writes: Mapping[str, tuple[int, str]]) -> dict[str, Result]:
        """Expire ``target``'s session epoch in each store (store -> (seq, epoch))."""
        site, node = target.split("/", 1)
        key = expiry_key(site, node, self.site, self.node)
        family = session_family(site, node)
        results = await asyncio.gather(
            *(
                self._one(b, key, ExpiryRecord(epoch).encode(), family, seq)
                for b, (seq, epoch) in writes.items()
            )
        )
        return {r.store: r for r in results}

    async def last(self, store: str, family: str) -> Entry | None:
        return await self.stores[store].last(family, self.cas_timeout)

    async def retract(
        self, store: str, key: str, family: str, expect: int, record: ClaimRecord, until: float
    ) -> str:
        """Replace our claim at ``expect`` by ``record`` (released or handover) until done.

        A store that does not answer is asked again (backing off to 5 s) for as long as it
        takes, or until ``until`` when that is finite: a claim left behind in a store that
        was down would block that store for the next holder. The record is never changed:
        a handover stays a handover. Returns how it ended: ``done``, ``moved`` (someone else
        wrote the family after our claim: nothing of ours left there) or ``gave up``.

        Only a claim of ``record.term`` is written over: a retry that lands after we
        claimed the lease again must not release the later tenure's claim (our own watch
        reads an older term as "not seen yet", so we would go on holding while the store
        shows the lease free to everyone else).
        """
        until = float("inf") if until == float("-inf") else until
        backoff = 0.1
        value = record.encode()
        while True:
            result = await self._one(store, key, value, family, expect)
            if result.ok:
                return "done"
            if result.conflict:
                try:
                    entry = await self.last(store, family)
                except StoreError:
                    entry = None
                if entry is not None and entry.key == key:
                    landed = parse_claim(entry.value, entry.key, entry.seq)
                    if landed is not None and landed.term != record.term:
                        return "moved"  # a later tenure of ours: never retract it
                    if landed is not None and landed.state is record.state:
                        return "done"  # our earlier attempt landed without an answer
                    if landed is not None and entry.seq > expect:
                        expect = entry.seq  # our own newer write (a repair): retract that
                        continue
                if entry is None or entry.key != key:
                    return "moved"
            if self.clock() >= until:
                log.warning(
                    "release_abandoned",
                    msg=f"giving up the release of {key} in {store}: {result.error}",
                    store=store,
                    key=key,
                    error=result.error,
                )
                return "gave up"
            await asyncio.sleep(min(backoff, max(0.0, until - self.clock())))
            backoff = min(backoff * 2, 5.0)
