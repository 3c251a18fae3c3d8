"""Regenerate the golden input packets (*.hex) of tests/unit/test_dhcp_golden.py.

    .venv/bin/python tests/data/dhcp/make_packets.py

Two sources:
- captures of qemu's iPXE ROM (tcpdump, see capture_ipxe.sh): ipxe-rom-site-dhcp.pcap (the ROM against a
  plain dnsmasq) and ipxe-rom-cello.pcap (the ROM against Cello's proxy, with its port-4011 request);
- scapy-built packets shaped like the firmware we have no capture of (values from the PXE 2.1 spec, the
  UEFI spec's HTTP boot chapter, and what EDK2/Intel ROMs send).
The expected text (*.txt) is written by the test itself when CELLO_REGEN_GOLDEN=1.
"""

from __future__ import annotations

import pathlib
import struct

from scapy.layers.dhcp import BOOTP, DHCP
from scapy.layers.inet import UDP
from scapy.utils import rdpcap

HERE = pathlib.Path(__file__).parent
UUID_LE = bytes.fromhex("4b2a1c3f6e5d704f8192a3b4c5d6e7f8")  # 3f1c2a4b-5d6e-4f70-8192-a3b4c5d6e7f8


def mac(last: int) -> bytes:
    return bytes([0x52, 0x54, 0x00, 0x78, 0x01, last])


def arch(n: int) -> bytes:
    return struct.pack("!H", n)


def write(name: str, data: bytes) -> None:
    hexed = data.hex()
    lines = [hexed[i : i + 64] for i in range(0, len(hexed), 64)]
    (HERE / f"{name}.hex").write_text("\n".join(lines) + "\n")


def built(chaddr: bytes, xid: int, options: list[tuple[str, object] | str], **bootp: object) -> bytes:
    pkt = BOOTP(op=1, chaddr=chaddr + bytes(10), xid=xid, **bootp) / DHCP(options=[*options, "end"])
    return bytes(pkt)


def from_pcaps() -> None:
    site = HERE / "ipxe-rom-site-dhcp.pcap"
    if site.exists():
        packets = [bytes(p[UDP].payload) for p in rdpcap(str(site)) if UDP in p]
        for i, name in {0: "ipxe-rom-discover", 3: "site-dnsmasq-offer", 6: "ipxe-rom-request"}.items():
            write(name, packets[i])
    cello = HERE / "ipxe-rom-cello.pcap"
    if cello.exists():  # the ROM against Cello's proxy (10.78.0.2): name the first packet of each flow
        wanted: dict[str, bytes] = {}
        for p in rdpcap(str(cello)):
            if UDP not in p:
                continue
            u, data = p[UDP], bytes(p[UDP].payload)
            if u.dport == 4011:
                wanted.setdefault("ipxe-rom-pxe-request", data)
            elif u.sport == 4011:
                wanted.setdefault("cello-pxe-ack", data)
            elif u.sport == 67 and p["IP"].src == "10.78.0.2":
                wanted.setdefault("cello-proxy-offer", data)
        for name, data in wanted.items():
            write(name, data)


def from_ovmf_pcap() -> None:
    """OVMF (UEFI x64) against Cello: the NIC's iPXE EFI ROM, then EDK2's own PXE client and its :4011
    boot server request (EDK2 asks even when the offer names the file)."""
    path = HERE / "ovmf-cello.pcap"
    if not path.exists():
        return
    wanted: dict[str, bytes] = {}
    for p in rdpcap(str(path)):
        if UDP not in p:
            continue
        u, data = p[UDP], bytes(p[UDP].payload)
        if u.sport == 4011 and p["IP"].src == "10.78.0.2":  # EDK2 asks from port 4011 too
            wanted.setdefault("ovmf-cello-pxe-ack", data)
        elif u.dport == 4011:
            wanted.setdefault("ovmf-edk2-pxe-request-4011", data)
        elif u.dport == 67 and b"iPXE" in data[240:]:
            wanted.setdefault("ovmf-ipxe-rom-discover", data)
        elif u.dport == 67 and data[242] == 1:  # option 53 first: DISCOVER
            wanted.setdefault("ovmf-edk2-discover", data)
    for name, data in wanted.items():
        write(name, data)


def scapy_built() -> None:
    guid = ("pxe_client_machine_identifier", b"\x00" + UUID_LE)
    # An Intel/ PXE 2.1 BIOS ROM (no iPXE user class): DISCOVER, then the :4011 boot server request with
    # option 43.71 (boot item type 0x8000, layer 0).
    bios = [
        ("message-type", "discover"), ("max_dhcp_size", 1260),
        ("param_req_list", [1, 2, 3, 5, 6, 11, 12, 13, 15, 16, 17, 18, 43, 54, 60, 67, 128, 129, 130, 131, 132,
                            133, 134, 135]),
        ("pxe_client_architecture", arch(0)), ("pxe_client_network_interface", b"\x01\x02\x01"), guid,
        ("vendor_class_id", b"PXEClient:Arch:00000:UNDI:002001"),
    ]
    write("bios-pxe-discover", built(mac(0x01), 0x1000_0001, bios))
    req = [("message-type", "request"), *bios[1:], ("vendor_specific", b"\x47\x04\x80\x00\x00\x00\xff")]
    write("bios-pxe-request-4011", built(mac(0x01), 0x1000_0002, req, ciaddr="10.78.0.101"))
    # EDK2 x64 UEFI PXE (arch 7, UNDI 3.16).
    uefi = [
        ("message-type", "discover"), ("max_dhcp_size", 1472),
        ("param_req_list", [1, 2, 3, 4, 5, 6, 12, 13, 15, 17, 18, 22, 23, 28, 40, 41, 42, 43, 50, 51, 54, 58, 59,
                            60, 66, 67, 97, 128, 129, 130, 131, 132, 133, 134, 135]),
        guid, ("pxe_client_network_interface", b"\x01\x03\x10"), ("pxe_client_architecture", arch(7)),
        ("vendor_class_id", b"PXEClient:Arch:00007:UNDI:003016"),
    ]
    write("uefi-x64-discover", built(mac(0x07), 0x1000_0007, uefi))
    # ARM64 UEFI (arch 11), all-zero GUID as cheap boards send it.
    arm = [
        ("message-type", "discover"), ("pxe_client_architecture", arch(11)),
        ("pxe_client_network_interface", b"\x01\x03\x10"),
        ("pxe_client_machine_identifier", b"\x00" + bytes(16)),
        ("vendor_class_id", b"PXEClient:Arch:00011:UNDI:003016"),
    ]
    write("uefi-arm64-discover", built(mac(0x0B), 0x1000_000B, arm))
    # UEFI HTTP boot (arch 16) — EDK2's HttpBootDxe.
    http = [
        ("message-type", "discover"), ("max_dhcp_size", 1472),
        ("param_req_list", [1, 3, 6, 12, 15, 43, 60, 67]),
        ("pxe_client_architecture", arch(16)), ("pxe_client_network_interface", b"\x01\x03\x00"),
        ("pxe_client_machine_identifier", b"\x00" + b"\xff" * 16),
        ("vendor_class_id", b"HTTPClient:Arch:00016:UNDI:003001"),
    ]
    write("uefi-http-discover", built(mac(0x10), 0x1000_0010, http))
    # A plain DHCP client (no PXE vendor class): must never be answered. User class in RFC 3004 form.
    plain = [
        ("message-type", "discover"), ("hostname", b"laptop"), ("user_class", b"\x04corp\x03lab"),
        ("vendor_class_id", b"MSFT 5.0"),
    ]
    write("plain-dhcp-discover", built(mac(0x20), 0x1000_0020, plain))
    # Option overload (52 = 3): the boot request options continue in the file and sname fields.
    file_opts = bytes([60, 9]) + b"PXEClient" + bytes([93, 2, 0, 0]) + b"\xff"
    sname_opts = bytes([97, 17, 0]) + UUID_LE + b"\xff"
    ov = BOOTP(op=1, chaddr=mac(0x34) + bytes(10), xid=0x1000_0034,
               file=file_opts.ljust(128, b"\0"), sname=sname_opts.ljust(64, b"\0")) / DHCP(
        options=[("message-type", "discover"), ("dhcp-option-overload", 3), "end"])
    write("overload-discover", bytes(ov))


if __name__ == "__main__":
    from_pcaps()
    from_ovmf_pcap()
    scapy_built()
