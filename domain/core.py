"""The domain's parts wired together: one store, one event bus, one export manager, and the workflows,
users, services and boot policy around them. `build_domain` is called by the composition root
(appliance/app.py `Appliance.build`) — the only place that chooses the backend and the driver.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from bootfiles.spec import Profile
from domain.audit import AuditLog
from domain.bootcache import CachedIndex
from domain.bootpolicy import ApplianceBootPolicy
from domain.census import SessionCounts
from domain.discovered import Adoption, AdoptRule, DiscoveredNodes
from domain.events import EventBus
from domain.exports import ChapMode, Naming, desired_targets, targets_of
from domain.fleet import Fleet, FleetSettings, PeerChannel
from domain.lifecycle import BootFilesCopy, Lifecycle, PowerFor, Scrub
from domain.reconcile import ReconcileReport, reconcile
from domain.rolling import RollingUpgrades
from domain.servers import ServerWorkflows
from domain.services import ServiceSwitches
from domain.store import AsyncStore
from domain.tasks import BackgroundTasks
from domain.templates import SourceCheck, TemplateBuilder, TemplateWorkflows
from domain.timings import Timings
from domain.users import Users
from iscsi.exports import ExportManager
from iscsi.model import ExportDriver, VolumeBackend


@dataclass
class Domain:
    store: AsyncStore
    events: EventBus
    backend: VolumeBackend
    exports: ExportManager
    services: ServiceSwitches
    users: Users
    servers: ServerWorkflows
    templates: TemplateWorkflows
    policy: ApplianceBootPolicy
    tasks: BackgroundTasks
    lifecycle: Lifecycle
    rolling: RollingUpgrades
    audit: AuditLog
    timings: Timings
    census: SessionCounts
    discovered: DiscoveredNodes
    adoption: Adoption
    fleet: Fleet

    @property
    def driver(self) -> ExportDriver:
        return self.exports.driver

    async def start(self) -> None:
        await self.events.start()
        await self.audit.start()
        await self.discovered.start()
        await self.services.load()
        await self.fleet.start()  # registers, and takes the servers made before fleets: before any reconcile

    async def start_offline(self) -> None:
        """What runs without the store (its database out of reach at start; `start()` follows once it
        is back): the audit log's flusher, which drops what it cannot save as in any outage, so that
        nothing piles up meanwhile."""
        await self.audit.start()

    async def export_cached(self, cached: CachedIndex) -> int:
        """Without the store, on a target daemon that holds no target at all (its host restarted: tgtd
        keeps none across that), export this appliance's servers as the cached index has them, so that
        their nodes find their root disks. A daemon that holds any target is left exactly as it is (a
        restart of Cello alone); nothing is ever removed here. Returns the targets exported."""
        if not self.services.get("export", True) or self.driver.name == "none":
            return 0
        if (await self.driver.actual()).targets:
            return 0
        mine = [s for s in cached.servers if s.appliance == self.fleet.name]
        targets = targets_of(mine, cached.volumes, self.backend, self.servers.naming)
        if targets:
            self.exports.last_state = await self.driver.apply(targets)
        return len(targets)

    async def reconcile(self) -> ReconcileReport:
        return await reconcile(self.servers)

    async def stop(self) -> None:
        """Workflows finish (briefly), events are flushed, the store closes. Exports stay as they are."""
        try:
            await asyncio.wait_for(self.tasks.drain(), timeout=2)
        except TimeoutError:
            pass
        await self.fleet.stop()
        await self.events.stop()
        await self.audit.stop()
        await self.discovered.stop()
        await asyncio.to_thread(self.store.close)


def build_domain(
    store: AsyncStore,
    backend: VolumeBackend,
    driver: ExportDriver,
    *,
    iqn_prefix: str,
    profiles: Mapping[str, Profile],
    default_profile: str,
    portal: tuple[str, int],
    http_base: str,
    unknown: str = "ignore",
    unknown_template: str = "",
    chap: ChapMode = "on",
    builder: TemplateBuilder | None = None,
    source_check: SourceCheck | None = None,
    power_for: PowerFor = lambda server: None,
    copy_boot_files: BootFilesCopy | None = None,
    scrub: Scrub | None = None,
    adopt_rule: AdoptRule | None = None,
    fleet: FleetSettings | None = None,
    channel: PeerChannel | None = None,
    boot_cache: Path | None = None,
) -> Domain:
    """Every part of the domain, wired; `boot_cache`: where the boot policy keeps its copy of the index
    (a shared store's appliance: domain/bootcache.py)."""
    # a single appliance is a fleet of one, named "local" unless the config names it
    settings = fleet or FleetSettings(name="local", api_url=http_base, advertise=portal[0])
    me = settings.name
    names = Naming(iqn_prefix)
    events = EventBus(store, me)
    timings = Timings()
    events.observers.append(timings.observe)
    tasks = BackgroundTasks()
    exports = ExportManager(driver, lambda: desired_targets(store, backend, names, me))
    discovered = DiscoveredNodes(store, events)
    policy = ApplianceBootPolicy(
        store, profiles=profiles, iqn_prefix=iqn_prefix, portal=portal, http_base=http_base, unknown=unknown,
        unknown_template=unknown_template, exports=lambda: exports.last_state, lun_number=driver.lun_number,
        discovered=discovered, appliance=me, cache_path=boot_cache)
    services = ServiceSwitches(store, events, me)
    if boot_cache is not None:  # the cache holds the switches too: a flip is written at once
        events.observers.append(lambda event: policy.changed() if event.kind == "service" else None)
    users = Users(store)
    servers = ServerWorkflows(store, backend, exports, events, services, users, tasks, naming=names,
                              profiles=_names(profiles), default_profile=default_profile,
                              on_change=policy.changed, chap=chap, appliance=me)
    templates = TemplateWorkflows(store, backend, events, tasks, builder=builder, source_check=source_check,
                                  destroy=servers.destroy, on_change=policy.changed, appliance=me)
    lifecycle = Lifecycle(servers, templates, power_for=power_for, copy_boot_files=copy_boot_files, scrub=scrub)
    adoption = Adoption(discovered, servers, tasks, events, adopt_rule)
    discovered.on_seen = adoption.auto
    return Domain(store, events, backend, exports, services, users, servers, templates, policy, tasks, lifecycle,
                  RollingUpgrades(lifecycle, tasks), AuditLog(store), timings, SessionCounts(exports),
                  discovered=discovered, adoption=adoption, fleet=Fleet(settings, servers, policy, channel=channel))


def _names(profiles: Mapping[str, Profile]) -> Sequence[str]:
    return tuple(profiles)
