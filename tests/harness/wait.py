"""Poll-with-deadline: the only way tests wait for something to become true."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


async def eventually(
    probe: Callable[[], Awaitable[T]] | Callable[[], T],
    *,
    timeout: float = 10.0,
    interval: float = 0.05,
    what: str = "condition",
) -> T:
    """Return the first truthy result of ``probe``; fail with ``what`` after ``timeout``.

    Exceptions inside the probe count as "not yet" until the deadline, then are re-raised,
    so a failing test shows the last real error instead of a bare timeout.
    """
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    while True:
        try:
            result = probe()
            if asyncio.iscoroutine(result) or isinstance(result, Awaitable):
                result = await result
            if result:
                return result  # type: ignore[return-value]
            last_exc = None
        except Exception as exc:
            last_exc = exc
        if time.monotonic() >= deadline:
            if last_exc is not None:
                raise AssertionError(f"timed out waiting for {what}: {last_exc!r}") from last_exc
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)
