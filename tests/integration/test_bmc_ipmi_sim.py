"""bmc's IPMI client against OpenIPMI's ipmi_sim, the BMC of a qemu process it starts and kills itself
(tests/ipmi_sim_chassis.py): the way to put a BMC in front of any qemu node, such as a PXE node of the
netboot lab, without libvirt."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from bmc import BmcError, controller, parse_bmc_url
from tests import bmc_lab
from tests.bmc_lab import PASSWORD, USER, SimNode


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimNode]:
    with bmc_lab.ipmi_sim(tmp_path_factory.mktemp("ipmi-sim")) as sim:
        yield sim


async def test_power_starts_and_kills_the_qemu(node: SimNode) -> None:
    power = controller(node.url, USER, PASSWORD)
    assert await power.power("off") == "off" and node.pid() is None
    assert await power.power("on") == "on"
    first = node.pid()
    assert first is not None and await power.status() == "on"
    assert await power.power("on") == "on" and node.pid() == first  # already on: left alone
    assert await power.power("cycle") == "on"  # ipmi_sim does a real "chassis power cycle": off, then on
    second = node.pid()
    assert second is not None and second != first and not bmc_lab.alive(first)
    assert await power.power("off") == "off" and node.pid() is None


async def test_pxe_applies_to_the_next_power_on_only(node: SimNode) -> None:
    power = controller(node.url, USER, PASSWORD)
    await power.power("off")
    await power.boot_pxe_once()
    await power.power("on")
    await power.power("cycle")
    *_, with_pxe, after = node.starts()
    assert with_pxe.endswith("-boot c -boot once=n") and after.endswith("-boot c")
    await power.power("off")


async def test_a_wrong_password_is_refused_clearly(node: SimNode) -> None:
    with pytest.raises(BmcError) as caught:
        await controller(node.url, USER, "not-the-password").status()
    assert str(caught.value) == (f"{parse_bmc_url(node.url)}: read power state: login refused: "
                                 "check the BMC user and password")
