"""What SendTargets discovery shows an initiator on tgt: only the targets it may log in to.

A real `tgtd` of this test's own (control port 58, portal 127.0.0.1:13358), configured through the
tgt driver as the provisioner configures it (each target's ACL names its node's initiator), and
libiscsi's `iscsi-ls` as the initiators: each node, and a stranger. tgt filters discovery by the same
ACL it checks at login, which is what ctl.conf's `discovery-filter "portal-name"` does on FreeBSD.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from iscsi.model import LunSpec, TargetAuth, TargetSpec
from iscsi.runner import SubprocessRunner
from iscsi.tgt import TgtDriver
from tests.integration.test_tgt_export import run
from tests.tools import require

CONTROL_PORT = 58
PORTAL = "127.0.0.1:13358"
PREFIX = "iqn.2026-11.io.cello"
U1 = "3f1c2b4e-9d8a-4c6b-8e2f-1a2b3c4d5e6f"
U2 = "0a1b2c3d-4e5f-4a6b-9c8d-7e6f5a4b3c2d"
U3 = "5e6f7a8b-1c2d-4e3f-9a0b-c1d2e3f4a5b6"
STRANGER = "iqn.2026-11.io.example:stranger"
MB = 1 << 20


@pytest.fixture(autouse=True)
def _tgt_installed() -> None:
    require("tgtd", "tgtadm", "iscsi-ls", "iscsi-inq", root=True, packages="tgt libiscsi-bin")


def node(uuid: str) -> str:
    return f"{PREFIX}:node-{uuid}"  # the provisioner's initiator name for a server


async def discovered(initiator: str) -> set[str]:
    """The target names SendTargets=All shows `initiator` (iscsi-ls: `Target:<iqn> Portal:<addr>,<tag>`)."""
    rc, out = await run("iscsi-ls", "-i", initiator, f"iscsi://{PORTAL}")
    assert rc == 0, out
    return set(re.findall(r"^Target:(\S+) Portal:", out, re.M))


async def logs_in(initiator: str, iqn: str) -> bool:
    rc, _ = await run("iscsi-inq", "-i", initiator, f"iscsi://{PORTAL}/{iqn}/1")
    return rc == 0


@pytest.fixture
async def tgtd(tmp_path: Path) -> AsyncIterator[int]:
    """This test's own tgtd; killed by its pid at the end, whatever the driver did."""
    log = await asyncio.to_thread(open, tmp_path / "tgtd.log", "wb")  # closed below, after the process
    proc = await asyncio.create_subprocess_exec(
        "tgtd", "-f", "-C", str(CONTROL_PORT), "--iscsi", f"portal={PORTAL}",
        stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
    try:
        for _ in range(100):
            if proc.returncode is not None:
                break
            rc, _ = await run("tgtadm", "-C", str(CONTROL_PORT), "--op", "show", "--mode", "system")
            if rc == 0:
                break
            await asyncio.sleep(0.05)
        assert proc.returncode is None, (tmp_path / "tgtd.log").read_text(errors="replace")
        yield proc.pid
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 5)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
                await proc.wait()
        log.close()


@pytest.fixture
async def driver(tgtd: int, tmp_path: Path) -> AsyncIterator[TgtDriver]:
    # manage_daemon=False: the driver configures the tgtd above and never starts or stops one itself
    d = TgtDriver(CONTROL_PORT, [PORTAL], manage_daemon=False, runner=SubprocessRunner(),
                  state_dir=tmp_path / "state")
    await d.start()
    try:
        yield d
    finally:
        if hasattr(d, "teardown"):
            await d.teardown(PREFIX)
        else:
            await d.stop()


def target(tmp_path: Path, uuid: str, auth: TargetAuth) -> TargetSpec:
    image = tmp_path / f"tiny-OS-{uuid}.img"
    with open(image, "wb") as f:
        f.truncate(16 * MB)
    lun = LunSpec(f"tiny-OS-{uuid}", str(image), 0, 16 * MB, f"OS{uuid[:8]}", f"cello:{uuid}:os")
    return TargetSpec(f"{PREFIX}:{uuid}", (lun,), auth)


async def test_sendtargets_shows_each_initiator_only_the_targets_it_may_log_in_to(driver: TgtDriver,
                                                                                 tmp_path: Path) -> None:
    # what the provisioner asks for: each server's target admits its node's initiator name, and by
    # default also wants the node's CHAP secret (discovery itself needs none: no-authentication)
    t1 = target(tmp_path, U1, TargetAuth(initiator_names=(node(U1),)))
    t2 = target(tmp_path, U2, TargetAuth(chap_user=f"node-{U2[:8]}", chap_secret="s3cret-secret2",
                                         initiator_names=(node(U2),)))
    state = await driver.apply([t1, t2])
    assert set(state.targets) == {t1.iqn, t2.iqn}

    assert await discovered(STRANGER) == set()  # no server UUID leaks to an initiator that is no node
    assert await discovered(node(U1)) == {t1.iqn}
    assert await discovered(node(U2)) == {t2.iqn}
    # discovery hides exactly what login refuses
    assert not await logs_in(STRANGER, t1.iqn) and not await logs_in(node(U2), t1.iqn)
    assert await logs_in(node(U1), t1.iqn)


async def test_a_target_open_to_an_address_is_shown_to_whoever_may_log_in_from_it(driver: TgtDriver,
                                                                                 tmp_path: Path) -> None:
    """The same rule as ctld's portal-name filter: an ACL of addresses only lets every initiator from
    them log in, so each of them sees the target; one that matches no address sees nothing."""
    open_here = target(tmp_path, U1, TargetAuth(initiator_portals=("127.0.0.0/8",)))
    elsewhere = target(tmp_path, U3, TargetAuth(initiator_portals=("10.77.0.0/24",)))
    await driver.apply([open_here, elsewhere])
    assert await discovered(STRANGER) == {open_here.iqn}
    assert await logs_in(STRANGER, open_here.iqn) and not await logs_in(STRANGER, elsewhere.iqn)


async def test_with_a_name_and_an_address_a_stranger_at_that_address_is_refused(driver: TgtDriver,
                                                                               tmp_path: Path) -> None:
    """ctld needs both to match; tgt admits either, so the driver binds only the name (the address is
    not enforced on tgt: README, Known limits)."""
    both = target(tmp_path, U2, TargetAuth(initiator_names=(node(U2),), initiator_portals=("127.0.0.1",)))
    await driver.apply([both])
    assert await discovered(node(U2)) == {both.iqn}
    assert await discovered(STRANGER) == set()
    assert not await logs_in(STRANGER, both.iqn)
