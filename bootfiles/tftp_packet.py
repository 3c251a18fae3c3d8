"""TFTP packet codec (pure): bytes <-> frozen dataclasses.

RFC 1350 (the protocol), RFC 2347 (option extension, OACK), RFC 2348 (blksize), RFC 2349 (timeout,
tsize), RFC 7440 (windowsize). No sockets, no asyncio, no configuration. The only exception raised by
`decode` is `TftpPacketError`, which carries the byte offset where decoding failed.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from enum import IntEnum

# RFC 1350 §5: opcodes; RFC 2347 §2: OACK.
OP_RRQ = 1
OP_WRQ = 2
OP_DATA = 3
OP_ACK = 4
OP_ERROR = 5
OP_OACK = 6

# RFC 1350 §5 / appendix: the largest block number before it wraps (16-bit field).
BLOCK_MODULO = 65536
DEFAULT_BLKSIZE = 512  # RFC 1350 §1
MIN_BLKSIZE = 8  # RFC 2348 §2
MAX_BLKSIZE = 65464  # RFC 2348 §2
MIN_WINDOWSIZE = 1  # RFC 7440 §3
MAX_WINDOWSIZE = 65535  # RFC 7440 §3
MIN_TIMEOUT = 1  # RFC 2349 §2 (seconds)
MAX_TIMEOUT = 255  # RFC 2349 §2

# A request packet is bounded: filename + mode + options. Real requests are < 600 bytes (pxelinux,
# iPXE, EDK2); 2048 leaves room while keeping decoding of hostile input cheap.
MAX_REQUEST_BYTES = 2048
MAX_ERROR_MESSAGE = 512


class ErrorCode(IntEnum):
    """RFC 1350 appendix (error codes), RFC 2347 §2 (code 8)."""

    NOT_DEFINED = 0
    FILE_NOT_FOUND = 1
    ACCESS_VIOLATION = 2
    DISK_FULL = 3
    ILLEGAL_OPERATION = 4
    UNKNOWN_TID = 5
    FILE_EXISTS = 6
    NO_SUCH_USER = 7
    OPTION_REFUSED = 8


class TftpPacketError(ValueError):
    """A datagram that is not a well-formed TFTP packet."""

    def __init__(self, message: str, offset: int) -> None:
        super().__init__(f"{message} (at byte {offset})")
        self.offset = offset


@dataclass(frozen=True)
class ReadRequest:
    filename: str
    mode: str  # lower-cased: "octet", "netascii" or "mail"
    options: dict[str, str] = field(default_factory=dict)  # names lower-cased, values as sent


@dataclass(frozen=True)
class WriteRequest:
    filename: str
    mode: str
    options: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Data:
    block: int
    payload: bytes


@dataclass(frozen=True)
class Ack:
    block: int


@dataclass(frozen=True)
class Error:
    code: int
    message: str


@dataclass(frozen=True)
class OptionAck:
    options: dict[str, str]


Packet = ReadRequest | WriteRequest | Data | Ack | Error | OptionAck

_HEADER = struct.Struct("!HH")


def _cstrings(data: bytes, start: int) -> list[tuple[str, int]]:
    """Split NUL-terminated ASCII strings from `start` to the end; each string with its offset."""
    out: list[tuple[str, int]] = []
    pos = start
    end = len(data)
    while pos < end:
        nul = data.find(b"\0", pos)
        if nul < 0:
            raise TftpPacketError("string without NUL terminator", pos)
        raw = data[pos:nul]
        try:
            text = raw.decode("ascii")
        except UnicodeDecodeError as exc:
            raise TftpPacketError("non-ASCII byte in string", pos + exc.start) from None
        out.append((text, pos))
        pos = nul + 1
    return out


def _decode_options(strings: list[tuple[str, int]]) -> dict[str, str]:
    if len(strings) % 2:
        name, offset = strings[-1]
        raise TftpPacketError(f"option {name!r} has no value", offset)
    options: dict[str, str] = {}
    for i in range(0, len(strings), 2):
        name, offset = strings[i]
        if not name:
            raise TftpPacketError("empty option name", offset)
        key = name.lower()
        if key in options:
            raise TftpPacketError(f"duplicate option {name!r}", offset)  # RFC 2347 leaves it undefined
        options[key] = strings[i + 1][0]
    return options


def _decode_request(data: bytes, opcode: int) -> ReadRequest | WriteRequest:
    if len(data) > MAX_REQUEST_BYTES:
        raise TftpPacketError(f"request longer than {MAX_REQUEST_BYTES} bytes", MAX_REQUEST_BYTES)
    strings = _cstrings(data, 2)
    if len(strings) < 2:
        raise TftpPacketError("request needs a filename and a mode", len(data))
    (filename, _), (mode, _) = strings[0], strings[1]
    options = _decode_options(strings[2:])
    if opcode == OP_RRQ:
        return ReadRequest(filename, mode.lower(), options)
    return WriteRequest(filename, mode.lower(), options)


def decode(data: bytes) -> Packet:
    """Decode one datagram. Raises TftpPacketError (only) on malformed input."""
    if len(data) < 2:
        raise TftpPacketError("datagram shorter than an opcode", len(data))
    opcode = (data[0] << 8) | data[1]
    if opcode in (OP_RRQ, OP_WRQ):
        return _decode_request(data, opcode)
    if opcode == OP_DATA:
        if len(data) < 4:
            raise TftpPacketError("DATA without block number", len(data))
        if len(data) > 4 + MAX_BLKSIZE:
            raise TftpPacketError("DATA payload larger than the largest block size", 4 + MAX_BLKSIZE)
        return Data(_HEADER.unpack_from(data)[1], bytes(data[4:]))
    if opcode == OP_ACK:
        if len(data) < 4:
            raise TftpPacketError("ACK without block number", len(data))
        return Ack(_HEADER.unpack_from(data)[1])  # trailing bytes are tolerated, as most servers do
    if opcode == OP_ERROR:
        if len(data) < 4:
            raise TftpPacketError("ERROR without code", len(data))
        code = _HEADER.unpack_from(data)[1]
        body = data[4 : 4 + MAX_ERROR_MESSAGE]
        nul = body.find(b"\0")
        text = (body if nul < 0 else body[:nul]).decode("ascii", "replace")  # lenient: only logged
        return Error(code, text)
    if opcode == OP_OACK:
        if len(data) > MAX_REQUEST_BYTES:
            raise TftpPacketError(f"OACK longer than {MAX_REQUEST_BYTES} bytes", MAX_REQUEST_BYTES)
        return OptionAck(_decode_options(_cstrings(data, 2)))
    raise TftpPacketError(f"unknown opcode {opcode}", 0)


def _cstr(text: str) -> bytes:
    raw = text.encode("ascii")
    if b"\0" in raw:
        raise ValueError("NUL inside a TFTP string")
    return raw + b"\0"


def encode_data(block: int, payload: bytes | memoryview) -> bytes:
    """The hot path: DATA header + payload with one copy."""
    return _HEADER.pack(OP_DATA, block % BLOCK_MODULO) + payload


def encode_ack(block: int) -> bytes:
    return _HEADER.pack(OP_ACK, block % BLOCK_MODULO)


def encode(packet: Packet) -> bytes:
    if isinstance(packet, Data):
        return encode_data(packet.block, packet.payload)
    if isinstance(packet, Ack):
        return encode_ack(packet.block)
    if isinstance(packet, Error):
        message = packet.message.encode("ascii", "replace")[:MAX_ERROR_MESSAGE].replace(b"\0", b"?")
        return _HEADER.pack(OP_ERROR, packet.code) + message + b"\0"
    if isinstance(packet, OptionAck):
        return struct.pack("!H", OP_OACK) + b"".join(_cstr(k) + _cstr(v) for k, v in packet.options.items())
    opcode = OP_RRQ if isinstance(packet, ReadRequest) else OP_WRQ
    body = _cstr(packet.filename) + _cstr(packet.mode)
    body += b"".join(_cstr(k) + _cstr(v) for k, v in packet.options.items())
    return struct.pack("!H", opcode) + body


def describe(packet: Packet) -> str:
    """Readable one-line form, for logs and golden tests."""
    if isinstance(packet, ReadRequest | WriteRequest):
        kind = "RRQ" if isinstance(packet, ReadRequest) else "WRQ"
        opts = " ".join(f"{k}={v}" for k, v in packet.options.items())
        return f"{kind} {packet.filename!r} mode={packet.mode}" + (f" {opts}" if opts else "")
    if isinstance(packet, Data):
        return f"DATA block={packet.block} len={len(packet.payload)}"
    if isinstance(packet, Ack):
        return f"ACK block={packet.block}"
    if isinstance(packet, Error):
        return f"ERROR code={packet.code} {packet.message!r}"
    return "OACK " + " ".join(f"{k}={v}" for k, v in packet.options.items())
