"""The ctld driver's exact file and argv, with a recording runner standing in for FreeBSD.

The "kernel" below answers `ctladm devlist -x`/`portlist -x` from the last ctl.conf that a reload
read, `lag` polls after the reload — ctld applies a reload asynchronously — or never, when the file
"had a parse error" (ctld then silently keeps the old configuration).
"""

from __future__ import annotations

import dataclasses
import json
import re
import stat
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from bootfiles.spec import Profile
from domain.core import build_domain
from domain.errors import Conflict
from domain.requests import CreateServer
from domain.store import AsyncStore, Store, TemplateVersion, User
from iscsi import ctlconf
from iscsi.ctld import CtldDriver, CtlLimits, parse_devlist, parse_portlist, state_from_ctladm
from iscsi.file_backend import FileBackend
from iscsi.model import StorageError
from iscsi.runner import CommandResult, RecordingRunner
from tests.unit.test_iscsi_specs import PREFIX, U1, U2, sample_targets
from web.api_misc import list_pools
from web.deps import WebDeps
from web.errors import classify
from web.keys import DEPS

DATA = Path(__file__).resolve().parent.parent / "data" / "ctld"
SHOW = (("ctladm", "devlist", "-x"), ("ctladm", "portlist", "-x"))
LIMITS = (("sysctl", "-n", "kern.cam.ctl.max_luns"), ("sysctl", "-n", "kern.cam.ctl.max_ports"))
# The ports CTL registers itself on every host (ctladm portlist of a FreeBSD 14 machine without HBAs)
OWN_PORTS = "".join(f'<targ_port id="{i}"><frontend_type>{fe}</frontend_type><port_name>{fe}</port_name></targ_port>'
                    for i, fe in enumerate(("tpc", "camsim", "ioctl")))


def xml_for(conf: ctlconf.CtlConf) -> tuple[str, str]:
    ids = {lun.name: i for i, lun in enumerate(conf.luns)}
    dev = ["<ctllunlist>"]
    for lun in conf.luns:
        dev.append(f'<lun id="{ids[lun.name]}"><backend_type>block</backend_type><file>{lun.path}</file>'
                   f"<serial_number>{lun.serial}</serial_number><ctld_name>{lun.name}</ctld_name></lun>")
    dev.append("</ctllunlist>")
    ports = [f"<ctlportlist>{OWN_PORTS}"]
    for n, t in enumerate(conf.targets, 3):
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
        self.sysctl = {"kern.cam.ctl.max_luns": 1024, "kern.cam.ctl.max_ports": 256}  # CTL's defaults

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
        if argv[:2] == ("sysctl", "-n"):
            return f"{self.sysctl[argv[2]]}\n"
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
        *LIMITS, *SHOW,  # start: CTL's limits, and what its own ports and LUNs hold of them
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


# -- CTL's limits: kern.cam.ctl.max_luns and max_ports, less what CTL's own ports and LUNs hold ----


def captured(argv: tuple[str, ...]) -> str:
    return {
        LIMITS[0]: "8192\n", LIMITS[1]: "2048\n",
        SHOW[0]: (DATA / "devlist.xml").read_text(),  # two ctld LUNs and a ramdisk made with ctladm create
        SHOW[1]: (DATA / "portlist-ctl-own.xml").read_text(),  # tpc, camsim, ioctl, an HBA port, one target
    }[argv]


async def test_start_reads_both_limits_and_counts_ctls_own_ports_and_luns(tmp_path: Path) -> None:
    runner = RecordingRunner(captured)
    driver = CtldDriver(tmp_path / "ctl.conf", ["0.0.0.0:3260"], runner)
    await driver.start()
    assert runner.calls == [*LIMITS, *SHOW]
    assert driver.limits() == CtlLimits(max_luns=8192, max_ports=2048, other_luns=1, other_ports=4)
    assert driver.limits().as_json() == {"max_luns": 8192, "max_ports": 2048, "other_luns": 1,
                                         "other_ports": 4, "max_luns_per_target": 1024}


async def test_lun_limit_counts_the_luns_ctld_did_not_make_and_refuses_before_writing(tmp_path: Path) -> None:
    conf = tmp_path / "ctl.conf"
    runner = RecordingRunner(captured)
    driver = CtldDriver(conf, ["0.0.0.0:3260"], runner, max_luns=4, max_ports=256)
    await driver.start()
    assert runner.calls == [*SHOW]  # limits given: no sysctl
    assert driver.refusal(2, 3) is None  # 3 + the ramdisk LUN = 4 fit
    with pytest.raises(ctlconf.LimitError) as info:
        await driver.apply(sample_targets())  # 4 LUNs
    assert str(info.value) == ("4 LUNs, and 1 more that ctld did not make, are more than "
                               "kern.cam.ctl.max_luns=4 (raise it in /boot/loader.conf)")
    assert not conf.exists() and runner.calls == [*SHOW]


async def test_port_limit_counts_ctls_own_ports(tmp_path: Path) -> None:
    driver = CtldDriver(tmp_path / "ctl.conf", ["0.0.0.0:3260"], RecordingRunner(captured), max_ports=8)
    await driver.start()
    assert driver.refusal(4, 4) is None  # 4 targets + tpc, camsim, ioctl and isp0 = 8 ports
    assert driver.refusal(5, 5) == ("5 targets need 5 CTL ports and CTL's own ports hold 4: more than "
                                    "kern.cam.ctl.max_ports=8 (raise it in /boot/loader.conf)")


async def test_without_ctladm_ctls_three_own_ports_are_assumed(tmp_path: Path) -> None:
    def respond(argv: tuple[str, ...]) -> tuple[int, str, str] | str:
        if argv[0] == "ctladm":
            return 1, "", "ctladm: error opening /dev/cam/ctl: No such file or directory"
        return "256\n"

    driver = CtldDriver(tmp_path / "ctl.conf", ["0.0.0.0:3260"], RecordingRunner(respond))
    await driver.start()
    assert driver.limits() == CtlLimits(max_luns=256, max_ports=256, other_luns=0, other_ports=3)
    assert driver.refusal(253, 1) is None and driver.refusal(254, 1) is not None


async def test_apply_counts_again_what_ctl_holds(tmp_path: Path) -> None:
    conf = tmp_path / "ctl.conf"
    ctl = FakeCtl(conf)
    driver = CtldDriver(conf, ["0.0.0.0:3260"], ctl.runner, ctl.sleep, max_luns=8, max_ports=8)
    assert driver.other_ports is None
    await driver.apply(sample_targets())
    assert (driver.other_ports, driver.other_luns) == (3, 0)  # the targets' own iSCSI ports are not counted


async def test_a_create_that_would_not_fit_ctl_is_a_409_naming_the_limit(tmp_path: Path) -> None:
    store = AsyncStore(Store(tmp_path / "cello.db"))
    try:
        backend = FileBackend(tmp_path / "volumes")
        ctl = FakeCtl(tmp_path / "ctl.conf")
        ctl.sysctl["kern.cam.ctl.max_ports"] = 4  # CTL's own tpc, camsim, ioctl + one target
        driver = CtldDriver(tmp_path / "ctl.conf", ["0.0.0.0:3260"], ctl.runner, ctl.sleep)
        domain = build_domain(store, backend, driver, iqn_prefix=PREFIX, profiles={"compute": Profile("compute")},
                              default_profile="compute", portal=("127.0.0.1", 3260), http_base="http://127.0.0.1")
        await store.call(store.sync.put_user, User("alice", 32, 1024))
        await store.call(store.sync.add_template_version,
                         TemplateVersion("tiny", "v1", "tiny", 64 << 20, "k", "i", 0.0))
        await driver.start()
        await domain.servers.create_server(CreateServer(U1, "tiny", "alice", "compute"))
        with pytest.raises(Conflict) as info:
            await domain.servers.create_server(CreateServer(U2, "tiny", "alice", "compute", data_gb=(1,)))
        assert str(info.value) == (
            f"server {U2} does not fit the iSCSI target: 2 targets need 2 CTL ports and CTL's own ports "
            "hold 3: more than kern.cam.ctl.max_ports=4 (raise it in /boot/loader.conf)")
        api = classify(info.value)
        assert api is not None and api.status == 409
        assert await store.call(store.sync.server, U2) is None  # nothing recorded, no quota taken
        assert not (tmp_path / "ctl.conf").exists()

        deps = WebDeps(domain=domain, files_root=tmp_path, health=dict, version="test")
        app = web.Application()
        app[DEPS] = deps
        resp = await list_pools(make_mocked_request("GET", "/api/v1/pools", app=app))
        assert isinstance(resp, web.Response) and resp.text is not None
        assert json.loads(resp.text)[0]["export"] == {"driver": "ctld", "limits": {
            "max_luns": 1024, "max_ports": 4, "other_luns": 0, "other_ports": 3, "max_luns_per_target": 1024}}
    finally:
        store.close()


def test_the_appliance_image_sizes_ctl_for_its_documented_capacity() -> None:
    """build.sh's loader.conf tunables hold the capacity image-build/appliance/README.md states
    (2,000 servers, 8,000 LUNs), with CTL's own ports of a host with an HBA taken first."""
    appliance = Path(__file__).resolve().parents[2] / "image-build" / "appliance"
    tunables = dict(re.findall(r"'(kern\.cam\.ctl\.max_\w+)=\"(\d+)\"'", (appliance / "build.sh").read_text()))
    max_luns, max_ports = int(tunables["kern.cam.ctl.max_luns"]), int(tunables["kern.cam.ctl.max_ports"])
    for value in (max_luns, max_ports):
        assert value & (value - 1) == 0, f"{value}: CTL ignores a tunable that is not a power of two"
    assert "**2,000 servers and 8,000 LUNs in all**" in (appliance / "README.md").read_text()
    own = parse_portlist((DATA / "portlist-ctl-own.xml").read_text())
    limits = CtlLimits(max_luns, max_ports, other_luns=0, other_ports=sum(1 for p in own if p.frontend != "iscsi"))
    assert limits.refusal(2000, 8000) is None
    assert CtlLimits(1024, 256).refusal(2000, 8000) is not None  # CTL's defaults would not do
