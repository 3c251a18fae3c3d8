"""A node's root disk survives its target going away and the appliance restarting.

One lab for the module (tests/system/conftest.py). One qemu node (TCG, BIOS, pxelinux) boots the tiny
template from its own clone on the profile `writeloop` (pxelinux + `cello.test=writeloop`): its init writes
and syncs /cello-writeloop once a second and prints `cello-writeloop <n> <uptime> recovery_tmo=<s>`
(the session's replacement timeout in the node's kernel). A thread notes the host time at which each
such line reaches the serial log; a scenario's stall is the longest gap between two lines (or from the
scenario's start to its first line) while it runs. The node is booted once; the
scenarios run on it in file order, each with its own assertions:

  a. tgtd is SIGKILLed (by the PID of Cello's tgtd); the appliance restarts it and re-applies the exports;
     the node's iscsid logs in again and the loop goes on.
  b. the target is away for 30 s as a reboot of the appliance host looks from the node: Cello's link is
     down (nothing answers at 10.77.0.2) and tgtd is killed meanwhile, so what answers again is a new
     tgtd without the old session; the loop waits and goes on.
  c. `cello serve` is stopped with SIGTERM and started, then killed with SIGKILL and started: the same
     tgtd serves throughout, the session is never dropped, the loop never stalls for more than a few
     seconds, and each start succeeds the first time.

In every scenario the console must show no I/O error (block layer, buffer, ext4, read-only remount), and
the session iscsid has logged in again keeps the root's replacement timeout (86400 s, not open-iscsi's 120 s).
"""

from __future__ import annotations

import itertools
import os
import re
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.system.lab import NS_CELLO, VETH_CELLO, Lab, LabError, Node, in_ns
from tests.system.test_e2e_boot import (
    USER,
    cli_ok,
    create_server,
    fail_with_logs,
    marker,
    target_block,
    wait_until,
)

pytestmark = pytest.mark.system

NODE = ("survivor", "3f1c2b4e-0000-4000-8000-0000000000d1", "52:54:00:77:00:d1")
PROFILE = "writeloop"
WRITELOOP_PROFILE = (
    f"[boot.profiles.{PROFILE}]\n"
    'loader = "pxelinux"\n'
    'kernel_args = "console=ttyS0 cello.test=writeloop"\n'
)
BOOT_TIMEOUT = 120.0  # TCG: ~35 s from power-on to the marker here
RESUMED = 3  # loop lines after a disruption that show the loop goes on
AWAY = 30.0  # scenario b: how long the target is unreachable
CELLO_DOWN = 5.0  # scenario c: how long the appliance stays down each time
STALL_LIMIT = 5.0  # scenario c: "a few seconds" (the loop's period is ~1 s)
RECOVERED = "is operational after recovery"  # iscsid, once it has logged the session in again
CONN_ERROR = "detected conn error"  # the kernel, when the session's connection failed
IO_ERRORS = ("I/O error", "Buffer I/O error", "EXT4-fs error", "Remounting filesystem read-only",
             "Aborting journal", "rejecting I/O", "cello-writeloop-failed")
ROOT_TMO = "86400"  # the root session's replacement timeout (image-build/tiny/iscsid.conf), not 120
_LINE = re.compile(rb"cello-writeloop (\d+) \S+ recovery_tmo=(\S+)")


@dataclass(frozen=True)
class Tick:
    n: int
    at: float  # host monotonic time the line reached the serial log
    recovery_tmo: str  # the session's replacement timeout in the node's kernel then


@dataclass
class WriteLoopWatch:
    """Follows a node's serial log from a thread and notes each `cello-writeloop` line with the host time."""

    serial: Path
    ticks: list[Tick] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="writeloop-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        offset, partial = 0, b""
        while not self._stop.wait(0.1):
            try:
                with open(self.serial, "rb") as f:
                    f.seek(offset)
                    data = f.read()
            except FileNotFoundError:
                continue
            offset += len(data)
            now = time.monotonic()
            *lines, partial = (partial + data).split(b"\n")
            for line in lines:
                found = _LINE.search(line)
                if found:
                    with self._lock:
                        self.ticks.append(Tick(int(found[1]), now, found[2].decode(errors="replace")))

    def since(self, start: float) -> list[Tick]:
        with self._lock:
            return [t for t in self.ticks if t.at > start]

    def wait(self, after: float, count: int, timeout: float, what: str) -> list[Tick]:
        """The first `count` lines seen after `after`; LabError when they are not there within `timeout`."""
        deadline = time.monotonic() + timeout
        while len(ticks := self.since(after)) < count:
            if time.monotonic() > deadline:
                last = self.ticks[-1] if self.ticks else None
                raise LabError(f"{what}: {len(ticks)} of {count} write-loop lines within {timeout:.0f} s "
                               f"(last: {last})")
            time.sleep(0.2)
        return ticks[:count]


@dataclass(frozen=True)
class Booted:
    node: Node
    watch: WriteLoopWatch
    iqn: str


@dataclass(frozen=True)
class Window:
    """One scenario: when it began (host clock) and where the serial log stood then."""

    start: float
    offset: int


def begin(booted: Booted) -> Window:
    window = Window(time.monotonic(), booted.node.serial.stat().st_size)
    booted.watch.wait(window.start, 2, 20, "writing before the scenario")
    return window


def console_since(node: Node, window: Window) -> str:
    with open(node.serial, "rb") as f:
        f.seek(window.offset)
        return f.read().decode(errors="replace")


def io_errors(text: str) -> list[str]:
    return [line for line in text.splitlines() if any(e in line for e in IO_ERRORS)]


def longest_stall(watch: WriteLoopWatch, window: Window) -> tuple[float, int]:
    """Seconds of the longest gap between loop lines since the window began, and the line ending it."""
    ticks = watch.since(window.start)
    points = [(window.start, 0), *((t.at, t.n) for t in ticks)]
    gap, n = max((b[0] - a[0], b[1]) for a, b in itertools.pairwise(points))
    return gap, n


def report(name: str, booted: Booted, window: Window) -> tuple[float, str]:
    """Prints the scenario's longest stall; (that stall, the console since the scenario began). The
    session iscsid logged in again has the root's replacement timeout, not open-iscsi's 120 s."""
    stall, n = longest_stall(booted.watch, window)
    ticks = booted.watch.since(window.start)
    lines = len(ticks)
    assert ticks[-1].recovery_tmo == ROOT_TMO, f"the node's session has recovery_tmo {ticks[-1].recovery_tmo}"
    print(f"\n{name}: longest stall of the write loop {stall:.1f} s (ended by line {n}); "
          f"{lines} lines in {time.monotonic() - window.start:.0f} s")
    return stall, console_since(booted.node, window)


def only_tgtd(lab: Lab) -> int:
    pids = lab.tgtd_pids()
    assert len(pids) == 1, f"expected one tgtd of the lab, found {pids}"
    return pids[0]


def kill_tgtd_and_wait_for_its_successor(lab: Lab, iqn: str) -> int:
    """SIGKILL Cello's tgtd; the PID of the tgtd the appliance started instead, once it exports `iqn`."""
    old = only_tgtd(lab)
    os.kill(old, signal.SIGKILL)
    new: list[int] = wait_until("the appliance restarts tgtd",
                                lambda: [p for p in lab.tgtd_pids() if p != old], 30)
    wait_until(f"tgtd exports {iqn} again", lambda: target_block(lab.tgt_show(), iqn), 30)
    return new[0]


@pytest.fixture(scope="module")
def booted(lab: Lab) -> Iterator[Booted]:
    """The node, booted from its clone on the write-loop profile, with iscsid holding its session."""
    _, uuid, _ = NODE
    lab.extra_config = WRITELOOP_PROFILE
    node = lab.node(*NODE)
    watch = WriteLoopWatch(node.serial)
    try:
        lab.stop_cello()
        lab.start_cello()  # cello.toml now has the profile
        cli_ok(lab, "user", "create", USER, "--max-volumes", "16", "--max-data-gb", "16")
        cli_ok(lab, "template", "build", "tiny", "--from", "tiny", timeout=240)
        server = create_server(lab, NODE, PROFILE)
        node.power_on()
        watch.start()
        took = node.wait_console(marker(uuid), BOOT_TIMEOUT)
        if "cello-iscsid: started" in node.console():
            # iscsid takes the session over by logging it in again: let that pass before any scenario
            node.wait_console(f"iscsid: connection1:0 {RECOVERED}", BOOT_TIMEOUT)
        after_boot = watch.wait(0, 3, 30, "the write loop after boot")
    except (LabError, AssertionError) as e:
        fail_with_logs(lab, f"the write-loop node did not come up: {e}")
    print(f"\nwrite-loop node: power-on → root in {took:.1f} s")
    assert "cello.test=writeloop" in node.console()
    assert after_boot[-1].recovery_tmo == ROOT_TMO, after_boot
    yield Booted(node, watch, server["target"]["iqn"])
    watch.stop()
    lab.release(node)


def check_no_io_error(lab: Lab, text: str) -> None:
    errors = io_errors(text)
    if errors:
        fail_with_logs(lab, "the node's console shows I/O errors:\n" + "\n".join(errors[:20]))


def test_a_tgtd_killed_the_appliance_restarts_it_and_the_node_writes_on(lab: Lab, booted: Booted) -> None:
    window = begin(booted)
    try:
        kill_tgtd_and_wait_for_its_successor(lab, booted.iqn)
        killed = time.monotonic()
        booted.watch.wait(killed, RESUMED, 120, "the write loop after tgtd's restart")
    except LabError as e:
        fail_with_logs(lab, str(e))
    _stall, text = report("a. tgtd SIGKILL", booted, window)
    check_no_io_error(lab, text)
    assert CONN_ERROR in text, "the node never saw its connection fail: tgtd was not the one it used"
    assert RECOVERED in text, "iscsid did not log the session in again"


def test_b_target_away_for_30_s_the_node_waits_and_writes_on(lab: Lab, booted: Booted) -> None:
    window = begin(booted)
    try:
        in_ns(NS_CELLO, "ip", "link", "set", VETH_CELLO, "down")
        try:
            away = time.monotonic()
            kill_tgtd_and_wait_for_its_successor(lab, booted.iqn)  # behind the down link
            time.sleep(max(0.0, away + AWAY - time.monotonic()))
        finally:
            in_ns(NS_CELLO, "ip", "link", "set", VETH_CELLO, "up")
        back = time.monotonic()
        booted.watch.wait(back, RESUMED, 180, "the write loop after the target came back")
    except LabError as e:
        fail_with_logs(lab, str(e))
    stall, text = report(f"b. target away {AWAY:.0f} s", booted, window)
    check_no_io_error(lab, text)
    assert stall >= AWAY - 5, f"the loop went on while its target was away ({stall:.1f} s): no real outage"
    assert RECOVERED in text, "iscsid did not log the session in again"


def start_or_fail(lab: Lab, which: str) -> None:
    try:
        lab.start_cello()
    except LabError as e:
        fail_with_logs(lab, f"{which} start of cello serve failed: {e}")


def test_c_cello_serve_stopped_and_crashed_the_node_never_notices(lab: Lab, booted: Booted) -> None:
    window = begin(booted)
    tgtd = only_tgtd(lab)
    lab.stop_cello()  # SIGTERM
    time.sleep(CELLO_DOWN)
    start_or_fail(lab, "the first")
    booted.watch.wait(time.monotonic(), 2, 30, "the write loop after the first restart")
    status = lab.kill_cello(signal.SIGKILL)
    assert status == -signal.SIGKILL, status
    time.sleep(CELLO_DOWN)
    start_or_fail(lab, "the second")
    try:
        booted.watch.wait(time.monotonic(), RESUMED, 30, "the write loop after the second restart")
    except LabError as e:
        fail_with_logs(lab, str(e))
    stall, text = report("c. cello serve SIGTERM + start, SIGKILL + start", booted, window)
    check_no_io_error(lab, text)
    assert lab.tgtd_pids() == [tgtd], "tgtd did not outlive cello serve"
    assert CONN_ERROR not in text, "the node's iSCSI connection failed while cello serve restarted"
    assert target_block(lab.tgt_show(), booted.iqn), f"{booted.iqn} is no longer exported"
    assert stall <= STALL_LIMIT, f"the write loop stalled {stall:.1f} s while cello serve restarted"
