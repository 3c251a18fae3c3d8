"""Reconcile: the store (desired) against the volumes and exports (real). Repairs what is safe, reports
the rest, and never destroys a volume that the store does not say should go.

Run at every start (after a crash the store may hold a create or delete that stopped half-way) and on
demand (`POST /api/v1/reconcile`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

from domain.exports import desired_targets
from domain.servers import WAITING, ServerWorkflows
from domain.states import BEING_MADE, ServerState, VolumeState
from domain.store import GONE_IDX, NEW_ROOT_IDX
from domain.tasks import reason
from iscsi import names


@dataclass
class ReconcileReport:
    repaired: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, list[str]]:
        return {"repaired": self.repaired, "problems": self.problems}


async def reconcile(servers: ServerWorkflows) -> ReconcileReport:
    report = ReconcileReport()
    store, backend = servers.store, servers.backend
    # Only this appliance's servers: a fleet's others reconcile their own.
    for server in await store.call(partial(store.sync.servers, appliance=servers.appliance)):
        if server.state in BEING_MADE and not servers.busy(server.uuid) and not server.reason.startswith(WAITING):
            # A crash between steps (a create placed here by another appliance and not yet taken is no
            # crash: the fleet's poll takes it): the volumes this server made are listed in the store, so
            # undoing them is what the store says; the record ends in error.
            present = {v.name for v in await backend.list()}
            made = [v.name for v in await store.call(store.sync.volumes, server.uuid) if v.name in present]
            await servers.compensate_create(server.uuid, made, "interrupted (appliance restarted mid-create)")
            report.repaired.append(f"server {server.uuid}: stuck in {server.state}, undone, now error")
        elif server.state == ServerState.REBUILDING and not servers.busy(server.uuid):
            # A crash mid-swap. The swap itself is one transaction, so the server is on its old root or
            # on its new one, never between: what is left over is a new root never swapped in, or an
            # older restore point the swap replaced. Both go; the server is exported again as it stands.
            try:
                for v in await store.call(store.sync.volumes, server.uuid):
                    if v.idx in (NEW_ROOT_IDX, GONE_IDX):
                        await servers.destroy(v.name)
                        await store.call(store.sync.delete_volume, v.name)
                await store.call(store.sync.set_server_state, server.uuid, ServerState.AVAILABLE,
                                 f"interrupted root swap: on {server.template}@{server.version}")
                report.repaired.append(f"server {server.uuid}: interrupted root swap undone, on "
                                       f"{server.template}@{server.version}")
            except Exception as e:
                report.problems.append(f"server {server.uuid}: interrupted root swap: {reason(e)}")
        elif server.state == ServerState.MOVING and not servers.busy(server.uuid):
            # A restart mid-move: the record never changed hands, so the volumes here are the server's;
            # it stays here and is exported again (the other appliance's partial copy went with its pull).
            await store.call(store.sync.set_moving_to, server.uuid, "")
            await store.call(store.sync.set_server_state, server.uuid, ServerState.AVAILABLE,
                             f"interrupted move to {server.moving_to or '?'}: stays on {servers.appliance}")
            report.repaired.append(f"server {server.uuid}: interrupted move undone, still here")
        elif server.state == ServerState.DELETING and not servers.busy(server.uuid):
            # A crash mid-delete: the store says this server and its volumes go, so finishing the
            # delete destroys only what the store says should be destroyed.
            try:
                await servers.delete_server(server.uuid)
                report.repaired.append(f"server {server.uuid}: interrupted delete finished")
            except Exception as e:
                report.problems.append(f"server {server.uuid}: interrupted delete failed: {reason(e)}")
    real = {v.name: v for v in await backend.list()}
    volumes = await store.call(store.sync.volumes)
    wanted = {v.name for v in volumes}
    templates = {names.template_volume(t.template) for t in await store.call(store.sync.template_versions)}
    here = {s.uuid for s in await store.call(partial(store.sync.servers, appliance=servers.appliance))}
    for v in volumes:
        if v.server in here and v.state == VolumeState.AVAILABLE and v.name not in real:
            report.problems.append(f"volume {v.name} of server {v.server} is missing from {backend.name}")
    for name in sorted(set(real) - wanted - templates):
        report.problems.append(f"volume {name} is not in the store (left alone)")
    if servers.services["export"]:
        try:
            state = await servers.apply_exports("reconcile")
            desired = {t.iqn for t in await desired_targets(store, backend, servers.naming, servers.appliance)}
            if state.available:
                report.problems += [f"target {t} did not come up" for t in sorted(desired - set(state.targets))]
                report.problems += [f"target {t} is exported but not desired"
                                    for t in sorted(set(state.targets) - desired)]
                report.repaired.append(f"exports applied: {len(state.targets)} target(s)")
            else:
                report.problems.append(f"exports unavailable: {state.detail}")
        except Exception as e:
            report.problems.append(f"applying exports failed: {reason(e)}")
    servers.events.publish("reconcile", report.as_json())
    return report
