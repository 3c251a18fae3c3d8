"""The file backend's sparse volume stream: the codec (iscsi/volstream.py) and the image encoder and
writer around it (iscsi/image_stream.py), on sparse files in a temp dir."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from iscsi import volstream
from iscsi.image_stream import ImageEncoder, ImageWriter, digest_file, pieces
from iscsi.model import StorageError
from iscsi.volstream import Data, Decoder, End, Header, VolStreamError, Zero

MB = 1 << 20


def sparse_image(path: Path, size: int, writes: dict[int, bytes]) -> Path:
    with open(path, "xb") as f:
        f.truncate(size)
        for off, data in writes.items():
            f.seek(off)
            f.write(data)
    return path


def encode(img: Path, base: Path | None = None) -> list[bytes]:
    enc = ImageEncoder(img, base)
    try:
        frames = []
        while (frame := enc.next_frame()) is not None:
            frames.append(frame)
        return frames
    finally:
        enc.close()


def decode(stream: bytes, *, max_size: int = 1 << 40, step: int = 4096) -> list[volstream.Event]:
    dec = Decoder(max_size)
    events: list[volstream.Event] = []
    for i in range(0, len(stream), step):
        events += dec.feed(stream[i:i + step])
    dec.close()
    return events


def logical(content: bytes) -> bytes:
    """The digest of content fed whole, zeros and all (what a sparse reader must agree with)."""
    h = volstream.LogicalHash()
    h.data(0, content)
    return h.finish(len(content))


def test_the_digest_compares_content_not_layout() -> None:
    content = bytearray(300_000)
    content[70_000:70_010] = b"x" * 10
    a = volstream.LogicalHash()
    a.data(60_000, bytes(content[60_000:80_000]))  # zeros around the data, sent as data
    b = volstream.LogicalHash()
    b.zeros_to(70_000)
    b.data(70_000, b"x" * 10)  # the rest a hole
    assert a.finish(300_000) == b.finish(300_000) == logical(bytes(content))
    c = volstream.LogicalHash()
    c.data(70_001, b"x" * 10)  # the same bytes one place later: another content
    assert c.finish(300_000) != logical(bytes(content))
    assert logical(bytes(300_000)) != logical(bytes(300_001))  # the size counts


def small_stream() -> bytes:
    content = bytearray(8192)
    content[512:516] = b"ABCD"
    content[5000:5003] = b"xyz"
    return b"".join([
        volstream.encode_header(8192),
        volstream.encode_data(512, bytes(content[512:1024])),
        volstream.encode_data(4096, bytes(content[4096:6144])),
        volstream.encode_end(8192, logical(bytes(content))),
    ])


def test_round_trip_with_holes(tmp_path: Path) -> None:
    size = 40 * MB
    writes = {0: b"BOOT" * 1024, 3 * MB - 2: b"across a grid line", 20 * MB: os.urandom(3 * MB + 5),
              39 * MB: b"\0" * 4096 + b"tail"}
    img = sparse_image(tmp_path / "a.img", size, writes)
    frames = encode(img)
    assert max(len(f) for f in frames) <= volstream.MAX_PAYLOAD + volstream.RECORD.size
    events = decode(b"".join(frames), step=65536 + 3)
    assert events[0] == Header(size, delta=False)
    end = events[-1]
    assert isinstance(end, End) and end.verified
    whole = logical((tmp_path / "a.img").read_bytes())  # every byte fed, zeros and all
    assert end.digest == whole == digest_file(img)  # the same digest, the holes never read
    datas = [e for e in events if isinstance(e, Data)]
    assert sum(len(d.data) for d in datas) < 6 * MB  # holes and the zero block are not sent
    assert not any(d.data == bytes(len(d.data)) for d in datas)

    # and written back: the same content, sparse
    out = tmp_path / "b.img"
    w = ImageWriter(out, base_copied=False)
    dec = Decoder(1 << 40)
    for f in frames:
        w.absorb(dec, f)
    dec.close()
    w.close()
    assert w.digest == whole and out.read_bytes() == img.read_bytes()
    assert out.stat().st_blocks * 512 < 8 * MB


def test_delta_against_a_base(tmp_path: Path) -> None:
    size = 8 * MB
    base = sparse_image(tmp_path / "base.img", size, {0: b"A" * MB, 4 * MB: b"B" * 4096})
    img = sparse_image(tmp_path / "new.img", size, {0: b"A" * MB, 2 * MB: b"C" * 10})  # B gone, C new
    events = decode(b"".join(encode(img, base)))
    assert events[0] == Header(size, delta=True)
    assert [type(e) for e in events[1:]] == [Data, Zero, End]
    assert events[1] == Data(2 * MB, img.read_bytes()[2 * MB:2 * MB + 4096])  # the same first MB is not sent
    assert events[2] == Zero(4 * MB, 4096)
    end = events[-1]
    assert isinstance(end, End) and not end.verified  # only the receiver can, once applied

    copy = tmp_path / "recv.img"
    copy.write_bytes(base.read_bytes())
    w = ImageWriter(copy, base_copied=True)
    dec = Decoder(1 << 40)
    w.absorb(dec, b"".join(encode(img, base)))
    dec.close()
    w.close()
    assert copy.read_bytes() == img.read_bytes()

    # applied to another base: the trailer's digest does not match, and says so
    other = tmp_path / "other.img"
    other.write_bytes(b"Z" * size)
    w = ImageWriter(other, base_copied=True)
    with pytest.raises(StorageError, match="checksum mismatch"):
        w.absorb(Decoder(1 << 40), b"".join(encode(img, base)))
    w.close()


def test_pieces_follow_the_grid() -> None:
    assert list(pieces([(10, 20), (MB - 5, MB + 5), (3 * MB, 5 * MB + 1)])) == [
        (10, 10), (MB - 5, 5), (MB, 5), (3 * MB, MB), (4 * MB, MB), (5 * MB, 1)]


def test_every_truncation_is_refused() -> None:
    stream = small_stream()
    assert isinstance(decode(stream)[-1], End)
    for cut in range(len(stream)):
        with pytest.raises(VolStreamError, match="truncated"):
            decode(stream[:cut], step=7)


def test_corruption_is_refused_never_a_traceback() -> None:
    stream = small_stream()
    rng = random.Random(16)
    for pos in range(len(stream)):
        for bit in (0x01, 0x80):
            bad = bytearray(stream)
            bad[pos] ^= bit
            if (pos, bit) == (11, 0x01):
                # the DELTA flag: the decoder cannot check a delta's digest, so it says it did not
                # (and the file backend refuses a delta it has no base for, or checks the result)
                end = decode(bytes(bad))[-1]
                assert isinstance(end, End) and not end.verified
                continue
            with pytest.raises(VolStreamError):
                decode(bytes(bad), step=rng.randint(1, 600))
    for _ in range(300):  # random garbage, and mutations of several bytes at once
        bad = bytearray(stream if rng.random() < 0.5 else os.urandom(rng.randint(0, 2000)))
        for _ in range(rng.randint(1, 8)):
            if bad:
                bad[rng.randrange(len(bad))] = rng.randrange(256)
        try:
            decode(bytes(bad), step=rng.randint(1, 600))
        except VolStreamError:
            pass


@pytest.mark.parametrize(("stream", "message"), [
    (volstream.encode_header(1 << 41), "exceeds the"),
    (volstream.HEADER.pack(volstream.MAGIC, 2, 0, 512), "unknown stream version 2"),
    (volstream.HEADER.pack(volstream.MAGIC, 1, 0x10, 512), "unknown flags"),
    (b"\x1f\x8b" + bytes(40), "bad magic"),
    (volstream.encode_header(4096) + volstream.RECORD.pack(ord("D"), 0, volstream.MAX_PAYLOAD + 1), "data record of"),
    (volstream.encode_header(4096) + volstream.encode_data(4000, b"x" * 200), "beyond the volume"),
    (volstream.encode_header(4096) + volstream.encode_data(100, b"x") + volstream.encode_data(50, b"y"), "overlaps"),
    (volstream.encode_header(4096) + volstream.encode_zero(0, 512), "zero record in a full stream"),
    (volstream.encode_header(4096) + volstream.RECORD.pack(ord("Q"), 0, 1), "unknown record kind"),
    (volstream.encode_header(4096) + volstream.encode_end(4096, bytes(32)), "checksum mismatch"),
    (volstream.encode_header(512) + volstream.encode_end(512, logical(bytes(512))) + b"!",
     "bytes after the trailer"),
])
def test_refusals_name_what_is_wrong(stream: bytes, message: str) -> None:
    with pytest.raises(VolStreamError, match=message) as info:
        decode(stream, max_size=1 << 40)
    assert isinstance(info.value, StorageError) and "at byte" in str(info.value)


def test_oversize_is_refused_before_any_payload_is_buffered() -> None:
    dec = Decoder(max_size=1 << 30)
    with pytest.raises(VolStreamError, match="exceeds"):
        dec.feed(volstream.encode_header((1 << 30) + 512))
    dec = Decoder(max_size=1 << 30)
    dec.feed(volstream.encode_header(1 << 30))
    with pytest.raises(VolStreamError, match="data record of"):
        dec.feed(volstream.RECORD.pack(ord("D"), 0, 1 << 31))  # refused on its 13 bytes alone


def test_an_empty_volume_round_trips(tmp_path: Path) -> None:
    img = sparse_image(tmp_path / "e.img", 4 * MB, {})
    events = decode(b"".join(encode(img)))
    assert [type(e) for e in events] == [Header, End]
