"""The ctld driver's exact file and argv, with a recording runner standing in for FreeBSD.

The "kernel" below answers `ctladm devlist -x`/`portlist -x` from the last ctl.conf that a reload
read, `lag` polls after the reload — ctld applies a reload asynchronously — or never, when the file
"had a parse error" (ctld then silently keeps the old configuration).
"""

from __future__ import annotations

import dataclasses
import stat
from pathlib import Path

import pytest

from iscsi import ctlconf
from iscsi.ctld import CtldDriver, parse_devlist, parse_portlist, state_from_ctladm
from iscsi.model import StorageError
from iscsi.runner import CommandResult, RecordingRunner
from tests.unit.test_iscsi_specs import PREFIX, U1, U2, sample_targets

DATA = Path(__file__).resolve().parent.parent / "data" / "ctld"
SHOW = (("ctladm", "devlist", "-x"), ("ctladm", "portlist", "-x"))


def xml_for(conf: ctlconf.CtlConf) -> tuple[str, str]:
    ids = {lun.name: i for i, lun in enumerate(conf.luns)}
    dev = ["<ctllunlist>"]
    for lun in conf.luns:
        dev.append(f'<lun id="{ids[lun.name]}"><backend_type>block</backend_type><file>{lun.path}</file>'
                   f"<serial_number>{lun.serial}</serial_number><ctld_name>{lun.name}</ctld_name></lun>")
    dev.append("</ctllunlist>")
    ports = ['<ctlportlist><targ_port id="0"><frontend_type>ioctl</frontend_type></targ_port>']
    for n, t in enumerate(conf.targets, 1):
        lunmap = "".join(f'<lun id="{num}">{ids[name]}</lun>' for num, name in t.luns)
        ports.append(f'<targ_port id="{n}"><frontend_type>iscsi</frontend_type>'
                     f"<cfiscsi_target>{t.iqn}</cfiscsi_target>{lunmap}</targ_port>")
    ports.append("</ctlportlist>")
    return "\n".join(dev), "\n".join(ports)


class FakeCtl:
    def __init__(self, conf_path: Path, lag: int = 0) -> None:
        self.conf_path = conf_path
        self.lag = lag
        self.broken = False
        self.kernel = ctlconf.CtlConf()
        self.pending: ctlconf.CtlConf | None = None
        self.countdown = 0
        self.runner = RecordingRunner(self.respond)
        self.sleeps: list[float] = []

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)

    def respond(self, argv: tuple[str, ...]) -> CommandResult | str | None:
        if argv == ("service", "ctld", "reload"):
            if not self.broken:
                self.pending, self.countdown = ctlconf.parse(self.conf_path.read_text()), self.lag
            return None
        if argv[:2] == ("ctladm", "devlist"):
            if self.pending is not None:
                if self.countdown == 0:
                    self.kernel, self.pending = self.pending, None
                else:
                    self.countdown -= 1
            return xml_for(self.kernel)[0]
        if argv[:2] == ("ctladm", "portlist"):
            return xml_for(self.kernel)[1]
        if argv[0] == "sysctl":
            return "256\n"
        raise AssertionError(f"unexpected command {argv}")


async def test_apply_writes_the_exact_file_then_reloads_and_verifies(tmp_path: Path) -> None:
    conf = tmp_path / "etc" / "ctl.conf"
    ctl = FakeCtl(conf, lag=2)
    driver = CtldDriver(conf, ["0.0.0.0:3260", "[::]:3260"], ctl.runner, ctl.sleep, verify_interval=0.1)
    await driver.start()
    state = await driver.apply(sample_targets())
    assert conf.read_text() == (DATA / "sample.conf").read_text()
    assert stat.S_IMODE(conf.stat().st_mode) == 0o640
    assert ctl.runner.calls == [
        ("sysctl", "-n", "kern.cam.ctl.max_ports"),
        ("service", "ctld", "reload"),
        *SHOW, *SHOW, *SHOW,  # reload applied asynchronously: two polls see the old state
    ]
    assert ctl.sleeps == [0.1, 0.1]
    assert state.targets == {
        f"{PREFIX}:{U1}": {f"tiny-OS-{U1}": 0, f"tiny-DATA-{U1}": 1, f"tiny-DATA-{U1}-3": 3},
        f"{PREFIX}:{U2}": {f"debian.12-OS-{U2}": 0},
    }
    assert not any("restart" in c for call in ctl.runner.calls for c in call)
    assert [p.name for p in conf.parent.iterdir()] == ["ctl.conf"]  # no temp file left behind


async def test_unchanged_bytes_mean_no_write_and_no_reload(tmp_path: Path) -> None:
    conf = tmp_path / "ctl.conf"
    ctl = FakeCtl(conf)
    driver = CtldDriver(conf, ["0.0.0.0:3260", "[::]:3260"], ctl.runner, ctl.sleep)
    await driver.apply(sample_targets())
    inode = conf.stat().st_ino
    ctl.runner.calls.clear()
    await driver.apply(list(reversed(sample_targets())))
    assert ctl.runner.calls == [*SHOW]
    assert conf.stat().st_ino == inode and driver.writes == 1 and driver.reloads == 1


async def test_a_silently_rejected_reload_is_reported(tmp_path: Path) -> None:
    conf = tmp_path / "ctl.conf"
    ctl = FakeCtl(conf)
    driver = CtldDriver(conf, ["0.0.0.0:3260"], ctl.runner, ctl.sleep, verify_timeout=0.0)
    await driver.apply(sample_targets()[:1])
    ctl.broken = True  # ctld keeps the old config; `service ctld reload` still exits 0
    with pytest.raises(StorageError, match=f"target {PREFIX}:{U2} missing"):
        await driver.apply(sample_targets())


async def test_lun_removal_is_confirmed_before_apply_returns(tmp_path: Path) -> None:
    conf = tmp_path / "ctl.conf"
    ctl = FakeCtl(conf, lag=3)
    driver = CtldDriver(conf, ["0.0.0.0:3260"], ctl.runner, ctl.sleep)
    await driver.apply(sample_targets())
    first = sample_targets()[0]
    shrunk = [dataclasses.replace(first, luns=first.luns[:1]), sample_targets()[1]]
    ctl.runner.calls.clear()
    state = await driver.apply(shrunk)
    assert state.targets[first.iqn] == {f"tiny-OS-{U1}": 0}
    devlists = [c for c in ctl.runner.calls if c[:2] == ("ctladm", "devlist")]
    assert len(devlists) == 4  # polled until the kernel no longer had the removed LUNs
    assert f"tiny-DATA-{U1}" not in conf.read_text()
    assert 'lun "0" "tiny-OS-' in conf.read_text()


async def test_port_limit_refused_before_writing(tmp_path: Path) -> None:
    conf = tmp_path / "ctl.conf"
    ctl = FakeCtl(conf)
    driver = CtldDriver(conf, ["0.0.0.0:3260"], ctl.runner, ctl.sleep, max_ports=2)
    with pytest.raises(ctlconf.LimitError, match="max_ports"):
        await driver.apply(sample_targets())
    assert not conf.exists() and ctl.runner.calls == []


def test_parse_captured_ctladm_xml() -> None:
    luns = parse_devlist((DATA / "devlist.xml").read_text())
    ports = parse_portlist((DATA / "portlist.xml").read_text())
    assert [(lun.ctl_id, lun.ctld_name) for lun in luns] == [
        (0, f"tiny-OS-{U1}"), (1, f"tiny-DATA-{U1}"), (2, None)]
    assert state_from_ctladm(luns, ports) == {f"{PREFIX}:{U1}": {f"tiny-OS-{U1}": 0, f"tiny-DATA-{U1}": 1}}


def test_lun_number_is_the_index() -> None:
    driver = CtldDriver(Path("/nonexistent/ctl.conf"), ["0.0.0.0:3260"], RecordingRunner())
    assert [driver.lun_number(i) for i in (0, 1, 5)] == [0, 1, 5]
