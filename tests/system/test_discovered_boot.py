"""An unknown qemu node shows up as discovered, and boots onto its own clone once adopted.

One lab for the module (tests/system/conftest.py): dnsmasq is the site DHCP, Cello the proxyDHCP, TFTP and
iSCSI target. A qemu node (TCG, BIOS, iPXE ROM) that no server names powers on: Cello answers nothing
(its ROM gives up), but records it — MAC, SMBIOS UUID, arch, vendor class and the address the site DHCP
gave it (its REQUEST to dnsmasq). `cello server adopt MAC --template tiny --user lab` makes the server
from that record (the node's own UUID); on its next power-on the node boots the tiny template from its
own clone (`cello-root-ok <uuid>` on its console, a session on its target), and `cello server diagnose`
says it booted.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.system.lab import Lab, LabError
from tests.system.test_e2e_boot import (
    USER,
    api_ok,
    boot,
    boot_expecting_no_answer,
    check_logged_in,
    cli_ok,
    fail_with_logs,
    node_address,
    wait_available,
    wait_until,
)

pytestmark = pytest.mark.system

NEWCOMER = ("newcomer", "3f1c2b4e-0000-4000-8000-0000000000d1", "52:54:00:77:00:d1")


def test_an_unknown_node_is_discovered_adopted_and_boots_its_own_clone(lab: Lab) -> None:
    name, uuid, mac = NEWCOMER
    cli_ok(lab, "user", "create", USER, "--max-volumes", "4", "--max-data-gb", "4")
    cli_ok(lab, "template", "build", "tiny", "--from", "tiny", timeout=240)

    console, since = boot_expecting_no_answer(lab, NEWCOMER)
    assert "Filename:" not in console, console[-1500:]
    found = [n for n in api_ok(lab, "GET", "/api/v1/discovered") if n["mac"] == mac]
    assert len(found) == 1, found
    node = found[0]
    assert node["uuid"] == uuid and node["arch"] == 0 and node["count"] >= 1, node
    assert node["vendor_class"].startswith("PXEClient:Arch:00000"), node
    assert node["address"] and node["address"].startswith("10.77.0."), node  # what dnsmasq gave it
    assert lab.events is not None
    assert [e for e in lab.events.snapshot() if e.get("id", 0) > since and e["kind"] == "discovered"
            and e.get("mac") == mac], "no discovered event"
    assert mac in cli_ok(lab, "discovered", "list")

    out = cli_ok(lab, "server", "adopt", mac, "--template", "tiny", "--user", USER, "--profile", "pxelinux")
    assert f"adopted {mac} as server {uuid}" in out, out
    server = wait_available(lab, uuid)
    assert server["macs"] == [mac], server
    assert all(n["mac"] != mac for n in api_ok(lab, "GET", "/api/v1/discovered"))

    qemu = lab.node(name, uuid, mac)
    try:
        took = boot(lab, qemu)
        check_logged_in(lab, uuid)
    except (LabError, AssertionError) as e:
        fail_with_logs(lab, str(e))
    print(f"\n{name}: adopted, power-on → root in {took:.1f} s at {node_address(qemu)}")
    # After switch_root the node's iscsid logs in again (its first session ends): a moment without one.
    def booted() -> Any:
        done = lab.cli("server", "diagnose", uuid)
        return done if done.returncode == 0 else None

    diagnosis = wait_until("diagnose says the node booted", booted, 30, every=1)
    assert "ok:" in diagnosis.stdout and "logged in to its iSCSI root disk" in diagnosis.stdout, diagnosis.stdout
    lab.release(qemu)
