"""Template versions: build a new one (in the background), delete one that has no clones.

A build job is a typed record kept for its callers to poll; finished ones beyond KEEP_FINISHED are
forgotten oldest first, so a long-running appliance does not keep every build's log forever.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Literal

import naming
from domain.errors import Conflict, InvalidRequest, NotFound
from domain.events import EventBus
from domain.store import AsyncStore, Store, TemplateVersion
from domain.tasks import BackgroundTasks, reason
from iscsi import names
from iscsi.model import InUseError, VolumeBackend

# (template, version, source, progress) -> the version's row, once its files and snapshot exist
TemplateBuilder = Callable[[str, str, str, Callable[[str], None]], Awaitable[TemplateVersion]]
SourceCheck = Callable[[str], Awaitable[object]]  # raises ValueError for a source that cannot build
KEEP_FINISHED = 100


@dataclass
class BuildJob:
    id: str
    template: str
    source: str
    state: Literal["running", "done", "failed"] = "running"
    progress: list[str] = field(default_factory=list)
    version: str | None = None
    error: str | None = None

    def as_json(self) -> dict[str, object]:
        return {"id": self.id, "template": self.template, "source": self.source, "state": self.state,
                "progress": list(self.progress), "version": self.version, "error": self.error}


class TemplateWorkflows:
    def __init__(self, store: AsyncStore, backend: VolumeBackend, events: EventBus, tasks: BackgroundTasks, *,
                 builder: TemplateBuilder | None, source_check: SourceCheck | None,
                 destroy: Callable[[str], Awaitable[None]], on_change: Callable[[], None],
                 appliance: str = "local") -> None:
        self._store = store
        self.appliance = appliance  # the other appliances of a fleet destroy their copies themselves
        self._backend = backend
        self._events = events
        self._tasks = tasks
        self._builder = builder
        self._source_check = source_check
        self._destroy = destroy  # a volume, guarded against one still exported
        self._on_change = on_change  # unknown nodes boot the newest version: the boot index must hear
        self._locks: dict[str, asyncio.Lock] = {}
        self.builds: OrderedDict[str, BuildJob] = OrderedDict()

    def _lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())

    async def start_build(self, name: str, source: str) -> BuildJob:
        naming.TEMPLATE.check(name, InvalidRequest, "name")
        if self._builder is None:
            raise InvalidRequest("template builds are not available in this appliance")
        if self._lock(name).locked():
            raise Conflict(f"template {name} is already being built")
        if self._source_check is not None:
            try:
                await self._source_check(source)
            except ValueError as e:  # a bad source is the caller's error, said before any work starts
                raise InvalidRequest(f"source: {e}") from None
        job = BuildJob(f"{name}-{int(time.time() * 1000)}", name, source)
        self.builds[job.id] = job
        self._forget_old()
        self._tasks.spawn(self._run(job), f"build-{job.id}")
        return job

    def _forget_old(self) -> None:
        finished = [k for k, j in self.builds.items() if j.state != "running"]
        for key in finished[:max(0, len(finished) - KEEP_FINISHED)]:
            del self.builds[key]

    async def _run(self, job: BuildJob) -> None:
        def progress(line: str) -> None:
            job.progress.append(line)
            self._events.publish("build", {"template": job.template, "build": job.id, "line": line})

        assert self._builder is not None
        async with self._lock(job.template):
            versions = await self._store.call(self._store.sync.template_versions, job.template)
            version = f"v{max((naming.version_number(v.version) for v in versions), default=0) + 1}"
            try:
                tv = await self._builder(job.template, version, job.source, progress)
                await self._store.call(self._store.sync.add_template_version, tv)
                self._on_change()
            except Exception as e:
                job.state, job.error = "failed", reason(e)
                progress(f"build failed: {reason(e)}")
                return
            job.state, job.version = "done", version
            progress(f"built {job.template}@{version}")

    async def delete_version(self, name: str, version: str) -> None:
        async with self._lock(name):
            versions = {v.version for v in await self._store.call(self._store.sync.template_versions, name)}
            if version not in versions:
                raise NotFound(f"no template version {name}@{version}")
            clones = await self._store.call(self._store.sync.clones_of, name, version)
            if clones:
                raise InUseError(f"{name}@{version} has {len(clones)} clone(s): {', '.join(clones[:5])}")
            await self._backend.destroy_snapshot(name, version)
            await self._store.call(self._store.sync.delete_template_version, name, version, self.appliance)
            self._on_change()
            if versions == {version}:
                await self._destroy(names.template_volume(name))

    async def listing(self, name: str | None = None) -> list[tuple[str, list[tuple[TemplateVersion, int]]]]:
        """(template, [(version, clones)]) sorted by name; one template when `name` is given."""
        return await self._store.call(_listing, self._store.sync, name)


def _listing(store: Store, name: str | None) -> list[tuple[str, list[tuple[TemplateVersion, int]]]]:
    grouped: dict[str, list[tuple[TemplateVersion, int]]] = {}
    for tv in store.template_versions(name):
        grouped.setdefault(tv.template, []).append((tv, len(store.clones_of(tv.template, tv.version))))
    return sorted(grouped.items())
