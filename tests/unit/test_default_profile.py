"""Issue 15: on the default profile TFTP carries only the first loader; kernel and initrd come over HTTP
from the address the node was told (advertise), on every firmware. `pxelinux-tftp` keeps today's
all-TFTP path. Each firmware's chain is followed through the real pieces: the config's profiles, the
appliance's HTTP base, the proxyDHCP's choice, and the renderer of the file the loader then asks for."""

from __future__ import annotations

import re
import struct

import pytest

from appliance.app import Appliance
from appliance.config import Config, parse_config
from bootfiles.render import render_ipxe, render_pxelinux
from bootfiles.spec import BootSpec, IscsiRoot
from dhcp import packet as p
from dhcp import pxe

UUID = "3f1c2a4b-5d6e-4f70-8192-a3b4c5d6e7f8"
ADVERTISE = "10.77.0.2"
KERNEL, INITRD = "templates/tiny/v1/vmlinuz", "templates/tiny/v1/initrd.img"
BIG_FILES = (KERNEL, INITRD)


def config(**boot: object) -> Config:
    return parse_config({"appliance": {"advertise": ADVERTISE}, "api": {"listen": "0.0.0.0:8080"},
                         "boot": boot})


def node_spec(cfg: Config, profile: str | None = None) -> BootSpec:
    """What the boot policy hands out for a server created without a profile (or on `profile`)."""
    base = Appliance(cfg).http_base()
    root = IscsiRoot(f"iqn.2026-11.io.cello:{UUID}", ADVERTISE, 3260, 1, f"iqn.2026-11.io.cello:node-{UUID}",
                     chap_user=f"node-{UUID}", chap_secret="s3cr3tS3cr3tS3cr")
    return BootSpec(UUID, cfg.boot.profiles[profile or cfg.boot.default_profile], KERNEL, INITRD, root, base)


def ask(spec: BootSpec, arch: int, *, vendor: bytes = b"PXEClient", ipxe: bool = False) -> pxe.BootChoice:
    opts: dict[int, bytes] = {p.OPT_MESSAGE_TYPE: bytes([p.DHCPDISCOVER]), p.OPT_VENDOR_CLASS: vendor,
                              p.OPT_CLIENT_ARCH: struct.pack("!H", arch),
                              p.OPT_CLIENT_GUID: b"\x00" + pxe.guid_bytes(UUID)}
    if ipxe:
        opts[p.OPT_USER_CLASS] = b"iPXE"
    packet = p.DhcpPacket(op=p.BOOTREQUEST, xid=1, chaddr=b"\x52\x54\x00\x77\x00\x10", flags=p.FLAG_BROADCAST,
                          options=p.Options.of(opts))
    request = pxe.classify(packet, pxe.Kind.DISCOVER)
    assert request is not None
    choice = pxe.choose_boot(request, spec)
    assert choice is not None
    return choice


def fetched_urls(script: str) -> list[str]:
    return re.findall(r"(?m)^(?:kernel|initrd --name \S+) (\S+)", script)


def test_the_default_profile_is_compute_on_ipxe() -> None:
    cfg = config()
    assert cfg.boot.default_profile == "compute"
    assert cfg.boot.profiles["compute"].loader == "ipxe"


def test_http_base_is_the_advertised_address_not_the_wildcard_listener() -> None:
    assert Appliance(config()).http_base() == f"http://{ADVERTISE}:8080"
    loopback = parse_config({"appliance": {"advertise": ADVERTISE}, "api": {"listen": "127.0.0.1:8080"}})
    assert Appliance(loopback).http_base() == f"http://{ADVERTISE}:8080"


@pytest.mark.parametrize(
    ("firmware", "arch", "vendor", "first_loader"),
    [
        ("BIOS PXE ROM", pxe.ARCH_BIOS, b"PXEClient", "undionly.kpxe"),
        ("UEFI PXE (x64)", pxe.ARCH_EFI_BC, b"PXEClient", "ipxe.efi"),
        ("UEFI PXE (x64, arch 9)", pxe.ARCH_EFI_X64, b"PXEClient", "ipxe.efi"),
    ],
)
def test_default_profile_tftp_carries_only_the_first_loader(firmware: str, arch: int, vendor: bytes,
                                                            first_loader: str) -> None:
    spec = node_spec(config())
    first = ask(spec, arch, vendor=vendor)
    assert (first.file, first.tftp) == (first_loader, True), firmware
    # the loader is iPXE: it asks again and is handed its own script by URL, not a TFTP name
    again = ask(spec, arch, vendor=vendor, ipxe=True)
    assert (again.file, again.tftp) == (f"http://{ADVERTISE}:8080/boot/{UUID}.ipxe", False), firmware
    urls = fetched_urls(render_ipxe(spec))
    assert urls == [f"http://{ADVERTISE}:8080/boot/files/{f}" for f in BIG_FILES], firmware


def test_default_profile_on_an_ipxe_rom_and_on_uefi_http_boot_uses_no_tftp_at_all() -> None:
    spec = node_spec(config())
    rom = ask(spec, pxe.ARCH_BIOS, ipxe=True)  # qemu's NIC ROM is iPXE already
    assert (rom.file, rom.tftp) == (f"http://{ADVERTISE}:8080/boot/{UUID}.ipxe", False)
    http_boot = ask(spec, pxe.ARCH_EFI_X64_HTTP, vendor=b"HTTPClient")
    assert (http_boot.file, http_boot.tftp) == (f"http://{ADVERTISE}:8080/boot/files/ipxe.efi", False)


def test_default_script_names_no_tftp_url_and_keeps_the_secret_in_the_script() -> None:
    """The script (served only to the node's address) carries the CHAP secret; the kernel and initrd
    URLs carry nothing secret, since those files are public."""
    script = render_ipxe(node_spec(config()))
    assert "tftp://" not in script
    assert "set password s3cr3tS3cr3tS3cr" in script
    assert not [u for u in fetched_urls(script) if "s3cr3t" in u]


def test_pxelinux_tftp_profile_keeps_everything_on_tftp() -> None:
    spec = node_spec(config(), "pxelinux-tftp")
    for ipxe in (False, True):  # a plain PXE ROM, and qemu's iPXE ROM (which pxelinux then runs on)
        choice = ask(spec, pxe.ARCH_BIOS, ipxe=ipxe)
        assert (choice.file, choice.tftp) == ("pxelinux.0", True)
    text = render_pxelinux(spec)
    assert f"  KERNEL /{KERNEL}\n" in text and f"  INITRD /{INITRD}\n" in text
    assert "http://" not in text
