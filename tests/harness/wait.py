"""Poll-with-deadline: the only way tests wait for something to become true."""

from __future__ import annotations

import asyncio
import os
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

    With ``HARMONY_TEST_SLOW_WAITS=<file>``, a wait that succeeds after more than half its
    timeout is recorded there: the flake hunter's list (a wait that is close to its
    timeout here fails on a slower CI machine).
    """
    started = time.monotonic()
    deadline = started + timeout
    last_exc: BaseException | None = None
    while True:
        try:
            result = probe()
            if asyncio.iscoroutine(result) or isinstance(result, Awaitable):
                result = await result
            if result:
                _note_slow(what, timeout, time.monotonic() - started)
                return result  # type: ignore[return-value]
            last_exc = None
        except Exception as exc:
            last_exc = exc
        if time.monotonic() >= deadline:
            if last_exc is not None:
                raise AssertionError(f"timed out waiting for {what}: {last_exc!r}") from last_exc
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)


def _note_slow(what: str, timeout: float, took: float) -> None:
    path = os.environ.get("HARMONY_TEST_SLOW_WAITS")
    if path and took > timeout / 2:
        test = os.environ.get("PYTEST_CURRENT_TEST", "?")
        with open(path, "a") as out:
            out.write(f"{took:.2f}/{timeout:g}s\t{what}\t{test}\n")
