"""Discovered nodes: PXE clients the proxyDHCP saw that no server record names, kept so that an operator
can adopt them (make a server of one: `Adoption.adopt`), by hand or by a rule (config `[dhcp.adopt]`).

`DiscoveredNodes.seen` runs inside the DHCP datagram handler (through the boot policy's
`client_unknown`): a dictionary update, no I/O. Records reach the store in batches on its thread
(every FLUSH_EVERY seconds, as the event bus saves its events). Bounded: at most `capacity` nodes in
memory and in the table, the least recently seen going first, so a stranger inventing MAC addresses
evicts its own inventions and grows nothing without end. The first time a node is seen, a
`discovered` event is published (at most EVENTS_PER_SECOND a second: a flood is counted, not streamed).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid as uuidlib
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import naming
from bootfiles.spec import PxeClient
from domain.errors import InvalidRequest, NotFound, StoreUnreachable
from domain.events import EventBus
from domain.periodic import Periodic
from domain.requests import CreateServer
from domain.servers import ServerWorkflows
from domain.store import AsyncStore, DiscoveredRow, ServerRow
from domain.tasks import BackgroundTasks, reason

log = logging.getLogger("cello.discovered")

DEFAULT_CAPACITY = 4096  # nodes kept, in memory and in the store
ADOPTED_QUIET = 120.0  # seconds an adopted MAC is not recorded again (its server is being made)
# 'discovered' events per second at most: a flood of invented MACs is recorded (bounded) but does not
# flood the event stream and its readers (the dashboard reloads the listing on each one).
EVENTS_PER_SECOND = 20


@dataclass(frozen=True)
class AdoptRule:
    """Adopt matching clients automatically: every condition given must hold (at least one is given)."""

    template: str
    user: str
    mac_prefix: str = ""  # lowercase, colon-separated ("52:54:00"); "" = any MAC
    arch: int | None = None  # option 93 (0 BIOS, 7 x64 UEFI, ...); None = any
    profile: str = ""  # "" = the appliance's default profile

    def matches(self, node: DiscoveredRow) -> bool:
        if self.mac_prefix and not node.mac.startswith(self.mac_prefix):
            return False
        return self.arch is None or node.arch == self.arch


def usable_uuid(text: str) -> str | None:
    """The node's SMBIOS UUID when it can be a server's identity; None for none or a broken one."""
    text = text.lower()
    return text if naming.UUID.ok(text) and text not in naming.BROKEN_UUIDS else None


class DiscoveredNodes:
    FLUSH_EVERY = 0.5  # seconds

    def __init__(self, store: AsyncStore | None, events: EventBus, *, capacity: int = DEFAULT_CAPACITY,
                 clock: Callable[[], float] = time.time, monotonic: Callable[[], float] = time.monotonic) -> None:
        if capacity <= 0:
            raise ValueError("capacity must be positive")
        self._store = store
        self._events = events
        self.capacity = capacity
        self._clock = clock
        self._monotonic = monotonic
        self._nodes: OrderedDict[str, DiscoveredRow] = OrderedDict()  # least recently seen first
        self._unsaved: dict[str, int] = {}  # mac -> boot requests seen since the last save
        self._adopted: dict[str, float] = {}  # mac -> until when it is not recorded again
        self._lock = asyncio.Lock()  # a save and a forget never interleave (no record comes back)
        self._flusher = Periodic(self.flush, self.FLUSH_EVERY, "cello-discovered-flush")
        self._event_second = 0.0
        self._events_this_second = 0
        self.events_suppressed = 0  # 'discovered' events not published because of the rate limit
        # Called for every boot request of an unknown node (the auto-adopt rule); cheap, synchronous.
        self.on_seen: Callable[[DiscoveredRow], None] = lambda node: None

    # --- the datagram handler's side (synchronous, no I/O) -------------------------------------

    def seen(self, client: PxeClient) -> None:
        mac = client.mac.lower()
        if self._adopted and self._recently_adopted(mac):
            return
        now = self._clock()
        old = self._nodes.pop(mac, None)
        node = DiscoveredRow(
            mac=mac, uuid=client.uuid or "", arch=client.arch, vendor_class=client.vendor_class,
            user_class=client.user_class,
            address=client.address or (old.address if old is not None else ""),
            first_seen=old.first_seen if old is not None else now, last_seen=now,
            count=(old.count if old is not None else 0) + 1)
        self._nodes[mac] = node
        self._unsaved[mac] = self._unsaved.get(mac, 0) + 1
        while len(self._nodes) > self.capacity:
            gone, _ = self._nodes.popitem(last=False)
            self._unsaved.pop(gone, None)
        if old is None:
            self._publish(node)
        try:
            self.on_seen(node)
        except Exception:
            log.exception("auto-adopt of %s failed", mac)

    def _publish(self, node: DiscoveredRow) -> None:
        second = self._monotonic() // 1
        if second != self._event_second:
            self._event_second, self._events_this_second = second, 0
        if self._events_this_second >= EVENTS_PER_SECOND:
            self.events_suppressed += 1
            return
        self._events_this_second += 1
        self._events.publish("discovered", {"mac": node.mac, "uuid": node.uuid, "arch": node.arch,
                                            "vendor_class": node.vendor_class, "address": node.address})

    def address(self, mac: str, address: str) -> None:
        """A DHCP packet of a discovered node said which address it holds (its REQUEST to the site
        server, say): noted for the listing. Other strangers are not recorded by this."""
        mac = mac.lower()
        node = self._nodes.get(mac)
        if node is not None and node.address != address:
            self._nodes[mac] = replace(node, address=address)
            self._unsaved.setdefault(mac, 0)

    def _recently_adopted(self, mac: str) -> bool:
        until = self._adopted.get(mac)
        if until is None:
            return False
        if until > self._monotonic():
            return True
        del self._adopted[mac]
        return False

    # --- reads ----------------------------------------------------------------------------------

    def get(self, mac: str) -> DiscoveredRow | None:
        return self._nodes.get(naming.normalize_mac(mac))

    def listing(self) -> list[DiscoveredRow]:
        """Most recently seen first."""
        return list(reversed(self._nodes.values()))

    def __len__(self) -> int:
        return len(self._nodes)

    # --- changes and persistence ----------------------------------------------------------------

    async def forget(self, mac: str, *, adopted: bool = False) -> bool:
        """Remove the record (memory and store); whether there was one. `adopted`: the MAC's server is
        being made, so its next DHCP packets are not recorded again while the boot index catches up."""
        mac = naming.normalize_mac(mac)
        async with self._lock:
            known = self._nodes.pop(mac, None) is not None
            self._unsaved.pop(mac, None)
            if adopted:
                if len(self._adopted) >= self.capacity:
                    self._adopted.clear()
                self._adopted[mac] = self._monotonic() + ADOPTED_QUIET
            if self._store is not None:
                known = await self._store.call(self._store.sync.forget_discovered, mac) or known
        return known

    async def load(self) -> None:
        """The stored records, so that a node seen before a restart is not 'discovered' again."""
        if self._store is None:
            return
        rows = await self._store.call(self._store.sync.discovered, self.capacity)
        for row in reversed(rows):  # oldest first, as `seen` keeps them
            self._nodes.setdefault(row.mac, row)

    async def start(self) -> None:
        await self.load()
        if self._store is not None:
            self._flusher.start()

    async def stop(self) -> None:
        await self._flusher.stop()

    async def flush(self) -> None:
        if self._store is None or not self._unsaved:
            return
        async with self._lock:
            batch, self._unsaved = self._unsaved, {}
            rows = [replace(node, count=batch[mac]) for mac, node in self._nodes.items() if mac in batch]
            try:
                await self._store.call(self._store.sync.save_discovered, rows, self.capacity)
            except StoreUnreachable as e:  # an outage: one line, not a traceback each flush
                log.warning("could not save %d discovered nodes: %s", len(rows), e)
            except Exception:
                log.exception("could not save %d discovered nodes", len(rows))


class Adoption:
    """Make a server of a discovered node, through the normal create workflow; the record goes."""

    def __init__(self, discovered: DiscoveredNodes, servers: ServerWorkflows, tasks: BackgroundTasks,
                 events: EventBus, rule: AdoptRule | None = None) -> None:
        self.discovered = discovered
        self.servers = servers
        self.tasks = tasks
        self.events = events
        self.rule = rule
        self._tried: OrderedDict[str, None] = OrderedDict()  # MACs the rule adopted (or tried to)

    async def adopt(self, mac: str, *, template: str, owner: str, profile: str = "",
                    data_gb: Sequence[int] = (), hostname: str = "", auto: bool = False) -> ServerRow:
        """The server made from the node's record (its UUID, or a new one if it sent none or a broken
        one; its MAC), recorded `creating` with its create workflow started."""
        mac = naming.MAC.check(naming.normalize_mac(mac), InvalidRequest, "mac")
        node = self.discovered.get(mac)
        if node is None:
            raise NotFound(f"no discovered node {mac}")
        uuid = usable_uuid(node.uuid) or str(uuidlib.uuid4())
        row = await self.servers.create_server(CreateServer(uuid=uuid, template=template, owner=owner,
                                                            profile=profile, macs=(mac,), data_gb=tuple(data_gb),
                                                            hostname=hostname))
        self.tasks.spawn(self.servers.run_create(row.uuid), f"create-{row.uuid}")
        self.servers.on_change()  # the boot index (and the policy's known MACs) hears of the record
        await self.discovered.forget(mac, adopted=True)
        self.events.publish("adopted", {"server": row.uuid, "mac": mac, "template": template, "user": owner,
                                        "auto": auto, "uuid_from": "node" if uuid == node.uuid else "new"})
        log.info("adopted %s as server %s (%s for %s%s)", mac, row.uuid, template, owner, ", by rule" * auto)
        return row

    def auto(self, node: DiscoveredRow) -> None:
        """`DiscoveredNodes.on_seen`: adopt a node the rule matches, once per MAC (a failure is logged
        and published, not retried until the appliance restarts)."""
        rule = self.rule
        if rule is None or node.mac in self._tried or not rule.matches(node):
            return
        self._tried[node.mac] = None
        while len(self._tried) > self.discovered.capacity:
            self._tried.popitem(last=False)
        self.tasks.spawn(self._auto(node.mac, rule), f"adopt-{node.mac}")

    async def _auto(self, mac: str, rule: AdoptRule) -> None:
        try:
            await self.adopt(mac, template=rule.template, owner=rule.user, profile=rule.profile, auto=True)
        except Exception as e:
            log.warning("auto-adopt of %s failed: %s", mac, reason(e))
            self.events.publish("adopted", {"server": None, "mac": mac, "auto": True, "error": reason(e)})
