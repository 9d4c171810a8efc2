"""Lease stores: single-replica KV buckets, one per store site, written only by family CAS.

Why several single-replica stores instead of one replicated bucket: a replicated JetStream
stream has a Raft leader, and when the site holding it is cut off the stream accepts no
write until an election 4-9 s later (fixed inside nats-server). A lease whose renewals go
through one such stream inherits that stall on every site. Here each store lives on one
site's server with no election at all, and sessions and leases are decided by a *quorum* of
stores (docs/leases.md): a cut site takes one store with it, the others carry on at once.

Every write is a compare-and-set over a *family* of keys (``Nats-Expected-Last-Subject-
Sequence`` with ``Nats-Expected-Last-Subject-Sequence-Subject`` set to a wildcard): it lands
only if no message in the family was written since the sequence the writer last saw. That is
how two agents can race on one lease while each writes only its own key.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from nats.aio.client import Client
from nats.errors import Error as NatsError
from nats.errors import NoRespondersError

from mesh.names import store_bucket, store_stream, store_subject

WRONG_LAST_SEQUENCE = 10071
_EXPECT = "Nats-Expected-Last-Subject-Sequence"
_EXPECT_SUBJECT = "Nats-Expected-Last-Subject-Sequence-Subject"


class StoreError(Exception):
    """The store did not take the write; ``conflict`` says whether it was a CAS mismatch."""

    def __init__(self, store: str, why: str, *, conflict: bool = False, current: int = 0):
        super().__init__(f"store {store}: {why}")
        self.store = store
        self.conflict = conflict
        self.current = current
        """With ``conflict``: the family's last sequence as the store saw it."""


@dataclass(frozen=True, slots=True)
class Entry:
    """The last message of a family (or a key), as a direct get returns it."""

    key: str
    seq: int
    value: bytes


class Store:
    """One lease store as seen from one NATS connection. Stateless and cheap."""

    def __init__(self, nc: Client, name: str) -> None:
        self.nc = nc
        self.name = name
        self.bucket = store_bucket(name)
        self.stream = store_stream(name)
        self._prefix = f"$KV.{self.bucket}."

    async def cas(self, key: str, value: bytes, family: str, expect: int, timeout: float) -> int:
        """Write ``key`` iff the last sequence of ``family`` is ``expect`` (0: empty).

        Returns the new sequence. Raises StoreError (``conflict=True`` on a mismatch);
        a timeout is ambiguous: the write may still land.
        """
        headers = {_EXPECT: str(expect), _EXPECT_SUBJECT: self._prefix + family}
        try:
            msg = await self.nc.request(
                store_subject(self.name, key), value, timeout=timeout, headers=headers
            )
        except NoRespondersError:
            raise StoreError(self.name, "no responders (store unavailable)") from None
        except (TimeoutError, NatsError, OSError) as exc:
            raise StoreError(self.name, f"no answer: {type(exc).__name__}") from None
        return self._ack(msg.data)

    def _ack(self, data: bytes) -> int:
        try:
            resp = json.loads(data)
        except ValueError:
            raise StoreError(self.name, "malformed publish ack") from None
        error = resp.get("error") if isinstance(resp, dict) else None
        if isinstance(error, dict):
            code = error.get("err_code")
            desc = str(error.get("description", ""))
            if code == WRONG_LAST_SEQUENCE:
                current = _trailing_int(desc)
                raise StoreError(self.name, desc, conflict=True, current=current)
            raise StoreError(self.name, f"{desc} ({code})")
        seq = resp.get("seq") if isinstance(resp, dict) else None
        if not isinstance(seq, int):
            raise StoreError(self.name, "publish ack without a sequence")
        return seq

    async def last(self, family: str, timeout: float) -> Entry | None:
        """The newest message of ``family`` (or one key), read from the store itself."""
        request = json.dumps({"last_by_subj": self._prefix + family}).encode()
        try:
            msg = await self.nc.request(
                f"$JS.API.DIRECT.GET.{self.stream}", request, timeout=timeout
            )
        except NoRespondersError:
            raise StoreError(self.name, "no responders (store unavailable)") from None
        except (TimeoutError, NatsError, OSError) as exc:
            raise StoreError(self.name, f"no answer: {type(exc).__name__}") from None
        headers = msg.headers or {}
        status = headers.get("Status")
        if status == "404":
            return None
        if status:
            raise StoreError(self.name, f"direct get: {status} {headers.get('Description', '')}")
        subject = headers.get("Nats-Subject", "")
        seq = headers.get("Nats-Sequence", "0")
        if not subject.startswith(self._prefix) or not seq.isdigit():
            raise StoreError(self.name, "direct get: malformed reply")
        op = headers.get("KV-Operation")
        value = b"" if op in ("DEL", "PURGE") else bytes(msg.data)
        return Entry(subject[len(self._prefix) :], int(seq), value)


def _trailing_int(text: str) -> int:
    tail = text.rsplit(" ", 1)[-1].strip()
    return int(tail) if tail.isdigit() else 0


def quorum(n: int) -> int:
    """Stores that must agree: a majority, so any two quorums share a store."""
    return n // 2 + 1


def quorum_deadline(fresh_until: list[float], n: int) -> float:
    """The instant until which a quorum of stores is fresh: the quorum-th largest value.

    ``fresh_until`` has one value per store that supports the claim; fewer than a quorum
    means no validity at all.
    """
    q = quorum(n)
    if len(fresh_until) < q:
        return float("-inf")
    return sorted(fresh_until, reverse=True)[q - 1]
