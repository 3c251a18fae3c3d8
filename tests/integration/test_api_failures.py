"""Every failure point of create and delete, injected in turn into the real backend/driver (thin
wrappers that raise at the chosen call): no orphan volume, no stale export, no leaked quota, the record
in `error`/`error_deleting` with a reason, and a clean reconcile. A crash between steps is a
BaseException that ends the workflow mid-way; the restart is a new appliance on the same state dir."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from appliance.app import Appliance
from appliance.config import load_config
from iscsi.model import ExportDriver, ExportState, StorageError, TargetSpec, VolumeBackend
from tests.integration.test_api_stack import Stack, needs_tgt, open_stack, uuid_n

pytestmark = needs_tgt


class Crash(BaseException):
    """The process dies here (nothing after this point of the workflow runs)."""


class FailingBackend:
    def __init__(self, real: VolumeBackend, method: str, exc: BaseException, nth: int = 1) -> None:
        self.real, self.method, self.exc, self.nth = real, method, exc, nth
        self.calls = 0
        self.armed = True

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.real, name)
        if name != self.method:
            return attr

        async def maybe_fail(*args: Any, **kw: Any) -> Any:
            self.calls += 1
            if self.armed and self.calls == self.nth:
                raise self.exc
            return await attr(*args, **kw)

        return maybe_fail


class FailingDriver:
    """Fails `apply` when the desired state contains (or, with when_absent, lacks) the watched target."""

    def __init__(self, real: ExportDriver, iqn: str, *, exc: BaseException | None = None,
                 drop: bool = False, when_absent: bool = False) -> None:
        self.real, self.iqn, self.exc, self.drop, self.when_absent = real, iqn, exc, drop, when_absent
        self.armed = True
        self.name = real.name

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    async def apply(self, targets: Sequence[TargetSpec]) -> ExportState:
        present = any(t.iqn == self.iqn for t in targets)
        if self.armed and present != self.when_absent:
            self.armed = False
            if self.exc is not None:
                raise self.exc
            if self.drop:  # the driver "applies" but the target does not come up
                state = await self.real.apply([t for t in targets if t.iqn != self.iqn])
                return state
        return await self.real.apply(targets)


UUID = uuid_n(40)
IQN = f"iqn.2026-11.io.cello:{UUID}"


async def create_and_wait(s: Stack, data: int = 2) -> dict[str, Any]:
    await s.add_user("alice")
    status, body = await s.create(UUID, data_volumes=[{"size_gb": 1}] * data)
    assert status == 202, body
    await s.wait_state(UUID)
    await s.domain.tasks.drain()  # `error` is recorded first (to leave the exports), then the cleanup runs
    return await s.wait_state(UUID)


async def assert_failed_clean(s: Stack, reason_part: str) -> None:
    status, server = await s.req("GET", f"/api/v1/servers/{UUID}")
    assert server["state"] == "error" and reason_part in server["reason"], server
    assert server["volumes"] == []
    await s.assert_clean()
    status, user = await s.req("GET", "/api/v1/users/alice")
    assert user["used_volumes"] == 0 and user["used_data_gb"] == 0
    status, _ = await s.req("DELETE", f"/api/v1/servers/{UUID}")  # an error record can be deleted
    assert status == 204
    await s.assert_clean()


@pytest.mark.parametrize(("method", "nth"), [("clone_os", 1), ("create_data", 1), ("create_data", 2)])
async def test_failing_volume_step(tmp_path: Path, method: str, nth: int) -> None:
    wrap = lambda b: FailingBackend(b, method, StorageError(f"injected {method} failure"), nth)  # noqa: E731
    async with open_stack(tmp_path, wrap_backend=wrap) as s:
        server = await create_and_wait(s)
        assert server["state"] == "error"
        await assert_failed_clean(s, f"injected {method} failure")


async def test_failing_export_apply(tmp_path: Path) -> None:
    wrap = lambda d: FailingDriver(d, IQN, exc=StorageError("injected tgtadm failure"))  # noqa: E731
    async with open_stack(tmp_path, wrap_driver=wrap) as s:
        await create_and_wait(s)
        await assert_failed_clean(s, "injected tgtadm failure")


async def test_target_that_never_appears(tmp_path: Path) -> None:
    wrap = lambda d: FailingDriver(d, IQN, drop=True)  # noqa: E731
    async with open_stack(tmp_path, wrap_driver=wrap) as s:
        await create_and_wait(s)
        await assert_failed_clean(s, "did not appear")


async def test_failing_cleanup_is_reported_then_reconciled(tmp_path: Path) -> None:
    """The clone fails at export and its destroy fails too: the record says so; the next reconcile
    reports the orphan it left (never destroying what the store does not list)."""
    backend: list[FailingBackend] = []

    def wrap(b: VolumeBackend) -> VolumeBackend:
        backend.append(FailingBackend(b, "destroy", StorageError("injected destroy failure")))
        return backend[0]  # type: ignore[return-value]

    drv = lambda d: FailingDriver(d, IQN, exc=StorageError("injected tgtadm failure"))  # noqa: E731
    async with open_stack(tmp_path, wrap_backend=wrap, wrap_driver=drv) as s:
        server = await create_and_wait(s, data=0)
        assert server["state"] == "error" and "cleanup: destroy" in server["reason"]
        # the volume row stays (the store still owns the volume), so it is not an orphan
        assert [v["name"] for v in server["volumes"]] == [f"tiny-OS-{UUID}"]
        status, _ = await s.req("DELETE", f"/api/v1/servers/{UUID}")
        assert status == 204
        await s.assert_clean()


async def restart(s: Stack, backend: VolumeBackend, driver: ExportDriver) -> Appliance:
    """The appliance restarted: built again from its config on the same state dir (a new store
    connection), with the real backend and driver; the caller reconciles, as a start does."""
    await s.domain.tasks.drain()
    again = Appliance.build(load_config(s.root / "cello.toml"), backend=backend, driver=driver)
    await again.built.start()
    return again


@pytest.mark.parametrize("where", ["after-os-clone", "after-data-volume", "before-export"])
async def test_crash_mid_create_then_restart(tmp_path: Path, where: str) -> None:
    backends: list[FailingBackend] = []


    def wrap(b: VolumeBackend) -> VolumeBackend:
        nth = 1 if where == "after-os-clone" else 2
        backends.append(FailingBackend(b, "create_data" if where != "before-export" else "none", Crash(), nth))
        return backends[0]  # type: ignore[return-value]

    async with open_stack(tmp_path, wrap_backend=wrap) as s:
        apply_exports = s.servers.apply_exports

        async def crashing(reason: str) -> ExportState:
            if where == "before-export" and reason.startswith("create"):
                raise Crash()
            return await apply_exports(reason)

        s.servers.apply_exports = crashing  # type: ignore[method-assign]
        await s.add_user("alice")
        status, _ = await s.create(UUID, data_volumes=[{"size_gb": 1}, {"size_gb": 1}])
        assert status == 202
        await s.domain.tasks.drain()
        stuck = await s.store.call(s.store.sync.server, UUID)
        assert stuck is not None and stuck.state in ("creating", "exporting")
        made = [v.name for v in await s.backend.list() if UUID in v.name]
        assert made, "the crash must leave something half-made for reconcile to undo"
        again = await restart(s, backends[0].real, s.driver)
        store = again.built.store
        try:
            report = await again.built.reconcile()
            assert any("undone" in line for line in report.repaired), report
            assert report.problems == []
            s.appliance = again
            await s.assert_clean()
            server = await store.call(store.sync.server, UUID)
            assert server is not None and server.state == "error" and "interrupted" in server.reason
            assert await store.call(store.sync.usage, "alice") == (0, 0)
        finally:
            await again.built.stop()


async def test_delete_failures_keep_volumes_until_unexported(tmp_path: Path) -> None:
    drivers: list[FailingDriver] = []

    def wrap(d: ExportDriver) -> ExportDriver:
        drivers.append(FailingDriver(d, IQN, exc=StorageError("injected unexport failure"), when_absent=True))
        drivers[0].armed = False
        return drivers[0]  # type: ignore[return-value]

    async with open_stack(tmp_path, wrap_driver=wrap) as s:
        server = await create_and_wait(s)
        assert server["state"] == "available"
        drivers[0].armed = True
        status, body = await s.req("DELETE", f"/api/v1/servers/{UUID}")
        assert status == 500 and body["error"] == "storage_error" and "injected unexport failure" in body["detail"]
        status, server = await s.req("GET", f"/api/v1/servers/{UUID}")
        assert server["state"] == "error_deleting" and "injected unexport failure" in server["reason"]
        # still exported, so nothing was destroyed under a live LUN
        assert len(await s.backend.list()) == 4  # template + OS + 2 data
        status, _ = await s.req("DELETE", f"/api/v1/servers/{UUID}")
        assert status == 204
        await s.assert_clean()


async def test_delete_destroy_failure_then_retry(tmp_path: Path) -> None:
    backends: list[FailingBackend] = []

    def wrap(b: VolumeBackend) -> VolumeBackend:
        backends.append(FailingBackend(b, "destroy", StorageError("injected destroy failure"), 2))
        backends[0].armed = False
        return backends[0]  # type: ignore[return-value]

    async with open_stack(tmp_path, wrap_backend=wrap) as s:
        await create_and_wait(s)
        backends[0].armed = True
        status, body = await s.req("DELETE", f"/api/v1/servers/{UUID}")
        assert status == 500 and "injected destroy failure" in body["detail"]
        status, server = await s.req("GET", f"/api/v1/servers/{UUID}")
        assert server["state"] == "error_deleting"
        assert server["target"]["exported"] is False  # unexported before anything was destroyed
        backends[0].armed = False
        status, _ = await s.req("DELETE", f"/api/v1/servers/{UUID}")
        assert status == 204
        await s.assert_clean()


async def test_crash_mid_delete_then_restart(tmp_path: Path) -> None:
    backends: list[FailingBackend] = []

    def wrap(b: VolumeBackend) -> VolumeBackend:
        backends.append(FailingBackend(b, "destroy", Crash(), 2))
        backends[0].armed = False
        return backends[0]  # type: ignore[return-value]

    async with open_stack(tmp_path, wrap_backend=wrap) as s:
        await create_and_wait(s)
        backends[0].armed = True
        with pytest.raises(Crash):
            await s.servers.delete_server(UUID)
        stuck = await s.store.call(s.store.sync.server, UUID)
        assert stuck is not None and stuck.state == "deleting"
        again = await restart(s, backends[0].real, s.driver)
        store = again.built.store
        try:
            report = await again.built.reconcile()
            assert any("interrupted delete finished" in line for line in report.repaired), report
            assert report.problems == []
            s.appliance = again
            await s.assert_clean()
            assert await store.call(store.sync.server, UUID) is None
        finally:
            await again.built.stop()
