"""Readable text for a DHCP packet (golden tests, debug logs). Pure."""

from __future__ import annotations

from . import packet as p

MESSAGE_TYPES = {
    p.DHCPDISCOVER: "DISCOVER", p.DHCPOFFER: "OFFER", p.DHCPREQUEST: "REQUEST", p.DHCPDECLINE: "DECLINE",
    p.DHCPACK: "ACK", p.DHCPNAK: "NAK", p.DHCPRELEASE: "RELEASE", p.DHCPINFORM: "INFORM",
}
OPTION_NAMES = {
    1: "subnet-mask", 3: "router", 6: "dns", 12: "hostname", 15: "domain", 43: "vendor-specific",
    50: "requested-ip", 51: "lease-time", 53: "message-type", 54: "server-id", 55: "parameter-list",
    57: "max-message-size", 60: "vendor-class", 61: "client-id", 66: "tftp-server", 67: "bootfile",
    77: "user-class", 93: "client-arch", 94: "client-nii", 97: "client-guid", 175: "ipxe",
}
PXE_SUB_NAMES = {6: "discovery-control", 8: "boot-servers", 9: "boot-menu", 10: "menu-prompt", 71: "boot-item"}


def _text_or_hex(value: bytes) -> str:
    if value and all(32 <= b < 127 for b in value):
        return repr(value.decode("ascii"))
    return value.hex()


def _sub_options(opts: p.Options, names: dict[int, str]) -> list[str]:
    return [f"    .{code} {names.get(code, '')}".rstrip() + f" = {_text_or_hex(v)}" for code, v in opts]


def describe(pkt: p.DhcpPacket) -> str:
    """One line per field and option; encapsulated options and the PXE typed values spelled out."""
    lines = [
        f"op {'BOOTREQUEST' if pkt.op == p.BOOTREQUEST else 'BOOTREPLY'} htype {pkt.htype} hops {pkt.hops}"
        f" xid 0x{pkt.xid:08x} secs {pkt.secs} flags 0x{pkt.flags:04x}",
        f"ciaddr {pkt.ciaddr} yiaddr {pkt.yiaddr} siaddr {pkt.siaddr} giaddr {pkt.giaddr}",
        f"chaddr {pkt.mac}",
        f"sname {_text_or_hex(pkt.sname)}" if pkt.sname else "sname -",
        f"file {_text_or_hex(pkt.file)}" if pkt.file else "file -",
        "dhcp" if pkt.dhcp else "bootp (no magic cookie)",
    ]
    for code, value in pkt.options:
        name = OPTION_NAMES.get(code, "")
        head = f"option {code} {name}".rstrip()
        if code == p.OPT_MESSAGE_TYPE:
            mt = pkt.message_type
            lines.append(f"{head} = {MESSAGE_TYPES.get(mt or 0, str(mt))}")
        elif code == p.OPT_USER_CLASS:
            lines.append(f"{head} = {[c.decode('latin-1') for c in pkt.user_classes]}")
        elif code == p.OPT_CLIENT_ARCH:
            lines.append(f"{head} = {list(pkt.client_arches)}")
        elif code == p.OPT_CLIENT_NII:
            lines.append(f"{head} = {pkt.client_nii}")
        elif code == p.OPT_CLIENT_GUID:
            from .pxe import smbios_uuid

            guid = pkt.client_guid or b""
            lines.append(f"{head} = {value.hex()} (uuid {smbios_uuid(guid)})")
        elif code in (p.OPT_SERVER_ID, 1, 3, 50):
            lines.append(f"{head} = {p.decode_ip(value, code) if len(value) == 4 else value.hex()}")
        elif code == p.OPT_PARAMETER_LIST:
            lines.append(f"{head} = {list(value)}")
        elif code == p.OPT_MAX_MESSAGE_SIZE and len(value) == 2:
            lines.append(f"{head} = {int.from_bytes(value, 'big')}")
        elif code == p.OPT_VENDOR_SPECIFIC and (pkt.vendor_class or b"").startswith((b"PXEClient", b"HTTPClient")):
            lines.append(f"{head}:")
            lines.extend(_sub_options(pkt.pxe_options, PXE_SUB_NAMES))
        elif code == p.OPT_IPXE:
            lines.append(f"{head}:")
            lines.extend(_sub_options(pkt.ipxe_options, {}))
        else:
            lines.append(f"{head} = {_text_or_hex(value)}")
    return "\n".join(lines) + "\n"
