"""What the browser tests run the appliance in: an event loop of its own in a thread, so that Selenium's
blocking calls do not stall the API; `run` calls into it and waits. `LiveStack` is one appliance on it
(SQLite, file backend, exports in memory); the fleet's test puts three on one."""

from __future__ import annotations

import asyncio
import functools
import threading
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

from tests.browser.chromium import WAIT
from tests.integration.test_api_stack import Stack, open_stack

T = TypeVar("T")


class LiveLoop:
    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)

    def start_loop(self) -> None:
        self.thread.start()

    def close_loop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)
        self.loop.close()

    def run(self, make: Callable[[], Coroutine[Any, Any, T]], within: float = WAIT) -> T:
        return asyncio.run_coroutine_threadsafe(make(), self.loop).result(within)


class LiveStack(LiveLoop):
    """The appliance stack serving on 127.0.0.1 from a loop that runs in a thread; `run` calls into it."""

    def __init__(self, tmp: Path, sections: dict[str, str] | None = None) -> None:
        super().__init__("dashboard-stack")
        self.opened = open_stack(tmp, exports="memory", sections=sections)
        self.stack: Stack | None = None

    def start(self) -> None:
        self.start_loop()
        self.stack = self.run(self.opened.__aenter__, within=60)
        for user in ("alice", "bob"):
            self.run(functools.partial(self.s.add_user, user))

    def stop(self) -> None:
        try:
            if self.stack is not None:
                self.run(functools.partial(self.opened.__aexit__, None, None, None), within=60)
        finally:
            self.close_loop()

    @property
    def s(self) -> Stack:
        assert self.stack is not None
        return self.stack

    @property
    def url(self) -> str:
        return f"{self.s.client.server.scheme}://127.0.0.1:{self.s.client.port}"

    def publish(self, kind: str, data: dict[str, object]) -> None:
        """As the DHCP/TFTP services publish: on the loop, through the domain's event bus."""
        self.run(lambda: _publish(self.s, kind, data))


async def _publish(stack: Stack, kind: str, data: dict[str, object]) -> None:
    stack.domain.events.publish(kind, data)
