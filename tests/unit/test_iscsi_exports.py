"""ExportManager coalescing, the none driver, driver choice, tgt's show parser and apply argv."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

import pytest

from iscsi.ctld import CtldDriver
from iscsi.exports import ExportManager, NullDriver, choose_driver
from iscsi.model import ExportState, InUseError, NameError_, TargetAuth, TargetSpec
from iscsi.runner import RecordingRunner
from iscsi.tgt import TgtDriver
from iscsi.tgt_show import TgtShowError, parse_show
from tests.unit.test_iscsi_specs import PREFIX, U1, U2, stable_lun


class SlowDriver:
    name = "slow"

    def __init__(self) -> None:
        self.seen: list[int] = []
        self.gate = asyncio.Event()
        self.fail_next = False

    async def start(self) -> None: ...
    async def stop(self) -> None: ...

    async def apply(self, targets: Sequence[TargetSpec]) -> ExportState:
        self.seen.append(len(targets))
        await self.gate.wait()
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("boom")
        return ExportState({t.iqn: {lun.volume: lun.index for lun in t.luns} for t in targets})

    async def actual(self) -> ExportState:
        return ExportState({})

    def lun_number(self, index: int) -> int:
        return index


def target(i: int) -> TargetSpec:
    uuid = f"{i:08x}-0000-4000-8000-000000000000"
    return TargetSpec(f"{PREFIX}:{uuid}", (stable_lun(f"tiny-OS-{uuid}", 0, f"S{i}"),))


async def test_a_burst_of_100_changes_costs_at_most_two_applies_and_everyone_sees_their_change() -> None:
    desired: list[TargetSpec] = []
    driver = SlowDriver()

    async def current() -> list[TargetSpec]:
        return list(desired)

    manager = ExportManager(driver, current)

    async def create(i: int) -> ExportState:
        desired.append(target(i))
        state = await manager.apply()
        assert target(i).iqn in state.targets  # the apply a caller awaits started after its change
        return state

    tasks = [asyncio.create_task(create(i)) for i in range(100)]
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    driver.gate.set()
    states = await asyncio.gather(*tasks)
    assert 1 <= manager.applies <= 2  # not 100
    assert driver.seen[-1] == 100
    assert len(states[-1].targets) == 100
    assert manager.last_state is states[-1]


async def test_a_caller_arriving_during_an_apply_gets_the_next_one() -> None:
    driver = SlowDriver()
    n = 0

    async def current() -> list[TargetSpec]:
        return [target(i) for i in range(n)]

    manager = ExportManager(driver, current)
    n = 1
    first = asyncio.create_task(manager.apply())
    await asyncio.sleep(0.01)  # the first apply is running now (waiting on the gate)
    n = 2
    second = asyncio.create_task(manager.apply())
    third = asyncio.create_task(manager.apply())
    await asyncio.sleep(0.01)
    driver.gate.set()
    s1, s2, s3 = await asyncio.gather(first, second, third)
    assert (len(s1.targets), len(s2.targets)) == (1, 2) and s3 is s2
    assert manager.applies == 2


async def test_errors_reach_the_callers_and_the_next_apply_runs() -> None:
    driver = SlowDriver()
    driver.gate.set()
    driver.fail_next = True

    async def current() -> list[TargetSpec]:
        return [target(1)]

    manager = ExportManager(driver, current)
    with pytest.raises(RuntimeError, match="boom"):
        await manager.apply()
    state = await manager.apply()
    assert manager.exported(f"tiny-OS-{target(1).iqn.split(':')[1]}") and state.targets


async def test_ensure_unexported_refuses_while_a_volume_is_served() -> None:
    driver = SlowDriver()
    driver.gate.set()
    served = [target(1)]

    async def current() -> list[TargetSpec]:
        return served

    manager = ExportManager(driver, current)
    volume = served[0].luns[0].volume
    with pytest.raises(InUseError):
        await manager.ensure_unexported(volume)
    served = []
    await manager.ensure_unexported(volume)
    assert not manager.exported(volume)


async def test_null_driver_reports_unavailable() -> None:
    state = await NullDriver().apply([target(1)])
    assert not state.available and "no iSCSI target software" in state.detail and state.targets == {}


def test_choose_driver() -> None:
    portals = ["0.0.0.0:3260"]
    assert isinstance(choose_driver("auto", portals, platform="freebsd14", which=lambda _: None), CtldDriver)
    assert isinstance(choose_driver("auto", portals, platform="linux", which=lambda n: f"/usr/sbin/{n}"),
                      TgtDriver)
    none = choose_driver("auto", portals, platform="linux", which=lambda _: None)
    assert isinstance(none, NullDriver) and "tgt" in none.reason
    assert isinstance(choose_driver("none", portals), NullDriver)
    assert isinstance(choose_driver("ctld", portals, ctl_conf=Path("/x/ctl.conf")), CtldDriver)
    with pytest.raises(ValueError, match="unknown"):
        choose_driver("iet", portals)  # type: ignore[arg-type]


# -- tgt ---------------------------------------------------------------------------------------

SHOW = f"""Target 1: {PREFIX}:{U1}
    System information:
        Driver: iscsi
        State: ready
        Nop interval: 2
        Nop count: 2
    I_T nexus information:
        I_T nexus: 3
            Initiator: iqn.2007-10.com.github:sahlberg:libiscsi:iscsi-inq alias: none
            Connection: 0
                IP Address: 127.0.0.1
    LUN information:
        LUN: 0
            Type: controller
            SCSI ID: IET     00010000
            SCSI SN: beaf10
            Size: 0 MB, Block size: 1
            Backing store type: null
            Backing store path: None
            Backing store flags:
        LUN: 1
            Type: disk
            SCSI ID: cello:os
            SCSI SN: OS3f1c2b4e
            Size: 67 MB, Block size: 512
            Backing store type: rdwr
            Backing store path: /var/cello/volumes/tiny-OS-{U1}.img
            Backing store flags:
    Account information:
        node1
    ACL information:
        10.77.0.0/24
        {PREFIX}:node-{U1}
Target 3: {PREFIX}:{U2}
    System information:
        Driver: iscsi
        State: ready
    I_T nexus information:
    LUN information:
        LUN: 0
            Type: controller
            Backing store path: None
    Account information:
    ACL information:
        ALL
"""


def test_parse_captured_tgtadm_show() -> None:
    targets = parse_show(SHOW)
    assert sorted(targets) == [1, 3]
    t1 = targets[1]
    assert (t1.iqn, t1.nop_interval, t1.nop_count) == (f"{PREFIX}:{U1}", 2, 2)
    assert list(t1.luns) == [1]  # LUN 0, the controller, is not a volume
    assert t1.luns[1].path == f"/var/cello/volumes/tiny-OS-{U1}.img" and t1.luns[1].serial == "OS3f1c2b4e"
    assert t1.accounts == ["node1"] and t1.acl == ["10.77.0.0/24", f"{PREFIX}:node-{U1}"]
    assert targets[3].acl == ["ALL"] and targets[3].luns == {} and targets[3].nop_interval is None


@pytest.mark.parametrize("bad", [
    "garbage", "    indented first", "Target x: y", "Target 1: a\n    LUN information:\n        LUN x",
])
def test_show_parser_raises_its_own_error(bad: str) -> None:
    with pytest.raises(TgtShowError):
        parse_show(bad)


async def test_tgt_apply_argv_from_an_empty_tgtd() -> None:
    def respond(argv: tuple[str, ...]) -> str | None:
        return "Account list:\n" if argv[-2:] == ("--mode", "account") else None

    runner = RecordingRunner(respond)
    driver = TgtDriver(40, ["127.0.0.1:13260", "[::1]:13260"], manage_daemon=False, runner=runner,
                       state_dir=Path("/nonexistent"))
    assert driver.daemon_argv() == ["tgtd", "-f", "-C", "40", "--iscsi",
                                    "portal=127.0.0.1:13260,portal=[::1]:13260"]
    assert driver.lun_number(0) == 1
    lun = stable_lun(f"tiny-OS-{U1}", 0, "S1", path="/v/a.img")
    await driver.apply([TargetSpec(f"{PREFIX}:{U1}", (lun,), TargetAuth("node1", "secretsecret12"))])
    adm = ("tgtadm", "-C", "40", "--lld", "iscsi", "--op")
    muts = [c[len(adm):] for c in runner.calls if c[len(adm) - 1] == "--op" and c[len(adm)] != "show"]
    assert muts == [
        ("new", "--mode", "target", "--tid", "1", "-T", f"{PREFIX}:{U1}"),
        ("update", "--mode", "target", "--tid", "1", "-n", "nop_interval", "-v", "2"),
        ("update", "--mode", "target", "--tid", "1", "-n", "nop_count", "-v", "2"),
        ("new", "--mode", "logicalunit", "--tid", "1", "--lun", "1", "-b", "/v/a.img"),
        ("update", "--mode", "logicalunit", "--tid", "1", "--lun", "1", "--params", "scsi_sn=S1,scsi_id=cello:S1"),
        ("bind", "--mode", "target", "--tid", "1", "-I", "ALL"),
        ("new", "--mode", "account", "--user", "node1", "--password", "secretsecret12"),
        ("bind", "--mode", "account", "--tid", "1", "--user", "node1"),
    ]


@pytest.mark.parametrize("bad", ["a b", "x\n", 'x"', "x{"])
async def test_tgt_hostile_names_run_no_command(bad: str) -> None:
    runner = RecordingRunner()
    driver = TgtDriver(40, ["127.0.0.1:13260"], manage_daemon=False, runner=runner,
                       state_dir=Path("/nonexistent"))
    good = TargetSpec(f"{PREFIX}:{U1}", (stable_lun(f"tiny-OS-{U1}", 0, "S1", path="/v/a.img"),))
    import dataclasses
    for spec in (
        dataclasses.replace(good, iqn=f"{PREFIX}:{bad}"),
        dataclasses.replace(good, luns=(dataclasses.replace(good.luns[0], path=f"/v/{bad}"),)),
        dataclasses.replace(good, luns=(dataclasses.replace(good.luns[0], volume=bad),)),
        dataclasses.replace(good, auth=TargetAuth(chap_user=bad, chap_secret="secretsecret12")),
        dataclasses.replace(good, auth=TargetAuth(initiator_names=(bad,))),
    ):
        with pytest.raises(NameError_):
            await driver.apply([spec])
    assert runner.calls == []
