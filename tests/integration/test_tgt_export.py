"""tgt export driver against a real `tgtd` (control port 40-41) and libiscsi's real initiators.

Portals: 127.0.0.1:13260..13261. The exported volumes come from the file backend: a template,
its snapshot, a clone — the initiators read and write the clone, and the template stays unchanged.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest

from iscsi.file_backend import FileBackend
from iscsi.model import LunSpec, TargetAuth, TargetSpec
from iscsi.runner import CommandResult, SubprocessRunner
from iscsi.tgt import TgtDriver
from iscsi.tgtd import process_start_time, read_record
from tests.tools import require

PORT = 13260
PORTAL = f"127.0.0.1:{PORT}"
PREFIX = "iqn.2026-11.io.cello"
U1 = "3f1c2b4e-9d8a-4c6b-8e2f-1a2b3c4d5e6f"
U2 = "0a1b2c3d-4e5f-4a6b-9c8d-7e6f5a4b3c2d"
MB = 1 << 20

@pytest.fixture(autouse=True)
def _tgt_installed() -> None:
    require("tgtd", "tgtadm", "iscsi-inq", "iscsi-test-cu", root=True, packages="tgt libiscsi-bin")


class TeeRunner(SubprocessRunner):
    """Runs for real and records the argv, so a test can check which commands an apply issued."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, ...]] = []

    async def __call__(self, argv: Sequence[str], *, check: bool = True) -> CommandResult:
        self.calls.append(tuple(argv))
        return await super().__call__(argv, check=check)

    def mutations(self) -> list[tuple[str, ...]]:
        return [c for c in self.calls if "--op" in c and c[c.index("--op") + 1] != "show"]

    def ops(self, op: str, mode: str) -> list[tuple[str, ...]]:
        return [c for c in self.calls if _flag(c, "--op") == op and _flag(c, "--mode") == mode]


def _flag(argv: tuple[str, ...], flag: str) -> str | None:
    return argv[argv.index(flag) + 1] if flag in argv and argv.index(flag) + 1 < len(argv) else None


async def run(*argv: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode or 0, out.decode(errors="replace")


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
async def backend(tmp_path: Path) -> FileBackend:
    b = FileBackend(tmp_path / "volumes")
    await b.create_template("tiny", 64 * MB)
    await asyncio.to_thread(_write_pattern, Path(b.path("tiny-template")))
    await b.snapshot_template("tiny", "v1")
    await b.clone_os("tiny", "v1", U1)
    await b.clone_os("tiny", "v1", U2)
    await b.create_data("tiny", U1, 1, 16 * MB)
    return b


def _write_pattern(path: Path) -> None:
    with open(path, "r+b") as f:
        f.write(b"CELLO-TEMPLATE" * 100)


@pytest.fixture
async def driver(tmp_path: Path) -> AsyncIterator[TgtDriver]:
    d = TgtDriver(40, [PORTAL], runner=TeeRunner(), state_dir=tmp_path / "state")
    await d.start()
    try:
        yield d
    finally:
        await d.teardown()


def spec(backend: FileBackend, uuid: str, *, data: bool = False, auth: TargetAuth | None = None) -> TargetSpec:
    luns = [LunSpec(f"tiny-OS-{uuid}", backend.path(f"tiny-OS-{uuid}"), 0, 64 * MB, f"OS{uuid[:8]}",
                    f"cello:{uuid}:os")]
    if data:
        luns.append(LunSpec(f"tiny-DATA-{uuid}", backend.path(f"tiny-DATA-{uuid}"), 1, 16 * MB,
                            f"DA{uuid[:8]}", f"cello:{uuid}:d1"))
    return TargetSpec(f"{PREFIX}:{uuid}", tuple(luns), auth or TargetAuth())


async def test_real_initiators_read_and_write_the_clone(backend: FileBackend, driver: TgtDriver) -> None:
    snap = Path(backend.path("tiny-template")).with_name("tiny-template@v1.img")
    before = await asyncio.to_thread(digest, snap)
    state = await driver.apply([spec(backend, U1, data=True)])
    iqn = f"{PREFIX}:{U1}"
    assert state.targets == {iqn: {f"tiny-OS-{U1}": 1, f"tiny-DATA-{U1}": 2}}  # LUN 0 is tgt's controller

    rc, out = await run("iscsi-ls", "-s", f"iscsi://{PORTAL}")
    assert rc == 0 and f"Target:{iqn}" in out, out
    rc, out = await run("iscsi-inq", f"iscsi://{PORTAL}/{iqn}/1")
    assert rc == 0 and "Peripheral Device Type" in out, out
    rc, out = await run("iscsi-inq", "-e", "1", "-c", "128", f"iscsi://{PORTAL}/{iqn}/1")
    assert rc == 0 and f"OS{U1[:8]}" in out, out  # the stable serial reached the initiator
    rc, out = await run("iscsi-readcapacity16", f"iscsi://{PORTAL}/{iqn}/2")
    assert rc == 0 and f"Total size:{16 * MB}" in out, out

    rc, out = await run("iscsi-test-cu", "--dataloss",
                        "--test=SCSI.Read10.Simple,SCSI.Write10.Simple,SCSI.Read16.Simple,SCSI.Write16.Simple,"
                        "SCSI.ReadCapacity16.Simple,SCSI.TestUnitReady",
                        f"iscsi://{PORTAL}/{iqn}/1")
    assert rc == 0 and "FAILED" not in out, out
    assert await asyncio.to_thread(digest, snap) == before  # writes landed in the clone only
    clone = Path(backend.path(f"tiny-OS-{U1}"))
    assert await asyncio.to_thread(digest, clone) != before


async def test_apply_is_idempotent_and_changes_only_the_difference(backend: FileBackend,
                                                                   driver: TgtDriver) -> None:
    runner = driver._run
    assert isinstance(runner, TeeRunner)
    await driver.apply([spec(backend, U1, data=True)])
    runner.calls.clear()
    state = await driver.apply([spec(backend, U1, data=True)])
    assert runner.mutations() == [], [" ".join(c) for c in runner.mutations()]
    tid1 = driver._tids[f"{PREFIX}:{U1}"]

    runner.calls.clear()
    state = await driver.apply([spec(backend, U1), spec(backend, U2)])
    muts = runner.mutations()
    assert [c for c in muts if "logicalunit" in c and "delete" in c] == [
        ("tgtadm", "-C", "40", "--lld", "iscsi", "--op", "delete", "--mode", "logicalunit",
         "--tid", str(tid1), "--lun", "2")]
    assert not any("delete" in c and "target" in c for c in muts)  # U1's target was kept
    assert any(c[-2:] == ("-T", f"{PREFIX}:{U2}") for c in muts)
    assert state.targets == {f"{PREFIX}:{U1}": {f"tiny-OS-{U1}": 1}, f"{PREFIX}:{U2}": {f"tiny-OS-{U2}": 1}}
    assert driver._tids[f"{PREFIX}:{U1}"] == tid1  # tid stable per IQN

    state = await driver.apply([spec(backend, U2)])
    assert list(state.targets) == [f"{PREFIX}:{U2}"]
    assert (await driver.actual()).targets == state.targets


async def test_chap_refuses_a_wrong_secret(backend: FileBackend, driver: TgtDriver) -> None:
    iqn = f"{PREFIX}:{U1}"
    await driver.apply([spec(backend, U1, auth=TargetAuth(chap_user="node1", chap_secret="right-secret1"))])
    rc, out = await run("iscsi-inq", f"iscsi://node1%right-secret1@{PORTAL}/{iqn}/1")
    assert rc == 0 and "Peripheral Device Type" in out, out
    rc, out = await run("iscsi-inq", f"iscsi://node1%wrong-secret1@{PORTAL}/{iqn}/1")
    assert rc != 0 and "Peripheral Device Type" not in out
    rc, out = await run("iscsi-inq", f"iscsi://{PORTAL}/{iqn}/1")
    assert rc != 0

    # a new secret replaces the account (tgt never shows secrets: the driver remembers what it set)
    await driver.apply([spec(backend, U1, auth=TargetAuth(chap_user="node1", chap_secret="newer-secret2"))])
    rc, _ = await run("iscsi-inq", f"iscsi://node1%right-secret1@{PORTAL}/{iqn}/1")
    assert rc != 0
    rc, out = await run("iscsi-inq", f"iscsi://node1%newer-secret2@{PORTAL}/{iqn}/1")
    assert rc == 0, out


async def test_mutual_chap_binds_the_target_account_outgoing(backend: FileBackend, driver: TgtDriver) -> None:
    iqn = f"{PREFIX}:{U1}"
    url = f"iscsi://node1%right-secret1@{PORTAL}/{iqn}/1"
    mutual = TargetAuth(chap_user="node1", chap_secret="right-secret1", chap_mutual_user="target1",
                        chap_mutual_secret="target-secret")
    await driver.apply([spec(backend, U1, auth=mutual)])
    rc, out = await run("iscsi-inq", url + "?target_user=target1&target_password=target-secret")
    assert rc == 0, out
    rc, out = await run("iscsi-inq", url + "?target_user=target1&target_password=impostor-sec")
    assert rc != 0 and "Invalid CHAP_R" in out, out  # the initiator refuses a target without the secret
    shown = (await driver._show())
    assert [(t.accounts, t.outgoing) for t in shown.values()] == [(["node1"], ["target1"])]

    # mutual off again: the outgoing account is unbound and, wanted by no target, deleted
    await driver.apply([spec(backend, U1, auth=TargetAuth(chap_user="node1", chap_secret="right-secret1"))])
    assert [(t.accounts, t.outgoing) for t in (await driver._show()).values()] == [(["node1"], [])]
    assert await driver._accounts() == {"node1"}
    assert not tee(driver).ops("delete", "target")  # all of it without touching the target itself


def tee(driver: TgtDriver) -> TeeRunner:
    runner = driver._run
    assert isinstance(runner, TeeRunner)
    return runner


async def test_initiator_acls(backend: FileBackend, driver: TgtDriver) -> None:
    iqn = f"{PREFIX}:{U1}"
    node = f"{PREFIX}:node-{U1}"
    await driver.apply([spec(backend, U1, auth=TargetAuth(initiator_portals=("10.99.0.0/24",)))])
    rc, _ = await run("iscsi-inq", f"iscsi://{PORTAL}/{iqn}/1")
    assert rc != 0  # 127.0.0.1 is not in 10.99.0.0/24
    await driver.apply([spec(backend, U1, auth=TargetAuth(initiator_names=(node,)))])
    rc, _ = await run("iscsi-inq", "-i", f"{PREFIX}:someone-else", f"iscsi://{PORTAL}/{iqn}/1")
    assert rc != 0
    rc, out = await run("iscsi-inq", "-i", node, f"iscsi://{PORTAL}/{iqn}/1")
    assert rc == 0, out


async def test_a_dead_tgtd_is_restarted_with_the_exports(backend: FileBackend, tmp_path: Path) -> None:
    driver = TgtDriver(41, ["127.0.0.1:13261"], state_dir=tmp_path / "state")
    await driver.start()
    try:
        await driver.apply([spec(backend, U1)])
        first = driver.daemon.pid
        assert first is not None
        os.kill(first, signal.SIGKILL)
        for _ in range(100):
            await asyncio.sleep(0.1)
            if driver.restarts >= 1 and driver.daemon.running:
                try:
                    if (await driver.actual()).targets:
                        break
                except Exception:
                    continue
        assert driver.restarts >= 1, driver.daemon.log_tail()
        assert driver.daemon.pid != first
        assert (await driver.actual()).targets == {f"{PREFIX}:{U1}": {f"tiny-OS-{U1}": 1}}
        rc, out = await run("iscsi-inq", f"iscsi://127.0.0.1:13261/{PREFIX}:{U1}/1")
        assert rc == 0, out
    finally:
        pid = driver.daemon.pid
        assert await driver.teardown() == 1
        assert await driver.teardown() == 0  # idempotent
    assert pid is not None and process_start_time(pid) is None
    assert read_record(driver.daemon.record_path) is None
    rc, _ = await run("iscsi-ls", "-s", "iscsi://127.0.0.1:13261")
    assert rc != 0  # nothing listens any more


async def test_start_reports_a_taken_control_port(driver: TgtDriver, tmp_path: Path) -> None:
    # another state dir: this tgtd is not one the other appliance started, so it is not adopted
    other = TgtDriver(40, ["127.0.0.1:13262"], start_timeout=3, state_dir=tmp_path / "other")
    with pytest.raises(Exception, match="tgtd -C 40: control port already served"):
        await other.start()
    await other.stop()
    with pytest.raises(Exception, match="not one this appliance started"):
        await other.teardown()  # and no teardown of someone else's tgtd either
    assert driver.daemon.running


async def test_a_system_tgtd_is_used_but_not_owned(backend: FileBackend, tmp_path: Path) -> None:
    # stands in for the host's tgtd service
    system = TgtDriver(42, ["127.0.0.1:13262"], state_dir=tmp_path / "system")
    await system.start()
    try:
        driver = TgtDriver(42, ["127.0.0.1:13262"], manage_daemon=False, state_dir=tmp_path / "state")
        await driver.start()
        state = await driver.apply([spec(backend, U1)])
        assert state.targets == {f"{PREFIX}:{U1}": {f"tiny-OS-{U1}": 1}}
        await driver.stop()
        assert system.daemon.running
        rc, out = await run("iscsi-inq", f"iscsi://127.0.0.1:13262/{PREFIX}:{U1}/1")
        assert rc == 0, out  # and still exporting: stop() leaves a system tgtd's targets alone
        # a teardown on a system tgtd removes only Cello's targets, and leaves the daemon running
        await run("tgtadm", "-C", "42", "--lld", "iscsi", "--op", "new", "--mode", "target", "--tid", "9",
                  "-T", "iqn.2001-04.com.example:not-cello")
        assert await driver.teardown(PREFIX) == 1
        assert set((await driver.actual()).targets) == {"iqn.2001-04.com.example:not-cello"}
        assert system.daemon.running
    finally:
        await system.teardown()
    with pytest.raises(Exception, match="tgtadm"):
        # nothing serves port 42
        await TgtDriver(42, ["127.0.0.1:13262"], manage_daemon=False, state_dir=tmp_path).start()
