"""The fleet: appliances that share one store, each serving the root disks of the servers it owns.

Every appliance registers itself in the store and heartbeats; one whose heartbeat is older than
`down_after_s` is `down`, and an operator may set one `disabled` (no new placement there). A new server
is placed by domain/placement.py's scheduler; its record names its appliance, and only that appliance
makes its volumes, exports its target and answers its node (so a node never sees two next-servers).

Work crosses appliances through the store, never by one appliance acting on another's disks:
- a create placed elsewhere is recorded `creating` and picked up by the owner's poll of the store;
- a template version built on one appliance is pulled by each other appliance over the fleet channel
  (an authenticated HTTP channel, web/peers.py) and becomes placeable there once its copy is verified;
- a move is driven by the owner: it unexports, asks the new appliance to pull the volumes, then hands
  the record over in one store write and destroys its own copies.
A single appliance is a fleet of one: the same code, with nobody to replicate to.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Protocol

from domain.errors import Conflict, InvalidRequest, NotFound
from domain.placement import Candidate, Placement, PlacementRequest, Scheduler
from domain.requests import CreateServer
from domain.servers import WAITING
from domain.states import EXPORTED, ServerState
from domain.store import ApplianceRow, ServerRow, TemplateCopyRow, TemplateVersion
from domain.tasks import reason
from iscsi import names
from iscsi.model import InUseError, StorageError

log = logging.getLogger("cello.fleet")

S = ServerState
RETRY_FAILED_COPY_S = 30.0
GiB = 1 << 30


class NoPlacement(Conflict):
    """No appliance of the fleet can take it now (each one's reason is in the message): a 409."""


@dataclass(frozen=True)
class FleetSettings:
    name: str
    api_url: str
    advertise: str
    labels: Mapping[str, str] = field(default_factory=dict)
    capacity_bytes: int = 0  # 0 = the backend's pool size
    secret: str = ""  # the channel's; '' = no replication, no moves
    heartbeat_s: float = 5.0
    down_after_s: float = 30.0
    poll_s: float = 1.0
    sole: bool = True  # its store is its own (SQLite): every server there is this appliance's, whatever its name
    os_reserve_bytes: int = 10 << 30  # what placement counts per OS clone (thin: it holds what its node writes)
    answers_unknown: bool = False
    version: str = ""
    tls_fingerprint: str = ""  # of its HTTPS certificate: registered for the others to pin


class PeerChannel(Protocol):
    """What one appliance asks of another (implemented over HTTP in web/peers.py)."""

    def template_stream(self, peer: ApplianceRow, template: str, version: str,
                        base: str | None) -> AsyncIterator[bytes]: ...
    async def fetch_file(self, peer: ApplianceRow, rel: str) -> None:
        """Copy a boot file (a template version's kernel or initrd) into this appliance's boot tree."""
        ...
    def volume_stream(self, peer: ApplianceRow, volume: str,
                      origin: tuple[str, str] | None) -> AsyncIterator[bytes]: ...
    async def ask_pull(self, peer: ApplianceRow, uuid: str) -> None:
        """The peer pulls the server's volumes from us (a move); raises with the peer's reason."""
        ...


@dataclass(frozen=True)
class ApplianceView:
    row: ApplianceRow
    state: str  # up | down | disabled
    servers: int
    placed_bytes: int
    templates: tuple[str, ...]  # "tiny@v1" versions with a verified copy there
    copying: tuple[str, ...]

    def as_json(self, now: float) -> dict[str, object]:
        r = self.row
        return {"name": r.name, "state": self.state, "api_url": r.api_url, "advertise": r.advertise,
                "labels": r.label_map, "capacity_bytes": r.capacity_bytes, "free_bytes": r.free_bytes,
                "placed_bytes": self.placed_bytes, "servers": self.servers, "disabled_reason": r.disabled_reason,
                "templates": list(self.templates), "copying": list(self.copying), "version": r.version,
                "tls_fingerprint": r.tls_fingerprint, "heartbeat_age_s": round(max(0.0, now - r.heartbeat_at), 3)}


class Fleet:
    def __init__(self, settings: FleetSettings, servers: Any, policy: Any, *, channel: PeerChannel | None = None,
                 scheduler: Scheduler | None = None, clock: Callable[[], float] = time.time) -> None:
        # servers: domain.servers.ServerWorkflows; policy: domain.bootpolicy.ApplianceBootPolicy (Any: no cycle)
        self.settings = settings
        self.name = settings.name
        self.servers = servers
        self.store = servers.store
        self.backend = servers.backend
        self.policy = policy
        self.channel = channel
        self.scheduler = scheduler or Scheduler()
        self._clock = clock
        self._task: asyncio.Task[None] | None = None
        self._replicating: asyncio.Task[None] | None = None
        self._last_heartbeat = 0.0
        self._last_exported: frozenset[tuple[str, str]] | None = None
        self._last_seen: tuple[tuple[str, str, float], ...] | None = None
        self._store_down = False
        self._alone = True

    def _db(self, fn: Callable[..., Any], *args: Any) -> Any:
        return self.store.call(fn, *args)

    # --- start, stop, the poll ------------------------------------------------------------------

    async def start(self) -> None:
        """Register (capacity, labels, address), take the servers made before fleets, note the template
        versions this appliance holds; then poll the store for this appliance's work."""
        await self._register()
        claimed = await self._db(self.store.sync.claim_unowned_servers, self.name, self.settings.sole)
        if claimed:
            log.info("fleet: %d server(s) made before fleets now belong to appliance %s", claimed, self.name)
        self._alone = len(await self._db(self.store.sync.appliances)) <= 1
        await self.note_local_copies()
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="cello-fleet")

    async def stop(self) -> None:
        for task in (self._task, self._replicating):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        self._task = self._replicating = None

    async def _capacity(self) -> tuple[int, int]:
        cap = await self.backend.capacity()
        total = self.settings.capacity_bytes or cap.total
        return total, min(cap.free, total)

    async def _register(self) -> None:
        total, free = await self._capacity()
        now = self._clock()
        import json

        await self._db(self.store.sync.register_appliance, ApplianceRow(
            name=self.name, api_url=self.settings.api_url, advertise=self.settings.advertise,
            labels=json.dumps(dict(self.settings.labels), sort_keys=True), capacity_bytes=total, free_bytes=free,
            answers_unknown=self.settings.answers_unknown, version=self.settings.version, started_at=now,
            heartbeat_at=now, tls_fingerprint=self.settings.tls_fingerprint))
        self._last_heartbeat = now

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.poll_s)
            try:
                await self.tick()
                if self._store_down:
                    log.warning("fleet: the store answers again")
                self._store_down = False
            except asyncio.CancelledError:
                raise
            except Exception as e:
                # The database may be down: nodes keep their root disks (the exports live in the target
                # daemon, not in the store); this appliance keeps serving what it knows and tries again.
                if not self._store_down:
                    log.warning("fleet: poll failed: %s", reason(e))
                self._store_down = True

    async def tick(self) -> None:
        """One look at the shared store: heartbeat when due, take creates placed here, follow changes
        other appliances made to this appliance's servers, pull template versions it lacks."""
        now = self._clock()
        if now - self._last_heartbeat >= self.settings.heartbeat_s:
            total, free = await self._capacity()
            if not await self._db(self.store.sync.heartbeat, self.name, now, total, free):
                await self._register()  # forgotten by an operator while running: register again
            self._last_heartbeat = now
            self._alone = len(await self._db(self.store.sync.appliances)) <= 1
            await self.reap_deleted_copies()
            await self.note_local_copies()
        if self._alone:
            return  # nobody else writes this appliance's servers: its own workflows keep exports and index
        mine: list[ServerRow] = await self._db(partial(self.store.sync.servers, appliance=self.name))
        for s in mine:
            if s.state == S.CREATING and s.reason.startswith(WAITING) and not self.servers.busy(s.uuid):
                log.info("fleet: taking the create of server %s", s.uuid)
                self.servers.tasks.spawn(self.servers.run_create(s.uuid), f"create-{s.uuid}")
        seen = tuple(sorted((s.uuid, s.state, s.updated_at) for s in mine))
        if seen != self._last_seen:
            self._last_seen = seen
            self.policy.changed()
        exported = frozenset((s.uuid, s.state) for s in mine if s.state in EXPORTED)
        if self._last_exported is not None and exported != self._last_exported and self.servers.services["export"]:
            await self.servers.apply_exports("fleet: the store changed")
        self._last_exported = exported
        idle = self._replicating is None or self._replicating.done()
        if self.channel is not None and self.settings.secret and idle:
            self._replicating = asyncio.get_running_loop().create_task(self.replicate_missing(),
                                                                       name="cello-fleet-replicate")

    # --- the fleet's view -----------------------------------------------------------------------

    def state_of(self, row: ApplianceRow, now: float) -> str:
        if now - row.heartbeat_at > self.settings.down_after_s:
            return "down"
        return "disabled" if row.disabled else "up"

    async def view(self) -> list[ApplianceView]:
        rows, placed, copies = await self._db(_fleet_rows, self.store.sync, self.settings.os_reserve_bytes)
        now = self._clock()
        out = []
        for r in rows:
            mine = [c for c in copies if c.appliance == r.name]
            n, used = placed.get(r.name, (0, 0))
            out.append(ApplianceView(r, self.state_of(r, now), n, used,
                                     tuple(f"{c.template}@{c.version}" for c in mine if c.state == "ready"),
                                     tuple(f"{c.template}@{c.version}" for c in mine if c.state == "copying")))
        return out

    async def appliance(self, name: str) -> ApplianceRow:
        row = await self._db(self.store.sync.appliance, name)
        if row is None:
            raise NotFound(f"no appliance {name}")
        assert isinstance(row, ApplianceRow)
        return row

    async def set_disabled(self, name: str, disabled: bool, why: str = "") -> None:
        if not await self._db(self.store.sync.set_appliance_disabled, name, disabled, why if disabled else ""):
            raise NotFound(f"no appliance {name}")

    # --- placement --------------------------------------------------------------------------------

    async def candidates(self) -> list[Candidate]:
        now = self._clock()
        return [Candidate(name=v.row.name, up=self.state_of(v.row, now) != "down", disabled=v.row.disabled,
                          disabled_reason=v.row.disabled_reason, labels=v.row.label_map,
                          capacity_bytes=v.row.capacity_bytes, placed_bytes=v.placed_bytes, servers=v.servers,
                          templates=frozenset(v.templates))
                for v in await self.view()]

    async def place(self, tv: TemplateVersion, data_bytes: int, *, pin: str = "",
                    labels: Mapping[str, str] | None = None) -> Placement:
        """Where a new server of this template version goes; NoPlacement naming why each appliance
        was filtered out when none fits."""
        request = PlacementRequest(template=tv.template, version=tv.version,
                                   os_bytes=min(tv.size, self.settings.os_reserve_bytes), data_bytes=data_bytes,
                                   labels=dict(labels or {}), pin=pin)
        candidates = await self.candidates()
        if pin and pin not in {c.name for c in candidates}:
            raise InvalidRequest(f"appliance: no appliance {pin} in the fleet")
        placement = self.scheduler.place(candidates, request)
        if placement.chosen is None:
            raise NoPlacement(f"no appliance can take it: {placement.explain()}")
        return placement

    async def place_create(self, req: CreateServer, *, pin: str = "", labels: Mapping[str, str] | None = None
                           ) -> Placement:
        """Where a new server goes. A fleet of one places it here without asking the scheduler unless the
        request names an appliance or labels (a lone appliance's capacity rules are its quota's)."""
        tv = await self._db(self.store.sync.newest_version, req.template)
        if tv is None:
            raise InvalidRequest(f"template: no template {req.template!r} with a built version")
        if self._alone and not pin and not labels:
            return Placement(chosen=self.name, weights={self.name: 0.0}, rejected={})
        return await self.place(tv, sum(req.data_gb) * GiB, pin=pin, labels=labels)

    # --- template replication -------------------------------------------------------------------

    async def note_local_copies(self) -> None:
        """Every template version whose snapshot this appliance holds (built or captured here, or made
        before fleets) is recorded as a verified copy here."""
        versions, copies = await self._db(_versions_and_copies, self.store.sync)
        have = {(c.template, c.version) for c in copies if c.appliance == self.name and c.state != "failed"}
        snaps = set(await self.backend.snapshots())
        for tv in versions:
            if (tv.template, tv.version) in have or f"{names.template_volume(tv.template)}@{tv.version}" not in snaps:
                continue
            checksum = await self.backend.template_checksum(tv.template, tv.version)
            await self._db(self.store.sync.set_template_copy, TemplateCopyRow(
                tv.template, tv.version, self.name, "ready", "", checksum, self._clock()))
            log.info("fleet: %s@%s is held here (%s)", tv.template, tv.version, checksum[:16])

    async def reap_deleted_copies(self) -> None:
        """A version deleted through another appliance: destroy its snapshot here (and the template volume
        when no version of it is left), then the mark. Refused ones (a clone here) stay marked, with why."""
        versions, copies = await self._db(_versions_and_copies, self.store.sync)
        left = {tv.template for tv in versions}
        for c in copies:
            if c.appliance != self.name or c.state != "deleting":
                continue
            try:
                await self.backend.destroy_snapshot(c.template, c.version)
                if c.template not in left:
                    await self.servers.destroy(names.template_volume(c.template))
            except Exception as e:
                await self._db(self.store.sync.set_template_copy, TemplateCopyRow(
                    c.template, c.version, self.name, "deleting", f"version deleted; here: {reason(e)}", "",
                    self._clock()))
                continue
            await self._db(self.store.sync.delete_template_copy, c.template, c.version, self.name)
            log.info("fleet: %s@%s deleted elsewhere: its copy here is gone", c.template, c.version)

    async def replicate_missing(self) -> None:
        """Pull, one at a time, each template version this appliance has no verified copy of, from an
        up appliance that has one."""
        if self.channel is None:
            return
        versions, copies = await self._db(_versions_and_copies, self.store.sync)
        rows = {r.name: r for r in await self._db(self.store.sync.appliances)}
        now = self._clock()
        mine = {(c.template, c.version): c for c in copies if c.appliance == self.name}
        for tv in versions:
            current = mine.get((tv.template, tv.version))
            if current is not None and (current.state in ("ready", "deleting") or (
                    current.state == "failed" and now - current.updated_at < RETRY_FAILED_COPY_S)):
                continue
            sources = [c for c in copies if c.template == tv.template and c.version == tv.version
                       and c.state == "ready" and c.appliance != self.name and c.appliance in rows
                       and self.state_of(rows[c.appliance], now) != "down"]
            if not sources:
                continue
            source = sources[0]
            held = {c.version for c in mine.values() if c.template == tv.template and c.state == "ready"}
            theirs = {c.version for c in copies if c.appliance == source.appliance and c.template == tv.template
                      and c.state == "ready"}
            # incremental from the newest version held here, if the source holds it too (zfs receives an
            # increment only on top of the newest snapshot; an older version after a newer one goes whole)
            newest = max(held, key=_vnum) if held else None
            base = newest if newest in theirs and newest is not None and _vnum(newest) < _vnum(tv.version) else None
            await self.replicate(tv, rows[source.appliance], source.checksum, base=base)

    async def replicate(self, tv: TemplateVersion, source: ApplianceRow, checksum: str, *,
                        base: str | None = None) -> None:
        assert self.channel is not None
        what = f"{tv.template}@{tv.version}"
        await self._db(self.store.sync.set_template_copy, TemplateCopyRow(
            tv.template, tv.version, self.name, "copying", f"from {source.name}", "", self._clock()))
        started = time.monotonic()
        try:
            got = await self.backend.receive_template(
                tv.template, tv.version, self.channel.template_stream(source, tv.template, tv.version, base),
                base=base)
            if checksum and got != checksum:
                await self.backend.destroy_snapshot(tv.template, tv.version)
                raise StorageError(f"{what}: the copy's checksum {got[:16]} is not {source.name}'s {checksum[:16]}")
            for rel in (tv.kernel, tv.initrd):
                await self.channel.fetch_file(source, rel)
        except Exception as e:
            log.warning("fleet: copy of %s from %s failed: %s", what, source.name, reason(e))
            await self._db(self.store.sync.set_template_copy, TemplateCopyRow(
                tv.template, tv.version, self.name, "failed", f"from {source.name}: {reason(e)}", "", self._clock()))
            return
        await self._db(self.store.sync.set_template_copy, TemplateCopyRow(
            tv.template, tv.version, self.name, "ready", f"from {source.name}", got, self._clock()))
        log.info("fleet: %s copied from %s in %.1f s%s", what, source.name, time.monotonic() - started,
                 f" (incremental from {base})" if base else "")
        self.policy.changed()

    # --- moving a server ----------------------------------------------------------------------------

    async def move(self, uuid: str, to: str) -> ServerRow:
        """Run on the server's appliance: unexport, have `to` pull the volumes, hand the record over,
        destroy the copies here. Refused while the node holds a session; undone on any failure before
        the hand-over (the server is exported here again)."""
        servers = self.servers
        async with servers._lock(uuid):
            server: ServerRow = await servers.get(uuid)
            if self.channel is None:
                raise NoPlacement("moves need the fleet channel: set [fleet] secret on every appliance")
            if server.appliance != self.name:
                raise Conflict(f"server {uuid} is on appliance {server.appliance}, not {self.name}")
            if to == self.name:
                raise InvalidRequest(f"appliance: server {uuid} is on {to} already")
            if server.state != S.AVAILABLE:
                raise Conflict(f"server {uuid} is {server.state}; only an available server moves")
            volumes = await servers.volumes_of(uuid)
            if any(v.kind not in ("os", "data") or v.idx < 0 for v in volumes) or \
                    await self._db(self.store.sync.snapshots_of, uuid):
                raise Conflict(f"server {uuid} has a restore point or snapshots; a move carries only its root "
                               "and data volumes (remove them first)")
            target = await self.appliance(to)
            request = PlacementRequest(template=server.template, version=server.version,
                                       os_bytes=self.settings.os_reserve_bytes,
                                       data_bytes=sum(v.size for v in volumes if v.kind == "data"), labels={}, pin=to)
            placement = self.scheduler.place(await self.candidates(), request)
            if placement.chosen != to:
                raise NoPlacement(f"server {uuid} cannot move to {to}: {placement.rejected.get(to, '?')}")
            held = await servers.exports.driver.sessions(servers.iqn(uuid))
            if held:
                raise InUseError(f"move of server {uuid} refused: its node holds an iSCSI session "
                                 f"({'; '.join(map(str, held))}); power it off first")
            await self._db(self.store.sync.set_moving_to, uuid, to)
            await self._db(self.store.sync.set_server_state, uuid, S.MOVING, f"moving to {to}")
            servers._step(uuid, "move", "unexport", to=to)
            try:
                await servers.apply_exports(f"move {uuid}")
                servers._step(uuid, "move", "copy", to=to)
                await self.channel.ask_pull(target, uuid)
            except Exception as e:
                await self._db(self.store.sync.set_moving_to, uuid, "")
                await self._db(self.store.sync.set_server_state, uuid, S.AVAILABLE, f"move to {to} failed: {reason(e)}")
                await servers.apply_exports(f"undo move {uuid}")
                servers._step(uuid, "move", "failed", reason=reason(e))
                raise
            # the new appliance holds verified copies: hand the record over in one write
            await self._db(self.store.sync.set_server_appliance, uuid, to)
            await self._db(self.store.sync.set_server_state, uuid, S.AVAILABLE, f"moved from {self.name}")
            servers._step(uuid, "move", "done", to=to)
            leftovers = []
            for v in volumes:
                try:
                    await servers.destroy(v.name)
                except Exception as e:
                    leftovers.append(f"{v.name}: {reason(e)}")
            if leftovers:
                log.warning("fleet: server %s moved to %s; copies left here: %s", uuid, to, "; ".join(leftovers))
            self.policy.changed()
            moved: ServerRow = await servers.get(uuid)
            return moved

    async def pull(self, uuid: str) -> None:
        """Run on the appliance a server moves to (asked by its owner): receive its volumes; on failure
        nothing received stays."""
        if self.channel is None:
            raise NoPlacement("no fleet channel here")
        server: ServerRow = await self.servers.get(uuid)
        if server.moving_to != self.name or server.state != S.MOVING:
            raise Conflict(f"server {uuid} is not moving to {self.name}")
        owner = await self.appliance(server.appliance)
        made: list[str] = []
        try:
            for v in await self.servers.volumes_of(uuid):
                origin = (server.template, server.version) if v.kind == "os" else None
                await self.backend.receive_volume(v.name, self.channel.volume_stream(owner, v.name, origin),
                                                  origin=origin)
                made.append(v.name)
        except Exception:
            for name in reversed(made):
                with contextlib.suppress(Exception):
                    await self.backend.destroy(name)
            raise

    async def volume_for_move(self, volume: str) -> tuple[str, str] | None:
        """The origin to send a volume against, when it belongs to a server moving away from here; else
        Conflict (the channel serves nothing else)."""
        row = await self._db(self.store.sync.volume, volume)
        server = None if row is None else await self._db(self.store.sync.server, row.server)
        if row is None or server is None or server.appliance != self.name or server.state != S.MOVING:
            raise Conflict(f"volume {volume} is not moving away from {self.name}")
        return (server.template, server.version) if row.kind == "os" else None


def _vnum(version: str) -> int:
    return int(version[1:])


def _fleet_rows(store: Any, os_reserve: int) -> tuple[list[ApplianceRow], dict[str, tuple[int, int]],
                                                      list[TemplateCopyRow]]:
    return store.appliances(), store.placed(os_reserve), store.template_copies()


def _versions_and_copies(store: Any) -> tuple[Sequence[TemplateVersion], list[TemplateCopyRow]]:
    return store.template_versions(), store.template_copies()
