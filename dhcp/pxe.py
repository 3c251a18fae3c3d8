"""Pure PXE policy: is a packet a boot request, which machine sent it, and what does it boot.

The pipeline is classify → (the appliance's BootPolicy) → choose_boot → build_reply; every step is a pure
function of its inputs. The boot policy (`bootfiles.spec.BootPolicy`) decides *whether* and *what* a node
boots; this module only maps the answer onto the firmware in front of it.
"""

from __future__ import annotations

import functools
import struct
import uuid as uuidlib
from dataclasses import dataclass
from enum import Enum

from bootfiles.spec import BootSpec

from . import packet as p

# RFC 4578 §2.1 / IANA "Processor Architecture Types".
ARCH_BIOS = 0
ARCH_EFI_IA32 = 6
ARCH_EFI_BC = 7  # x64 UEFI in practice
ARCH_EFI_X64 = 9
ARCH_EFI_ARM64 = 11
ARCH_EFI_X64_HTTP = 16
ARCH_EFI_ARM64_HTTP = 19

UEFI_X86_ARCHES = frozenset({ARCH_EFI_IA32, ARCH_EFI_BC, ARCH_EFI_X64})
HTTP_ARCHES = frozenset({ARCH_EFI_X64_HTTP, ARCH_EFI_ARM64_HTTP})
ARM64_ARCHES = frozenset({ARCH_EFI_ARM64, ARCH_EFI_ARM64_HTTP})
SUPPORTED_ARCHES = frozenset({ARCH_BIOS, ARCH_EFI_ARM64}) | UEFI_X86_ARCHES | HTTP_ARCHES

VENDOR_PXE = b"PXEClient"  # PXE 2.1 §2.2.1
VENDOR_HTTP = b"HTTPClient"  # UEFI 2.5+ §24.7 HTTP Boot
USER_CLASS_IPXE = b"iPXE"

# Default name of the ARM64 UEFI loader in the static TFTP tree: iPXE's bin-arm64-efi/snponly.efi,
# renamed so that it can sit next to the x86 one.
DEFAULT_ARM64_LOADER = "snponly-arm64.efi"

# PXE 2.1 §2.4.7.1 discovery control bit 3: "if a boot file name is present in the (proxy) offer, download
# it; do not prompt, menu or discover". Lets a BIOS ROM boot straight from our offer.
DISCOVERY_USE_BOOTFILE = 0x08


class Kind(Enum):
    """Which flow the request belongs to."""

    DISCOVER = "discover"  # port 67 broadcast: answer with a proxy OFFER
    REQUEST = "request"  # port 4011 boot server request: answer with an ACK


@dataclass(frozen=True, slots=True)
class BootRequest:
    """A classified PXE / UEFI HTTP boot request."""

    mac: str
    uuid: str | None  # canonical lowercase; None when absent or broken
    arch: int
    vendor: bytes  # VENDOR_PXE or VENDOR_HTTP
    ipxe: bool  # already running iPXE (user class "iPXE")
    message_type: int
    guid_option: bytes | None  # option 97 exactly as sent, echoed in the reply


@dataclass(frozen=True, slots=True)
class BootChoice:
    """What the reply tells the firmware to fetch."""

    file: str  # TFTP file name or an http:// URL
    tftp: bool  # True: fetch `file` from siaddr over TFTP
    vendor: bytes  # option 60 of the reply
    pxe_discovery: bool  # BIOS (arch 0) replies: option 43 with discovery control; UEFI ones: no option 43


def smbios_uuid(guid: bytes) -> str | None:
    """Option 97's 16 bytes → canonical text, or None for a broken GUID.

    The bytes are in SMBIOS order: the first three fields little-endian (checked against qemu's iPXE ROM,
    which sends `-uuid 3f1c2a4b-…` as 4b 2a 1c 3f …). pxelinux and iPXE print the same canonical text.
    All-zero and all-ones GUIDs (common on cheap boards) identify nothing and are ignored.
    Formatted by hand, not through uuid.UUID: this runs for every boot request, and the class costs
    several times as much (the same text: tests compare the two).
    """
    if len(guid) != 16 or guid in _NO_GUIDS:
        return None
    h = (guid[3::-1] + guid[5:3:-1] + guid[7:5:-1] + guid[8:]).hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


_NO_GUIDS = (bytes(16), b"\xff" * 16)


def guid_bytes(uuid: str) -> bytes:
    """Canonical UUID text → option 97's 16 bytes (SMBIOS order). Inverse of `smbios_uuid`."""
    return uuidlib.UUID(uuid).bytes_le


def pxelinux_uuid(uuid: str) -> str:
    """The UUID text pxelinux uses for `pxelinux.cfg/<uuid>`: pxelinux (6.04, checked with qemu's iPXE ROM)
    prints option 97's 16 bytes in wire order, so its text is the SMBIOS UUID with the first three fields
    byte-swapped (`3f1c2a4b-5d6e-4f70-…` → `4b2a1c3f-6e5d-704f-…`). For the TFTP side's lookup."""
    return str(uuidlib.UUID(bytes=uuidlib.UUID(uuid).bytes_le))


def classify(packet: p.DhcpPacket, kind: Kind) -> BootRequest | None:
    """A boot request, or None for anything we must not answer (plain DHCP clients, replies, other
    message types, unsupported architectures). Raises PacketError for malformed options."""
    if packet.op != p.BOOTREQUEST or not packet.dhcp or packet.htype != p.HTYPE_ETHERNET:
        return None
    if len(packet.chaddr) != 6:
        return None
    mtype = packet.message_type
    if kind is Kind.DISCOVER:
        # On :67 a proxyDHCP answers DISCOVERs only; the client's REQUEST there is for the site server
        # (PXE 2.1 §2.2.4 — the proxy's part of the exchange continues on :4011).
        if mtype != p.DHCPDISCOVER:
            return None
    elif mtype not in (p.DHCPREQUEST, p.DHCPINFORM):  # :4011 boot server request (some ROMs: INFORM)
        return None
    vendor_class = packet.vendor_class or b""
    if vendor_class.startswith(VENDOR_PXE):
        vendor = VENDOR_PXE
    elif vendor_class.startswith(VENDOR_HTTP):
        vendor = VENDOR_HTTP
    else:
        return None
    arches = packet.client_arches
    # RFC 4578 §2.1 says option 93 is required; a PXE 2.0 ROM without it is a BIOS ROM.
    arch = arches[0] if arches else ARCH_BIOS
    if arch not in SUPPORTED_ARCHES:
        return None
    try:
        guid = packet.client_guid
        raw97 = packet.options.get(p.OPT_CLIENT_GUID)
    except p.PacketError:  # a malformed GUID identifies nothing: fall back to the MAC, echo nothing
        guid = raw97 = None
    return BootRequest(
        mac=packet.mac,
        uuid=None if guid is None else smbios_uuid(guid),
        arch=arch,
        vendor=vendor,
        ipxe=USER_CLASS_IPXE in packet.user_classes,
        message_type=mtype if mtype is not None else 0,
        guid_option=raw97,
    )


@dataclass(frozen=True, slots=True)
class PxeConfig:
    """Loader names that do not come from the boot profile."""

    arm64_loader: str = DEFAULT_ARM64_LOADER


DEFAULT_CONFIG = PxeConfig()


def choose_boot(request: BootRequest, spec: BootSpec, config: PxeConfig | None = None) -> BootChoice | None:
    """Map a boot spec onto the requesting firmware; None when nothing fits this firmware."""
    config = config or DEFAULT_CONFIG
    profile = spec.profile
    base = spec.http_base.rstrip("/")
    if request.ipxe:
        # Already running iPXE: hand it the per-node script (never the iPXE loader again, so chainloading
        # cannot loop). The pxelinux profile chains pxelinux.0 on BIOS (pxelinux is not iPXE, no loop);
        # pxelinux.0 cannot run on UEFI, so a UEFI iPXE gets the script there too.
        if profile.loader == "pxelinux" and request.arch == ARCH_BIOS:
            return BootChoice("pxelinux.0", True, VENDOR_PXE, True)
        vendor = VENDOR_HTTP if request.vendor == VENDOR_HTTP else VENDOR_PXE
        bios = request.arch == ARCH_BIOS
        return BootChoice(f"{base}/boot/{spec.server_uuid}.ipxe", False, vendor, bios)
    if request.arch in HTTP_ARCHES or request.vendor == VENDOR_HTTP:
        loader = config.arm64_loader if request.arch in ARM64_ARCHES else profile.efi_loader
        return BootChoice(f"{base}/boot/files/{loader}", False, VENDOR_HTTP, False)
    if request.arch == ARCH_BIOS:
        return BootChoice(profile.bios_loader, True, VENDOR_PXE, True)
    if request.arch in UEFI_X86_ARCHES:
        return BootChoice(profile.efi_loader, True, VENDOR_PXE, False)
    if request.arch == ARCH_EFI_ARM64:
        return BootChoice(config.arm64_loader, True, VENDOR_PXE, False)
    return None


_OFFER_OPTION_43 = p.encode_encapsulated(p.Options(((p.PXE_DISCOVERY_CONTROL, bytes([DISCOVERY_USE_BOOTFILE])),)))


def pxe_vendor_options(request_packet: p.DhcpPacket, kind: Kind) -> bytes:
    """Option 43 for a BIOS PXE reply: discovery control 8; on :4011 also the boot item the client asked
    for (PXE 2.1 §2.2.5: the boot server echoes option 43.71, layer 0 when the client sent none)."""
    if kind is Kind.DISCOVER:
        return _OFFER_OPTION_43
    subs: list[tuple[int, bytes]] = [(p.PXE_DISCOVERY_CONTROL, bytes([DISCOVERY_USE_BOOTFILE]))]
    if kind is Kind.REQUEST:
        item = request_packet.pxe_options.get(p.PXE_BOOT_ITEM)
        subs.append((p.PXE_BOOT_ITEM, item if item is not None and len(item) == 4 else b"\x80\x00\x00\x00"))
    return p.encode_encapsulated(p.Options.of(subs))


def build_reply(
    request_packet: p.DhcpPacket, request: BootRequest, choice: BootChoice, advertise: str, kind: Kind
) -> p.DhcpPacket:
    """The proxy OFFER (kind DISCOVER) or boot-server ACK (kind REQUEST): no address is given (yiaddr 0);
    the boot server is `advertise`."""
    file_bytes = choice.file.encode("latin-1")
    opts: list[tuple[int, bytes]] = [
        (p.OPT_MESSAGE_TYPE, bytes([p.DHCPOFFER if kind is Kind.DISCOVER else p.DHCPACK])),
        (p.OPT_SERVER_ID, p.ip_bytes(advertise, "advertise")),
        (p.OPT_VENDOR_CLASS, choice.vendor),
    ]
    if request.guid_option is not None:
        opts.append((p.OPT_CLIENT_GUID, request.guid_option))
    if choice.tftp:
        opts.append((p.OPT_TFTP_SERVER, advertise.encode("ascii")))
    opts.append((p.OPT_BOOTFILE, file_bytes))
    if choice.pxe_discovery:
        opts.append((p.OPT_VENDOR_SPECIFIC, pxe_vendor_options(request_packet, kind)))
    return p.DhcpPacket(
        op=p.BOOTREPLY,
        xid=request_packet.xid,
        chaddr=request_packet.chaddr,
        htype=request_packet.htype,
        flags=request_packet.flags,
        ciaddr=request_packet.ciaddr if kind is Kind.REQUEST else "0.0.0.0",
        siaddr=advertise,
        giaddr=request_packet.giaddr,
        file=file_bytes if len(file_bytes) <= 127 else b"",
        options=p.Options(tuple(opts)),  # codes are distinct by construction
    )


def reply_bytes(
    request_packet: p.DhcpPacket, request: BootRequest, choice: BootChoice, advertise: str, kind: Kind
) -> bytes:
    """`p.encode(build_reply(...))`, from a template encoded once per reply shape (the choice, the
    advertised address, the kind, whether option 97 is echoed, option 43's bytes) with the client's own
    fields written into it: xid, flags, ciaddr, giaddr, chaddr and option 97's value. A boot storm asks
    for a handful of shapes, so this skips building and encoding a packet per reply (tests compare the
    two for every shape)."""
    vendor43 = pxe_vendor_options(request_packet, kind) if choice.pxe_discovery else b""
    template, guid_at = _reply_template(choice, advertise, kind, request.guid_option is not None, vendor43)
    out = bytearray(template)
    _CLIENT_FIELDS.pack_into(out, 4, request_packet.xid & 0xFFFFFFFF, 0, request_packet.flags & 0xFFFF)
    if kind is Kind.REQUEST:
        out[12:16] = p.ip_bytes(request_packet.ciaddr, "ciaddr")
    out[24:28] = p.ip_bytes(request_packet.giaddr, "giaddr")
    out[28:34] = request_packet.chaddr  # classify() admits 6-byte Ethernet addresses only
    if request.guid_option is not None:
        out[guid_at : guid_at + len(request.guid_option)] = request.guid_option
    return bytes(out)


_CLIENT_FIELDS = struct.Struct("!IHH")  # xid, secs, flags: bytes 4..12 of the header (RFC 2131 §2)
_TEMPLATE_GUID = b"\x00" + bytes(16)  # option 97 as classify() admits it: type 0, 16 bytes (RFC 4578 §2.3)


@functools.lru_cache(maxsize=256)
def _reply_template(
    choice: BootChoice, advertise: str, kind: Kind, with_guid: bool, vendor43: bytes
) -> tuple[bytes, int]:
    """The reply for a client with all-zero fields, and where option 97's value starts in it (0: none)."""
    request_packet = p.DhcpPacket(op=p.BOOTREQUEST, xid=0, chaddr=bytes(6))
    request = BootRequest(mac="", uuid=None, arch=0, vendor=choice.vendor, ipxe=False, message_type=0,
                          guid_option=_TEMPLATE_GUID if with_guid else None)
    reply = build_reply(request_packet, request, choice, advertise, kind)
    if choice.pxe_discovery:  # option 43 as the real request makes it (on :4011 it echoes the boot item)
        opts = tuple((c, vendor43 if c == p.OPT_VENDOR_SPECIFIC else v) for c, v in reply.options)
        reply = reply.with_options(p.Options(opts))
    data = p.encode(reply)
    guid_at = 0
    i = p.OPTIONS_OFFSET
    while with_guid and i < len(data) and data[i] != p.OPT_END:  # the options this module wrote: well formed
        if data[i] == p.OPT_CLIENT_GUID:
            guid_at = i + 2
            break
        i += 2 + data[i + 1]
    return data, guid_at


BOOTPC_PORT = 68  # RFC 2131 §4.1: clients listen on 68
ANY = "0.0.0.0"
LIMITED_BROADCAST = "255.255.255.255"


def reply_destination(
    request: p.DhcpPacket,
    source: tuple[str, int],
    kind: Kind,
    *,
    relay_port: int,
    client_port: int = BOOTPC_PORT,
    broadcast: str = LIMITED_BROADCAST,
) -> tuple[str, int]:
    """Where the reply to `request` (which came from `source`) goes.

    - A boot server REQUEST (port 4011): PXE 2.1 §2.2.5, the client is answered where it asked from — its
      ciaddr, else the datagram's source address, at the source port; a client with no address yet is
      answered by broadcast to the client port.
    - A DISCOVER (port 67), RFC 2131 §4.1: through the relay agent when giaddr is set (to the relay's
      server port, `relay_port`); else unicast to ciaddr when the client has one; else broadcast to the
      client port (a proxyDHCP never knows the address the client is being given, so it cannot unicast
      to yiaddr).
    """
    if kind is Kind.REQUEST:
        ip = request.ciaddr if request.ciaddr != ANY else source[0]
        if ip != ANY:
            return (ip, source[1])
        return (broadcast, client_port)
    if request.giaddr != ANY:
        return (request.giaddr, relay_port)
    if request.ciaddr != ANY:
        return (request.ciaddr, client_port)
    return (broadcast, client_port)
