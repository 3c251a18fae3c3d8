"""Cello's sparse volume stream: how the `file` backend sends a volume image to another appliance.

A pure codec (no files, no asyncio). Big-endian throughout:

    header   magic "CELLOVS\\0" (8) | version u16 = 1 | flags u16 | logical size u64           20 bytes
    record   kind u8 | offset u64 | length u32                                                13 bytes
             kind 'D': `length` bytes of data at `offset` follow (1 ≤ length ≤ MAX_PAYLOAD)
             kind 'Z': [offset, offset + length) reads as zeros (delta streams only: a full stream
                       says the same by leaving the range out)
             kind 'E': the trailer, offset = the logical size, length = 32: the digest of the logical
                       content (LogicalHash) follows; nothing may come after it

Records are in ascending offset order and never overlap. A full stream lists the data extents only
(what it leaves out is a hole, and reads as zeros). A delta stream (flag DELTA) lists what differs
from a base both sides hold: what it leaves out is the base's content, so only the receiver, once it
has applied the records to its copy of the base, can check the trailer's digest.

The digest is `LogicalHash`'s: sha256 over the content's non-zero 64 KiB blocks with their indexes and
the logical size, so equal content gives an equal digest whatever its layout, and holes cost nothing
(a plain sha256 would hash a 100 GiB template's zeros: ~100 s per copy, measured here). The file
backend still caches the digests of immutable snapshots.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

from iscsi.model import StorageError

MAGIC = b"CELLOVS\0"
VERSION = 1
FLAG_DELTA = 0x0001
MAX_PAYLOAD = 1 << 20  # a data record's bytes: what a receiver holds in memory per record
HEADER = struct.Struct(">8sHHQ")
RECORD = struct.Struct(">BQI")
KIND_DATA, KIND_ZERO, KIND_END = ord("D"), ord("Z"), ord("E")
DIGEST_LEN = 32
_ZEROS = memoryview(bytes(4 * MAX_PAYLOAD))


class VolStreamError(StorageError, ValueError):
    """Not a complete, intact Cello volume stream; `offset` is the stream byte where that showed. A
    StorageError too: a receive that meets one fails as any other storage operation does."""

    def __init__(self, message: str, offset: int) -> None:
        super().__init__(f"volume stream: {message} at byte {offset}")
        self.offset = offset


@dataclass(frozen=True)
class Header:
    size: int  # logical bytes
    delta: bool


@dataclass(frozen=True)
class Data:
    offset: int
    data: bytes


@dataclass(frozen=True)
class Zero:
    offset: int
    length: int


@dataclass(frozen=True)
class End:
    digest: bytes
    verified: bool  # the decoder compared it (full streams); a delta's receiver compares it itself


Event = Header | Data | Zero | End


def encode_header(size: int, *, delta: bool = False) -> bytes:
    if size < 0:
        raise ValueError(f"negative volume size {size}")
    return HEADER.pack(MAGIC, VERSION, FLAG_DELTA if delta else 0, size)


def encode_data(offset: int, data: bytes) -> bytes:
    if not 0 < len(data) <= MAX_PAYLOAD:
        raise ValueError(f"a data record holds 1..{MAX_PAYLOAD} bytes, not {len(data)}")
    return RECORD.pack(KIND_DATA, offset, len(data)) + data


def encode_zero(offset: int, length: int) -> bytes:
    if not 0 < length < 1 << 32:
        raise ValueError(f"invalid zero range length {length}")
    return RECORD.pack(KIND_ZERO, offset, length)


def encode_end(size: int, digest: bytes) -> bytes:
    if len(digest) != DIGEST_LEN:
        raise ValueError("the trailer holds a sha256 digest")
    return RECORD.pack(KIND_END, size, DIGEST_LEN) + digest


def checksum_text(digest: bytes) -> str:
    """The form the backends compare and report: "sha256:<hex>"."""
    return "sha256:" + digest.hex()


class LogicalHash:
    """A digest of a volume's logical content that costs what its data costs, not what its size is.

    The content is cut into BLOCK-sized blocks on a fixed grid; every block that is not all zeros is
    hashed with its index, then the logical size. Two images with the same content have the same digest
    however their holes, zero runs and extents lie (it compares content, not layout), and a 100 GiB
    template holding 40 MiB hashes 40 MiB: holes are skipped, never fed as zeros.
    Data must come in ascending order (`data`); `zeros_to` only moves past what reads as zeros.
    """

    BLOCK = 1 << 16

    def __init__(self) -> None:
        self._h = hashlib.sha256(b"cello-blocks-v1\0")
        self.pos = 0
        self._index = -1  # the block held in _buf
        self._buf = bytearray(self.BLOCK)
        self._dirty = False

    def _flush(self) -> None:
        if self._dirty and any(self._buf):
            self._h.update(self._index.to_bytes(8, "big"))
            self._h.update(self._buf)
        self._dirty = False

    def zeros_to(self, offset: int) -> None:
        self.pos = max(self.pos, offset)

    def data(self, offset: int, data: bytes) -> None:
        if offset < self.pos:
            raise ValueError(f"data at {offset} is before {self.pos}: extents must ascend")
        view = memoryview(data)
        while view:
            index, within = divmod(offset, self.BLOCK)
            if index != self._index:
                self._flush()
                self._index = index
                self._buf[:] = bytes(self.BLOCK)
            n = min(len(view), self.BLOCK - within)
            self._buf[within:within + n] = view[:n]
            self._dirty = True
            offset += n
            view = view[n:]
        self.pos = offset

    def finish(self, size: int) -> bytes:
        self._flush()
        self._h.update(size.to_bytes(8, "big"))
        return self._h.digest()


class Decoder:
    """Incremental: `feed` bytes as they arrive and act on the events it returns; `close` at the end
    of the input. Memory stays bounded (one record at a time) whatever the input claims."""

    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        self._buf = bytearray()
        self._consumed = 0  # stream offset of _buf[0]
        self._header: Header | None = None
        self._record: tuple[int, int, int] | None = None  # kind, offset, length awaiting a payload
        self._pos = 0  # logical offset the next record may start at
        self._hash: LogicalHash | None = None
        self.done = False

    def feed(self, chunk: bytes) -> list[Event]:
        if self.done and chunk:
            raise VolStreamError("bytes after the trailer", self._consumed + len(self._buf))
        self._buf += chunk
        events: list[Event] = []
        while not self.done:
            event = self._next()
            if event is None:
                break
            events.append(event)
        if self.done and self._buf:
            raise VolStreamError("bytes after the trailer", self._consumed)
        return events

    def close(self) -> None:
        """The input ended: it must have ended right after the trailer."""
        if not self.done:
            what = "header" if self._header is None else "record" if self._record is None else "payload"
            raise VolStreamError(f"truncated (in a {what})", self._consumed + len(self._buf))

    def _take(self, n: int) -> bytes:
        out = bytes(self._buf[:n])
        del self._buf[:n]
        self._consumed += n
        return out

    def _next(self) -> Event | None:
        if self._header is None:
            return self._read_header()
        if self._record is None:
            if len(self._buf) < RECORD.size:
                return None
            self._record = self._check_record(*RECORD.unpack_from(self._buf))
            self._take(RECORD.size)
        kind, offset, length = self._record
        if kind == KIND_ZERO:
            self._record = None
            self._pos = offset + length
            return Zero(offset, length)
        if len(self._buf) < length:
            return None
        at = self._consumed
        payload = self._take(length)
        self._record = None
        if kind == KIND_DATA:
            self._pos = offset + length
            if self._hash is not None:
                self._hash.data(offset, payload)
            return Data(offset, payload)
        self.done = True
        if self._hash is None:
            return End(payload, verified=False)
        if self._hash.finish(self._header.size) != payload:
            raise VolStreamError("checksum mismatch: the content is not what the sender hashed", at)
        return End(payload, verified=True)

    def _read_header(self) -> Header | None:
        if len(self._buf) < HEADER.size:
            if self._buf and not MAGIC.startswith(bytes(self._buf[: len(MAGIC)])):
                raise VolStreamError("not a Cello volume stream (bad magic)", 0)
            return None
        magic, version, flags, size = HEADER.unpack_from(self._buf)
        if magic != MAGIC:
            raise VolStreamError("not a Cello volume stream (bad magic)", 0)
        if version != VERSION:
            raise VolStreamError(f"unknown stream version {version} (this appliance reads {VERSION})", 8)
        if flags & ~FLAG_DELTA:
            raise VolStreamError(f"unknown flags {flags:#06x}", 10)
        if size > self.max_size:
            raise VolStreamError(f"volume of {size} bytes exceeds the {self.max_size}-byte limit", 12)
        self._take(HEADER.size)
        self._header = Header(size, bool(flags & FLAG_DELTA))
        self._hash = None if self._header.delta else LogicalHash()
        return self._header

    def _check_record(self, kind: int, offset: int, length: int) -> tuple[int, int, int]:
        assert self._header is not None
        at, size = self._consumed, self._header.size
        if kind == KIND_END:
            if offset != size or length != DIGEST_LEN:
                raise VolStreamError(f"malformed trailer (offset {offset}, length {length})", at)
            return kind, offset, length
        if kind == KIND_DATA:
            if not 0 < length <= MAX_PAYLOAD:
                raise VolStreamError(f"data record of {length} bytes (1..{MAX_PAYLOAD} allowed)", at)
        elif kind == KIND_ZERO:
            if not self._header.delta:
                raise VolStreamError("zero record in a full stream", at)
            if length == 0:
                raise VolStreamError("empty zero record", at)
        else:
            raise VolStreamError(f"unknown record kind {kind:#04x}", at)
        if offset < self._pos:
            raise VolStreamError(f"record at {offset} overlaps or precedes the one before (ends {self._pos})", at)
        if offset + length > size:
            raise VolStreamError(f"record [{offset}, {offset + length}) beyond the volume's {size} bytes", at)
        return kind, offset, length
