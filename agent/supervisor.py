"""Named, supervised tasks (after kopf's reactor): the first unexpected exit stops them all.

A daemon whose renewal loop died but whose process lives on is the worst kind of failure:
it looks up and does nothing. So any task that ends on its own, returning or raising, is a
fault: ``run`` returns, the agent shuts down in its written order (``agent/daemon.py``) and
exits 1, letting systemd or the kubelet restart it with a clean state.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine
from typing import Any

import structlog

log = structlog.get_logger("agent.supervisor")


class Supervisor:
    def __init__(self) -> None:
        self._tasks: dict[str, asyncio.Task[Any]] = {}
        self.failure: str | None = None
        self._changed = asyncio.Event()

    def spawn(self, name: str, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        if name in self._tasks:
            raise ValueError(f"task {name!r} already running")
        task = asyncio.create_task(coro, name=name)
        self._tasks[name] = task
        self._changed.set()
        return task

    @property
    def names(self) -> list[str]:
        return list(self._tasks)

    def healthy(self) -> bool:
        return self.failure is None and all(not t.done() for t in self._tasks.values())

    async def run(self, stop: asyncio.Event) -> int:
        """Wait for ``stop`` or the first task exit; return the exit code (0 or 1)."""
        stopper = asyncio.create_task(stop.wait(), name="stop-signal")
        try:
            while True:
                self._changed.clear()
                changed = asyncio.create_task(self._changed.wait())
                done, _ = await asyncio.wait(
                    [stopper, changed, *self._tasks.values()], return_when=asyncio.FIRST_COMPLETED
                )
                changed.cancel()
                failed = [t for t in done if t is not stopper and t is not changed]
                for task in failed:
                    exc = task.exception() if not task.cancelled() else None
                    self.failure = f"task {task.get_name()} exited" + (f": {exc!r}" if exc else "")
                    log.error(
                        "supervised task exited unexpectedly; stopping",
                        task=task.get_name(),
                        error=repr(exc) if exc else None,
                    )
                if failed or stopper in done:
                    return 1 if self.failure else 0
        finally:
            stopper.cancel()

    async def cancel(self, name: str, grace: float = 5.0) -> None:
        task = self._tasks.pop(name, None)
        if task is not None:
            await _cancel(task, grace)

    async def cancel_all(self, grace: float = 5.0) -> None:
        for name in reversed(list(self._tasks)):
            await self.cancel(name, grace)


async def _cancel(task: asyncio.Task[Any], grace: float) -> None:
    """Cancel until done (Python 3.11's ``wait_for`` can swallow one cancellation), but give
    up after ``grace``: a task that ignores cancellation must not hang the shutdown."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + grace
    while not task.done() and loop.time() < deadline:
        task.cancel()
        await asyncio.wait({task}, timeout=0.1)
    if task.done() and not task.cancelled():
        with contextlib.suppress(BaseException):
            task.exception()
    elif not task.done():
        log.error(
            "task_abandoned",
            msg=f"task {task.get_name()} ignored cancellation; abandoning it",
            task=task.get_name(),
        )
