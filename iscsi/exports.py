"""Export policy around the drivers: coalescing bursts of changes, the "none" driver, driver choice.

`ExportManager.apply()` is what callers await after changing the desired state. Concurrent callers
share one in-flight apply or the next queued one: a caller's apply always STARTS after its call, so
it sees its own change, and 100 servers created at once cost a few applies, not 100.
"""

from __future__ import annotations

import asyncio
import shutil
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Literal

from iscsi import names
from iscsi.ctld import CtldDriver
from iscsi.model import ExportDriver, ExportState, InUseError, Session, TargetSpec
from iscsi.runner import CommandRunner
from iscsi.tgt import TgtDriver

DesiredState = Callable[[], Awaitable[Sequence[TargetSpec]]]


class NullDriver:
    """For hosts without iSCSI target software: exports nothing and says why."""

    name = "none"

    def __init__(self, reason: str = "no iSCSI target software (ctld or tgt) on this host") -> None:
        self.reason = reason

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    async def teardown(self, iqn_prefix: str | None = None) -> int:
        return 0

    async def sessions(self, iqn: str) -> list[Session]:
        return []

    async def apply(self, targets: Sequence[TargetSpec]) -> ExportState:
        return ExportState({}, available=False, detail=self.reason)

    async def actual(self) -> ExportState:
        return ExportState({}, available=False, detail=self.reason)

    def lun_number(self, index: int) -> int:
        return index


DriverKind = Literal["auto", "ctld", "tgt", "none"]


def choose_driver(
    kind: DriverKind,
    portals: Sequence[str],
    *,
    ctl_conf: Path = Path("/etc/ctl.conf"),
    tgt_control_port: int = 7,
    tgt_manage_daemon: bool = True,
    state_dir: Path = Path("."),
    runner: CommandRunner | None = None,
    platform: str = sys.platform,
    which: Callable[[str], str | None] = shutil.which,
    on_fatal: Callable[[BaseException], None] | None = None,
) -> ExportDriver:
    """auto = ctld on FreeBSD, tgt where `tgtadm` is on PATH, else none."""
    if kind == "auto":
        if platform.startswith("freebsd"):
            kind = "ctld"
        elif which("tgtadm") is not None and (not tgt_manage_daemon or which("tgtd") is not None):
            kind = "tgt"
        else:
            return NullDriver("driver auto: not FreeBSD and no tgtadm/tgtd on PATH (install tgt)")
    if kind == "ctld":
        return CtldDriver(ctl_conf, portals, runner)
    if kind == "tgt":
        return TgtDriver(tgt_control_port, portals, manage_daemon=tgt_manage_daemon, runner=runner,
                         state_dir=state_dir, on_fatal=on_fatal)
    if kind == "none":
        return NullDriver("iSCSI driver is configured as none")
    raise ValueError(f"unknown iSCSI driver {kind!r} (auto, ctld, tgt or none)")


class ExportManager:
    def __init__(self, driver: ExportDriver, desired: DesiredState) -> None:
        self.driver = driver
        self._desired = desired
        self._worker: asyncio.Task[None] | None = None
        self._next: asyncio.Future[ExportState] | None = None
        self.applies = 0
        self.last_state: ExportState | None = None

    async def apply(self) -> ExportState:
        """Apply the whole desired state; returns the state that a run started after this call produced."""
        loop = asyncio.get_running_loop()
        if self._next is None:
            self._next = loop.create_future()
            # retrieve exceptions even if every waiter was cancelled (no "never retrieved" warnings)
            self._next.add_done_callback(lambda f: f.cancelled() or f.exception())
        fut = self._next
        if self._worker is None:
            self._worker = asyncio.create_task(self._run(), name="iscsi-export-apply")
        return await asyncio.shield(fut)

    async def _run(self) -> None:
        try:
            while self._next is not None:
                fut, self._next = self._next, None
                self.applies += 1
                try:
                    targets = await self._desired()
                    state = await self.driver.apply(targets)
                except asyncio.CancelledError:
                    fut.cancel()
                    raise
                except Exception as exc:
                    fut.set_exception(exc)
                else:
                    self.last_state = state
                    fut.set_result(state)
        finally:
            self._worker = None
            if self._next is not None and not self._next.done():
                self._next.cancel()
                self._next = None

    async def stop(self) -> None:
        """Cancel a running apply (callers get CancelledError). Idempotent."""
        worker = self._worker
        if worker is not None:
            worker.cancel()
            await asyncio.gather(worker, return_exceptions=True)

    def exported(self, volume: str) -> bool:
        """Whether the last applied real state still serves `volume` (a guard for `backend.destroy`)."""
        state = self.last_state
        return state is not None and any(volume in luns for luns in state.targets.values())

    async def ensure_unexported(self, volume: str) -> None:
        """Apply (the caller has removed `volume` from the desired state) and confirm its LUN is gone.

        Call before `backend.destroy(volume)`; raises InUseError if a driver still serves it.
        """
        names.volume(volume)
        state = await self.apply()
        if any(volume in luns for luns in state.targets.values()):
            raise InUseError(f"volume {volume} is still exported; remove it from its target first")
        actual = await self.driver.actual()
        if any(volume in luns for luns in actual.targets.values()):
            raise InUseError(f"volume {volume} is still exported by {self.driver.name}")
