"""10 contenders race for 20 leases on a 3-node cluster, with churn: never two holders.

Churn covers every way a tenure ends: release (handover without expiry), kill (others
expire the dead session after a full ttl) and pause (a hung agent: its own deadline timer
ends its belief before anyone may take over). The checker then runs over the whole history.
"""

from __future__ import annotations

import asyncio
import random

from tests.harness.nats import NatsCluster
from tests.harness.wait import eventually
from tests.mesh.lease_world import Contender, check_history, make_mesh

LEASES = [f"race-{i}" for i in range(20)]
TTL = 1.5


async def test_ten_contenders_twenty_leases_with_churn(nats_cluster: NatsCluster) -> None:
    rng = random.Random(7)
    urls, stores = nats_cluster.urls, nats_cluster.stores
    await make_mesh(urls, stores)
    contenders = [
        Contender([urls[i % 3]], stores, f"s{i}", "n1", ttl=TTL, margin=0.3, step=0.05)
        for i in range(10)
    ]
    await asyncio.gather(*(c.start() for c in contenders))
    for i, c in enumerate(contenders):
        for j, name in enumerate(LEASES):
            c.want([name], rank=(i + j) % 10)

    def holders() -> dict[str, list[str]]:
        out: dict[str, list[str]] = {name: [] for name in LEASES}
        for c in contenders:
            for name in c.held():
                out[name].append(c.id)
        return out

    def all_held_once() -> bool:
        return all(len(h) == 1 for h in holders().values())

    await eventually(all_held_once, timeout=15, what="every lease held by exactly one")
    dead: list[Contender] = []
    paused: list[Contender] = []
    releases = kills = pauses = 0
    for _round in range(12):
        live = [c for c in contenders if c not in dead and c.manager is not None]
        action = ["release", "kill", "pause"][_round % 3]
        victim = rng.choice([c for c in live if c.held()] or live)
        if action == "release" and victim.held():
            name = rng.choice(sorted(victim.held()))
            assert victim.manager is not None
            assert await victim.manager.release(name)
            releases += 1
            victim.want([name], rank=9)  # come back as the least preferred
        elif action == "kill":
            await victim.kill()
            dead.append(victim)
            kills += 1
        else:
            victim.pause()
            paused.append(victim)
            pauses += 1
        # every round ends with each lease held by exactly one live contender again:
        # after a kill or pause that means a takeover by expiry happened meanwhile
        await eventually(all_held_once, timeout=3 * TTL + 5, what=f"leases re-held after {action}")
        for c in paused:
            c.resume()
        paused.clear()
        if len(dead) > 2:
            revived = dead.pop(0)
            await revived.start()  # same agent id: its session waits out the old epoch
            revived.want(LEASES, rank=5)

    await eventually(all_held_once, timeout=4 * TTL + 10, what="every lease held again")
    history = [iv for c in contenders for iv in c.intervals()]
    checked = check_history(history)
    assert checked > len(LEASES) + releases  # churn produced takeovers, all were checked
    assert releases and kills and pauses
    for c in contenders:
        await c.kill()
