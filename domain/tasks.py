"""Background workflows (a server's create, a template build): kept referenced until done, so that
none is garbage-collected mid-way, and drained together at a clean stop."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any


class BackgroundTasks:
    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def drain(self) -> None:
        """Wait for every running workflow (tests, and a clean stop)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)


def reason(e: BaseException) -> str:
    """An exception as one line for a record's `reason` or a report."""
    text = str(e) or type(e).__name__
    return text.splitlines()[0][:500] if text else type(e).__name__
