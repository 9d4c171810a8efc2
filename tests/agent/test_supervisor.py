"""The supervisor: a task that ends on its own stops the others and fails the agent."""

from __future__ import annotations

import asyncio

from agent.supervisor import Supervisor


async def test_first_unexpected_exit_stops_the_rest() -> None:
    sup = Supervisor()
    cancelled = asyncio.Event()
    order: list[str] = []

    async def forever() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            cancelled.set()

    async def crash() -> None:
        raise RuntimeError("boom")

    async def hook() -> None:
        order.append("hook")

    sup.spawn("worker", forever())
    sup.spawn("crasher", crash())
    sup.on_shutdown("hook", hook)
    code = await sup.run(asyncio.Event())
    assert code == 1
    assert cancelled.is_set()
    assert order == ["hook"]
    assert sup.failure is not None and "crasher" in sup.failure and "boom" in sup.failure


async def test_stop_event_is_a_clean_exit_with_hooks_lifo() -> None:
    sup = Supervisor()
    order: list[str] = []

    async def forever() -> None:
        await asyncio.Event().wait()

    def hook(name: str):  # type: ignore[no-untyped-def]
        async def run() -> None:
            order.append(name)

        return run

    sup.spawn("a", forever())
    sup.on_shutdown("first", hook("first"))
    sup.on_shutdown("second", hook("second"))
    stop = asyncio.Event()
    stop.set()
    assert await sup.run(stop) == 0
    assert order == ["second", "first"]
