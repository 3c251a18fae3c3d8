"""A server's life on its clone: upgrade (rebuild) to another template version, roll back, snapshots of
its root, capture of its root as a template version, and its node's power.

A root swap never runs under a running node: a node that holds an iSCSI session is refused, naming the
session, unless the request asks to power it off first through its BMC. During the swap the server is
`rebuilding` (its target is not exported); its data volumes stay untouched and come back at their LUNs.
Each swap is a list of steps with compensations, like create: a failure at any step leaves the server
on its old root, with no orphan volume and the quota as it was.

The old root of an upgrade is kept as the server's restore point (one per server: the root before the
last upgrade or rollback); an upgrade's new root is a clone under the next generation's name, so no
volume is ever renamed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Literal, Protocol

import naming
from domain.errors import Conflict, InvalidRequest, NotFound
from domain.exports import new_secret, server_serial
from domain.servers import ServerWorkflows
from domain.states import ServerState, VolumeState
from domain.store import NEW_ROOT_IDX, PREV_IDX, AsyncStore, ServerRow, TemplateVersion, VolumeRow
from domain.tasks import reason
from domain.templates import TemplateWorkflows
from domain.users import quota_check
from iscsi import names
from iscsi.model import InUseError, Session, StorageError

log = logging.getLogger("cello.lifecycle")

S, V = ServerState, VolumeState
PowerAction = Literal["on", "off", "cycle"]


class PowerSwitch(Protocol):
    """A node's BMC, as the lifecycle needs it (bmc/ implements it for Redfish and IPMI)."""

    async def status(self) -> str: ...
    async def power(self, action: PowerAction) -> str: ...
    async def boot_pxe_once(self) -> None: ...


PowerFor = Callable[[ServerRow], PowerSwitch | None]  # None: the server has no BMC
# Copies a version's kernel and initrd for a captured version: (from, to_template, to_version) -> paths
BootFilesCopy = Callable[[TemplateVersion, str, str], Awaitable[tuple[str, str]]]
# empties a root image's identity and stamps it as (template, version, source); returns what changed
Scrub = Callable[[str, str, str, str], Awaitable[list[str]]]


@dataclass
class SwapReport:
    """What a root swap did, for the API's answer and the rolling upgrade's per-node report."""

    server: str
    action: str
    before: str  # "tiny@v1"
    after: str
    restore_point: str | None = None
    powered: list[str] = field(default_factory=list)  # "off", "pxe-once", "on", "reached root"
    problems: list[str] = field(default_factory=list)  # cleanups that failed after the swap succeeded

    def as_json(self) -> dict[str, object]:
        return {"server": self.server, "action": self.action, "before": self.before, "after": self.after,
                "restore_point": self.restore_point, "powered": self.powered, "problems": self.problems}


class Lifecycle:
    def __init__(self, servers: ServerWorkflows, templates: TemplateWorkflows, *, power_for: PowerFor,
                 copy_boot_files: BootFilesCopy | None = None, scrub: Scrub | None = None,
                 root_timeout: float = 600.0, off_timeout: float = 60.0, poll: float = 1.0) -> None:
        self.servers = servers
        self.templates = templates
        self.power_for = power_for
        self.copy_boot_files = copy_boot_files
        self.scrub = scrub
        self.root_timeout = root_timeout  # power-on -> the node's iSCSI login (its boot reached its root)
        self.off_timeout = off_timeout  # power-off -> its session gone
        self.poll = poll

    @property
    def _store(self) -> AsyncStore:
        return self.servers.store

    # --- the guard every destructive action passes -----------------------------------------------------

    async def sessions(self, uuid: str) -> list[Session]:
        return await self.servers.exports.driver.sessions(self.servers.iqn(uuid))

    async def _node_down(self, server: ServerRow, action: str, power_off: bool, report: SwapReport) -> None:
        """Refuse while the node holds a session, or power it off first when asked to (and wait)."""
        held = await self.sessions(server.uuid)
        if not held:
            return
        if not power_off:
            raise InUseError(f"{action} of server {server.uuid} refused: its node holds an iSCSI session "
                             f"({'; '.join(map(str, held))}); power it off first, or ask for a reboot")
        switch = self._switch(server)
        await switch.power("off")
        report.powered.append("off")
        deadline = time.monotonic() + self.off_timeout
        while held := await self.sessions(server.uuid):
            if time.monotonic() > deadline:
                raise InUseError(f"server {server.uuid} was powered off but its session stays "
                                 f"({'; '.join(map(str, held))}) after {self.off_timeout:g} s")
            await asyncio.sleep(self.poll)

    def _switch(self, server: ServerRow) -> PowerSwitch:
        switch = self.power_for(server)
        if switch is None:
            raise InvalidRequest(f"server {server.uuid} has no BMC: set one (bmc_url) to power it from here")
        return switch

    async def _node_up(self, server: ServerRow, report: SwapReport) -> None:
        """One-time PXE, power on, and wait until the node logs in to its target (its boot reached root)."""
        switch = self._switch(server)
        await switch.boot_pxe_once()
        report.powered.append("pxe-once")
        await switch.power("on")
        report.powered.append("on")
        powered_on = time.monotonic()
        deadline = powered_on + self.root_timeout
        while not await self.sessions(server.uuid):
            if time.monotonic() > deadline:
                report.problems.append(f"the node did not log in to its target within {self.root_timeout:g} s")
                return
            await asyncio.sleep(self.poll)
        report.powered.append("reached root")
        # measured to within one poll: the power-on -> root histogram of /metrics (domain/timings.py)
        self.servers.events.publish("root", {"server": server.uuid, "via": report.action,
                                             "after_power_on_seconds": round(time.monotonic() - powered_on, 3)})

    async def power(self, uuid: str, action: Literal["on", "off", "cycle", "status"],
                    may_act_for: Callable[[str], bool] = lambda owner: True) -> str:
        server = await self.servers.get(uuid, may_act_for)
        switch = self._switch(server)
        state = await switch.status() if action == "status" else await switch.power(action)
        if action != "status":
            self.servers.events.publish("power", {"server": uuid, "action": action, "state": state})
        return state

    async def delete(self, uuid: str, *, power_off: bool = False,
                     may_act_for: Callable[[str], bool] = lambda owner: True) -> None:
        """Delete the server; with `power_off`, its node is powered off through its BMC first (a delete
        is refused while the node holds a session)."""
        if power_off:
            server = await self.servers.get(uuid, may_act_for)
            await self._node_down(server, "delete", True, SwapReport(uuid, "delete", "", ""))
        await self.servers.delete_server(uuid, may_act_for=may_act_for)

    # --- the swap skeleton -------------------------------------------------------------------------------

    async def _swap(self, uuid: str, action: str, may_act_for: Callable[[str], bool], reboot: bool,
                    change: Callable[[ServerRow, SwapReport], Awaitable[None]],
                    undo: Callable[[ServerRow, SwapReport], Awaitable[None]],
                    after: Callable[[ServerRow, SwapReport], Awaitable[None]] | None = None) -> SwapReport:
        servers = self.servers
        servers.services.require("export")
        async with servers._lock(uuid):
            server = await servers.get(uuid, may_act_for)
            if server.state != S.AVAILABLE:
                raise Conflict(f"server {uuid} is {server.state}, not available")
            report = SwapReport(uuid, action, f"{server.template}@{server.version}", "")
            await self._node_down(server, action, reboot, report)
            await self._db(self._store.sync.set_server_state, uuid, S.REBUILDING)
            servers._step(uuid, action, "unexport", state=S.REBUILDING)
            try:
                state = await servers.apply_exports(f"{action} {uuid}")
                if servers.iqn(uuid) in state.targets:
                    raise StorageError(f"target {servers.iqn(uuid)} is still exported")
                await change(server, report)
            except BaseException as e:
                await self._undo(server, report, undo, e)
                raise
            try:
                await self._db(self._store.sync.set_server_state, uuid, S.AVAILABLE)
                state = await servers.apply_exports(f"{action} {uuid} done")
                if state.available and servers.iqn(uuid) not in state.targets:
                    raise StorageError(f"target {servers.iqn(uuid)} did not come back ({state.detail})")
            except Exception as e:
                await self._db(self._store.sync.set_server_state, uuid, S.REBUILDING)
                await self._undo(server, report, undo, e)
                raise
            now = await servers.get(uuid)
            report.after = f"{now.template}@{now.version}"
            servers._step(uuid, action, "done", state=S.AVAILABLE, before=report.before, after=report.after)
            if after is not None:
                await after(now, report)
            servers.on_change()
        if reboot:
            await self._node_up(now, report)
        return report

    async def _undo(self, server: ServerRow, report: SwapReport, undo: Callable[[ServerRow, SwapReport],
                    Awaitable[None]], cause: BaseException) -> None:
        """Back on the old root, exported again; `error` only if even that fails (the reason says why)."""
        servers, uuid = self.servers, server.uuid
        why = reason(cause)
        log.warning("%s %s failed, undoing: %s", report.action, uuid, why)
        try:
            await undo(server, report)
            await self._db(self._store.sync.set_server_state, uuid, S.AVAILABLE, f"{report.action} failed: {why}")
            await servers.apply_exports(f"undo {report.action} {uuid}")
        except Exception as e:
            detail = f"{report.action} failed: {why}; undoing it failed too: {reason(e)}"
            await self._db(self._store.sync.set_server_state, uuid, S.ERROR, detail)
            servers._step(uuid, report.action, "failed", state=S.ERROR, reason=detail)
            return
        servers._step(uuid, report.action, "failed", state=S.AVAILABLE, reason=why)

    def _db(self, fn: Callable[..., object], *args: object) -> Awaitable[object]:
        return self._store.call(fn, *args)

    # --- upgrade / rebuild ---------------------------------------------------------------------------------

    async def rebuild(self, uuid: str, to: str | None = None, *, discard_old: bool = False, reboot: bool = False,
                      may_act_for: Callable[[str], bool] = lambda owner: True) -> SwapReport:
        """Onto `to` ("tiny@v3", "tiny" = its newest, None = the newest of the server's own template)."""
        current = await self.servers.get(uuid, may_act_for)
        tv = await self._target_version(to or current.template)
        made: list[str] = []
        swapped: list[bool] = []
        old_prev: list[str] = []  # the restore point of the upgrade before, replaced by this one
        secrets = {"chap_secret": new_secret()} if current.chap_secret else {}
        if current.chap_mutual_secret:
            secrets["chap_mutual_secret"] = new_secret()

        async def change(server: ServerRow, report: SwapReport) -> None:
            volumes = await self.servers.volumes_of(uuid)
            generation = 1 + max(names.parse_volume(v.name).index for v in volumes if v.kind in ("os", "prev"))
            new = names.os_volume(tv.template, uuid, generation)
            user = await self.servers.users.get(server.owner)
            row = VolumeRow(new, uuid, "os", NEW_ROOT_IDX, tv.size, V.CREATING, server_serial(new),
                            f"{tv.template}@{tv.version}")
            await self._db(self._store.sync.add_volume, row, server.owner, quota_check(user))
            made.append(new)
            self.servers._step(uuid, "rebuild", "clone", volume=new, to=f"{tv.template}@{tv.version}")
            await self.servers.backend.clone_os(tv.template, tv.version, uuid, generation)
            replaced = await self._db(self._store.sync.swap_root, uuid, new, tv.template, tv.version, secrets)
            swapped.append(True)
            old_prev.extend([replaced] if isinstance(replaced, str) else [])
            report.restore_point = next(v.name for v in volumes if v.kind == "os" and v.idx == 0)

        async def undo(server: ServerRow, report: SwapReport) -> None:
            if swapped:  # the old root is the root again (with its own secrets); the new one is its prev now
                await self._db(self._store.sync.swap_back, uuid, server.template, server.version,
                               {"chap_secret": server.chap_secret, "chap_mutual_secret": server.chap_mutual_secret})
            for name in made:  # the new root goes, volume and row
                await self.servers.backend.destroy(name)
                await self._db(self._store.sync.delete_volume, name)
            for name in old_prev:  # and the restore point it had replaced is the restore point again
                await self._db(self._store.sync.revive_prev, name)
            report.restore_point = None

        async def after(server: ServerRow, report: SwapReport) -> None:
            for name in old_prev:
                await self._drop(name, report)
            if discard_old and report.restore_point:
                await self._drop(report.restore_point, report)
                report.restore_point = None

        return await self._swap(uuid, "rebuild", may_act_for, reboot, change, undo, after)

    async def _drop(self, name: str, report: SwapReport) -> None:
        try:
            await self.servers.destroy(name)
            await self._db(self._store.sync.delete_volume, name)
        except Exception as e:  # the server is on its new root; this volume is reported, not lost
            report.problems.append(f"destroy {name}: {reason(e)}")

    async def _target_version(self, spec: str) -> TemplateVersion:
        template, _, version = spec.partition("@")
        naming.TEMPLATE.check(template, InvalidRequest, "to")
        if version:
            naming.VERSION.check(version, InvalidRequest, "to")
        versions = await self._store.call(self._store.sync.template_versions, template)
        found = [v for v in versions if not version or v.version == version]
        if not found:
            raise InvalidRequest(f"to: no template version {spec}")
        return found[-1]

    # --- rollback --------------------------------------------------------------------------------------------

    async def rollback(self, uuid: str, *, reboot: bool = False,
                       may_act_for: Callable[[str], bool] = lambda owner: True) -> SwapReport:
        """Back onto the restore point; the root it leaves becomes the restore point (a rollback can be undone)."""
        volumes = await self.servers.volumes_of(uuid)
        prev = next((v for v in volumes if v.kind == "prev" and v.idx == PREV_IDX), None)
        if prev is None or not prev.origin:
            raise Conflict(f"server {uuid} has no restore point to roll back to")
        template, _, version = prev.origin.partition("@")

        async def change(server: ServerRow, report: SwapReport) -> None:
            await self._db(self._store.sync.swap_back, uuid, template, version, {})
            report.restore_point = next(v.name for v in volumes if v.kind == "os")

        async def undo(server: ServerRow, report: SwapReport) -> None:
            if report.restore_point:
                await self._db(self._store.sync.swap_back, uuid, server.template, server.version, {})

        return await self._swap(uuid, "rollback", may_act_for, reboot, change, undo)

    # --- snapshots of the root -------------------------------------------------------------------------------

    async def list_snapshots(self, uuid: str, may_act_for: Callable[[str], bool] = lambda o: True
                             ) -> list[tuple[str, str, float]]:
        await self.servers.get(uuid, may_act_for)
        return list(await self._store.call(self._store.sync.snapshots_of, uuid))  # type: ignore[arg-type]

    async def _root(self, uuid: str) -> VolumeRow:
        root = next((v for v in await self.servers.volumes_of(uuid) if v.kind == "os" and v.idx == 0), None)
        if root is None:
            raise Conflict(f"server {uuid} has no root volume")
        return root

    async def create_snapshot(self, uuid: str, name: str,
                              may_act_for: Callable[[str], bool] = lambda o: True) -> None:
        """A snapshot of the root (crash-consistent while the node runs), counted in the owner's quota."""
        naming.SNAPSHOT.check(name, InvalidRequest, "name")
        async with self.servers._lock(uuid):
            server = await self.servers.get(uuid, may_act_for)
            if server.state != S.AVAILABLE:
                raise Conflict(f"server {uuid} is {server.state}, not available")
            root = await self._root(uuid)
            user = await self.servers.users.get(server.owner)
            await self._db(self._store.sync.add_snapshot, uuid, name, root.name, server.owner, quota_check(user))
            try:
                await self.servers.backend.snapshot_volume(root.name, name)
            except BaseException:
                await self._db(self._store.sync.delete_snapshot, uuid, name)
                raise
            self.servers._step(uuid, "snapshot", "done", snapshot=name, volume=root.name)

    async def delete_snapshot(self, uuid: str, name: str, may_act_for: Callable[[str], bool] = lambda o: True) -> None:
        async with self.servers._lock(uuid):
            await self.servers.get(uuid, may_act_for)
            volume = await self._snapshot_volume(uuid, name)
            await self.servers.backend.destroy_volume_snapshot(volume, name)
            await self._db(self._store.sync.delete_snapshot, uuid, name)

    async def _snapshot_volume(self, uuid: str, name: str) -> str:
        for snap, volume, _ in await self._store.call(self._store.sync.snapshots_of, uuid):  # type: ignore[arg-type]
            if snap == name:
                return str(volume)
        raise NotFound(f"server {uuid} has no snapshot {name}")

    async def restore_snapshot(self, uuid: str, name: str, *, reboot: bool = False,
                               may_act_for: Callable[[str], bool] = lambda o: True) -> SwapReport:
        """The root's content goes back to the snapshot's (a newer snapshot is refused by the backend)."""
        await self.servers.get(uuid, may_act_for)
        volume = await self._snapshot_volume(uuid, name)

        async def change(server: ServerRow, report: SwapReport) -> None:
            root = await self._root(uuid)
            if root.name != volume:
                raise Conflict(f"snapshot {name} is of {volume}, not of the current root {root.name}")
            await self.servers.backend.restore_volume_snapshot(volume, name)
            report.restore_point = None

        async def undo(server: ServerRow, report: SwapReport) -> None:
            """Nothing to put back: the backend's restore replaces the root whole, or leaves it as it was."""

        return await self._swap(uuid, "restore", may_act_for, reboot, change, undo)

    # --- capture ------------------------------------------------------------------------------------------------

    async def capture(self, uuid: str, as_name: str, *, power_off: bool = False) -> TemplateVersion:
        """The server's root becomes the next version of template `as_name`, the node's identity scrubbed."""
        naming.TEMPLATE.check(as_name, InvalidRequest, "as")
        if self.copy_boot_files is None or self.scrub is None:
            raise InvalidRequest("capture is not available in this appliance")
        report = SwapReport(uuid, "capture", "", "")
        async with self.servers._lock(uuid), self.templates._lock(as_name):
            server = await self.servers.get(uuid)
            if server.state != S.AVAILABLE:
                raise Conflict(f"server {uuid} is {server.state}, not available")
            await self._node_down(server, "capture", power_off, report)
            root = await self._root(uuid)
            store, backend = self._store, self.servers.backend
            source = next((v for v in await store.call(store.sync.template_versions, server.template)
                           if v.version == server.version), None)
            if source is None:
                raise Conflict(f"server {uuid}'s template {server.template}@{server.version} is gone")
            existing = await store.call(store.sync.template_versions, as_name)
            version = f"v{max((naming.version_number(v.version) for v in existing), default=0) + 1}"
            template = names.template_volume(as_name)
            made_template = not existing and template not in {v.name for v in await backend.list()}
            snapped = False
            try:
                info = await backend.copy_volume(root.name, template)
                changed = await self.scrub(backend.path(template), as_name, version, f"capture:{uuid}")
                self.servers._step(uuid, "capture", "scrubbed", template=as_name, files=changed)
                await backend.snapshot_template(as_name, version)
                snapped = True
                kernel, initrd = await self.copy_boot_files(source, as_name, version)
                tv = TemplateVersion(as_name, version, f"capture:{uuid}", info.size, kernel, initrd, time.time())
                await store.call(store.sync.add_template_version, tv)
            except BaseException:
                if snapped:
                    await backend.destroy_snapshot(as_name, version)
                if made_template:
                    await backend.destroy(template)
                raise
        self.servers.on_change()
        self.servers._step(uuid, "capture", "done", template=as_name, version=version)
        return tv
