"""bmc's IPMI client (ipmitool, lanplus) against virtualbmc driving a real libvirt qemu domain
(tests/bmc_lab.py): every power action and boot change is checked on the domain itself, through virsh."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest

from bmc import BmcError, IpmiController, controller, parse_bmc_url
from tests import bmc_lab
from tests.bmc_lab import PASSWORD, USER, Lab


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    workdir = tmp_path_factory.mktemp("ipmi")
    with bmc_lab.libvirtd(workdir), bmc_lab.domain(workdir) as dom, bmc_lab.virtualbmc(workdir, dom) as url:
        yield Lab(dom, url)


async def test_status_on_off_cycle_are_real(lab: Lab) -> None:
    # virtualbmc answers "chassis power cycle" with "Invalid data field": the client falls back to off + on.
    await bmc_lab.check_power_actions(controller(lab.url, USER, PASSWORD), lab.dom)


async def test_boot_pxe_once_changes_the_domains_boot_device(lab: Lab) -> None:
    await bmc_lab.check_boot_pxe_once(controller(lab.url, USER, PASSWORD), lab.dom)


async def test_the_password_is_never_on_the_command_line(lab: Lab) -> None:
    power = controller(lab.url, USER, PASSWORD)
    assert isinstance(power, IpmiController)
    task = asyncio.create_task(power.status())
    seen: list[str] = []
    while not task.done():  # read every ipmitool's /proc/PID/cmdline while it runs
        seen += bmc_lab.ipmitool_command_lines()
        await asyncio.sleep(0.005)
    assert await task in ("on", "off")
    # (a command line read while ipmitool rewrites its own argv may show a blank more: compare words)
    assert any(" ".join(line.split()).endswith(f"-U {USER} -E -v -N 1 -R 3 chassis power status")
               for line in seen), seen
    assert all(PASSWORD not in line for line in seen)
    assert PASSWORD not in " ".join(power.argv(["chassis", "power", "status"]))


async def test_a_wrong_password_is_refused_clearly(lab: Lab) -> None:
    with pytest.raises(BmcError) as caught:
        await controller(lab.url, USER, "not-the-password").status()
    message = str(caught.value)
    assert message == f"{parse_bmc_url(lab.url)}: read power state: login refused: check the BMC user and password"


async def test_an_unreachable_bmc_times_out_within_the_bound() -> None:
    url = f"ipmi://127.0.0.1:{bmc_lab.free_port(bmc_lab.socket.SOCK_DGRAM)}"  # nobody there
    started = time.monotonic()
    with pytest.raises(BmcError, match=r"^ipmi://127\.0\.0\.1:\d+: read power state: no answer within 2s$"):
        await controller(url, USER, PASSWORD, timeout=2).power("on")
    assert time.monotonic() - started < 4
    assert bmc_lab.ipmitool_command_lines() == []  # the timed-out ipmitool was killed, not left behind


async def test_a_missing_ipmitool_is_named() -> None:
    power = IpmiController(parse_bmc_url("ipmi://127.0.0.1"), USER, PASSWORD, ipmitool="/nonexistent/ipmitool")
    with pytest.raises(BmcError, match=r"^ipmi://127\.0\.0\.1:623: read power state: /nonexistent/ipmitool is not"):
        await power.status()
