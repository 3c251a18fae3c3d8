"""Provisioning workflows: create/delete server, add/remove data volume, templates, reconcile.

Each workflow is a list of steps; a step that fails runs the compensations of the steps before it,
in reverse, so nothing is left half-made: no orphan volume, no export pointing at nothing, no quota
leaked. Record states follow Cinder: creating → available | error, deleting → (gone) | error_deleting.
One workflow at a time per server (a lock each); different servers run in parallel.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import secrets
import string
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from domain.errors import Conflict, InvalidRequest, NotFound, ServiceDisabled
from domain.events import EventBus
from domain.store import AsyncStore, ServerRow, TemplateVersion, User, VolumeRow
from iscsi import names
from iscsi.exports import ExportManager
from iscsi.model import (
    ExportDriver,
    ExportState,
    InUseError,
    LimitedDriver,
    LunSpec,
    StorageError,
    TargetAuth,
    TargetSpec,
    VolumeBackend,
)

log = logging.getLogger("cello.provisioner")

GiB = 1 << 30
UUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
MAC_RE = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")
NAME_RE = re.compile(r"[a-z0-9][a-z0-9_.-]{0,62}")
HOST_RE = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
SERVICES = ("dhcp", "tftp", "http-boot", "export")
MAX_DATA_VOLUMES = 64
MAX_DATA_GB = 65536
DEFAULT_QUOTA = User(name="", max_volumes=32, max_data_gb=1024)

# Server states in which the server's target is part of the desired export configuration.
EXPORTED_STATES = ("exporting", "available")
ChapMode = Literal["on", "mutual", "off"]
# 16 letters and digits (~95 bits): inside every whitelist a secret meets on its way (ctld's 12..16
# chars, tgt's accounts, dracut's netroot, pxelinux and iPXE command lines).
_SECRET_ALPHABET = string.ascii_letters + string.digits
SECRET_LENGTH = 16


def new_secret() -> str:
    return "".join(secrets.choice(_SECRET_ALPHABET) for _ in range(SECRET_LENGTH))


def chap_for(uuid: str, mode: ChapMode) -> dict[str, str]:
    """The CHAP fields of a new server's record: a random secret per server (and one for the target)."""
    if mode == "off":
        return {}
    out = {"chap_user": f"node-{uuid}", "chap_secret": new_secret()}
    if mode == "mutual":
        out |= {"chap_mutual_user": f"target-{uuid}", "chap_mutual_secret": new_secret()}
    return out


def target_auth(server: ServerRow, initiator: str) -> TargetAuth:
    """The target's ACL: the server's CHAP account when it has one, and its node's initiator name."""
    if not server.chap_secret:
        return TargetAuth(initiator_names=(initiator,))
    return TargetAuth(chap_user=server.chap_user, chap_secret=server.chap_secret,
                      chap_mutual_user=server.chap_mutual_user or None,
                      chap_mutual_secret=server.chap_mutual_secret or None, initiator_names=(initiator,))


def server_serial(volume: str) -> str:
    # Stable for the volume's whole life: derived from its name, never from its position.
    return hashlib.sha256(volume.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class CreateServer:
    uuid: str
    template: str
    profile: str
    owner: str
    macs: tuple[str, ...] = ()
    data_gb: tuple[int, ...] = ()
    hostname: str = ""
    address: str = ""


@dataclass
class ReconcileReport:
    repaired: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, list[str]]:
        return {"repaired": self.repaired, "problems": self.problems}


TemplateBuilder = Callable[[str, str, str, Callable[[str], None]], Awaitable[TemplateVersion]]


class Provisioner:
    def __init__(
        self,
        store: AsyncStore,
        backend: VolumeBackend,
        driver: ExportDriver,
        events: EventBus,
        *,
        iqn_prefix: str,
        profiles: Sequence[str],
        default_profile: str,
        on_change: Callable[[], None] = lambda: None,
        chap: ChapMode = "on",
    ) -> None:
        self.store = store
        self.backend = backend
        self.driver = driver
        self.events = events
        self.iqn_prefix = iqn_prefix
        self.profiles = tuple(profiles)
        self.default_profile = default_profile
        self.chap: ChapMode = chap
        self.on_change = on_change  # the boot index refreshes from the store when told
        self.exports = ExportManager(driver, self.desired_targets)
        self.services: dict[str, bool] = dict.fromkeys(SERVICES, True)
        self._locks: dict[str, asyncio.Lock] = {}
        self._template_locks: dict[str, asyncio.Lock] = {}
        self.template_builder: TemplateBuilder | None = None
        self.source_check: Callable[[str], Awaitable[object]] | None = None
        self.builds: dict[str, dict[str, Any]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        """A background workflow; kept referenced until done so it is never garbage-collected."""
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def drain(self) -> None:
        """Wait for running workflows (tests, and a clean stop)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    # --- helpers ---------------------------------------------------------------------------------

    def _db(self, fn: Callable[..., Any], *args: Any) -> Awaitable[Any]:
        return self.store.call(fn, *args)

    def _lock(self, uuid: str) -> asyncio.Lock:
        return self._locks.setdefault(uuid, asyncio.Lock())

    def iqn(self, uuid: str) -> str:
        return f"{self.iqn_prefix}:{uuid}"

    def initiator(self, uuid: str) -> str:
        return f"{self.iqn_prefix}:node-{uuid}"

    def _step(self, uuid: str, workflow: str, step: str, **more: object) -> None:
        self.events.publish("workflow", {"server": uuid, "workflow": workflow, "step": step, **more})

    async def load_services(self) -> None:
        stored = await self._db(self.store.sync.services)
        self.services.update({k: v for k, v in stored.items() if k in SERVICES})

    async def set_service(self, name: str, enabled: bool) -> None:
        if name not in SERVICES:
            raise NotFound(f"no service {name!r} (services: {', '.join(SERVICES)})")
        await self._db(self.store.sync.set_service, name, enabled)
        self.services[name] = enabled
        self.events.publish("service", {"service": name, "enabled": enabled})

    def _need_export_service(self) -> None:
        if not self.services["export"]:
            raise ServiceDisabled("the export service is disabled; enable it to change exports")

    async def desired_targets(self) -> list[TargetSpec]:
        servers, volumes = await self._db(_snapshot, self.store.sync)
        by_server: dict[str, list[VolumeRow]] = {}
        for v in volumes:
            if v.state == "available":
                by_server.setdefault(v.server, []).append(v)
        targets = []
        for s in servers:
            if s.state not in EXPORTED_STATES:
                continue
            luns = tuple(
                LunSpec(volume=v.name, path=self.backend.path(v.name), index=v.idx, size=v.size,
                        serial=v.serial, device_id=f"cello-{v.serial}")
                for v in by_server.get(s.uuid, [])
            )
            if luns:
                targets.append(TargetSpec(iqn=self.iqn(s.uuid), luns=luns,
                                          auth=target_auth(s, self.initiator(s.uuid))))
        return targets

    async def apply_exports(self, reason: str) -> ExportState:
        state = await self.exports.apply()
        self.events.publish("export", {"reason": reason, "targets": len(state.targets),
                                       "available": state.available, "detail": state.detail})
        self.on_change()
        return state

    # --- validation ------------------------------------------------------------------------------

    async def validate_create(self, raw: Mapping[str, Any], owner: str) -> CreateServer:
        uuid = _str(raw, "uuid").lower()
        if not UUID_RE.fullmatch(uuid):
            raise InvalidRequest("uuid: must be a UUID like 3f1c2b4e-0000-4000-8000-000000000001")
        if uuid in ("00000000-0000-0000-0000-000000000000", "ffffffff-ffff-ffff-ffff-ffffffffffff"):
            raise InvalidRequest("uuid: all-zero and all-one UUIDs are what broken boards report; give the MAC")
        template = _str(raw, "template")
        if not NAME_RE.fullmatch(template):
            raise InvalidRequest("template: not a template name")
        profile = raw.get("profile", self.default_profile)
        if not isinstance(profile, str) or profile not in self.profiles:
            raise InvalidRequest(f"profile: must be one of {', '.join(self.profiles)}")
        macs_raw = raw.get("macs", [])
        if not isinstance(macs_raw, list) or not all(isinstance(m, str) for m in macs_raw) or len(macs_raw) > 16:
            raise InvalidRequest("macs: must be a list of up to 16 MAC addresses")
        macs = tuple(sorted({m.lower().replace("-", ":") for m in macs_raw}))
        for m in macs:
            if not MAC_RE.fullmatch(m):
                raise InvalidRequest(f"macs: {m!r} is not a MAC address")
        dv = raw.get("data_volumes", [])
        if not isinstance(dv, list) or len(dv) > MAX_DATA_VOLUMES:
            raise InvalidRequest(f"data_volumes: must be a list of at most {MAX_DATA_VOLUMES}")
        sizes = tuple(_size_gb(d, f"data_volumes[{i}]") for i, d in enumerate(dv))
        hostname = raw.get("hostname", "")
        if not isinstance(hostname, str) or (hostname and not HOST_RE.fullmatch(hostname)):
            raise InvalidRequest("hostname: must be a DNS label")
        address = raw.get("address", "")
        if not isinstance(address, str) or (address and not re.fullmatch(r"\d{1,3}(\.\d{1,3}){3}", address)):
            raise InvalidRequest("address: must be an IPv4 address")
        extra = set(raw) - {"uuid", "template", "profile", "macs", "data_volumes", "hostname", "address", "user"}
        if extra:
            raise InvalidRequest(f"unknown field(s): {', '.join(sorted(extra))}")
        return CreateServer(uuid, template, profile, owner, macs, sizes, hostname, address)

    async def quota_for(self, owner: str) -> User:
        user = await self._db(self.store.sync.user, owner)
        if user is None:
            raise InvalidRequest(f"user: no user {owner!r}")
        assert isinstance(user, User)
        return user

    # --- create ----------------------------------------------------------------------------------

    async def create_server(self, req: CreateServer) -> ServerRow:
        """Validate, reserve quota and record `creating`; the rest runs as a background workflow."""
        self._need_export_service()
        tv = await self._db(self.store.sync.newest_version, req.template)
        if tv is None:
            raise InvalidRequest(f"template: no template {req.template!r} with a built version")
        user = await self.quota_for(req.owner)
        now = time.time()
        row = ServerRow(uuid=req.uuid, template=req.template, version=tv.version, profile=req.profile,
                        owner=req.owner, state="creating", reason="", macs=req.macs, hostname=req.hostname,
                        address=req.address, created_at=now, updated_at=now, **chap_for(req.uuid, self.chap))
        vols = [VolumeRow(names.os_volume(req.template, req.uuid), req.uuid, "os", 0, tv.size, "creating",
                          server_serial(names.os_volume(req.template, req.uuid)))]
        for i, gb in enumerate(req.data_gb, start=1):
            name = names.data_volume(req.template, req.uuid, i)
            vols.append(VolumeRow(name, req.uuid, "data", i, gb * GiB, "creating", server_serial(name)))
        if isinstance(self.driver, LimitedDriver):  # ctld: CTL's port and LUN tables are fixed at boot
            servers, volumes = await self._db(_snapshot, self.store.sync)
            live = {s.uuid for s in servers if s.state in ("creating", *EXPORTED_STATES)}
            luns = sum(1 for v in volumes if v.server in live) + len(vols)
            if (problem := self.driver.refusal(len(live) + 1, luns)) is not None:
                raise Conflict(f"server {req.uuid} does not fit the iSCSI target: {problem}")
        await self._db(self.store.sync.create_server, row, vols, _quota_check(user))
        self._step(req.uuid, "create", "recorded", state="creating")
        return row

    async def run_create(self, uuid: str) -> None:
        async with self._lock(uuid):
            server = await self._db(self.store.sync.server, uuid)
            if server is None or server.state != "creating":
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
                    await self._db(self.store.sync.set_volume_state, v.name, "available")
                await self._db(self.store.sync.set_server_state, uuid, "exporting")
                self._step(uuid, "create", "export")
                state = await self.apply_exports(f"create {uuid}")
                if state.available and self.iqn(uuid) not in state.targets:
                    raise StorageError(f"target {self.iqn(uuid)} did not appear ({state.detail or 'no detail'})")
                await self._db(self.store.sync.set_server_state, uuid, "available")
                self._step(uuid, "create", "done", state="available")
            except Exception as e:
                reason = _reason(e)
                log.warning("create %s failed: %s", uuid, reason)
                await self._compensate_create(uuid, made, reason)
            finally:
                self.on_change()

    async def _compensate_create(self, uuid: str, made: Sequence[str], reason: str) -> None:
        # Leave the desired exports first ("creating" is not exported), so no LUN points at a volume
        # about to go; the record says `error` only once the cleanup is over.
        await self._db(self.store.sync.set_server_state, uuid, "creating", f"failed, cleaning up: {reason}")
        problems = []
        try:
            await self.apply_exports(f"undo create {uuid}")
        except Exception as e:
            problems.append(f"unexport: {_reason(e)}")
        for name in reversed(made):
            try:
                await self._destroy(name)
            except Exception as e:
                problems.append(f"destroy {name}: {_reason(e)}")
        if not problems:
            for v in await self._db(self.store.sync.volumes, uuid):
                await self._db(self.store.sync.delete_volume, v.name)  # releases their quota
        detail = reason + ("" if not problems else " (cleanup: " + "; ".join(problems) + ")")
        await self._db(self.store.sync.set_server_state, uuid, "error", detail)
        self._step(uuid, "create", "failed", state="error", reason=detail)

    # --- delete ----------------------------------------------------------------------------------

    async def delete_server(self, uuid: str, *, may_act_for: Callable[[str], bool] = lambda owner: True) -> None:
        """Unexport, destroy the volumes, forget the server; `error_deleting` (and raise) on failure.

        A server whose owner `may_act_for` refuses is not found, exactly as a missing one. Deletes
        coalesce like creates: each waits for the shared export apply that starts after it marked
        its server `deleting`, and that apply's closing show is what says its target is gone before
        any volume is destroyed.
        """
        self._need_export_service()
        async with self._lock(uuid):
            server, volumes = await self._db(_begin_delete, self.store.sync, uuid, may_act_for)
            if server is None:
                raise NotFound(f"no server {uuid}")
            if server.state in ("creating", "exporting"):
                raise Conflict(f"server {uuid} is being created; retry when it is available or error")
            self._step(uuid, "delete", "unexport", state="deleting")
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
                    await self._destroy(v.name)
                    destroyed.append(v.name)
                await self._db(_forget_server, self.store.sync, uuid, destroyed)
                self._step(uuid, "delete", "done", state="deleted")
            except Exception as e:
                reason = _reason(e)
                # The rows of the volumes already destroyed go (their quota with them); the rest stay,
                # so a retry or reconcile destroys exactly what is left.
                await self._db(_fail_delete, self.store.sync, uuid, destroyed, reason)
                self._step(uuid, "delete", "failed", state="error_deleting", reason=reason)
                self.on_change()
                raise StorageError(f"delete {uuid} failed: {reason}") from e
            finally:
                self._locks.pop(uuid, None)

    async def _destroy(self, name: str) -> None:
        # Backends treat a missing volume as done (compensations repeat); the guard refuses a volume
        # that the last applied export state still serves.
        await self.backend.destroy(name, exported=self.exports.exported)

    # --- data volumes ----------------------------------------------------------------------------

    async def add_data_volume(self, uuid: str, size_gb: int) -> VolumeRow:
        self._need_export_service()
        async with self._lock(uuid):
            server = await self._server_in(uuid, "available")
            user = await self.quota_for(server.owner)
            existing = await self._db(self.store.sync.volumes, uuid)
            idx = max((v.idx for v in existing), default=0) + 1
            name = names.data_volume(server.template, uuid, idx)
            row = VolumeRow(name, uuid, "data", idx, size_gb * GiB, "creating", server_serial(name))
            await self._db(self.store.sync.add_volume, row, server.owner, _quota_check(user))
            made = False
            try:
                await self.backend.create_data(server.template, uuid, idx, row.size)
                made = True
                await self._db(self.store.sync.set_volume_state, name, "available")
                state = await self.apply_exports(f"add volume {name}")
                if state.available and name not in state.targets.get(self.iqn(uuid), {}):
                    raise StorageError(f"LUN for {name} did not appear")
            except Exception as e:
                await self._db(self.store.sync.set_volume_state, name, "error")
                if made:
                    try:
                        await self.apply_exports(f"undo add volume {name}")
                        await self._destroy(name)
                    except Exception as cleanup:
                        raise StorageError(f"{_reason(e)}; cleanup failed: {_reason(cleanup)}") from e
                await self._db(self.store.sync.delete_volume, name)
                raise StorageError(_reason(e)) from e
            self._step(uuid, "add-volume", "done", volume=name)
            return VolumeRow(name, uuid, "data", idx, row.size, "available", row.serial)

    async def remove_data_volume(self, uuid: str, name: str) -> None:
        self._need_export_service()
        async with self._lock(uuid):
            await self._server_in(uuid, "available")
            vol = await self._db(self.store.sync.volume, name)
            if vol is None or vol.server != uuid:
                raise NotFound(f"server {uuid} has no volume {name}")
            if vol.kind == "os":
                raise InvalidRequest("the OS volume goes only with its server")
            await self._db(self.store.sync.set_volume_state, name, "deleting")
            state = await self.apply_exports(f"remove volume {name}")
            if name in state.targets.get(self.iqn(uuid), {}):
                await self._db(self.store.sync.set_volume_state, name, "error")
                raise StorageError(f"LUN for {name} is still exported; not destroying it")
            await self._destroy(name)
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

    # --- templates -------------------------------------------------------------------------------

    def _template_lock(self, name: str) -> asyncio.Lock:
        return self._template_locks.setdefault(name, asyncio.Lock())

    async def start_build(self, name: str, source: str) -> dict[str, Any]:
        if not NAME_RE.fullmatch(name):
            raise InvalidRequest("name: templates are named [a-z0-9][a-z0-9_.-]*, up to 63 chars")
        if self.template_builder is None:
            raise InvalidRequest("template builds are not available in this appliance")
        if self._template_lock(name).locked():
            raise Conflict(f"template {name} is already being built")
        if self.source_check is not None:
            try:
                await self.source_check(source)
            except ValueError as e:  # a bad source is the caller's error, said before any work starts
                raise InvalidRequest(f"source: {e}") from None
        build_id = f"{name}-{int(time.time() * 1000)}"
        job: dict[str, Any] = {"id": build_id, "template": name, "source": source, "state": "running",
                               "progress": [], "version": None, "error": None}
        self.builds[build_id] = job
        self.spawn(self._run_build(job), f"build-{build_id}")
        return job

    async def _run_build(self, job: dict[str, Any]) -> None:
        name = job["template"]

        def progress(line: str) -> None:
            job["progress"].append(line)
            self.events.publish("build", {"template": name, "build": job["id"], "line": line})

        assert self.template_builder is not None
        async with self._template_lock(name):
            versions = await self._db(self.store.sync.template_versions, name)
            version = f"v{max((int(v.version[1:]) for v in versions), default=0) + 1}"
            try:
                tv = await self.template_builder(name, version, job["source"], progress)
                await self._db(self.store.sync.add_template_version, tv)
                self.on_change()  # unknown nodes boot the newest version: the boot index must hear of it
            except Exception as e:
                job.update(state="failed", error=_reason(e))
                progress(f"build failed: {_reason(e)}")
                return
            job.update(state="done", version=version)
            progress(f"built {name}@{version}")

    async def delete_template_version(self, name: str, version: str) -> None:
        async with self._template_lock(name):
            versions = {v.version for v in await self._db(self.store.sync.template_versions, name)}
            if version not in versions:
                raise NotFound(f"no template version {name}@{version}")
            clones = await self._db(self.store.sync.clones_of, name, version)
            if clones:
                raise InUseError(f"{name}@{version} has {len(clones)} clone(s): {', '.join(clones[:5])}")
            await self.backend.destroy_snapshot(name, version)
            await self._db(self.store.sync.delete_template_version, name, version)
            self.on_change()
            if versions == {version}:
                await self._destroy(names.template_volume(name))

    # --- reconcile -------------------------------------------------------------------------------

    async def reconcile(self) -> ReconcileReport:
        """Desired (store) vs real (volumes, exports). Repairs what is safe, reports the rest."""
        report = ReconcileReport()
        for server in await self._db(self.store.sync.servers):
            if server.state in ("creating", "exporting") and not self._lock(server.uuid).locked():
                # A crash between steps: the volumes this server made are listed in the store, so
                # undoing them is what the store says; the record ends in error.
                present = {v.name for v in await self.backend.list()}
                made = [v.name for v in await self._db(self.store.sync.volumes, server.uuid) if v.name in present]
                await self._compensate_create(server.uuid, made, "interrupted (appliance restarted mid-create)")
                report.repaired.append(f"server {server.uuid}: stuck in {server.state}, undone, now error")
            elif server.state == "deleting" and not self._lock(server.uuid).locked():
                # A crash mid-delete: the store says this server and its volumes go, so finishing the
                # delete destroys only what the store says should be destroyed.
                try:
                    await self.delete_server(server.uuid)
                    report.repaired.append(f"server {server.uuid}: interrupted delete finished")
                except Exception as e:
                    report.problems.append(f"server {server.uuid}: interrupted delete failed: {_reason(e)}")
        real = {v.name: v for v in await self.backend.list()}
        wanted = {v.name for v in await self._db(self.store.sync.volumes)}
        templates = {names.template_volume(t.template) for t in await self._db(self.store.sync.template_versions)}
        for v in await self._db(self.store.sync.volumes):
            if v.state == "available" and v.name not in real:
                report.problems.append(f"volume {v.name} of server {v.server} is missing from {self.backend.name}")
        for name in sorted(set(real) - wanted - templates):
            report.problems.append(f"volume {name} is not in the store (left alone)")
        if self.services["export"]:
            try:
                state = await self.apply_exports("reconcile")
                desired = {t.iqn for t in await self.desired_targets()}
                if state.available:
                    missing = desired - set(state.targets)
                    extra = set(state.targets) - desired
                    report.problems += [f"target {t} did not come up" for t in sorted(missing)]
                    report.problems += [f"target {t} is exported but not desired" for t in sorted(extra)]
                    report.repaired.append(f"exports applied: {len(state.targets)} target(s)")
                else:
                    report.problems.append(f"exports unavailable: {state.detail}")
            except Exception as e:
                report.problems.append(f"applying exports failed: {_reason(e)}")
        self.events.publish("reconcile", report.as_json())
        return report


def _snapshot(store: Any) -> tuple[list[ServerRow], list[VolumeRow]]:
    return store.servers(), store.volumes()


# The delete workflow's store steps, each one call on the store's thread (one trip through its
# queue, however many rows): a burst of deletes is otherwise a long queue of small writes.

def _begin_delete(store: Any, uuid: str,
                  may_act_for: Callable[[str], bool]) -> tuple[ServerRow | None, list[VolumeRow]]:
    """The server and its volumes; marked `deleting` unless missing, not the caller's, or still being made."""
    server = store.server(uuid)
    if server is not None and not may_act_for(server.owner):
        return None, []
    if server is None or server.state in ("creating", "exporting"):
        return server, []
    store.set_server_state(uuid, "deleting")
    return server, store.volumes(uuid)


def _forget_server(store: Any, uuid: str, volumes: Sequence[str]) -> None:
    for name in volumes:
        store.delete_volume(name)
    store.delete_server(uuid)


def _fail_delete(store: Any, uuid: str, destroyed: Sequence[str], reason: str) -> None:
    for name in destroyed:
        store.delete_volume(name)
    store.set_server_state(uuid, "error_deleting", reason)


def _quota_check(user: User) -> Callable[[int, int], str | None]:
    def check(volumes: int, data_bytes: int) -> str | None:
        if volumes > user.max_volumes:
            return f"quota: user {user.name} may have {user.max_volumes} volumes, this needs {volumes}"
        if data_bytes > user.max_data_gb * GiB:
            return (f"quota: user {user.name} may have {user.max_data_gb} GB of data volumes, "
                    f"this needs {data_bytes // GiB}")
        return None

    return check


def _str(raw: Mapping[str, Any], key: str) -> str:
    value = raw.get(key)
    if not isinstance(value, str) or not value:
        raise InvalidRequest(f"{key}: required string")
    return value


def _size_gb(raw: Any, where: str) -> int:
    if not isinstance(raw, dict) or set(raw) != {"size_gb"}:
        raise InvalidRequest(f'{where}: must be {{"size_gb": N}}')
    size = raw["size_gb"]
    if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= MAX_DATA_GB:
        raise InvalidRequest(f"{where}.size_gb: must be an integer 1..{MAX_DATA_GB}")
    return size


def _reason(e: BaseException) -> str:
    text = str(e) or type(e).__name__
    return text.splitlines()[0][:500] if text else type(e).__name__
