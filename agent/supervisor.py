"""Named, supervised tasks (after kopf's reactor): the first unexpected exit stops them all.

A daemon whose renewal loop died but whose process lives on is the worst kind of failure:
it looks up and does nothing. So any task that ends on its own, returning or raising, is
a fault: the supervisor stops the others in reverse start order and the agent exits 1,
letting systemd or the kubelet restart it with a clean state.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import structlog

log = structlog.get_logger("agent.supervisor")


class Supervisor:
    def __init__(self) -> None:
        self._tasks: dict[str, asyncio.Task[Any]] = {}
        self._shutdown: list[tuple[str, Callable[[], Awaitable[None]]]] = []
        self.failure: str | None = None

    def spawn(self, name: str, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        if name in self._tasks:
            raise ValueError(f"task {name!r} already running")
        task = asyncio.create_task(coro, name=name)
        self._tasks[name] = task
        return task

    def on_shutdown(self, name: str, hook: Callable[[], Awaitable[None]]) -> None:
        """Run ``hook`` at shutdown, before tasks are cancelled; hooks run last-in first-out."""
        self._shutdown.append((name, hook))

    @property
    def names(self) -> list[str]:
        return list(self._tasks)

    async def run(self, stop: asyncio.Event) -> int:
        """Wait for ``stop`` or the first task exit, then shut down; return the exit code."""
        stopper = asyncio.create_task(stop.wait(), name="stop-signal")
        done, _ = await asyncio.wait(
            [stopper, *self._tasks.values()], return_when=asyncio.FIRST_COMPLETED
        )
        for task in done:
            if task is stopper:
                continue
            exc = task.exception() if not task.cancelled() else None
            self.failure = f"task {task.get_name()} exited" + (f": {exc!r}" if exc else "")
            log.error(
                "supervised task exited unexpectedly; stopping",
                task=task.get_name(),
                error=repr(exc) if exc else None,
            )
        stopper.cancel()
        await self.shutdown()
        return 1 if self.failure else 0

    async def shutdown(self, grace: float = 5.0) -> None:
        for name, hook in reversed(self._shutdown):
            try:
                await asyncio.wait_for(hook(), grace)
            except Exception as exc:
                log.warning("shutdown hook failed", hook=name, error=repr(exc))
        for name in reversed(list(self._tasks)):
            await _cancel(self._tasks[name], grace)


async def _cancel(task: asyncio.Task[Any], grace: float) -> None:
    """Cancel until done (Python 3.11's ``wait_for`` can swallow one cancellation), but give
    up after ``grace``: a task that ignores cancellation must not hang the shutdown."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + grace
    while not task.done() and loop.time() < deadline:
        task.cancel()
        await asyncio.wait({task}, timeout=0.1)
    if task.done() and not task.cancelled():
        with contextlib.suppress(Exception):
            task.exception()
    elif not task.done():
        log.error("task ignored cancellation; abandoning it", task=task.get_name())
