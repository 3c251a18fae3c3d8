"""The appliance's boot policy: answers `boot_spec(uuid=, mac=)` for the DHCP and TFTP services, and
who may fetch a node's config (`may_fetch`, from the DHCP bindings `client_seen` feeds and the
server's configured address; see appliance/bindings.py).

Those answer from their datagram handlers, so lookups are dictionary reads on an in-memory index;
the index is rebuilt from the store (on the store's thread) whenever the provisioner changes something,
and (a PostgreSQL store) copied to disk, for a start while the database is out of reach (domain/bootcache.py).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Container, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from bootfiles.spec import BootSpec, IscsiRoot, Profile, PxeClient
from domain import bootcache
from domain.bindings import BindingTable, ipv4_of
from domain.discovered import DiscoveredNodes
from domain.store import AsyncStore, ServerRow, Store, TemplateVersion, VolumeRow
from iscsi.model import ExportState

log = logging.getLogger("cello.boot")

# The server UUID an unknown node's diskless boot is rendered for when it sent no usable GUID.
UNKNOWN_NODE = "00000000-0000-0000-0000-000000000000"


@dataclass(frozen=True)
class BootIndex:
    by_uuid: Mapping[str, BootSpec]
    by_mac: Mapping[str, BootSpec]
    names: Mapping[str, str] = field(default_factory=dict)  # hostname -> IPv4, for the DNS responder


def build_index(
    servers: list[ServerRow],
    volumes: list[VolumeRow],
    versions: list[TemplateVersion],
    *,
    profiles: Mapping[str, Profile],
    iqn_prefix: str,
    portal: tuple[str, int],
    http_base: str,
    exports: ExportState | None,
    lun_number: Callable[[int], int],
) -> BootIndex:
    """Pure: the specs of every server that can boot (available, with an OS volume)."""
    files = {(v.template, v.version): v for v in versions}
    os_volume = {v.server: v for v in volumes if v.kind == "os" and v.state == "available"}
    by_uuid: dict[str, BootSpec] = {}
    by_mac: dict[str, BootSpec] = {}
    names = {s.hostname: s.address for s in servers
             if s.hostname and s.address and s.state in ("available", "exporting")}
    for s in servers:
        tv = files.get((s.template, s.version))
        vol = os_volume.get(s.uuid)
        if s.state != "available" or tv is None or vol is None or s.profile not in profiles:
            continue
        iqn = f"{iqn_prefix}:{s.uuid}"
        # The LUN the driver really used, when it said; its numbering rule otherwise.
        luns = exports.targets.get(iqn, {}) if exports is not None else {}
        lun = luns.get(vol.name, lun_number(vol.idx))
        spec = BootSpec(
            server_uuid=s.uuid,
            profile=profiles[s.profile],
            kernel=tv.kernel,
            initrd=tv.initrd,
            root=IscsiRoot(target_iqn=iqn, portal_ip=portal[0], portal_port=portal[1], lun=lun,
                           initiator_iqn=f"{iqn_prefix}:node-{s.uuid}",
                           chap_user=s.chap_user or None, chap_secret=s.chap_secret or None,
                           chap_mutual_user=s.chap_mutual_user or None,
                           chap_mutual_secret=s.chap_mutual_secret or None),
            http_base=http_base,
            hostname=s.hostname or None,
        )
        by_uuid[s.uuid] = spec
        for mac in s.macs:
            by_mac[mac] = spec
    return BootIndex(by_uuid, by_mac, names)


@dataclass(frozen=True)
class NodeAccess:
    """What says where a server's node is: its MACs (for the DHCP bindings) and its configured address."""

    macs: tuple[str, ...]
    address: str  # "" = none configured


def node_access(servers: list[ServerRow]) -> dict[str, NodeAccess]:
    """Pure: server uuid -> its NodeAccess."""
    return {s.uuid: NodeAccess(tuple(m.lower() for m in s.macs), ipv4_of(s.address) or "") for s in servers}


def unknown_node_files(versions: list[TemplateVersion], template: str) -> tuple[str, str] | None:
    """Kernel and initrd of the named template's newest version ('' = the most recently built one)."""
    candidates = [v for v in versions if not template or v.template == template]
    if not candidates:
        return None
    if template:
        newest = max(candidates, key=lambda v: int(v.version[1:]))
    else:
        newest = max(candidates, key=lambda v: v.created_at)
    return newest.kernel, newest.initrd


@dataclass(frozen=True)
class BootSnapshot:
    """What `ApplianceBootPolicy.boot_spec` reads, as one picklable value: the proxyDHCP in a process of
    its own (dhcp/process.py) answers from a copy of it, sent again whenever the index is swapped."""

    by_uuid: Mapping[str, BootSpec]
    by_mac: Mapping[str, BootSpec]
    known_macs: frozenset[str]  # every server record's MACs, whatever its state
    known_uuids: frozenset[str]  # every server record's uuid
    unknown: Profile | None  # the profile unknown nodes boot; None: they get no answer
    unknown_files: tuple[str, str] | None
    http_base: str

    def boot_spec(self, *, uuid: str | None, mac: str | None) -> BootSpec | None:
        return _answer(self.by_uuid, self.by_mac, self.known_macs, self.known_uuids, self.unknown,
                       self.unknown_files, self.http_base, uuid=uuid, mac=mac)


def _answer(by_uuid: Mapping[str, BootSpec], by_mac: Mapping[str, BootSpec], known_macs: Container[str],
            known_uuids: Container[str], unknown: Profile | None, unknown_files: tuple[str, str] | None,
            http_base: str, *, uuid: str | None, mac: str | None) -> BootSpec | None:
    """Pure: the boot spec of a node (the policy's and its snapshot's one rule)."""
    if uuid is not None and (spec := by_uuid.get(uuid.lower())) is not None:
        return spec
    if mac is not None and (spec := by_mac.get(mac.lower())) is not None:
        return spec
    # A server record names it, but it cannot boot from here: it is another appliance's node (that one
    # answers), or its server is not ready. Never the strangers' diskless boot.
    if (mac is not None and mac.lower() in known_macs) or (uuid is not None and uuid.lower() in known_uuids):
        return None
    # Unknown node: 'ignore' sends nothing, so the firmware falls through to its next boot device.
    # A named profile boots the unknown-node template diskless: no server record, so no root disk.
    if unknown is None or unknown_files is None:
        return None
    kernel, initrd = unknown_files
    return BootSpec(server_uuid=(uuid or UNKNOWN_NODE).lower(), profile=unknown,
                    kernel=kernel, initrd=initrd, root=None, http_base=http_base)


class ApplianceBootPolicy:
    """Implements bootfiles.spec.BootPolicy from the store."""

    def __init__(
        self,
        store: AsyncStore,
        *,
        profiles: Mapping[str, Profile],
        iqn_prefix: str,
        portal: tuple[str, int],
        http_base: str,
        unknown: str,
        exports: Callable[[], ExportState | None],
        lun_number: Callable[[int], int],
        unknown_template: str = "",
        bindings: BindingTable | None = None,
        discovered: DiscoveredNodes | None = None,
        appliance: str = "local",
        cache_path: Path | None = None,
    ) -> None:
        self._store = store
        self.cache_path = cache_path  # a copy of each refresh's rows, for a start without the store
        self._cached_body = b""
        self._refreshing = asyncio.Lock()
        self.appliance = appliance  # only this appliance's servers are answered here (a fleet's others answer theirs)
        self.profiles = dict(profiles)
        self.iqn_prefix = iqn_prefix
        self.portal = portal
        self.http_base = http_base
        self.unknown = unknown
        self.unknown_template = unknown_template
        self.unknown_files: tuple[str, str] | None = None  # (kernel, initrd) unknown nodes boot
        self._exports = exports
        self._lun_number = lun_number
        self.index = BootIndex({}, {})
        self.bindings = bindings if bindings is not None else BindingTable()
        self.nodes: Mapping[str, NodeAccess] = {}
        self.discovered = discovered  # unknown PXE clients, noted for adoption
        self._known_macs: frozenset[str] = frozenset()  # every server record's MACs, whatever its state
        self._refresh: asyncio.Task[None] | None = None
        self._dirty = False
        # Called after each refresh (the index swapped): the proxyDHCP's process gets a new snapshot().
        self.listeners: list[Callable[[], None]] = []
        self._snapshot: tuple[tuple[object, ...], BootSnapshot] | None = None

    def boot_spec(self, *, uuid: str | None, mac: str | None) -> BootSpec | None:
        return _answer(self.index.by_uuid, self.index.by_mac, self._known_macs, self.nodes, self._unknown_profile(),
                       self.unknown_files, self.http_base, uuid=uuid, mac=mac)

    def _unknown_profile(self) -> Profile | None:
        return None if self.unknown == "ignore" else self.profiles.get(self.unknown)

    def snapshot(self) -> BootSnapshot:
        """What boot_spec reads now, whole; the same object until something in it is replaced."""
        parts = (self.index, self.nodes, self._known_macs, self.unknown_files)
        cached = self._snapshot
        if cached is None or any(a is not b for a, b in zip(cached[0], parts, strict=True)):
            snapshot = BootSnapshot(dict(self.index.by_uuid), dict(self.index.by_mac), self._known_macs,
                                    frozenset(self.nodes), self._unknown_profile(), self.unknown_files,
                                    self.http_base)
            self._snapshot = cached = (parts, snapshot)
        return cached[1]

    def client_seen(self, *, mac: str, uuid: str | None, address: str) -> None:
        """Bind a known server's MAC / UUID to the address its DHCP packet named; strangers are not kept."""
        mac = mac.lower()
        known_mac = mac in self.index.by_mac
        known_uuid = uuid is not None and uuid.lower() in self.index.by_uuid
        if not (known_mac or known_uuid):
            if self.discovered is not None:
                self.discovered.address(mac, address)  # a discovered node's listing shows its address
            return
        before = self.bindings.address_of_mac(mac) if known_mac else None
        if known_uuid and before is None:
            before = self.bindings.address_of_uuid(uuid or "")
        self.bindings.learn(address, mac=mac if known_mac else None, uuid=uuid if known_uuid else None)
        if before != address:
            log.info("binding: %s (uuid %s) is at %s%s", mac, uuid, address, f" (was {before})" if before else "")

    def client_unknown(self, client: PxeClient) -> None:
        """Note a PXE client no server record names (a record being made or in error names it: not noted)."""
        if self.discovered is None:
            return
        if client.mac.lower() in self._known_macs or (client.uuid is not None and client.uuid.lower() in self.nodes):
            return
        self.discovered.seen(client)

    def may_fetch(self, spec: BootSpec, address: str) -> bool:
        """A config without a root disk (an unknown node's diskless boot) is anyone's; one with a root
        disk goes only to the server's configured address or the address its DHCP last named (while
        that binding lasts). No binding and no configured address: nobody."""
        if spec.root is None:
            return True
        ip = ipv4_of(address)
        node = self.nodes.get(spec.server_uuid)
        if ip is None or node is None:
            return False
        if ip == node.address or self.bindings.address_of_uuid(spec.server_uuid) == ip:
            return True
        return any(self.bindings.address_of_mac(mac) == ip for mac in node.macs)

    def names(self) -> Mapping[str, str]:
        """hostname -> address, for the DNS responder."""
        return self.index.names

    async def refresh(self) -> None:
        # One at a time (a caller's and the coalescing loop's): the index installed and the copy written
        # are always of the latest read, never an older read finishing last.
        async with self._refreshing:
            servers, volumes, versions, services = await self._store.call(_read_all, self._store.sync,
                                                                          self.appliance)
            self._install(servers, volumes, versions)
            if self.cache_path is None:
                return
            body = bootcache.encode(servers, volumes, versions, services)
            if body == self._cached_body:
                return
            try:
                await asyncio.to_thread(bootcache.write, self.cache_path, body)
                self._cached_body = body
            except OSError as e:  # the index in memory is right; only a later start would lack it
                log.warning("boot index cache not written (%s): %s", self.cache_path, e)

    async def load_cached(self) -> bootcache.CachedIndex | None:
        """The index from the cache file (the store out of reach at start); None where there is none.
        ValueError for a damaged file."""
        if self.cache_path is None:
            return None
        cached = await asyncio.to_thread(bootcache.read, self.cache_path)
        if cached is not None:
            self._install(cached.servers, cached.volumes, cached.versions)
        return cached

    def _install(self, servers: list[ServerRow], volumes: list[VolumeRow], versions: list[TemplateVersion]) -> None:
        self.index = build_index(
            [s for s in servers if s.appliance == self.appliance], volumes, versions, profiles=self.profiles,
            iqn_prefix=self.iqn_prefix, portal=self.portal, http_base=self.http_base, exports=self._exports(),
            lun_number=self._lun_number,
        )
        self.unknown_files = unknown_node_files(versions, self.unknown_template)
        self.nodes = node_access(servers)
        self._known_macs = frozenset(mac for node in self.nodes.values() for mac in node.macs)
        for listener in self.listeners:
            try:
                listener()
            except Exception:
                log.exception("boot index listener failed")

    def changed(self) -> None:
        """Called after every store change; coalesces into one refresh at a time."""
        self._dirty = True
        if self._refresh is None or self._refresh.done():
            self._refresh = asyncio.get_running_loop().create_task(self._refresh_loop())

    async def _refresh_loop(self) -> None:
        while self._dirty:
            self._dirty = False
            try:
                await self.refresh()
            except Exception:
                log.exception("boot index refresh failed")

    async def settled(self) -> None:
        """Wait until the index reflects every change made so far (tests, and the API after writes)."""
        while self._refresh is not None and not self._refresh.done():
            await asyncio.shield(self._refresh)


def _read_all(store: Store, appliance: str) -> tuple[list[ServerRow], list[VolumeRow], list[TemplateVersion],
                                                    dict[str, bool]]:
    return store.servers(), store.volumes(), store.template_versions(), store.services(appliance)
