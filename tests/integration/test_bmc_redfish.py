"""bmc's Redfish client against sushy-tools' emulator driving a real libvirt qemu domain (tests/bmc_lab.py):
every power action and boot change is checked on the domain itself, through virsh."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from bmc import BmcError, controller, parse_bmc_url
from tests import bmc_lab
from tests.bmc_lab import PASSWORD, USER, Lab


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    workdir = tmp_path_factory.mktemp("redfish")
    with bmc_lab.libvirtd(workdir), bmc_lab.domain(workdir) as dom, bmc_lab.sushy_emulator(workdir, dom) as base:
        yield Lab(dom, f"{base}/{dom.uuid}")


async def test_status_on_off_cycle_are_real(lab: Lab) -> None:
    # sushy-tools offers ForceRestart (libvirt destroy + create), no PowerCycle: the client picks it.
    await bmc_lab.check_power_actions(controller(lab.url, USER, PASSWORD), lab.dom)


async def test_boot_pxe_once_changes_the_domains_boot_device(lab: Lab) -> None:
    await bmc_lab.check_boot_pxe_once(controller(lab.url, USER, PASSWORD), lab.dom)


async def test_the_only_system_is_found_without_an_id(lab: Lab) -> None:
    power = controller(lab.url.rsplit("/", 1)[0], USER, PASSWORD)
    assert await power.power("on") == "on" and lab.dom.state() == "running"
    assert await power.power("off") == "off" and lab.dom.state() == "shut off"


async def test_a_system_named_by_its_libvirt_name_is_followed_to_its_id(lab: Lab) -> None:
    # sushy-tools answers GET /Systems/<name> with a 307 to /Systems/<uuid>; the reset then goes to the
    # action target that the system document names.
    power = controller(f"{lab.url.rsplit('/', 1)[0]}/{lab.dom.name}", USER, PASSWORD)
    assert await power.power("on") == "on" and lab.dom.state() == "running"
    assert await power.power("off") == "off" and lab.dom.state() == "shut off"


async def test_https_checks_the_certificate_unless_the_url_says_verify_off(
        lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> None:
    workdir = tmp_path_factory.mktemp("redfish-https")
    with bmc_lab.sushy_emulator(workdir, lab.dom, tls=bmc_lab.self_signed_certificate(workdir)) as base:
        url = f"{base}/{lab.dom.uuid}"
        with pytest.raises(BmcError, match=r"^redfish\+https://127\.0\.0\.1:\d+/[-0-9a-f]+: read power state: "
                                           r"TLS certificate refused \(.*\); for a self-signed BMC add \?verify=off"):
            await controller(url, USER, PASSWORD).status()
        power = controller(f"{url}?verify=off", USER, PASSWORD)
        assert await power.power("on") == "on" and lab.dom.state() == "running"
        assert await power.power("off") == "off" and lab.dom.state() == "shut off"


async def test_a_wrong_password_is_refused_clearly(lab: Lab) -> None:
    with pytest.raises(BmcError) as caught:
        await controller(lab.url, USER, "not-the-password").status()
    message = str(caught.value)
    assert message == (f"{parse_bmc_url(lab.url)}: read power state: login refused (HTTP 401): "
                       "check the BMC user and password")


async def test_an_unknown_system_is_named(lab: Lab) -> None:
    # (sushy-tools answers 500 "'function' object has no attribute 'NotFound'" where it means 404.)
    with pytest.raises(BmcError, match=r"^redfish://127\.0\.0\.1:\d+/no-such-system: read power state: HTTP \d{3}: "):
        await controller(f"{lab.url.rsplit('/', 1)[0]}/no-such-system", USER, PASSWORD).status()


async def test_a_refused_port_fails_at_once() -> None:
    url = f"redfish://127.0.0.1:{bmc_lab.free_port()}/1"
    started = time.monotonic()
    with pytest.raises(BmcError, match=r"^redfish://127\.0\.0\.1:\d+/1: read power state: cannot connect"):
        await controller(url, USER, PASSWORD, timeout=5).status()
    assert time.monotonic() - started < 5


async def test_a_silent_bmc_times_out_within_the_bound() -> None:
    with bmc_lab.silent_tcp_listener() as port:
        started = time.monotonic()
        with pytest.raises(BmcError, match=r"^redfish://127\.0\.0\.1:\d+/1: read power state: no answer within 1s$"):
            await controller(f"redfish://127.0.0.1:{port}/1", USER, PASSWORD, timeout=1).power("on")
        assert time.monotonic() - started < 3
