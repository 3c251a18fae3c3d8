"""The tgt driver's apply in bursts, against a real `tgtd` (control port 43, portal 127.0.0.1:13263).

Back-to-back applies start from the previous closing show instead of reading tgtd twice; these tests
check that this costs one show per apply, that many targets go in one apply, and that a change made
behind the driver's back (another tgtadm on its control port) is still repaired by the very apply
that follows it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

import iscsi.tgt
from iscsi.model import LunSpec, TargetAuth, TargetSpec
from iscsi.tgt import TgtDriver
from tests.integration.test_tgt_export import TeeRunner, _flag
from tests.tools import require

CONTROL_PORT = 43
PORTAL = "127.0.0.1:13263"
PREFIX = "iqn.2026-11.io.cello"
MB = 1 << 20


@pytest.fixture(autouse=True)
def _tgt_installed() -> None:
    require("tgtd", "tgtadm", root=True, packages="tgt")


def uuid_n(n: int) -> str:
    return f"5e1e7e00-0000-4000-8000-{n:012x}"


def iqn(n: int) -> str:
    return f"{PREFIX}:{uuid_n(n)}"


def spec(root: Path, n: int, auth: TargetAuth | None = None) -> TargetSpec:
    volume = f"tiny-OS-{uuid_n(n)}"
    path = root / f"{volume}.img"
    if not path.exists():
        with open(path, "wb") as f:
            f.truncate(4 * MB)
    return TargetSpec(iqn(n), (LunSpec(volume, str(path), 0, 4 * MB, f"S{n}", f"cello-S{n}"),),
                      auth or TargetAuth())


async def tgtadm(*args: str) -> None:
    proc = await asyncio.create_subprocess_exec("tgtadm", "-C", str(CONTROL_PORT), "--lld", "iscsi", *args,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, out.decode(errors="replace")


@pytest.fixture
async def driver(tmp_path: Path) -> AsyncIterator[TgtDriver]:
    d = TgtDriver(CONTROL_PORT, [PORTAL], runner=TeeRunner(), state_dir=tmp_path / "state")
    await d.start()
    try:
        yield d
    finally:
        await d.teardown()


def tee(driver: TgtDriver) -> TeeRunner:
    runner = driver._run
    assert isinstance(runner, TeeRunner)
    return runner


async def test_back_to_back_applies_read_tgtd_once_each(tmp_path: Path, driver: TgtDriver) -> None:
    runner = tee(driver)
    all40 = [spec(tmp_path, n) for n in range(40)]
    await driver.apply(all40)
    assert len(runner.ops("show", "target")) == 2  # nothing to start from: read, change, read

    runner.calls.clear()
    state = await driver.apply(all40)
    assert len(runner.ops("show", "target")) == 1  # the closing show only
    assert [c for c in runner.calls if _flag(c, "--op") != "show"] == []
    assert len(state.targets) == 40

    runner.calls.clear()
    state = await driver.apply(all40[:5])  # 35 servers retired at once
    deletes = runner.ops("delete", "target")
    assert len(deletes) == 35 and all("--force" in c for c in deletes)
    assert len(runner.ops("show", "target")) == 1
    assert sorted(state.targets) == sorted(iqn(n) for n in range(5))
    assert (await driver.actual()).targets == state.targets


async def test_a_target_deleted_behind_the_driver_comes_back_in_the_next_apply(tmp_path: Path,
                                                                              driver: TgtDriver) -> None:
    wanted = [spec(tmp_path, 1), spec(tmp_path, 2)]
    await driver.apply(wanted)
    await tgtadm("--op", "delete", "--force", "--mode", "target", "--tid", str(driver._tids[iqn(1)]))
    state = await driver.apply(wanted)  # within REUSE_SHOW_FOR: starts from the stale reading
    assert sorted(state.targets) == [iqn(1), iqn(2)]
    assert (await driver.actual()).targets == state.targets


async def test_a_target_gone_before_the_driver_deletes_it(tmp_path: Path, driver: TgtDriver) -> None:
    await driver.apply([spec(tmp_path, 1), spec(tmp_path, 2), spec(tmp_path, 3)])
    await tgtadm("--op", "delete", "--force", "--mode", "target", "--tid", str(driver._tids[iqn(2)]))
    state = await driver.apply([spec(tmp_path, 1)])  # deleting tid 2 fails: it is already gone
    assert list(state.targets) == [iqn(1)]
    assert (await driver.actual()).targets == state.targets


async def test_a_target_made_behind_the_driver_on_the_tid_it_picks_next(tmp_path: Path,
                                                                       driver: TgtDriver) -> None:
    await driver.apply([spec(tmp_path, 1)])
    free = max(driver._tids.values()) + 1
    await tgtadm("--op", "new", "--mode", "target", "--tid", str(free), "-T", f"{PREFIX}:someone-else")
    state = await driver.apply([spec(tmp_path, 1), spec(tmp_path, 2)])  # `new --tid <free>` fails
    assert sorted(state.targets) == [iqn(1), iqn(2)]  # this tgtd serves the desired targets only
    assert (await driver.actual()).targets == state.targets


async def test_after_a_pause_an_apply_reads_tgtd_again_and_repairs_an_acl(
        tmp_path: Path, driver: TgtDriver, monkeypatch: pytest.MonkeyPatch) -> None:
    node = f"{PREFIX}:node-{uuid_n(1)}"
    wanted = [spec(tmp_path, 1, TargetAuth(initiator_names=(node,)))]
    await driver.apply(wanted)
    await tgtadm("--op", "unbind", "--mode", "target", "--tid", str(driver._tids[iqn(1)]), "-Q", node)
    monkeypatch.setattr(iscsi.tgt, "REUSE_SHOW_FOR", 0.0)  # as if the pause were over
    runner = tee(driver)
    runner.calls.clear()
    await driver.apply(wanted)
    assert len(runner.ops("show", "target")) == 2
    assert [c[-1] for c in runner.ops("bind", "target")] == [node]
    shown = await driver._show()
    assert shown[driver._tids[iqn(1)]].acl == [node]
