"""Issue 15: on the default profile a node's kernel and initrd come over HTTP; TFTP carries at most the
first loader.

One lab for the module (tests/system/conftest.py). Servers are created without `--profile`, so they get
the appliance's default (`compute`). A BIOS node (qemu's NIC ROM is iPXE: it is offered its script by URL
and asks TFTP for nothing) and a UEFI node whose firmware is OVMF's own PXE client (it fetches ipxe.efi
over TFTP, the one TFTP file) boot their own iSCSI clones. Cello's event stream shows, for each, the
per-node script, the kernel and the initrd as `http` fetches of the whole file, and no TFTP fetch of
anything but a loader. As a control, a node on `pxelinux-tftp` (the hcc-cello path) boots too, and the
same check must reject its boot: the check would fail if the default's big files came over TFTP.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.system.lab import Lab, LabError, Node
from tests.system.test_e2e_boot import (
    USER,
    api_ok,
    boot,
    check_logged_in,
    cli_ok,
    fail_with_logs,
    last_event_id,
    node_address,
    wait_available,
)

pytestmark = pytest.mark.system

BIOS = ("httpbios", "3f1c2b4e-0000-4000-8000-0000000015b1", "52:54:00:77:15:b1")
UEFI = ("httpuefi", "3f1c2b4e-0000-4000-8000-0000000015e1", "52:54:00:77:15:e1")
TFTP = ("tftpctl", "3f1c2b4e-0000-4000-8000-0000000015c1", "52:54:00:77:15:c1")
LOADERS = frozenset({"undionly.kpxe", "ipxe.efi", "snponly.efi"})  # what TFTP may carry on the default

seen: dict[str, Any] = {}


def create_on_default(lab: Lab, node: tuple[str, str, str]) -> dict[str, Any]:
    """`cello server create` without --profile: the server gets boot.default_profile."""
    _, uuid, mac = node
    cli_ok(lab, "server", "create", uuid, "--template", "tiny", "--mac", mac, "--user", USER,
           "--wait", "--wait-timeout", "60")
    return wait_available(lab, uuid)


def tiny_files(lab: Lab) -> dict[str, int]:
    """The tiny template's kernel and initrd (paths under /boot/files/) and their sizes on disk."""
    tiny = next(t for t in api_ok(lab, "GET", "/api/v1/templates") if t["name"] == "tiny")
    version = tiny["versions"][-1]
    return {path: (lab.state_dir / "boot" / path).stat().st_size for path in (version["kernel"], version["initrd"])}


def big_files_over_http(events: list[dict[str, Any]], since: int, ip: str, uuid: str,
                        files: dict[str, int]) -> list[str]:
    """Raise AssertionError unless, after event `since`: the node at `ip` fetched its own script and then
    each of `files` whole over HTTP (status 200, every byte), and TFTP served nothing but loaders — to
    anyone: this node is the only one booting. Returns the steps, for the log."""
    after = [e for e in events if e.get("id", 0) > since]
    from_node: Callable[[dict[str, Any]], bool] = lambda e: str(e.get("client", "")).split(":")[0] == ip  # noqa: E731
    tftp = [e for e in after if e["kind"] == "tftp" and e.get("outcome") == "ok"]
    big = {Path(f).name for f in files}
    over_tftp = [e["file"] for e in tftp if Path(str(e["file"])).name in big]
    assert not over_tftp, f"the kernel or initrd came over TFTP: {over_tftp}"
    not_loaders = [e["file"] for e in tftp if Path(str(e["file"])).name not in LOADERS]
    assert not not_loaders, f"TFTP carried more than the first loader: {not_loaders}"
    steps = [f"tftp {e['file']} (loader)" for e in tftp]
    http = [e for e in after if e["kind"] == "http" and from_node(e) and e.get("status") == 200]
    script = [e for e in http if e.get("file") == f"{uuid}.ipxe" and e.get("server") == uuid]
    assert script, f"no HTTP fetch of {uuid}.ipxe from {ip}: {http}"
    steps.append(f"{script[0]['id']} http {uuid}.ipxe (per-node script)")
    for path, size in files.items():
        got = [e for e in http if e.get("file") == path and e["id"] > script[0]["id"]]
        assert got, f"no HTTP fetch of {path} from {ip} after its script: {http}"
        assert got[0].get("bytes") == size, f"{path}: {got[0].get('bytes')} bytes over HTTP, the file has {size}"
        assert got[0].get("server") == uuid, f"{path} fetched but not counted for server {uuid}: {got[0]}"
        steps.append(f"{got[0]['id']} http {Path(path).name} ({size} bytes)")
    return steps


def boot_and_check(lab: Lab, who: tuple[str, str, str], firmware: str) -> tuple[Node, int, list[dict[str, Any]]]:
    """Boot `who` to its marker on its clone: (the node, the last event id before power-on, the events)."""
    node = lab.node(*who, firmware=firmware, nic="e1000" if firmware == "bios" else "virtio-net-pci")
    since = last_event_id(lab)
    try:
        took = boot(lab, node)
        check_logged_in(lab, who[1])
    except LabError as e:
        fail_with_logs(lab, str(e))
    print(f"\n{who[0]} ({firmware}): power-on → root in {took:.1f} s")
    assert "cello-initramfs-failed" not in node.console()
    assert lab.events is not None
    return node, since, lab.events.snapshot()


def no_second_dhcp(node: Node) -> None:
    """The initramfs took the address iPXE had (ip= on the command line) instead of asking the site DHCP
    again: one DHCP exchange per node in a boot storm, not two."""
    console = node.console()
    assert f"cello-initramfs: static address {node_address(node)} " in console, console[-2000:]
    assert "cello-initramfs: DHCP on" not in console, console[-2000:]


def test_servers_created_without_a_profile_get_compute(lab: Lab) -> None:
    cli_ok(lab, "user", "create", USER, "--max-volumes", "8", "--max-data-gb", "8")
    cli_ok(lab, "template", "build", "tiny", "--from", "tiny", timeout=240)
    server = create_on_default(lab, BIOS)
    assert server["profile"] == "compute", server
    seen["files"] = tiny_files(lab)


def test_bios_node_on_the_default_profile_boots_with_kernel_and_initrd_over_http(lab: Lab) -> None:
    files = seen.get("files") or pytest.fail("the template was not built", pytrace=False)
    node, since, events = boot_and_check(lab, BIOS, "bios")
    try:
        steps = big_files_over_http(events, since, node_address(node), BIOS[1], files)
    finally:
        lab.release(node)
    no_second_dhcp(node)
    # qemu's ROM is iPXE already: it is offered its script by URL and TFTP is not used at all
    assert not any(e["kind"] == "tftp" for e in events if e.get("id", 0) > since), steps
    print(" → ".join(steps))


def test_uefi_pxe_node_on_the_default_profile_gets_only_ipxe_efi_over_tftp(lab: Lab) -> None:
    """OVMF's own PXE client (no iPXE ROM on the NIC) is handed ipxe.efi over TFTP; iPXE then takes the
    script, kernel and initrd over HTTP."""
    files = seen.get("files") or pytest.fail("the template was not built", pytrace=False)
    server = create_on_default(lab, UEFI)
    assert server["profile"] == "compute", server
    node, since, events = boot_and_check(lab, UEFI, "uefi-pxe")
    try:
        steps = big_files_over_http(events, since, node_address(node), UEFI[1], files)
    finally:
        lab.release(node)
    no_second_dhcp(node)
    assert [s.split(" ")[1] for s in steps if s.startswith("tftp ")] == ["ipxe.efi"], steps
    print(" → ".join(steps))


def test_the_check_rejects_a_boot_whose_kernel_and_initrd_came_over_tftp(lab: Lab) -> None:
    """The control: the hcc-cello profile `pxelinux-tftp` still boots, all over TFTP, and the check above
    says so — it would fail the default profile had its kernel and initrd come over TFTP."""
    files = seen.get("files") or pytest.fail("the template was not built", pytrace=False)
    _, uuid, mac = TFTP
    cli_ok(lab, "server", "create", uuid, "--template", "tiny", "--profile", "pxelinux-tftp", "--mac", mac,
           "--user", USER, "--wait", "--wait-timeout", "60")
    assert wait_available(lab, uuid)["profile"] == "pxelinux-tftp"
    node, since, events = boot_and_check(lab, TFTP, "bios")
    lab.release(node)
    over_tftp = {Path(str(e["file"])).name for e in events if e.get("id", 0) > since and e["kind"] == "tftp"
                 and e.get("outcome") == "ok"}
    assert {"pxelinux.0", "ldlinux.c32", *(Path(f).name for f in files)} <= over_tftp, over_tftp
    with pytest.raises(AssertionError, match="the kernel or initrd came over TFTP"):
        big_files_over_http(events, since, node_address(node), uuid, files)
