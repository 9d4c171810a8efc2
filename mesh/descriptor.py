"""The mesh descriptor (``mesh`` in ``harmony-state``): the lease stores every agent must
count quorums over. Kept apart from ``mesh.bootstrap`` so readers (the CLI) can read it
without importing the bootstrap's machinery."""

from __future__ import annotations

import json
from dataclasses import dataclass

from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue

from mesh.codec import load_object
from mesh.names import MESH_KEY


@dataclass(frozen=True)
class Descriptor:
    stores: tuple[str, ...]
    replicas: int
    created_at: str

    def encode(self) -> bytes:
        body = {
            "stores": list(self.stores),
            "replicas": self.replicas,
            "created_at": self.created_at,
        }
        return json.dumps(body).encode()

    @classmethod
    def parse(cls, raw: bytes | None) -> Descriptor | None:
        data = load_object(raw, kind="descriptor", key=MESH_KEY)
        if data is None:
            return None
        stores = data.get("stores")
        if (
            not isinstance(stores, list)
            or not stores
            or not all(isinstance(s, str) for s in stores)
        ):
            return None
        replicas = data.get("replicas")
        return cls(
            tuple(stores),
            replicas if isinstance(replicas, int) else 1,
            str(data.get("created_at", "")),
        )


async def read_descriptor(state: KeyValue) -> Descriptor | None:
    try:
        entry = await state.get(MESH_KEY)
    except KeyNotFoundError:
        return None
    return Descriptor.parse(entry.value)
