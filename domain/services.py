"""Run-time switches of the boot and export services (kept in the store across restarts).

A disabled service keeps its sockets bound and answers nothing (dhcp, tftp, http-boot), or refuses
every change of the exports (export); the appliance's health report shows it `disabled`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from domain.errors import NotFound, ServiceDisabled
from domain.events import EventBus
from domain.store import AsyncStore

SERVICES = ("dhcp", "tftp", "http-boot", "export")


class ServiceSwitches(Mapping[str, bool]):
    """name -> enabled, for every service in SERVICES."""

    def __init__(self, store: AsyncStore, events: EventBus, appliance: str = "") -> None:
        self._store = store
        self.appliance = appliance  # a fleet's appliances switch their own services
        self._events = events
        self._enabled: dict[str, bool] = dict.fromkeys(SERVICES, True)

    def __getitem__(self, name: str) -> bool:
        return self._enabled[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._enabled)

    def __len__(self) -> int:
        return len(self._enabled)

    async def load(self) -> None:
        stored = await self._store.call(self._store.sync.services, self.appliance)
        self._enabled.update({k: v for k, v in stored.items() if k in SERVICES})

    def assume(self, switches: Mapping[str, bool]) -> None:
        """The switches as last read (the boot index cache), while the store is out of reach."""
        self._enabled.update({k: bool(v) for k, v in switches.items() if k in SERVICES})

    async def set(self, name: str, enabled: bool) -> None:
        if name not in SERVICES:
            raise NotFound(f"no service {name!r} (services: {', '.join(SERVICES)})")
        await self._store.call(self._store.sync.set_service, name, enabled, self.appliance)
        self._enabled[name] = enabled
        self._events.publish("service", {"service": name, "enabled": enabled})

    def require(self, name: str) -> None:
        if not self._enabled[name]:
            raise ServiceDisabled(f"the {name} service is disabled; enable it to change exports")
