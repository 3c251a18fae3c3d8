"""Rolling upgrades: the servers a label selector names, upgraded in waves of `batch`, each wave waiting
until its nodes are back on their roots (with `reboot`), halting once more than `max_failures` failed.

The plan (which servers, in which order) is said before anything is touched; the job reports per node
what happened: upgraded (and to what), failed (and why), or not reached because the upgrade halted.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from domain.lifecycle import Lifecycle
from domain.states import ServerState
from domain.tasks import BackgroundTasks, reason

KEEP_JOBS = 50


@dataclass
class UpgradeJob:
    id: str
    selector: dict[str, str]
    to: str | None
    batch: int
    max_failures: int
    waves: list[list[str]]
    state: Literal["running", "done", "halted"] = "running"
    nodes: dict[str, dict[str, object]] = field(default_factory=dict)  # uuid -> {"state": ..., ...}

    @property
    def failures(self) -> int:
        return sum(1 for n in self.nodes.values() if n["state"] == "failed")

    def as_json(self) -> dict[str, object]:
        return {"id": self.id, "selector": self.selector, "to": self.to, "batch": self.batch,
                "max_failures": self.max_failures, "waves": self.waves, "state": self.state,
                "nodes": self.nodes, "failures": self.failures}


def matches(labels: Mapping[str, str], selector: Mapping[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


class RollingUpgrades:
    def __init__(self, lifecycle: Lifecycle, tasks: BackgroundTasks) -> None:
        self.lifecycle = lifecycle
        self.tasks = tasks
        self.jobs: dict[str, UpgradeJob] = {}

    async def plan(self, selector: Mapping[str, str]) -> list[str]:
        """The servers the selector names, oldest first: what an upgrade would touch, in its order."""
        servers, _ = await self.lifecycle.servers.listing()
        return [s.uuid for s in servers if matches(s.label_map, selector)]

    async def start(self, selector: Mapping[str, str], to: str | None, *, batch: int, max_failures: int,
                    reboot: bool, discard_old: bool) -> UpgradeJob:
        plan = await self.plan(selector)
        waves = [plan[i:i + batch] for i in range(0, len(plan), batch)]
        job = UpgradeJob(f"upgrade-{int(time.time() * 1000)}", dict(selector), to, batch, max_failures, waves,
                         nodes={u: {"state": "pending"} for u in plan})
        self.jobs[job.id] = job
        for old in list(self.jobs)[:-KEEP_JOBS]:
            if self.jobs[old].state != "running":
                del self.jobs[old]
        self.tasks.spawn(self._run(job, reboot, discard_old), job.id)
        return job

    async def _run(self, job: UpgradeJob, reboot: bool, discard_old: bool) -> None:
        events = self.lifecycle.servers.events
        for n, wave in enumerate(job.waves, 1):
            events.publish("upgrade", {"upgrade": job.id, "wave": n, "servers": wave})
            await asyncio.gather(*(self._one(job, uuid, reboot, discard_old) for uuid in wave))
            if job.failures > job.max_failures:
                job.state = "halted"
                for later in job.waves[n:]:
                    for uuid in later:
                        job.nodes[uuid] = {"state": "not reached", "why": "the failure budget was spent"}
                events.publish("upgrade", {"upgrade": job.id, "halted": True, "after_wave": n,
                                           "failures": job.failures})
                return
        job.state = "done"

    async def _one(self, job: UpgradeJob, uuid: str, reboot: bool, discard_old: bool) -> None:
        job.nodes[uuid] = {"state": "upgrading"}
        try:
            report = await self.lifecycle.rebuild(uuid, job.to, discard_old=discard_old, reboot=reboot)
        except Exception as e:
            job.nodes[uuid] = {"state": "failed", "why": reason(e)}
            return
        ok = not reboot or "reached root" in report.powered
        job.nodes[uuid] = {"state": "upgraded" if ok else "failed", **report.as_json()}
        if not ok:
            job.nodes[uuid]["why"] = "; ".join(report.problems) or "the node did not reach its root"
        server = await self.lifecycle.servers.get(uuid)
        if server.state != ServerState.AVAILABLE:
            job.nodes[uuid]["state"] = "failed"
