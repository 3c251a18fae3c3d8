"""Upgrade, rollback, snapshots and rolling upgrades through the real app and domain, on the real file
backend (bytes on disk are checked) with the in-memory export stand-in (its sessions are what a test says;
the real tgtd's session list is tested in test_tgt_survives). Every step of an upgrade is failed in turn:
the server stays on its old root, with no orphan volume and its quota as it was.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from domain.store import TemplateVersion
from iscsi.model import Session, StorageError
from tests.export_standin import InMemoryExports
from tests.integration.test_api_stack import INITRD, KERNEL, TEMPLATE_SIZE, Stack, open_stack, uuid_n

U = uuid_n(0x13)
MARK_AT = 4096  # where each template version leaves its mark, and where the node's "writes" go


def exports(s: Stack) -> InMemoryExports:
    driver = s.driver
    assert isinstance(driver, InMemoryExports)
    return driver


def read_at(path: str, offset: int, n: int = 8) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(n)


def write_at(path: str, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


async def new_version(s: Stack, version: str, mark: bytes) -> None:
    """tiny@vN: the template volume marked, snapshotted and recorded (a build, without the file system)."""
    await asyncio.to_thread(write_at, s.backend.path("tiny-template"), MARK_AT, mark)
    await s.backend.snapshot_template("tiny", version)
    await s.store.call(s.store.sync.add_template_version,
                       TemplateVersion("tiny", version, "tiny", TEMPLATE_SIZE, KERNEL, INITRD, 0.0))


class RecordingSwitch:
    """Stands in for the node's BMC (bmc/ is tested against real emulators): power off ends the node's
    session, power on brings it back, as a real node's boot would."""

    def __init__(self, s: Stack, uuid: str) -> None:
        self.s, self.uuid, self.calls = s, uuid, list[str]()

    async def status(self) -> str:
        return "on" if exports(self.s).logged_in.get(self.s.servers.iqn(self.uuid)) else "off"

    async def power(self, action: str) -> str:
        self.calls.append(action)
        iqn = self.s.servers.iqn(self.uuid)
        if action == "off":
            exports(self.s).logged_in.pop(iqn, None)
            return "off"
        exports(self.s).logged_in[iqn] = [Session(self.s.servers.initiator(self.uuid), "10.77.0.104")]
        return "on"

    async def boot_pxe_once(self) -> None:
        self.calls.append("pxe-once")


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    async with open_stack(tmp_path, exports="memory") as s:
        await s.add_user("alice", max_volumes=8)
        await s.add_user("bob")
        await asyncio.to_thread(write_at, s.backend.path("tiny-template"), MARK_AT, b"tiny-v1!")
        await s.backend.destroy_snapshot("tiny", "v1")  # v1 again, now with its mark
        await s.backend.snapshot_template("tiny", "v1")
        status, body = await s.create(U, data_volumes=[{"size_gb": 1}])
        assert status == 202, body
        assert (await s.wait_state(U))["state"] == "available"
        yield s


async def volumes(s: Stack) -> dict[str, tuple[str, int]]:
    return {v.name: (v.kind, v.idx) for v in await s.servers.volumes_of(U)}


async def test_upgrade_swaps_the_root_keeps_the_data_and_rollback_swaps_back(stack: Stack) -> None:
    s = stack
    data = s.backend.path(f"tiny-DATA-{U}")
    await asyncio.to_thread(write_at, data, MARK_AT, b"userdata")
    await new_version(s, "v2", b"tiny-v2!")
    before = await s.store.call(s.store.sync.server, U)
    assert before is not None

    status, report = await s.req("POST", f"/api/v1/servers/{U}/rebuild", "alice", json={"to": "tiny@v2"})
    assert status == 200, report
    assert (report["before"], report["after"], report["restore_point"]) == ("tiny@v1", "tiny@v2", f"tiny-OS-{U}")
    assert await volumes(s) == {f"tiny-OS-{U}-g2": ("os", 0), f"tiny-OS-{U}": ("prev", -1),
                                f"tiny-DATA-{U}": ("data", 1)}
    assert read_at(s.backend.path(f"tiny-OS-{U}-g2"), MARK_AT) == b"tiny-v2!"  # the new root is v2's clone
    assert read_at(data, MARK_AT) == b"userdata"  # the data volume untouched
    target = exports(s).targets[s.servers.iqn(U)]
    assert target == {f"tiny-OS-{U}-g2": 1, f"tiny-DATA-{U}": 2}  # same LUNs, the restore point not exported
    after = await s.store.call(s.store.sync.server, U)
    assert after is not None and after.version == "v2" and after.chap_secret != before.chap_secret  # rotated
    spec = s.policy.boot_spec(uuid=U, mac=None)
    assert spec is not None and spec.root is not None and spec.root.chap_secret == after.chap_secret

    status, report = await s.req("POST", f"/api/v1/servers/{U}/rollback", "alice", json={})
    assert status == 200, report
    assert (report["before"], report["after"]) == ("tiny@v2", "tiny@v1")
    assert await volumes(s) == {f"tiny-OS-{U}": ("os", 0), f"tiny-OS-{U}-g2": ("prev", -1),
                                f"tiny-DATA-{U}": ("data", 1)}
    assert exports(s).targets[s.servers.iqn(U)] == {f"tiny-OS-{U}": 1, f"tiny-DATA-{U}": 2}

    # a second upgrade replaces the restore point (one per server); --discard-old keeps none
    status, report = await s.req("POST", f"/api/v1/servers/{U}/rebuild", "alice",
                                 json={"to": "tiny", "discard_old": True})
    assert status == 200 and report["after"] == "tiny@v2" and report["restore_point"] is None, report
    assert await volumes(s) == {f"tiny-OS-{U}-g3": ("os", 0), f"tiny-DATA-{U}": ("data", 1)}
    assert {v.name for v in await s.backend.list()} == {"tiny-template", f"tiny-OS-{U}-g3", f"tiny-DATA-{U}"}
    await s.assert_clean()


async def test_a_running_node_is_refused_naming_its_session_and_nothing_changes(stack: Stack) -> None:
    s = stack
    await new_version(s, "v2", b"tiny-v2!")
    iqn = s.servers.iqn(U)
    exports(s).logged_in[iqn] = [Session(s.servers.initiator(U), "10.77.0.104")]
    before = (await volumes(s), await s.store.call(s.store.sync.usage, "alice"))
    for path, body in ((f"/api/v1/servers/{U}/rebuild", {"to": "tiny@v2"}), (f"/api/v1/servers/{U}/rollback", {})):
        status, answer = await s.req("POST", path, "alice", json=body)
        if path.endswith("rollback"):
            assert status == 409 and "no restore point" in answer["detail"], answer
            continue
        assert status == 409 and answer["error"] == "in_use", answer
        assert f"{s.servers.initiator(U)} from 10.77.0.104" in answer["detail"], answer
    assert (await volumes(s), await s.store.call(s.store.sync.usage, "alice")) == before
    server = await s.servers.get(U)
    assert (server.version, server.state) == ("v1", "available")
    assert s.servers.iqn(U) in exports(s).targets  # never unexported

    # asked to reboot but the server has no BMC: refused too, before anything is touched
    status, answer = await s.req("POST", f"/api/v1/servers/{U}/rebuild", "alice", json={"reboot": True})
    assert status == 422 and "has no BMC" in answer["detail"], answer

    # with its BMC: powered off, swapped, one-time PXE, powered on, and back on its root
    switch = RecordingSwitch(s, U)
    s.domain.lifecycle.power_for = lambda server: switch
    s.domain.lifecycle.poll = 0.01
    status, report = await s.req("POST", f"/api/v1/servers/{U}/rebuild", "alice", json={"reboot": True})
    assert status == 200 and report["after"] == "tiny@v2", report
    assert switch.calls == ["off", "pxe-once", "on"]
    assert report["powered"] == ["off", "pxe-once", "on", "reached root"]


class Faults:
    """Fails the chosen step of an upgrade: the backend's clone, the store's swap, or the final export."""

    def __init__(self, s: Stack, where: str) -> None:
        self.s, self.where = s, where

    def arm(self) -> None:
        s, where = self.s, self.where
        if where == "clone":
            async def clone(*args: Any, **kw: Any) -> Any:
                raise StorageError("injected: clone failed")
            s.backend.clone_os = clone  # type: ignore[method-assign]
        elif where == "clone-midway":
            real = s.backend.clone_os

            async def clone_then_fail(*args: Any, **kw: Any) -> Any:
                await real(*args, **kw)  # the volume exists, then the step fails
                raise StorageError("injected: clone failed after writing")
            s.backend.clone_os = clone_then_fail  # type: ignore[method-assign]
        elif where == "swap":
            def swap(*args: Any) -> Any:
                raise StorageError("injected: the store's swap failed")
            s.store.sync.swap_root = swap  # type: ignore[method-assign]
        elif where == "export":
            driver, real_apply = exports(s), exports(s).apply
            known = {v for luns in driver.targets.values() for v in luns}

            async def apply(targets: Any) -> Any:
                if any(lun.volume not in known for t in targets for lun in t.luns):  # the new root
                    raise StorageError("injected: the new root's export failed")
                return await real_apply(targets)
            driver.apply = apply  # type: ignore[method-assign]


@pytest.mark.parametrize("where", ["clone", "clone-midway", "swap", "export"])
async def test_every_step_of_an_upgrade_failed_leaves_the_old_root(stack: Stack, where: str) -> None:
    s = stack
    await new_version(s, "v2", b"tiny-v2!")
    await s.req("POST", f"/api/v1/servers/{U}/rebuild", "alice", json={"to": "tiny@v2"})  # a restore point...
    await s.req("POST", f"/api/v1/servers/{U}/rollback", "alice", json={})  # ...and back on v1
    before = (await volumes(s), await s.store.call(s.store.sync.usage, "alice"),
              {v.name for v in await s.backend.list()}, dict(exports(s).targets))
    Faults(s, where).arm()
    status, answer = await s.req("POST", f"/api/v1/servers/{U}/rebuild", "alice", json={"to": "tiny@v2"})
    assert status == 500 and "injected" in answer["detail"], answer
    server = await s.servers.get(U)
    assert (server.state, server.version) == ("available", "v1") and "injected" in server.reason
    after = (await volumes(s), await s.store.call(s.store.sync.usage, "alice"),
             {v.name for v in await s.backend.list()}, dict(exports(s).targets))
    assert after == before  # the old root, the old restore point, no orphan, the quota, the export
    assert read_at(s.backend.path(f"tiny-OS-{U}"), MARK_AT) == b"tiny-v1!"


async def test_snapshots_of_the_root_restore_and_count_in_the_quota(stack: Stack) -> None:
    s = stack
    root = s.backend.path(f"tiny-OS-{U}")
    used = await s.store.call(s.store.sync.usage, "alice")
    status, body = await s.req("POST", f"/api/v1/servers/{U}/snapshots", "alice", json={"name": "before"})
    assert status == 201, body
    assert await s.store.call(s.store.sync.usage, "alice") == (used[0] + 1, used[1])
    status, listed = await s.req("GET", f"/api/v1/servers/{U}/snapshots", "alice")
    assert status == 200 and [x["name"] for x in listed] == ["before"]
    status, body = await s.req("GET", f"/api/v1/servers/{U}/snapshots", "bob")
    assert status == 404  # another user's server, as if missing
    await asyncio.to_thread(write_at, root, MARK_AT, b"changed!")
    status, report = await s.req("POST", f"/api/v1/servers/{U}/snapshots/before/restore", "alice", json={})
    assert status == 200, report
    assert read_at(root, MARK_AT) == b"tiny-v1!"
    status, _ = await s.req("DELETE", f"/api/v1/servers/{U}/snapshots/before", "alice")
    assert status == 204
    assert await s.store.call(s.store.sync.usage, "alice") == used
    assert await s.backend.volume_snapshots(f"tiny-OS-{U}") == []
    status, body = await s.req("POST", f"/api/v1/servers/{U}/snapshots", "alice", json={"name": "Bad Name"})
    assert status == 422, body


async def test_a_rolling_upgrade_goes_in_waves_and_halts_on_its_failure_budget(tmp_path: Path) -> None:
    async with open_stack(tmp_path, exports="memory") as s:
        await s.add_user("alice")
        fleet = [uuid_n(0x20 + i) for i in range(4)]
        for uuid in fleet:
            assert (await s.create(uuid))[0] == 202
            assert (await s.wait_state(uuid))["state"] == "available"
            status, _ = await s.req("PUT", f"/api/v1/servers/{uuid}/labels", json={"labels": {"role": "compute"}})
            assert status == 200
        await new_version(s, "v2", b"tiny-v2!")
        status, plan = await s.req("POST", "/api/v1/upgrades", json={"selector": {"role": "compute"}})
        assert status == 200 and plan["count"] == 4 and plan["confirm"] is False, plan  # says before it acts
        assert [(await s.servers.get(u)).version for u in fleet] == ["v1"] * 4
        exports(s).logged_in[s.servers.iqn(fleet[1])] = [Session("iqn.x:node", "10.0.0.9")]  # one node runs
        status, job = await s.req("POST", "/api/v1/upgrades", json={
            "selector": {"role": "compute"}, "to": "tiny@v2", "batch": 2, "max_failures": 0, "confirm": True})
        assert status == 202, job
        for _ in range(200):
            status, job = await s.req("GET", f"/api/v1/upgrades/{job['id']}")
            if job["state"] != "running":
                break
            await asyncio.sleep(0.02)
        assert job["state"] == "halted" and job["waves"] == [fleet[:2], fleet[2:]], job
        nodes = job["nodes"]
        assert nodes[fleet[0]]["state"] == "upgraded" and nodes[fleet[0]]["after"] == "tiny@v2"
        assert nodes[fleet[1]]["state"] == "failed" and "10.0.0.9" in nodes[fleet[1]]["why"]
        assert [nodes[u]["state"] for u in fleet[2:]] == ["not reached", "not reached"]
        assert [(await s.servers.get(u)).version for u in fleet] == ["v2", "v1", "v1", "v1"]


async def test_the_cli_upgrades_snapshots_and_refuses_a_group_without_yes(stack: Stack) -> None:
    from tests.integration.test_cli_client import cello

    s = stack
    await new_version(s, "v2", b"tiny-v2!")
    code, out, err = await cello(s, "server", "snapshot", "create", U, "pre-upgrade", who="alice")
    assert code == 0, err
    code, out, err = await cello(s, "server", "upgrade", U, "--to", "tiny@v2", who="alice")
    assert code == 0 and f"rebuild {U}: tiny@v1 -> tiny@v2" in out and f"restore point: tiny-OS-{U}" in out, err
    code, out, err = await cello(s, "server", "rollback", U, who="alice")
    assert code == 0 and "tiny@v2 -> tiny@v1" in out, err
    code, out, err = await cello(s, "server", "snapshot", "list", U, who="alice")
    assert code == 0 and "pre-upgrade" in out, err
    code, out, _ = await cello(s, "server", "label", U, "role=compute", "rack=3")
    assert code == 0 and "role=compute" in out and "rack=3" in out
    code, out, _ = await cello(s, "server", "upgrade", "--selector", "role=compute", "--to", "tiny@v2")
    assert code == 2 and f"would upgrade 1 server(s) in waves of 1: {U}" in out and "--yes" in out
    assert (await s.servers.get(U)).version == "v1"  # nothing touched without --yes
    code, out, err = await cello(s, "server", "power", U, "status", who="alice")
    assert code == 1 and "has no BMC" in err


async def test_delete_is_refused_under_a_running_node_unless_it_powers_it_off(stack: Stack) -> None:
    s = stack
    exports(s).logged_in[s.servers.iqn(U)] = [Session(s.servers.initiator(U), "10.77.0.104")]
    status, answer = await s.req("DELETE", f"/api/v1/servers/{U}", "alice")
    assert status == 409 and answer["error"] == "in_use" and "10.77.0.104" in answer["detail"], answer
    assert (await s.servers.get(U)).state == "available" and s.servers.iqn(U) in exports(s).targets
    switch = RecordingSwitch(s, U)
    s.domain.lifecycle.power_for = lambda server: switch
    s.domain.lifecycle.poll = 0.01
    status, _ = await s.req("DELETE", f"/api/v1/servers/{U}?power_off=true", "alice")
    assert status == 204 and switch.calls == ["off"]
    assert s.servers.iqn(U) not in exports(s).targets


def ext4_root(path: str, files: dict[str, bytes]) -> None:
    """A small ext4 root file system written over the template image, made by mkfs.ext4 -d from a tree."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as tree:
        for rel, data in files.items():
            target = Path(tree) / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        subprocess.run(["mkfs.ext4", "-q", "-F", "-d", tree, "-L", "cello-root", path, "32M"], check=True,
                       capture_output=True, timeout=60)


def debugfs_cat(image: str, path: str) -> bytes | None:
    import subprocess

    out = subprocess.run(["debugfs", "-R", f"cat {path}", image], capture_output=True, timeout=30)
    return None if b"File not found" in out.stderr else out.stdout


@pytest.fixture
async def ext4_stack(tmp_path: Path) -> AsyncIterator[Stack]:
    async with open_stack(tmp_path, exports="memory") as s:
        await s.add_user("alice", max_volumes=8)
        await s.backend.destroy_snapshot("tiny", "v1")
        await asyncio.to_thread(ext4_root, s.backend.path("tiny-template"), {
            "etc/machine-id": b"0123456789abcdef0123456789abcdef\n", "etc/hostname": b"tiny\n"})
        await s.backend.snapshot_template("tiny", "v1")
        assert (await s.create(U))[0] == 202 and (await s.wait_state(U))["state"] == "available"
        yield s


async def test_capture_makes_a_version_without_the_nodes_identity_and_a_new_server_boots_it(
        ext4_stack: Stack) -> None:
    s = ext4_stack
    root = s.backend.path(f"tiny-OS-{U}")
    await asyncio.to_thread(ext4_root, root, {  # what the node did on its root: its identity, its work
        "etc/machine-id": b"node-machine-id-node-machine-id\n", "cello-booted": U.encode(),
        "etc/ssh/ssh_host_ed25519_key": b"secret key", "srv/app.conf": b"tuned=yes\n"})
    status, tv = await s.req("POST", "/api/v1/templates/tiny/captures", json={"server": U})
    assert status == 201 and tv["version"] == "v2" and tv["source"] == f"capture:{U}", tv
    assert (s.files_root / tv["kernel"]).read_bytes() == (s.files_root / KERNEL).read_bytes()
    second = uuid_n(0x99)
    status, _ = await s.create(second, template="tiny")
    assert status == 202 and (await s.wait_state(second))["version"] == "v2"
    clone = s.backend.path(f"tiny-OS-{second}")
    assert debugfs_cat(clone, "/srv/app.conf") == b"tuned=yes\n"  # the node's work is in the template
    assert debugfs_cat(clone, "/etc/machine-id") == b""  # its identity is not: emptied, regenerated at boot
    assert debugfs_cat(clone, "/cello-booted") is None and debugfs_cat(clone, "/etc/ssh/ssh_host_ed25519_key") is None
    assert debugfs_cat(root, "/etc/machine-id") == b"node-machine-id-node-machine-id\n"  # the source untouched
    # the version is stamped as what it is (a node prints it at boot), not as the version it was cloned from
    assert debugfs_cat(clone, "/etc/cello-template") == f"os=tiny\nversion=v2\nsource=capture:{U}\n".encode()


@pytest.mark.parametrize("where", ["copy", "scrub", "snapshot", "record"])
async def test_every_step_of_a_capture_failed_leaves_no_version_and_no_orphan(ext4_stack: Stack, where: str) -> None:
    s = ext4_stack
    lifecycle, backend = s.domain.lifecycle, s.backend
    before = ([v.version for v in await s.store.call(s.store.sync.template_versions, "fresh")],
              {v.name for v in await backend.list()}, await backend.snapshots())

    async def boom(*args: Any, **kw: Any) -> Any:
        raise StorageError(f"injected: {where} failed")

    if where == "copy":
        backend.copy_volume = boom  # type: ignore[method-assign]
    elif where == "scrub":
        lifecycle.scrub = boom
    elif where == "snapshot":
        backend.snapshot_template = boom  # type: ignore[method-assign]
    else:
        def refuse(*args: Any) -> Any:
            raise StorageError("injected: record failed")
        s.store.sync.add_template_version = refuse  # type: ignore[method-assign]
    status, answer = await s.req("POST", "/api/v1/templates/fresh/captures", json={"server": U})
    assert status == 500 and "injected" in answer["detail"], answer
    after = ([v.version for v in await s.store.call(s.store.sync.template_versions, "fresh")],
             {v.name for v in await backend.list()}, await backend.snapshots())
    assert after == before  # no fresh-template volume, no snapshot, no version
    assert (await s.servers.get(U)).state == "available"


async def test_an_upgrade_counts_its_new_root_as_a_volume_not_as_data(tmp_path: Path) -> None:
    """A user whose data quota is smaller than a root (roots are 100 GB sparse by default) can upgrade."""
    async with open_stack(tmp_path, exports="memory") as s:
        await s.add_user("alice", max_volumes=8, max_data_gb=0)
        assert (await s.create(U))[0] == 202 and (await s.wait_state(U))["state"] == "available"
        await s.store.call(s.store.sync.add_template_version,  # a root far above the 0 GB of data allowed
                           TemplateVersion("tiny", "v2", "tiny", 100 << 30, KERNEL, INITRD, 0.0))
        await s.backend.snapshot_template("tiny", "v2")
        status, report = await s.req("POST", f"/api/v1/servers/{U}/rebuild", "alice", json={"to": "tiny@v2"})
        assert status == 200 and report["after"] == "tiny@v2", report
        assert await s.store.call(s.store.sync.usage, "alice") == (2, 0)  # root + restore point, no data


async def test_a_root_swap_cut_short_by_a_crash_is_undone_at_the_next_reconcile(stack: Stack) -> None:
    """The process died mid-rebuild: the server is `rebuilding` (not exported) with a clone never swapped
    in. The start's reconcile destroys the clone and exports the server again on the root it has."""
    from domain.store import NEW_ROOT_IDX, VolumeRow

    s = stack
    await new_version(s, "v2", b"tiny-v2!")
    await s.store.call(s.store.sync.set_server_state, U, "rebuilding")
    new = f"tiny-OS-{U}-g2"
    await s.store.call(s.store.sync.add_volume, VolumeRow(new, U, "os", NEW_ROOT_IDX, TEMPLATE_SIZE, "creating",
                                                          "s-g2", "tiny@v2"), "alice")
    await s.backend.clone_os("tiny", "v2", U, 2)
    await s.servers.apply_exports("the crash")
    assert s.servers.iqn(U) not in exports(s).targets
    report = await s.domain.reconcile()
    assert any("interrupted root swap undone" in line for line in report.repaired), report
    server = await s.servers.get(U)
    assert (server.state, server.version) == ("available", "v1")
    assert new not in {v.name for v in await s.backend.list()} and new not in await volumes(s)
    assert exports(s).targets[s.servers.iqn(U)] == {f"tiny-OS-{U}": 1, f"tiny-DATA-{U}": 2}


async def test_a_data_volume_is_not_removed_under_a_running_node(stack: Stack) -> None:
    s = stack
    exports(s).logged_in[s.servers.iqn(U)] = [Session(s.servers.initiator(U), "10.77.0.104")]
    status, answer = await s.req("DELETE", f"/api/v1/servers/{U}/volumes/tiny-DATA-{U}", "alice")
    assert status == 409 and "10.77.0.104" in answer["detail"], answer
    assert f"tiny-DATA-{U}" in exports(s).targets[s.servers.iqn(U)]
    exports(s).logged_in.clear()
    status, _ = await s.req("DELETE", f"/api/v1/servers/{U}/volumes/tiny-DATA-{U}", "alice")
    assert status == 204


async def test_labels_are_bounded_and_the_store_is_the_appliances_alone(stack: Stack) -> None:
    s = stack
    status, answer = await s.req("PUT", f"/api/v1/servers/{U}/labels", "alice",
                                 json={"labels": {f"k{i}": "v" for i in range(65)}})
    assert status == 422 and "at most 64" in answer["detail"], answer
    status, answer = await s.req("PUT", f"/api/v1/servers/{U}/labels", "alice", json={"labels": {"a b": "c"}})
    assert status == 422, answer
    assert (s.root / "cello.db").stat().st_mode & 0o777 == 0o600  # CHAP secrets and BMC passwords are in it
