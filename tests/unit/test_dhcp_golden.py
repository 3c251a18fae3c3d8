"""Golden tests: captured (qemu's iPXE ROM) and scapy-built packets decoded to text and compared with the
checked-in expected output; the proxy's reply to each is golden too. CELLO_REGEN_GOLDEN=1 rewrites them."""

from __future__ import annotations

import os
import pathlib

import pytest

from dhcp import packet as p
from dhcp import pxe
from dhcp.text import describe
from tests.dhcp_lab import PROFILES, make_spec

DATA = pathlib.Path(__file__).resolve().parent.parent / "data" / "dhcp"
REGEN = os.environ.get("CELLO_REGEN_GOLDEN") == "1"
PACKETS = sorted(f.stem for f in DATA.glob("*.hex"))
QEMU_UUID = "3f1c2a4b-5d6e-4f70-8192-a3b4c5d6e7f8"  # the -uuid capture_ipxe.sh gives qemu
ADVERTISE = "10.78.0.2"


def load(name: str) -> bytes:
    return bytes.fromhex("".join((DATA / f"{name}.hex").read_text().split()))


def check_golden(path: pathlib.Path, text: str) -> None:
    if REGEN:
        path.write_text(text)
    assert path.exists(), f"{path.name} missing: run with CELLO_REGEN_GOLDEN=1"
    assert text == path.read_text()


def test_the_golden_set_is_complete() -> None:
    for name in ("ipxe-rom-discover", "ipxe-rom-request", "bios-pxe-discover", "bios-pxe-request-4011",
                 "uefi-x64-discover", "uefi-arm64-discover", "uefi-http-discover", "overload-discover",
                 "plain-dhcp-discover", "cello-proxy-offer",
                 "ovmf-edk2-discover", "ovmf-edk2-pxe-request-4011", "ovmf-ipxe-rom-discover"):
        assert name in PACKETS


@pytest.mark.parametrize("name", PACKETS)
def test_decode_golden(name: str) -> None:
    check_golden(DATA / f"{name}.txt", describe(p.decode(load(name))))


@pytest.mark.parametrize("name", PACKETS)
def test_reencode_is_stable(name: str) -> None:
    """decode → encode → decode gives the same packet (wire order and values kept)."""
    first = p.decode(load(name))
    assert p.decode(p.encode(first, min_size=0)) == first


def _reply_text(name: str, profile: str) -> str:
    packet = p.decode(load(name))
    kind = pxe.Kind.REQUEST if "request-4011" in name else pxe.Kind.DISCOVER
    request = pxe.classify(packet, kind)
    if request is None:
        return "no reply: not a boot request\n"
    spec = make_spec(request.uuid or "9b2e4a10-0000-4000-8000-00000000c0de", PROFILES[profile],
                     "http://10.78.0.2:8080")
    choice = pxe.choose_boot(request, spec)
    assert choice is not None
    return describe(p.decode(p.encode(pxe.build_reply(packet, request, choice, ADVERTISE, kind))))


REQUESTS = [n for n in PACKETS if "discover" in n or "request" in n]


@pytest.mark.parametrize("profile", sorted(PROFILES))
@pytest.mark.parametrize("name", REQUESTS)
def test_reply_golden(name: str, profile: str) -> None:
    check_golden(DATA / f"{name}.reply-{profile}.txt", _reply_text(name, profile))


def test_qemu_guid_is_smbios_order() -> None:
    """The capture settles option 97's byte order: qemu's -uuid text comes back from the SMBIOS bytes."""
    packet = p.decode(load("ipxe-rom-discover"))
    guid = packet.client_guid
    assert guid is not None and guid[:4] == bytes.fromhex("4b2a1c3f")
    assert pxe.smbios_uuid(guid) == QEMU_UUID
    assert pxe.guid_bytes(QEMU_UUID) == guid


def test_ipxe_rom_capture_fields() -> None:
    packet = p.decode(load("ipxe-rom-discover"))
    assert packet.message_type == p.DHCPDISCOVER
    assert packet.user_classes == (b"iPXE",)  # plain string, not RFC 3004
    assert packet.client_arches == (0,)
    assert packet.client_nii == (1, 2, 1)
    assert packet.vendor_class == b"PXEClient:Arch:00000:UNDI:002001"
    assert packet.mac == "52:54:00:78:00:10"
    assert p.OPT_IPXE in packet.options and 177 in packet.ipxe_options  # bus id
    request = pxe.classify(packet, pxe.Kind.DISCOVER)
    assert request is not None and request.ipxe and request.uuid == QEMU_UUID


def test_overload_options_are_collected() -> None:
    packet = p.decode(load("overload-discover"))
    assert packet.vendor_class == b"PXEClient"
    assert packet.client_arches == (0,)
    assert p.OPT_OVERLOAD not in packet.options
    assert packet.file == b"" and packet.sname == b""
    assert pxe.smbios_uuid(packet.client_guid or b"") == QEMU_UUID


def test_site_offer_is_not_a_boot_request() -> None:
    assert pxe.classify(p.decode(load("site-dnsmasq-offer")), pxe.Kind.DISCOVER) is None
    assert pxe.classify(p.decode(load("plain-dhcp-discover")), pxe.Kind.DISCOVER) is None
    assert p.decode(load("plain-dhcp-discover")).user_classes == (b"corp", b"lab")  # RFC 3004 form


def test_reply_to_captured_edk2_request_matches_captured_ack() -> None:
    """The ACK Cello sent to OVMF's real :4011 request (captured) is what the pipeline builds today."""
    request_packet = p.decode(load("ovmf-edk2-pxe-request-4011"))
    request = pxe.classify(request_packet, pxe.Kind.REQUEST)
    assert request is not None and request.arch == 7 and request.uuid == QEMU_UUID
    choice = pxe.choose_boot(request, make_spec(QEMU_UUID, PROFILES["ipxe"], "http://10.78.0.2:8080"))
    assert choice is not None
    built = p.encode(pxe.build_reply(request_packet, request, choice, ADVERTISE, pxe.Kind.REQUEST))
    assert built == load("ovmf-cello-pxe-ack")
