"""Server workflows: create and delete a server, add and remove a data volume.

Each workflow is a list of steps; a step that fails runs the compensations of the steps before it,
in reverse, so nothing is left half-made: no orphan volume, no export pointing at nothing, no quota
leaked. Record states follow Cinder (domain/states.py): creating → exporting → available | error,
deleting → (gone) | error_deleting. One workflow at a time per server (a lock each); different
servers run in parallel.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import naming
from domain.errors import Conflict, InvalidRequest, NotFound
from domain.events import EventBus
from domain.exports import ChapMode, Naming, chap_for, server_serial
from domain.requests import CreateServer
from domain.services import ServiceSwitches
from domain.states import BEING_MADE, EXPORTED, ServerState, VolumeState
from domain.store import AsyncStore, ServerRow, VolumeRow
from domain.tasks import BackgroundTasks, reason
from domain.users import Users, quota_check
from iscsi import names
from iscsi.exports import ExportManager
from iscsi.model import ExportState, InUseError, LimitedDriver, StorageError, VolumeBackend

log = logging.getLogger("cello.servers")

GiB = 1 << 30
MAX_LABELS = 64
S, V = ServerState, VolumeState
WAITING = "placed on "  # the reason of a create recorded for another appliance, until that one takes it


class ServerWorkflows:
    def __init__(
        self,
        store: AsyncStore,
        backend: VolumeBackend,
        exports: ExportManager,
        events: EventBus,
        services: ServiceSwitches,
        users: Users,
        tasks: BackgroundTasks,
        *,
        naming: Naming,
        profiles: Sequence[str],
        default_profile: str,
        on_change: Callable[[], None] = lambda: None,
        chap: ChapMode = "on",
        appliance: str = "local",
    ) -> None:
        self.store = store
        self.backend = backend
        self.exports = exports
        self.events = events
        self.services = services
        self.users = users
        self.tasks = tasks
        self.naming = naming
        self.profiles = tuple(profiles)
        self.default_profile = default_profile
        self.chap: ChapMode = chap
        self.appliance = appliance  # this appliance's name in the fleet: it makes and exports its servers only
        self.on_change = on_change  # the boot index refreshes from the store when told
        self._locks: dict[str, asyncio.Lock] = {}

    # --- helpers ---------------------------------------------------------------------------------

    def _db(self, fn: Callable[..., Any], *args: Any) -> Any:
        return self.store.call(fn, *args)

    def _lock(self, uuid: str) -> asyncio.Lock:
        return self._locks.setdefault(uuid, asyncio.Lock())

    def busy(self, uuid: str) -> bool:
        """A workflow of this server is running (reconcile leaves such a server alone)."""
        return self._lock(uuid).locked()

    def iqn(self, uuid: str) -> str:
        return self.naming.iqn(uuid)

    def initiator(self, uuid: str) -> str:
        return self.naming.initiator(uuid)

    def _step(self, uuid: str, workflow: str, step: str, **more: object) -> None:
        self.events.publish("workflow", {"server": uuid, "workflow": workflow, "step": step, **more})

    # --- reads ----------------------------------------------------------------------------------

    async def get(self, uuid: str, may_act_for: Callable[[str], bool] = lambda owner: True) -> ServerRow:
        """The server; NotFound for a missing one and, alike, for one whose owner `may_act_for` refuses."""
        server = await self._db(self.store.sync.server, uuid.lower())
        if server is None or not may_act_for(server.owner):
            raise NotFound(f"no server {uuid}")
        assert isinstance(server, ServerRow)
        return server

    async def volumes_of(self, uuid: str) -> list[VolumeRow]:
        return list(await self._db(self.store.sync.volumes, uuid))

    async def listing(self, owner: str | None = None) -> tuple[list[ServerRow], list[VolumeRow]]:
        """Servers (all, or one owner's) and every volume, in one trip through the store's thread."""
        servers, volumes = await self._db(_listing, self.store.sync, owner)
        return servers, volumes

    async def boot_log(self, uuid: str, limit: int) -> list[dict[str, object]]:
        return list(await self._db(self.store.sync.events, uuid, limit))

    async def owner_of(self, uuid: str) -> str | None:
        server = await self._db(self.store.sync.server, uuid)
        return None if server is None else str(server.owner)

    async def counts(self) -> tuple[dict[str, int], dict[tuple[str, str], int]]:
        """Servers by state, volumes by (kind, state)."""
        servers, volumes = await self.listing()
        by_state: dict[str, int] = {}
        for s in servers:
            by_state[s.state] = by_state.get(s.state, 0) + 1
        by_kind: dict[tuple[str, str], int] = {}
        for v in volumes:
            by_kind[(v.kind, v.state)] = by_kind.get((v.kind, v.state), 0) + 1
        return by_state, by_kind

    async def set_labels(self, uuid: str, labels: dict[str, str],
                         may_act_for: Callable[[str], bool] = lambda owner: True) -> None:
        await self.get(uuid, may_act_for)
        if len(labels) > MAX_LABELS:
            raise InvalidRequest(f"labels: at most {MAX_LABELS}")
        for key, value in labels.items():
            naming.LABEL.check(key, InvalidRequest, "label")
            naming.LABEL.check(value, InvalidRequest, f"label {key}'s value")
        await self._db(self.store.sync.set_labels, uuid, dict(labels))

    async def set_bmc(self, uuid: str, url: str, user: str, password: str) -> None:
        """The node's BMC, checked before it is kept ("" removes it); the password is kept like CHAP secrets."""
        await self.get(uuid)
        if url:
            from bmc import parse_bmc_url  # the BMC's own rules (bmc/address.py)

            try:
                parse_bmc_url(url)
            except ValueError as e:
                raise InvalidRequest(f"url: {e}") from None
        await self._db(self.store.sync.set_bmc, uuid, url, user if url else "", password if url else "")

    async def apply_exports(self, reason: str) -> ExportState:
        state = await self.exports.apply()
        self.events.publish("export", {"reason": reason, "targets": len(state.targets),
                                       "available": state.available, "detail": state.detail})
        self.on_change()
        return state

    # --- create ----------------------------------------------------------------------------------

    async def create_server(self, req: CreateServer, appliance: str | None = None) -> ServerRow:
        """Validate, reserve quota and record `creating`; the rest runs as a background workflow, on
        `appliance` (default this one): another appliance of the fleet takes it from the store."""
        self.services.require("export")
        appliance = appliance or self.appliance
        here = appliance == self.appliance
        req = req.checked(self.profiles, self.default_profile)
        tv = await self._db(self.store.sync.newest_version, req.template)
        if tv is None:
            raise InvalidRequest(f"template: no template {req.template!r} with a built version")
        user = await self.users.get(req.owner)
        now = time.time()
        row = ServerRow(uuid=req.uuid, template=req.template, version=tv.version, profile=req.profile,
                        owner=req.owner, state=S.CREATING, macs=req.macs, hostname=req.hostname,
                        address=req.address, created_at=now, updated_at=now, appliance=appliance,
                        reason="" if here else f"{WAITING}{appliance}; waiting for it to take the create",
                        **chap_for(req.uuid, self.chap))
        vols = [VolumeRow(names.os_volume(req.template, req.uuid), req.uuid, "os", 0, tv.size, V.CREATING,
                          server_serial(names.os_volume(req.template, req.uuid)), f"{tv.template}@{tv.version}")]
        for i, gb in enumerate(req.data_gb, start=1):
            name = names.data_volume(req.template, req.uuid, i)
            vols.append(VolumeRow(name, req.uuid, "data", i, gb * GiB, V.CREATING, server_serial(name)))
        # ctld: CTL's port and LUN tables are fixed at boot
        if here and isinstance(driver := self.exports.driver, LimitedDriver):
            servers, volumes = await self.listing()
            live = {s.uuid for s in servers if s.state in BEING_MADE | EXPORTED and s.appliance == self.appliance}
            luns = sum(1 for v in volumes if v.server in live) + len(vols)
            if (problem := driver.refusal(len(live) + 1, luns)) is not None:
                raise Conflict(f"server {req.uuid} does not fit the iSCSI target: {problem}")
        await self._db(self.store.sync.create_server, row, vols, quota_check(user))
        self._step(req.uuid, "create", "recorded", state=S.CREATING)
        return row

    async def run_create(self, uuid: str) -> None:
        async with self._lock(uuid):
            server = await self._db(self.store.sync.server, uuid)
            if server is None or server.state != S.CREATING:
                return
            volumes = await self._db(self.store.sync.volumes, uuid)
            made: list[str] = []
            try:
                for v in volumes:
                    self._step(uuid, "create", "volume", volume=v.name)
                    if v.kind == "os":
                        await self.backend.clone_os(server.template, server.version, uuid)
                    else:
                        await self.backend.create_data(server.template, uuid, v.idx, v.size)
                    made.append(v.name)
                    await self._db(self.store.sync.set_volume_state, v.name, V.AVAILABLE)
                await self._db(self.store.sync.set_server_state, uuid, S.EXPORTING)
                self._step(uuid, "create", "export")
                state = await self.apply_exports(f"create {uuid}")
                if state.available and self.iqn(uuid) not in state.targets:
                    raise StorageError(f"target {self.iqn(uuid)} did not appear ({state.detail or 'no detail'})")
                await self._db(self.store.sync.set_server_state, uuid, S.AVAILABLE)
                self._step(uuid, "create", "done", state=S.AVAILABLE)
            except Exception as e:
                why = reason(e)
                log.warning("create %s failed: %s", uuid, why)
                await self.compensate_create(uuid, made, why)
            finally:
                self.on_change()

    async def compensate_create(self, uuid: str, made: Sequence[str], why: str) -> None:
        # Leave the desired exports first ("creating" is not exported), so no LUN points at a volume
        # about to go; the record says `error` only once the cleanup is over.
        await self._db(self.store.sync.set_server_state, uuid, S.CREATING, f"failed, cleaning up: {why}")
        problems = []
        try:
            await self.apply_exports(f"undo create {uuid}")
        except Exception as e:
            problems.append(f"unexport: {reason(e)}")
        for name in reversed(made):
            try:
                await self.destroy(name)
            except Exception as e:
                problems.append(f"destroy {name}: {reason(e)}")
        if not problems:
            for v in await self._db(self.store.sync.volumes, uuid):
                await self._db(self.store.sync.delete_volume, v.name)  # releases their quota
        detail = why + ("" if not problems else " (cleanup: " + "; ".join(problems) + ")")
        await self._db(self.store.sync.set_server_state, uuid, S.ERROR, detail)
        self._step(uuid, "create", "failed", state=S.ERROR, reason=detail)

    # --- delete ----------------------------------------------------------------------------------

    async def delete_server(self, uuid: str, *, may_act_for: Callable[[str], bool] = lambda owner: True) -> None:
        """Unexport, destroy the volumes, forget the server; `error_deleting` (and raise) on failure.

        A server whose owner `may_act_for` refuses is not found, exactly as a missing one. Deletes
        coalesce like creates: each waits for the shared export apply that starts after it marked
        its server `deleting`, and that apply's closing show is what says its target is gone before
        any volume is destroyed.
        """
        self.services.require("export")
        async with self._lock(uuid):
            current = await self._db(self.store.sync.server, uuid)
            if current is not None and may_act_for(current.owner) and current.state != S.DELETING:
                # a delete takes the node's root disk away: never under a running node (issue 13's rule)
                held = await self.exports.driver.sessions(self.iqn(uuid))
                if held:
                    raise InUseError(f"delete of server {uuid} refused: its node holds an iSCSI session "
                                     f"({'; '.join(map(str, held))}); power it off first")
            server, volumes = await self._db(_begin_delete, self.store.sync, uuid, may_act_for)
            if server is None:
                raise NotFound(f"no server {uuid}")
            if server.state in BEING_MADE:
                raise Conflict(f"server {uuid} is being created; retry when it is available or error")
            self._step(uuid, "delete", "unexport", state=S.DELETING)
            destroyed: list[str] = []
            try:
                # The boot index hears of this delete only from apply_exports, when every delete that
                # shared the apply resumes at once (one refresh for the batch, not one per delete
                # finishing): a `deleting` server boots nothing, so the rows going later change no answer.
                state = await self.apply_exports(f"delete {uuid}")
                if self.iqn(uuid) in state.targets:
                    raise StorageError(f"target {self.iqn(uuid)} is still exported")
                for v in reversed(volumes):
                    self._step(uuid, "delete", "destroy", volume=v.name)
                    await self.destroy(v.name)
                    destroyed.append(v.name)
                await self._db(_forget_server, self.store.sync, uuid, destroyed)
                self._step(uuid, "delete", "done", state="deleted")
            except Exception as e:
                why = reason(e)
                # The rows of the volumes already destroyed go (their quota with them); the rest stay,
                # so a retry or reconcile destroys exactly what is left.
                await self._db(_fail_delete, self.store.sync, uuid, destroyed, why)
                self._step(uuid, "delete", "failed", state=S.ERROR_DELETING, reason=why)
                self.on_change()
                raise StorageError(f"delete {uuid} failed: {why}") from e
            finally:
                self._locks.pop(uuid, None)

    async def destroy(self, name: str) -> None:
        # Backends treat a missing volume as done (compensations repeat); the guard refuses a volume
        # that the last applied export state still serves.
        await self.backend.destroy(name, exported=self.exports.exported)

    # --- data volumes ----------------------------------------------------------------------------

    async def add_data_volume(self, uuid: str, size_gb: int) -> VolumeRow:
        self.services.require("export")
        async with self._lock(uuid):
            server = await self._server_in(uuid, S.AVAILABLE)
            user = await self.users.get(server.owner)
            existing = await self._db(self.store.sync.volumes, uuid)
            idx = max((v.idx for v in existing), default=0) + 1
            name = names.data_volume(server.template, uuid, idx)
            row = VolumeRow(name, uuid, "data", idx, size_gb * GiB, V.CREATING, server_serial(name))
            await self._db(self.store.sync.add_volume, row, server.owner, quota_check(user))
            made = False
            try:
                await self.backend.create_data(server.template, uuid, idx, row.size)
                made = True
                await self._db(self.store.sync.set_volume_state, name, V.AVAILABLE)
                state = await self.apply_exports(f"add volume {name}")
                if state.available and name not in state.targets.get(self.iqn(uuid), {}):
                    raise StorageError(f"LUN for {name} did not appear")
            except Exception as e:
                await self._db(self.store.sync.set_volume_state, name, V.ERROR)
                if made:
                    try:
                        await self.apply_exports(f"undo add volume {name}")
                        await self.destroy(name)
                    except Exception as cleanup:
                        raise StorageError(f"{reason(e)}; cleanup failed: {reason(cleanup)}") from e
                await self._db(self.store.sync.delete_volume, name)
                raise StorageError(reason(e)) from e
            self._step(uuid, "add-volume", "done", volume=name)
            return VolumeRow(name, uuid, "data", idx, row.size, V.AVAILABLE, row.serial)

    async def remove_data_volume(self, uuid: str, name: str) -> None:
        self.services.require("export")
        async with self._lock(uuid):
            await self._server_in(uuid, S.AVAILABLE)
            vol = await self._db(self.store.sync.volume, name)
            if vol is None or vol.server != uuid:
                raise NotFound(f"server {uuid} has no volume {name}")
            if vol.kind != "data":
                raise InvalidRequest("the OS volume and the restore point go only with their server "
                                     "(or with an upgrade's --discard-old)")
            held = await self.exports.driver.sessions(self.iqn(uuid))
            if held:  # removing a LUN takes a disk away from a running node
                raise InUseError(f"removing volume {name} refused: the node holds an iSCSI session "
                                 f"({'; '.join(map(str, held))}); power it off first")
            await self._db(self.store.sync.set_volume_state, name, V.DELETING)
            state = await self.apply_exports(f"remove volume {name}")
            if name in state.targets.get(self.iqn(uuid), {}):
                await self._db(self.store.sync.set_volume_state, name, V.ERROR)
                raise StorageError(f"LUN for {name} is still exported; not destroying it")
            await self.destroy(name)
            await self._db(self.store.sync.delete_volume, name)
            self._step(uuid, "remove-volume", "done", volume=name)

    async def _server_in(self, uuid: str, state: str) -> ServerRow:
        server = await self._db(self.store.sync.server, uuid)
        if server is None:
            raise NotFound(f"no server {uuid}")
        if server.state != state:
            raise Conflict(f"server {uuid} is {server.state}, not {state}")
        assert isinstance(server, ServerRow)
        return server



# The delete workflow's store steps, each one call on the store's thread (one trip through its
# queue, however many rows): a burst of deletes is otherwise a long queue of small writes.

def _begin_delete(store: Any, uuid: str,
                  may_act_for: Callable[[str], bool]) -> tuple[ServerRow | None, list[VolumeRow]]:
    """The server and its volumes; marked `deleting` unless missing, not the caller's, or still being made."""
    server = store.server(uuid)
    if server is not None and not may_act_for(server.owner):
        return None, []
    if server is None or server.state in BEING_MADE:
        return server, []
    store.set_server_state(uuid, S.DELETING)
    return server, store.volumes(uuid)


def _forget_server(store: Any, uuid: str, volumes: Sequence[str]) -> None:
    for name in volumes:
        store.delete_volume(name)
    store.delete_server(uuid)


def _fail_delete(store: Any, uuid: str, destroyed: Sequence[str], reason: str) -> None:
    for name in destroyed:
        store.delete_volume(name)
    store.set_server_state(uuid, S.ERROR_DELETING, reason)




def _listing(store: Any, owner: str | None) -> tuple[list[ServerRow], list[VolumeRow]]:
    return store.servers(owner), store.volumes()
