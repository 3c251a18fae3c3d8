"""DHCP codec: round trips, RFC 3396 long options, option overload, bounds and error offsets."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dhcp import packet as p

ADDR = st.ip_addresses(v=4).map(str)
OPTION = st.tuples(
    st.integers(1, 254).filter(lambda c: c != p.OPT_OVERLOAD), st.binary(min_size=0, max_size=300)
)


@st.composite
def packets(draw: st.DrawFn) -> p.DhcpPacket:
    opts = draw(st.lists(OPTION, max_size=4, unique_by=lambda o: o[0]))
    return p.DhcpPacket(
        op=draw(st.sampled_from([p.BOOTREQUEST, p.BOOTREPLY])),
        xid=draw(st.integers(0, 2**32 - 1)),
        chaddr=draw(st.binary(min_size=0, max_size=16)),
        htype=draw(st.integers(0, 255)),
        hops=draw(st.integers(0, 255)),
        secs=draw(st.integers(0, 65535)),
        flags=draw(st.integers(0, 65535)),
        ciaddr=draw(ADDR), yiaddr=draw(ADDR), siaddr=draw(ADDR), giaddr=draw(ADDR),
        sname=draw(st.binary(max_size=64).map(lambda b: b.replace(b"\0", b"x"))),
        file=draw(st.binary(max_size=128).map(lambda b: b.replace(b"\0", b"x"))),
        options=p.Options.of(opts),
    )


@settings(max_examples=300, deadline=None)
@given(packets())
def test_round_trip(packet: p.DhcpPacket) -> None:
    data = p.encode(packet)
    assert len(data) >= p.MIN_REPLY_SIZE
    assert p.decode(data) == packet


def test_long_option_is_split_and_joined() -> None:
    """RFC 3396: a 600-byte value goes out as 255 + 255 + 90 instances and comes back whole."""
    value = bytes(range(256)) * 2 + bytes(88)
    data = p.encode(p.DhcpPacket(op=p.BOOTREPLY, xid=1, options=p.Options.of({77: value})))
    assert data[240:242] == bytes([77, 255]) and data[497:499] == bytes([77, 255])
    assert data[754:756] == bytes([77, len(value) - 510])
    assert p.decode(data).options.get(77) == value


def _raw(options: bytes, *, file: bytes = b"", sname: bytes = b"") -> bytes:
    header = p.HEADER.pack(1, 1, 6, 0, 7, 0, 0, bytes(4), bytes(4), bytes(4), bytes(4),
                           b"\x52\x54\x00\x00\x00\x01".ljust(16, b"\0"), sname.ljust(64, b"\0"),
                           file.ljust(128, b"\0"))
    return header + p.MAGIC_COOKIE + options


def test_overload_file_only() -> None:
    data = _raw(bytes([53, 1, 1, 52, 1, 1, 255]), file=bytes([67, 4]) + b"boot" + b"\xff", sname=b"srv")
    packet = p.decode(data)
    assert packet.options.get(67) == b"boot" and packet.file == b"" and packet.sname == b"srv"


def test_overload_bad_value_is_error() -> None:
    with pytest.raises(p.PacketError) as e:
        p.decode(_raw(bytes([52, 1, 9, 255])))
    assert e.value.offset == p.OPTIONS_OFFSET


@pytest.mark.parametrize(
    ("data", "offset"),
    [
        (b"\x01" * 100, 100),  # shorter than the header
        (_raw(bytes([60, 10]) + b"abc"), 240),  # option runs past the end
        (_raw(bytes([53, 1, 1, 60])), 243),  # option without length byte
        (b"\x07" + _raw(b"")[1:], 0),  # bad op
        (b"\x01\x01\x11" + _raw(b"")[3:], 2),  # hlen > 16
        (bytes(p.MAX_PACKET_SIZE + 1), p.MAX_PACKET_SIZE),
    ],
)
def test_errors_carry_offsets(data: bytes, offset: int) -> None:
    with pytest.raises(p.PacketError) as e:
        p.decode(data)
    assert isinstance(e.value, ValueError)
    assert e.value.offset == offset
    assert f"at byte {offset}" in str(e.value)


def test_overload_area_error_offset_is_absolute() -> None:
    with pytest.raises(p.PacketError) as e:
        p.decode(_raw(bytes([52, 1, 1, 255]), file=bytes([67, 200])))
    assert e.value.offset == p.FILE_OFFSET


def test_bootp_without_cookie() -> None:
    data = _raw(b"")[: p.HEADER_SIZE] + bytes(64)
    packet = p.decode(data)
    assert not packet.dhcp and packet.options == p.Options()
    assert p.decode(p.encode(packet)) == packet


def test_user_class_forms() -> None:
    assert p.decode_user_class(b"iPXE") == (b"iPXE",)
    assert p.decode_user_class(b"\x04iPXE\x03lab") == (b"iPXE", b"lab")
    assert p.decode_user_class(b"\x04iPX") == (b"\x04iPX",)  # does not parse as RFC 3004: plain
    assert p.encode_user_class([b"iPXE", b"lab"]) == b"\x04iPXE\x03lab"
    with pytest.raises(p.PacketError):
        p.decode_user_class(b"")


def test_typed_option_errors() -> None:
    for code, value in ((93, b"\x00"), (94, b"\x01\x02"), (97, b"\x01" + bytes(16)), (97, bytes(5)),
                        (53, b""), (54, b"\x01\x02")):
        packet = p.DhcpPacket(op=1, xid=1, options=p.Options.of({code: value}))
        with pytest.raises(p.PacketError):
            _ = (packet.client_arches, packet.client_nii, packet.client_guid, packet.message_type,
                 packet.server_id)


def test_client_arch_list_and_encapsulated() -> None:
    assert p.decode_client_arch(b"\x00\x07\x00\x10") == (7, 16)
    enc = p.encode_encapsulated(p.Options.of([(6, b"\x08"), (71, b"\x80\x00\x00\x00")]))
    assert enc == b"\x06\x01\x08\x47\x04\x80\x00\x00\x00\xff"
    assert p.decode_encapsulated(b"\x00" + enc + b"junk", 43).items == ((6, b"\x08"), (71, b"\x80\x00\x00\x00"))
    with pytest.raises(p.PacketError) as e:
        p.decode_encapsulated(b"\x06\x05\x08", 43)
    assert e.value.offset == 0


def test_encode_bounds() -> None:
    with pytest.raises(p.PacketError):
        p.encode(p.DhcpPacket(op=2, xid=1, file=b"x" * 129))
    with pytest.raises(p.PacketError):
        p.encode(p.DhcpPacket(op=2, xid=1, options=p.Options.of({77: bytes(1300)})))
    with pytest.raises(p.PacketError):
        p.encode(p.DhcpPacket(op=2, xid=1, ciaddr="10.0.0.256"))
