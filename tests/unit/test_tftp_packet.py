"""TFTP codec: RFC examples, golden captures, round trips, fuzzing."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bootfiles import tftp_packet as tp

# Captured datagrams (hex) from real clients, decoded to readable text.
GOLDEN = {
    # pxelinux 6.03 asking for its config by UUID, with tsize/blksize (as seen from qemu+iPXE).
    "00017078656c696e75782e6366672f33663163303030302d303030302d343030302d383030302d303030303030303030303031"
    "006f63746574007473697a65003000626c6b73697a650031343038"
    "00": "RRQ 'pxelinux.cfg/3f1c0000-0000-4000-8000-000000000001' mode=octet tsize=0 blksize=1408",
    # tftp-hpa `tftp` default (netascii, no options).
    "0001626967006e6574617363696900": "RRQ 'big' mode=netascii",
    # EDK2's tsize probe being refused by the client itself.
    "0005000855736572206162697274656420746865207472616e7366657200": "ERROR code=8 'User abirted the transfer'",
    "0006626c6b73697a650031343638007473697a6500343234333000": "OACK blksize=1468 tsize=42430",
    "00040000": "ACK block=0",
    "0003ffff41424344": "DATA block=65535 len=4",
    "0002782e62696e006f6374657400": "WRQ 'x.bin' mode=octet",
}


@pytest.mark.parametrize("hexdata", sorted(GOLDEN))
def test_golden_captures(hexdata: str) -> None:
    packet = tp.decode(bytes.fromhex(hexdata))
    assert tp.describe(packet) == GOLDEN[hexdata]


def test_rfc1350_rrq_layout() -> None:
    # RFC 1350 §5 figure 5-1: | 01 | Filename | 0 | Mode | 0 |
    assert tp.encode(tp.ReadRequest("a", "octet")) == b"\x00\x01a\x00octet\x00"
    assert tp.encode(tp.Error(1, "File not found")) == b"\x00\x05\x00\x01File not found\x00"


def test_rfc2347_example_oack() -> None:
    # RFC 2347 §5 example: blksize 1432 acknowledged.
    pkt = tp.decode(b"\x00\x06blksize\x001432\x00")
    assert pkt == tp.OptionAck({"blksize": "1432"})


def test_options_are_case_insensitive_and_mode_lowercased() -> None:
    pkt = tp.decode(b"\x00\x01f\x00OCTET\x00BlkSize\x00512\x00")
    assert pkt == tp.ReadRequest("f", "octet", {"blksize": "512"})


def test_block_numbers_wrap_on_encode() -> None:
    assert tp.encode_data(65536, b"x") == b"\x00\x03\x00\x00x"
    assert tp.encode_ack(65537) == b"\x00\x04\x00\x01"


@pytest.mark.parametrize(
    ("data", "offset"),
    [
        (b"", 0),
        (b"\x00", 1),
        (b"\x00\x09xx", 0),
        (b"\x00\x01file", 2),
        (b"\x00\x01file\x00", 7),
        (b"\x00\x01f\x00octet\x00blksize\x00", 10),
        (b"\x00\x01f\xff\x00octet\x00", 3),
        (b"\x00\x04\x00", 3),
        (b"\x00\x01f\x00octet\x00a\x001\x00A\x002\x00", 14),
    ],
)
def test_errors_carry_offsets(data: bytes, offset: int) -> None:
    with pytest.raises(tp.TftpPacketError) as info:
        tp.decode(data)
    assert info.value.offset == offset
    assert isinstance(info.value, ValueError)


def test_oversized_request_refused() -> None:
    with pytest.raises(tp.TftpPacketError):
        tp.decode(b"\x00\x01" + b"a" * 3000 + b"\x00octet\x00")


@given(
    st.sampled_from([tp.ReadRequest, tp.WriteRequest]),
    st.text(alphabet=st.characters(min_codepoint=1, max_codepoint=127), min_size=1, max_size=100),
    st.dictionaries(
        st.text(alphabet="abcdefghijklmnopqrstuvwxyz", min_size=1, max_size=10),
        st.text(alphabet="0123456789", max_size=6),
        max_size=4,
    ),
)
def test_request_round_trip(kind: type[tp.ReadRequest], name: str, options: dict[str, str]) -> None:
    pkt = kind(name, "octet", options)
    assert tp.decode(tp.encode(pkt)) == pkt


@given(st.integers(0, 65535), st.binary(max_size=1468))
def test_data_round_trip(block: int, payload: bytes) -> None:
    assert tp.decode(tp.encode(tp.Data(block, payload))) == tp.Data(block, payload)


@settings(max_examples=1500)
@given(st.binary(max_size=80))
def test_fuzz_random_bytes(data: bytes) -> None:
    try:
        tp.decode(data)
    except tp.TftpPacketError:
        pass


@settings(max_examples=1500)
@given(st.sampled_from(sorted(GOLDEN)), st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)), max_size=6))
def test_fuzz_mutated_captures(hexdata: str, mutations: list[tuple[int, int]]) -> None:
    data = bytearray(bytes.fromhex(hexdata))
    for pos, value in mutations:
        if pos < len(data):
            data[pos] = value
        else:
            data.append(value)
    try:
        tp.decode(bytes(data))
    except tp.TftpPacketError:
        pass
