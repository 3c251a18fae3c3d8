"""What the tgt driver carries from one apply to the next, with recorded commands (no tgtd).

A spec checked once is not checked again while it stays equal; a changed one always is. A system
tgtd (manage_daemon=False) is the host's too, so every apply reads it afresh.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import pytest

from iscsi.model import NameError_, TargetSpec
from iscsi.runner import RecordingRunner
from iscsi.tgt import TgtDriver
from tests.unit.test_iscsi_specs import PREFIX, U1, stable_lun


def respond(argv: tuple[str, ...]) -> str | None:
    return "Account list:\n" if argv[-2:] == ("--mode", "account") else None


def shows(runner: RecordingRunner) -> int:
    return sum(1 for c in runner.calls if c[-4:] == ("--op", "show", "--mode", "target"))


GOOD = TargetSpec(f"{PREFIX}:{U1}", (stable_lun(f"tiny-OS-{U1}", 0, "S1", path="/v/a.img"),))


@pytest.mark.parametrize("change", [
    lambda s: dataclasses.replace(s, luns=(dataclasses.replace(s.luns[0], path="/v/a b.img"),)),
    lambda s: dataclasses.replace(s, luns=(dataclasses.replace(s.luns[0], serial="S1\n"),)),
    lambda s: dataclasses.replace(s, luns=(dataclasses.replace(s.luns[0], volume="x{"),)),
])
async def test_a_changed_spec_is_checked_again(change: Callable[[TargetSpec], TargetSpec]) -> None:
    runner = RecordingRunner(respond)
    driver = TgtDriver(40, ["127.0.0.1:13260"], manage_daemon=False, runner=runner,
                       state_dir=Path("/nonexistent"))
    await driver.apply([GOOD])
    runner.calls.clear()
    bad = change(GOOD)
    with pytest.raises(NameError_):
        await driver.apply([bad])
    assert runner.calls == []
    await driver.apply([GOOD])  # and the good one still goes through


async def test_a_system_tgtd_is_read_afresh_by_every_apply() -> None:
    runner = RecordingRunner(respond)
    driver = TgtDriver(40, ["127.0.0.1:13260"], manage_daemon=False, runner=runner,
                       state_dir=Path("/nonexistent"))
    await driver.apply([GOOD])
    runner.calls.clear()
    await driver.apply([GOOD])
    assert shows(runner) == 2  # the opening and the closing show
