"""A pure DHCP/BOOTP codec: bytes to a frozen `DhcpPacket` and back.

No sockets, no asyncio, no configuration. `decode` raises only `PacketError` (a `ValueError` carrying the
byte offset where the problem was found); `encode` raises `PacketError` for a packet it cannot represent.

Sources: RFC 2131 (BOOTP/DHCP header, message flow), RFC 2132 (options), RFC 3396 (long options split
into several instances), RFC 3004 (user class), RFC 4578 (PXE options 93, 94, 97), the PXE 2.1
specification (option 43 sub-options) and iPXE's encapsulated options (175).
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace

# RFC 2131 §2: fixed header layout (236 bytes), then the options field starting with the magic cookie.
HEADER = struct.Struct("!BBBBIHH4s4s4s4s16s64s128s")
HEADER_SIZE = HEADER.size  # 236
MAGIC_COOKIE = b"\x63\x82\x53\x63"  # RFC 2131 §3
OPTIONS_OFFSET = HEADER_SIZE + len(MAGIC_COOKIE)  # 240
SNAME_OFFSET = 44
FILE_OFFSET = 108

# Bounds. A datagram larger than this is refused before any parsing (no DHCP client sends one: the
# default maximum message size is 576, RFC 2131 §2, and UDP over Ethernet carries at most 1472).
MAX_PACKET_SIZE = 4096
# RFC 951 / RFC 1542 §2.1: some BOOTP relay agents and PXE ROMs drop replies shorter than 300 bytes.
MIN_REPLY_SIZE = 300
# Largest reply we will encode: one Ethernet frame (1500 - 20 IP - 8 UDP).
MAX_REPLY_SIZE = 1472

BOOTREQUEST = 1  # RFC 2131 §2 "op"
BOOTREPLY = 2
HTYPE_ETHERNET = 1
FLAG_BROADCAST = 0x8000  # RFC 2131 §2 "flags"

# RFC 2132 §9.6 DHCP message types.
DHCPDISCOVER = 1
DHCPOFFER = 2
DHCPREQUEST = 3
DHCPDECLINE = 4
DHCPACK = 5
DHCPNAK = 6
DHCPRELEASE = 7
DHCPINFORM = 8

# Option codes.
OPT_PAD = 0  # RFC 2132 §3.1
OPT_END = 255  # RFC 2132 §3.2
OPT_VENDOR_SPECIFIC = 43  # RFC 2132 §8.4 (PXE sub-options when option 60 is "PXEClient")
OPT_OVERLOAD = 52  # RFC 2132 §9.3
OPT_MESSAGE_TYPE = 53  # RFC 2132 §9.6
OPT_SERVER_ID = 54  # RFC 2132 §9.7
OPT_PARAMETER_LIST = 55  # RFC 2132 §9.8
OPT_MAX_MESSAGE_SIZE = 57  # RFC 2132 §9.10
OPT_VENDOR_CLASS = 60  # RFC 2132 §9.13
OPT_CLIENT_ID = 61  # RFC 2132 §9.14
OPT_TFTP_SERVER = 66  # RFC 2132 §9.4
OPT_BOOTFILE = 67  # RFC 2132 §9.5
OPT_USER_CLASS = 77  # RFC 3004 §4
OPT_CLIENT_ARCH = 93  # RFC 4578 §2.1
OPT_CLIENT_NII = 94  # RFC 4578 §2.2
OPT_CLIENT_GUID = 97  # RFC 4578 §2.3
OPT_IPXE = 175  # iPXE encapsulated options (ipxe.org/cfg; include/ipxe/dhcp.h DHCP_EB_ENCAP)

# RFC 2132 §9.3 option overload values.
OVERLOAD_FILE = 1
OVERLOAD_SNAME = 2
OVERLOAD_BOTH = 3

# PXE 2.1 §2.4.7 option 43 sub-options.
PXE_DISCOVERY_CONTROL = 6
PXE_BOOT_SERVERS = 8
PXE_BOOT_MENU = 9
PXE_MENU_PROMPT = 10
PXE_BOOT_ITEM = 71


class PacketError(ValueError):
    """A datagram that is not a well-formed DHCP/BOOTP packet (or a packet that cannot be encoded).

    `offset` is the byte offset in the datagram; for a malformed option *value* found by one of the typed
    accessors (`DhcpPacket.client_arches`, …) it is the offset inside that option's value."""

    def __init__(self, message: str, offset: int) -> None:
        super().__init__(f"{message} (at byte {offset})")
        self.reason = message
        self.offset = offset


@dataclass(frozen=True, slots=True)
class Options:
    """DHCP options in wire order; a code appears at most once (RFC 3396 instances are joined)."""

    items: tuple[tuple[int, bytes], ...] = ()
    _index: dict[int, bytes] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_index", dict(self.items))

    @classmethod
    def of(cls, pairs: Mapping[int, bytes] | Iterable[tuple[int, bytes]]) -> Options:
        seq = pairs.items() if isinstance(pairs, Mapping) else pairs
        merged: dict[int, bytes] = {}
        for code, value in seq:
            if not 0 < code < 255:
                raise PacketError(f"option code {code} is reserved", 0)
            if code in merged:
                merged[code] += bytes(value)
            else:
                merged[code] = bytes(value)
        return cls(tuple(merged.items()))

    def get(self, code: int) -> bytes | None:
        return self._index.get(code)

    def __contains__(self, code: object) -> bool:
        return code in self._index

    def __iter__(self) -> Iterator[tuple[int, bytes]]:
        return iter(self.items)

    def codes(self) -> tuple[int, ...]:
        return tuple(c for c, _ in self.items)


@dataclass(frozen=True, slots=True)
class DhcpPacket:
    """One BOOTP/DHCP message (RFC 2131 §2). Addresses are dotted-quad strings."""

    op: int
    xid: int
    chaddr: bytes = b""  # hardware address, hlen bytes (not the 16-byte padded field)
    htype: int = HTYPE_ETHERNET
    hops: int = 0
    secs: int = 0
    flags: int = 0
    ciaddr: str = "0.0.0.0"
    yiaddr: str = "0.0.0.0"
    siaddr: str = "0.0.0.0"
    giaddr: str = "0.0.0.0"
    sname: bytes = b""  # NUL padding stripped
    file: bytes = b""
    options: Options = field(default_factory=Options)
    # True when the packet had the magic cookie (a DHCP packet); False for plain BOOTP.
    dhcp: bool = True

    # Typed views of the options this appliance uses. Each raises PacketError for a malformed value.

    @property
    def mac(self) -> str:
        return self.chaddr.hex(":")

    @property
    def message_type(self) -> int | None:
        v = self.options.get(OPT_MESSAGE_TYPE)
        if v is None:
            return None
        if len(v) != 1:
            raise PacketError("option 53 must be 1 byte", 0)
        return v[0]

    @property
    def vendor_class(self) -> bytes | None:
        return self.options.get(OPT_VENDOR_CLASS)

    @property
    def user_classes(self) -> tuple[bytes, ...]:
        v = self.options.get(OPT_USER_CLASS)
        return () if v is None else decode_user_class(v)

    @property
    def client_arches(self) -> tuple[int, ...]:
        v = self.options.get(OPT_CLIENT_ARCH)
        return () if v is None else decode_client_arch(v)

    @property
    def client_nii(self) -> tuple[int, int, int] | None:
        v = self.options.get(OPT_CLIENT_NII)
        return None if v is None else decode_client_nii(v)

    @property
    def client_guid(self) -> bytes | None:
        """The 16 GUID bytes of option 97 as sent (SMBIOS order), or None."""
        v = self.options.get(OPT_CLIENT_GUID)
        return None if v is None else decode_client_guid(v)

    @property
    def server_id(self) -> str | None:
        v = self.options.get(OPT_SERVER_ID)
        return None if v is None else decode_ip(v, OPT_SERVER_ID)

    @property
    def pxe_options(self) -> Options:
        """Option 43 decoded as PXE sub-options (meaningful when option 60 starts with PXEClient)."""
        v = self.options.get(OPT_VENDOR_SPECIFIC)
        return Options() if v is None else decode_encapsulated(v, OPT_VENDOR_SPECIFIC)

    @property
    def ipxe_options(self) -> Options:
        v = self.options.get(OPT_IPXE)
        return Options() if v is None else decode_encapsulated(v, OPT_IPXE)

    @property
    def tftp_server(self) -> str | None:
        v = self.options.get(OPT_TFTP_SERVER)
        return None if v is None else v.decode("latin-1")

    @property
    def bootfile(self) -> str | None:
        """Option 67 if present, else the header's file field (RFC 2132 §9.5)."""
        v = self.options.get(OPT_BOOTFILE)
        if v is None:
            v = self.file or None
        return None if v is None else v.rstrip(b"\0").decode("latin-1")

    def with_options(self, options: Options) -> DhcpPacket:
        return replace(self, options=options)


# ---- option value codecs -------------------------------------------------------------------------------


def decode_ip(value: bytes, code: int) -> str:
    if len(value) != 4:
        raise PacketError(f"option {code} must be a 4-byte address", 0)
    return socket.inet_ntoa(value)


def decode_user_class(value: bytes) -> tuple[bytes, ...]:
    """RFC 3004: a list of (length, data) instances. iPXE sends a plain string instead ("iPXE"): a value
    that does not parse exactly as RFC 3004 instances is taken as one plain class."""
    if not value:
        raise PacketError("option 77 is empty", 0)
    classes: list[bytes] = []
    i = 0
    while i < len(value):
        n = value[i]
        if n == 0 or i + 1 + n > len(value):
            return (value,)
        classes.append(value[i + 1 : i + 1 + n])
        i += 1 + n
    return tuple(classes)


def encode_user_class(classes: Iterable[bytes]) -> bytes:
    out = bytearray()
    for c in classes:
        if not 0 < len(c) < 256:
            raise PacketError("user class instance must be 1..255 bytes", 0)
        out += bytes([len(c)]) + c
    return bytes(out)


def decode_client_arch(value: bytes) -> tuple[int, ...]:
    """RFC 4578 §2.1: a list of 16-bit architecture types."""
    if not value or len(value) % 2:
        raise PacketError("option 93 must be a non-empty list of 16-bit values", 0)
    if len(value) == 2:
        return ((value[0] << 8) | value[1],)
    return struct.unpack(f"!{len(value) // 2}H", value)


def decode_client_nii(value: bytes) -> tuple[int, int, int]:
    """RFC 4578 §2.2: (interface type, major, minor)."""
    if len(value) != 3:
        raise PacketError("option 94 must be 3 bytes", 0)
    return value[0], value[1], value[2]


def decode_client_guid(value: bytes) -> bytes:
    """RFC 4578 §2.3: type 0 then 16 bytes."""
    if len(value) != 17 or value[0] != 0:
        raise PacketError("option 97 must be type 0 and 16 bytes", 0)
    return value[1:]


def decode_encapsulated(value: bytes, code: int) -> Options:
    """Encapsulated sub-options (RFC 2132 §8.4 format): code, length, data; pad 0; end 255."""
    pairs: list[tuple[int, bytes]] = []
    i = 0
    while i < len(value):
        sub = value[i]
        if sub == OPT_PAD:
            i += 1
            continue
        if sub == OPT_END:
            break
        if i + 1 >= len(value):
            raise PacketError(f"option {code}: sub-option {sub} has no length", i)
        n = value[i + 1]
        if i + 2 + n > len(value):
            raise PacketError(f"option {code}: sub-option {sub} runs past the option", i)
        pairs.append((sub, value[i + 2 : i + 2 + n]))
        i += 2 + n
    return Options.of(pairs)


def encode_encapsulated(options: Options) -> bytes:
    out = bytearray()
    for code, value in options:
        if len(value) > 255:
            raise PacketError(f"sub-option {code} longer than 255 bytes", 0)
        out += bytes([code, len(value)]) + value
    out.append(OPT_END)
    return bytes(out)


# ---- packet codec --------------------------------------------------------------------------------------


def _parse_options_area(data: bytes, start: int, end: int, into: list[tuple[int, bytes]]) -> None:
    """Parse the TLV options in data[start:end] (absolute offsets for error messages)."""
    i = start
    while i < end:
        code = data[i]
        if code == OPT_PAD:
            i += 1
            continue
        if code == OPT_END:
            return
        if i + 1 >= end:
            raise PacketError(f"option {code} has no length byte", i)
        n = data[i + 1]
        if i + 2 + n > end:
            raise PacketError(f"option {code} (length {n}) runs past the end of its field", i)
        into.append((code, data[i + 2 : i + 2 + n]))
        i += 2 + n
    # A missing end option is tolerated: several PXE ROMs omit it when the packet is exactly full.


def _strip_nul(field_bytes: bytes) -> bytes:
    n = field_bytes.find(b"\0")
    return field_bytes if n < 0 else field_bytes[:n]


def decode(data: bytes) -> DhcpPacket:
    """Decode one BOOTP/DHCP datagram. Raises only PacketError."""
    if len(data) > MAX_PACKET_SIZE:
        raise PacketError(f"datagram of {len(data)} bytes is larger than {MAX_PACKET_SIZE}", MAX_PACKET_SIZE)
    if len(data) < HEADER_SIZE:
        raise PacketError(f"datagram of {len(data)} bytes is shorter than the BOOTP header", len(data))
    (op, htype, hlen, hops, xid, secs, flags, ciaddr, yiaddr, siaddr, giaddr, chaddr, sname, file) = (
        HEADER.unpack_from(data)
    )
    if op not in (BOOTREQUEST, BOOTREPLY):
        raise PacketError(f"op {op} is neither BOOTREQUEST nor BOOTREPLY", 0)
    if hlen > 16:
        raise PacketError(f"hlen {hlen} is larger than the 16-byte chaddr field", 2)
    is_dhcp = data[HEADER_SIZE:OPTIONS_OFFSET] == MAGIC_COOKIE
    pairs: list[tuple[int, bytes]] = []
    if is_dhcp:
        _parse_options_area(data, OPTIONS_OFFSET, len(data), pairs)
        overload_values = [v for c, v in pairs if c == OPT_OVERLOAD]
        if overload_values:
            ov = overload_values[0]
            if len(ov) != 1 or ov[0] not in (OVERLOAD_FILE, OVERLOAD_SNAME, OVERLOAD_BOTH):
                raise PacketError("option 52 must be one byte of 1, 2 or 3", OPTIONS_OFFSET)
            # RFC 2131 §4.1: options, then file, then sname.
            if ov[0] & OVERLOAD_FILE:
                _parse_options_area(data, FILE_OFFSET, FILE_OFFSET + 128, pairs)
                file = b""
            if ov[0] & OVERLOAD_SNAME:
                _parse_options_area(data, SNAME_OFFSET, SNAME_OFFSET + 64, pairs)
                sname = b""
            pairs = [(c, v) for c, v in pairs if c != OPT_OVERLOAD]
    # The parser never yields codes 0 or 255. Repeated codes are RFC 3396 instances of one option.
    if len({c for c, _ in pairs}) == len(pairs):
        options = Options(tuple(pairs))
    else:
        options = Options.of(pairs)
    return DhcpPacket(
        op=op,
        xid=xid,
        chaddr=chaddr[:hlen],
        htype=htype,
        hops=hops,
        secs=secs,
        flags=flags,
        ciaddr=socket.inet_ntoa(ciaddr),
        yiaddr=socket.inet_ntoa(yiaddr),
        siaddr=socket.inet_ntoa(siaddr),
        giaddr=socket.inet_ntoa(giaddr),
        sname=_strip_nul(sname),
        file=_strip_nul(file),
        options=options,
        dhcp=is_dhcp,
    )


def ip_bytes(value: str, name: str) -> bytes:
    """Dotted quad → 4 bytes, strictly (inet_pton: no "10.1" shorthand, no octal)."""
    try:
        return socket.inet_pton(socket.AF_INET, value)
    except (OSError, TypeError, ValueError):
        raise PacketError(f"{name} {value!r} is not an IPv4 address", 0) from None


def encode(packet: DhcpPacket, *, min_size: int = MIN_REPLY_SIZE) -> bytes:
    """Encode a packet. Options longer than 255 bytes are split into instances (RFC 3396); the packet is
    padded to `min_size`. Raises PacketError when the result would exceed MAX_REPLY_SIZE."""
    if len(packet.chaddr) > 16:
        raise PacketError("chaddr longer than 16 bytes", 28)
    if len(packet.sname) > 64:
        raise PacketError("sname longer than 64 bytes", SNAME_OFFSET)
    if len(packet.file) > 128:
        raise PacketError("file longer than 128 bytes", FILE_OFFSET)
    out = bytearray(
        HEADER.pack(
            packet.op,
            packet.htype,
            len(packet.chaddr),
            packet.hops,
            packet.xid & 0xFFFFFFFF,
            packet.secs & 0xFFFF,
            packet.flags & 0xFFFF,
            ip_bytes(packet.ciaddr, "ciaddr"),
            ip_bytes(packet.yiaddr, "yiaddr"),
            ip_bytes(packet.siaddr, "siaddr"),
            ip_bytes(packet.giaddr, "giaddr"),
            packet.chaddr,
            packet.sname,
            packet.file,
        )
    )
    if packet.dhcp:
        out += MAGIC_COOKIE
        for code, value in packet.options:
            if not 0 < code < 255:
                raise PacketError(f"option code {code} is reserved", len(out))
            n = len(value)
            if n <= 255:
                out += bytes((code, n))
                out += value
                continue
            for i in range(0, n, 255):  # RFC 3396: split into instances of at most 255 bytes
                chunk = value[i : i + 255]
                out += bytes((code, len(chunk)))
                out += chunk
        out.append(OPT_END)
    if len(out) < min_size:
        out += bytes(min_size - len(out))
    if len(out) > MAX_REPLY_SIZE:
        raise PacketError(f"encoded packet of {len(out)} bytes exceeds {MAX_REPLY_SIZE}", MAX_REPLY_SIZE)
    return bytes(out)
