"""A flush that runs on the loop every few seconds: what the event bus, the audit log and the discovered
nodes use to save their batches off the loop (the saving itself runs on the store's thread)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable


class Periodic:
    """`flush` every `every` seconds from `start()` on; `stop()` ends that and flushes once more."""

    def __init__(self, flush: Callable[[], Awaitable[None]], every: float, name: str) -> None:
        self._flush = flush
        self.every = every
        self._name = name
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name=self._name)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self._flush()

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.every)
            await self._flush()
