"""The supervisor: a task that ends on its own fails the agent; cancellation is bounded."""

from __future__ import annotations

import asyncio

from agent.supervisor import Supervisor


async def test_first_unexpected_exit_fails_the_agent_and_the_rest_can_be_cancelled() -> None:
    sup = Supervisor()
    cancelled = asyncio.Event()

    async def forever() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            cancelled.set()

    async def crash() -> None:
        raise RuntimeError("boom")

    sup.spawn("worker", forever())
    sup.spawn("crasher", crash())
    code = await sup.run(asyncio.Event())
    assert code == 1 and not sup.healthy()
    assert sup.failure is not None and "crasher" in sup.failure and "boom" in sup.failure
    await sup.cancel_all()
    assert cancelled.is_set()


async def test_a_task_that_returns_is_a_failure_too() -> None:
    sup = Supervisor()

    async def quits() -> None:
        return None

    sup.spawn("quitter", quits())
    assert await sup.run(asyncio.Event()) == 1
    assert sup.failure == "task quitter exited"


async def test_a_task_spawned_while_running_is_supervised_too() -> None:
    sup = Supervisor()
    stop = asyncio.Event()
    running = asyncio.create_task(sup.run(stop))

    async def crash() -> None:
        raise RuntimeError("late")

    await asyncio.sleep(0)
    sup.spawn("late", crash())
    assert await asyncio.wait_for(running, 5) == 1 and "late" in (sup.failure or "")


async def test_stop_event_is_a_clean_exit_and_cancel_gives_up_on_stubborn_tasks() -> None:
    sup = Supervisor()
    done = asyncio.Event()

    async def stubborn() -> None:
        while not done.is_set():
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                continue

    task = sup.spawn("stubborn", stubborn())
    stop = asyncio.Event()
    stop.set()
    assert await sup.run(stop) == 0 and sup.failure is None
    await sup.cancel_all(grace=0.3)  # returns: a task ignoring cancellation is abandoned
    assert sup.names == [] and not task.done()
    done.set()
    task.cancel()
    await asyncio.wait({task}, timeout=5)
