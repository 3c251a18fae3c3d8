"""The fleet lab itself (tests/system/fleet_lab.py), until issue 16's fleet test replaces this module: three
appliances come up in their own namespaces on their own SQLite stores, each API answers from inside its
namespace on its own address, and a qemu node on br0 gets its address from the site's dnsmasq."""

from __future__ import annotations

import time

import pytest

from tests.system.fleet_lab import FleetLab

pytestmark = pytest.mark.system

NODE = ("probe", "3f1c2b4e-0000-4000-8000-0000000000f5", "52:54:00:77:00:f5")
LEASE_TIMEOUT = 60.0  # TCG: the iPXE ROM asks for DHCP ~2.5 s after power-on


def test_each_appliance_answers_from_its_namespace_on_its_own_store(fleet: FleetLab) -> None:
    for name in fleet.names:
        status, health = fleet.api(name, "GET", "/api/v1/health")
        assert status == 200 and health["status"] == "ok", f"{name}: {status} {health}"
        assert (fleet.appliance(name).state_dir / "cello.db").exists(), f"{name} has no SQLite store of its own"
        assert "[store]" not in fleet.config(name) and "[fleet]" not in fleet.config(name)
        assert len(fleet.tgtd_pids(name)) == 1, f"{name}: tgtd on its own control port {fleet.tgtd_pids(name)}"


def test_a_node_on_br0_gets_its_address_from_the_site_dhcp(fleet: FleetLab) -> None:
    name, uuid, mac = NODE
    node = fleet.node(name, uuid, mac)
    node.power_on()
    try:
        deadline = time.monotonic() + LEASE_TIMEOUT
        while not (leased := [line.split() for line in _lines(fleet) if line.split()[1:2] == [mac]]):
            assert time.monotonic() < deadline, f"no lease for {mac} within {LEASE_TIMEOUT:.0f} s"
            time.sleep(0.5)
    finally:
        fleet.release(node)
    address = leased[0][2]
    assert address.startswith("10.77.0.1"), address
    print(f"\nfleet lab: {name} leased {address} from the site dhcp")


def _lines(fleet: FleetLab) -> list[str]:
    return fleet.leases.read_text().splitlines() if fleet.leases.exists() else []
