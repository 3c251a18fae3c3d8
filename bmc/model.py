"""What every BMC client offers, whatever its protocol: power state, power actions, one-time PXE boot."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Literal, Protocol

PowerState = Literal["on", "off", "unknown"]
PowerAction = Literal["on", "off", "cycle", "status"]
ChangeAction = Literal["on", "off", "cycle"]


class BmcError(Exception):
    """A BMC refused, failed or did not answer. The message is one line for the operator: the BMC's URL
    (never a password) and what failed."""


class PowerController(Protocol):
    async def status(self) -> PowerState: ...

    async def power(self, action: ChangeAction) -> PowerState:
        """Do `action` and return the state after it, once the BMC reports it (bounded wait; BmcError
        when it never does). `cycle` of a node that is off powers it on."""
        ...

    async def boot_pxe_once(self) -> None:
        """Make the next power-on boot from the network, once."""
        ...


async def wait_for_state(read: Callable[[], Awaitable[PowerState]], want: PowerState, *, within: float,
                         every: float, what: str) -> PowerState:
    """Poll `read` until it reports `want`; BmcError naming `what` and the last state seen after `within`
    seconds. Power changes take a BMC from milliseconds (an emulator) to tens of seconds (a real board)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        state = await read()
        if state == want:
            return state
        if loop.time() + every > deadline:
            raise BmcError(f"{what}: still reports power {state} after {within:g}s (expected {want})")
        await asyncio.sleep(every)
