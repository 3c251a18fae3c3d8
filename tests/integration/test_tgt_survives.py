"""The data plane outlives the control plane: a real tgtd (control port 44) survives its driver's stop and
crash, keeps a real initiator's session (libiscsi's iscsi-perf, reading all along), and is adopted by the
next driver without a single change to it. Portal 127.0.0.1:13264.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from iscsi.file_backend import FileBackend
from iscsi.model import Session, TargetAuth
from iscsi.tgt import TgtDriver
from iscsi.tgtd import TgtdRecord, process_start_time, read_record, write_record
from tests.integration.test_tgt_export import PREFIX, U1, U2, TeeRunner, backend, run, spec
from tests.tools import require

__all__ = ["backend"]  # the fixture, shared with test_tgt_export

CONTROL_PORT = 44
PORTAL = "127.0.0.1:13264"
NODE = f"{PREFIX}:node-{U1}"
AUTH = TargetAuth(chap_user="node1", chap_secret="s3cret-s3cret", initiator_names=(NODE,))


@pytest.fixture(autouse=True)
def _tools() -> None:
    require("tgtd", "tgtadm", "iscsi-perf", root=True, packages="tgt libiscsi-bin")


def new_driver(state: Path) -> TgtDriver:
    return TgtDriver(CONTROL_PORT, [PORTAL], runner=TeeRunner(), state_dir=state)


@pytest.fixture
async def state(tmp_path: Path) -> AsyncIterator[Path]:
    folder = tmp_path / "state"
    try:
        yield folder
    finally:
        # whatever a test left: the explicit teardown is the only thing that stops this tgtd
        await new_driver(folder).teardown()


async def reader(uuid: str) -> asyncio.subprocess.Process:
    """An initiator that keeps one session and reads all the time; -x 0: no reconnect, a dropped session ends it."""
    return await asyncio.create_subprocess_exec(
        "iscsi-perf", "-i", NODE, "-x", "0", "-m", "4", f"iscsi://node1%s3cret-s3cret@{PORTAL}/{PREFIX}:{uuid}/1",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)


async def sessions(uuid: str = U1) -> set[str]:
    """tgt's I_T nexus ids on a target: a session that was dropped and made again has a new one."""
    rc, out = await run("tgtadm", "-C", str(CONTROL_PORT), "--lld", "iscsi", "--op", "show", "--mode", "target")
    assert rc == 0, out
    for block in re.split(r"^(?=Target \d+: )", out, flags=re.M):
        if block.startswith("Target ") and block.split(None, 3)[2] == f"{PREFIX}:{uuid}":
            return set(re.findall(r"I_T nexus: (\d+)", block))
    raise AssertionError(f"no target for {uuid} in:\n{out}")


async def wait_for_session() -> set[str]:
    for _ in range(100):
        if found := await sessions():
            return found
        await asyncio.sleep(0.1)
    raise AssertionError("the initiator never logged in")


async def stop_reader(proc: asyncio.subprocess.Process) -> str:
    if proc.returncode is None:
        proc.send_signal(signal.SIGINT)
    out, _ = await asyncio.wait_for(proc.communicate(), 20)
    return out.decode(errors="replace")


async def test_stop_leaves_tgtd_and_the_session_and_the_next_start_changes_nothing(
        backend: FileBackend, state: Path) -> None:
    targets = [spec(backend, U1, auth=AUTH), spec(backend, U2, data=False)]
    drivers = [new_driver(state), new_driver(state)]
    first = drivers[0]
    await first.start()
    try:
        await first.apply(targets)
    finally:
        await first.stop()
    await first.start()  # adopts its own tgtd again: stop() and start() may alternate
    pid = first.daemon.pid
    perf = await reader(U1)
    try:
        before = await wait_for_session()
        # the session a destructive action would name (initiator and address), as tgtd reports it
        assert await first.sessions(f"{PREFIX}:{U1}") == [Session(NODE, "127.0.0.1")]
        assert await first.sessions(f"{PREFIX}:{U2}") == []
        await first.stop()
        await asyncio.sleep(1)  # the initiator keeps reading from the tgtd that Cello left running
        assert pid is not None and process_start_time(pid) is not None
        assert perf.returncode is None
        assert await sessions() == before

        second = drivers[1]
        await second.start()
        assert second.adopted and second.daemon.pid == pid
        await second.apply(targets)  # what a restarted appliance's reconcile does
        runner = second._run
        assert isinstance(runner, TeeRunner)
        assert runner.mutations() == []  # nothing was touched: not a target, an account or an ACL
        await asyncio.sleep(1)
        assert perf.returncode is None and await sessions() == before

        # A changed target is changed, and only it: the other one's session is not disturbed.
        await second.apply([targets[0], spec(backend, U2, auth=TargetAuth(initiator_names=(f"{PREFIX}:node-{U2}",)))])
        assert {c[c.index("--tid") + 1] for c in runner.mutations()} == {str(second._tids[f"{PREFIX}:{U2}"])}
        assert perf.returncode is None and await sessions() == before
    finally:
        for d in drivers:
            await d.stop()
        out = await stop_reader(perf)
    assert "error" not in out.lower(), out


async def test_a_crashed_cello_leaves_tgtd_running_and_the_next_start_adopts_it(
        backend: FileBackend, state: Path) -> None:
    """The driver's process is SIGKILLed: no stop() runs at all. The next driver finds tgtd by its state file."""
    code = (
        "import asyncio, sys\n"
        "from pathlib import Path\n"
        "from iscsi.tgt import TgtDriver\n"
        "async def main():\n"
        f"    d = TgtDriver({CONTROL_PORT}, [{PORTAL!r}], state_dir=Path(sys.argv[1]))\n"
        "    await d.start()\n"
        "    print('ready', d.daemon.pid, flush=True)\n"
        "    await asyncio.sleep(600)\n"
        "asyncio.run(main())\n"
    )
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", code, str(state),
                                                stdout=asyncio.subprocess.PIPE, cwd=Path(__file__).parents[2])
    assert proc.stdout is not None
    line = (await asyncio.wait_for(proc.stdout.readline(), 20)).decode().split()
    assert line[0] == "ready", line
    pid = int(line[1])
    proc.kill()
    await proc.wait()
    assert process_start_time(pid) is not None  # tgtd is in a session of its own: the kill did not reach it
    record = read_record(state / f"tgtd-{CONTROL_PORT}.json")
    assert record is not None and record.pid == pid

    driver = new_driver(state)
    await driver.start()  # first time: no "control port already served"
    try:
        await adopted_and_watched(driver, pid, backend)
    finally:
        await driver.stop()


async def adopted_and_watched(driver: TgtDriver, pid: int, backend: FileBackend) -> None:
    assert driver.adopted and driver.daemon.pid == pid
    await driver.apply([spec(backend, U1, auth=AUTH)])
    rc, out = await run("iscsi-inq", "-i", NODE, f"iscsi://node1%s3cret-s3cret@{PORTAL}/{PREFIX}:{U1}/1")
    assert rc == 0, out

    # An adopted tgtd is watched as well as a child: its death is noticed and it is restarted.
    os.kill(pid, signal.SIGKILL)
    for _ in range(100):
        await asyncio.sleep(0.1)
        if driver.restarts and driver.daemon.running and (await driver.actual()).targets:
            break
    assert driver.restarts == 1 and driver.daemon.pid != pid
    rc, out = await run("iscsi-inq", "-i", NODE, f"iscsi://node1%s3cret-s3cret@{PORTAL}/{PREFIX}:{U1}/1")
    assert rc == 0, out


async def test_adoption_refuses_a_reused_pid(state: Path) -> None:
    """A state file whose pid now names another process (another start time) is not adopted."""
    write_record(state / f"tgtd-{CONTROL_PORT}.json", TgtdRecord(os.getpid(), 1))
    driver = new_driver(state)
    await driver.start()
    try:
        assert not driver.adopted and driver.daemon.pid != os.getpid()
    finally:
        await driver.teardown()
    assert read_record(state / f"tgtd-{CONTROL_PORT}.json") is None
