"""Durations from the event stream (domain/timings.py) and the session census (domain/census.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from domain import timings as t
from domain.census import SessionCounts
from domain.events import Event, EventBus
from iscsi.exports import ExportManager
from iscsi.model import ExportState, Session, StorageError, TargetSpec


def ev(at: float, kind: str, **data: object) -> Event:
    return Event(0, at, kind, data)


def test_workflow_durations_from_first_step_to_done_or_failed() -> None:
    tm = t.Timings()
    for e in (ev(100.0, "workflow", server="a", workflow="create", step="recorded"),
              ev(100.5, "workflow", server="b", workflow="create", step="recorded"),
              ev(101.0, "workflow", server="a", workflow="create", step="volume"),
              ev(103.0, "workflow", server="a", workflow="create", step="done"),
              ev(140.5, "workflow", server="b", workflow="create", step="failed"),
              ev(150.0, "workflow", server="a", workflow="rebuild", step="unexport"),
              ev(150.2, "workflow", server="a", workflow="rebuild", step="clone"),
              ev(162.0, "workflow", server="a", workflow="rebuild", step="done"),
              ev(170.0, "workflow", server="a", workflow="add-volume", step="done")):  # one step: no duration
        tm.observe(e)
    assert set(tm.workflows) == {("create", "ok"), ("create", "failed"), ("rebuild", "ok")}
    ok = tm.workflows["create", "ok"]
    assert (ok.count, ok.total) == (1, 3.0)
    assert dict(ok.cumulative())[2.5] == 0 and dict(ok.cumulative())[5.0] == 1
    assert tm.workflows["create", "failed"].total == 40.0
    assert tm.workflows["rebuild", "ok"].total == pytest.approx(12.0)


def test_power_on_to_root_and_last_dhcp_reply() -> None:
    tm = t.Timings()
    tm.observe(ev(10.0, "root", server="a", after_power_on_seconds=41.5))
    tm.observe(ev(11.0, "root", server="a", after_power_on_seconds="soon"))  # not a figure: ignored
    tm.observe(ev(12.0, "dhcp", server="a", reply="offer"))
    tm.observe(ev(13.0, "dhcp", server="a", reply="ack"))
    tm.observe(ev(14.0, "dhcp", server=None, reply="offer"))
    h = tm.power_on_to_root
    assert (h.count, h.total) == (1, 41.5)
    assert [n for le, n in h.cumulative() if le in (30.0, 45.0)] == [0, 1]
    assert dict(tm.last_dhcp_reply) == {"a": 13.0}


def test_what_is_tracked_stays_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(t, "TRACKED", 3)
    tm = t.Timings()
    for i in range(10):
        tm.observe(ev(float(i), "dhcp", server=f"s{i}"))
        tm.observe(ev(float(i), "workflow", server=f"s{i}", workflow="create", step="recorded"))
    assert list(tm.last_dhcp_reply) == ["s7", "s8", "s9"] and len(tm._started) == 3


def test_the_bus_calls_observers_and_survives_a_failing_one() -> None:
    bus = EventBus()
    seen: list[str] = []

    def broken(event: Event) -> None:
        raise RuntimeError("observer bug")

    bus.observers += [broken, lambda e: seen.append(e.kind)]
    bus.publish("dhcp", {"server": "a"})
    assert seen == ["dhcp"] and bus.counts["dhcp"] == 1


class CensusDriver:
    """all_sessions in one read, counted; `fail` makes the read fail."""

    name = "census"

    def __init__(self) -> None:
        self.reads = 0
        self.fail = False
        self.logged_in = {"iqn.x:a": [Session("i-a", "10.0.0.1")]}

    async def all_sessions(self) -> dict[str, list[Session]]:
        self.reads += 1
        await asyncio.sleep(0.01)
        if self.fail:
            raise StorageError("tgtadm show: no answer")
        return dict(self.logged_in)

    async def sessions(self, iqn: str) -> list[Session]:
        raise AssertionError("the census must not ask per target")

    async def apply(self, targets: Sequence[TargetSpec]) -> ExportState:
        raise NotImplementedError

    async def actual(self) -> ExportState:
        raise NotImplementedError


def manager(driver: object, targets: Sequence[str]) -> ExportManager:
    exports = ExportManager(driver, lambda: [])  # type: ignore[arg-type]
    exports.last_state = ExportState({iqn: {} for iqn in targets})
    return exports


async def test_one_driver_read_per_refresh_however_many_targets_and_askers() -> None:
    driver = CensusDriver()
    now = [0.0]
    census = SessionCounts(manager(driver, ["iqn.x:a", "iqn.x:b", "iqn.x:c"]), clock=lambda: now[0], fresh=5.0)
    answers = await asyncio.gather(*(census.per_target() for _ in range(20)))
    assert answers[0] == {"iqn.x:a": 1, "iqn.x:b": 0, "iqn.x:c": 0} and all(a == answers[0] for a in answers)
    assert driver.reads == 1
    now[0] = 4.0
    await census.per_target()
    assert driver.reads == 1  # still fresh
    now[0] = 5.5
    driver.logged_in["iqn.x:b"] = [Session("i-b", "10.0.0.2")]
    assert (await census.per_target())["iqn.x:b"] == 1 and driver.reads == 2
    now[0] = 11.0
    driver.fail = True
    with pytest.raises(StorageError):
        await census.per_target()


async def test_a_driver_without_a_census_is_asked_per_target_at_once() -> None:
    from tests.export_standin import InMemoryExports

    driver = InMemoryExports()
    driver.logged_in["iqn.x:b"] = [Session("i-b", "10.0.0.2"), Session("i-b2", "10.0.0.3")]
    census = SessionCounts(manager(driver, ["iqn.x:a", "iqn.x:b"]))
    assert await census.per_target() == {"iqn.x:a": 0, "iqn.x:b": 2}
    assert await SessionCounts(manager(driver, [])).per_target() == {}


async def test_ctld_lists_every_targets_sessions_in_one_islist(tmp_path: object) -> None:
    from pathlib import Path

    from iscsi.ctld import CtldDriver
    from iscsi.runner import RecordingRunner
    from tests.unit.test_sessions import ISLIST

    runner = RecordingRunner(respond=lambda argv: ISLIST if argv[:2] == ("ctladm", "islist") else None)
    driver = CtldDriver(Path(str(tmp_path)) / "ctl.conf", ["0.0.0.0:3260"], runner)
    census = SessionCounts(manager(driver, ["iqn.2026-11.io.cello:3f1c2b4e-0000-4000-8000-000000000001",
                                            "iqn.2026-11.io.cello:3f1c2b4e-0000-4000-8000-000000000002",
                                            "iqn.2026-11.io.cello:3f1c2b4e-0000-4000-8000-000000000003"]))
    assert list((await census.per_target()).values()) == [1, 1, 0]
    assert runner.calls == [("ctladm", "islist", "-x")]
    assert await driver.sessions("iqn.2026-11.io.cello:3f1c2b4e-0000-4000-8000-000000000003") == []


async def test_refused_logins_are_counted_from_the_supervised_tgtds_log_as_it_grows(tmp_path: object) -> None:
    from pathlib import Path

    from domain.census import LoginFailures
    from iscsi.tgt import TgtDriver

    driver = TgtDriver(99, ["127.0.0.1:13299"], state_dir=Path(str(tmp_path)))
    logins = LoginFailures(manager(driver, []))
    log = driver.daemon.log_path
    assert await logins.total() == 0  # no log yet
    fail = "tgtd: CHAP initiator auth.: authentication of iqn.2026-11.io.cello:node-a failed (wrong secret!?)"
    log.write_text("tgtd: bs_init(387) use signalfd notification\n" + fail)  # tgtd ends it with no newline
    assert await logins.total() == 1
    with log.open("a") as f:
        f.write(fail[:40])  # a line cut in the middle of its write
    assert await logins.total() == 1
    with log.open("a") as f:
        f.write(fail[40:] + fail)
    assert await logins.total() == 3
    assert await logins.total() == 3  # nothing new, nothing counted twice
    log.write_text(fail)  # a new log in its place (smaller than what was read)
    assert await logins.total() == 1
    assert await LoginFailures(manager(CensusDriver(), [])).total() is None  # no such log: no figure
