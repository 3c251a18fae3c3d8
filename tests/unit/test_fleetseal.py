"""The fleet channel's sealed streams (web/fleetseal.py): what goes in comes out, only with the fleet's
secret and for the request it answers; an altered, reordered, cut or lengthened stream is refused."""

from __future__ import annotations

import os
import struct
import time
from collections.abc import AsyncIterator, Iterable

import pytest

from web import fleetauth, fleetseal
from web.fleetseal import SealError

SECRET = "fleet-secret-0123456789abcdef"
AUTH = fleetauth.sign(SECRET, "GET", "/fleet/v1/volumes/web-OS-1/stream", time.time())


async def _chunks(parts: Iterable[bytes]) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


async def _sealed(parts: list[bytes], secret: str = SECRET, auth: str = AUTH) -> bytes:
    return b"".join([c async for c in fleetseal.seal(_chunks(parts), secret, auth)])


async def _open(raw: bytes, secret: str = SECRET, auth: str = AUTH, cut: int = 7919) -> bytes:
    """The plaintext, with the raw bytes arriving in pieces of `cut` (frames straddle them)."""
    pieces = [raw[i:i + cut] for i in range(0, len(raw), cut)]
    return b"".join([c async for c in fleetseal.unseal(_chunks(pieces), secret, auth)])


def _frames(raw: bytes) -> tuple[bytes, list[bytes]]:
    head, at, frames = raw[:20], 20, []
    while at < len(raw):
        (size,) = struct.unpack_from(">I", raw, at)
        frames.append(raw[at:at + 4 + size])
        at += 4 + size
    return head, frames


async def test_what_is_sealed_opens_whole_and_is_not_on_the_wire() -> None:
    disk = [os.urandom(1000), b"root=/dev/sda1 password=hunter2 " * 2000, b"", os.urandom(fleetseal.FRAME_MAX + 5)]
    raw = await _sealed(disk)
    assert raw.startswith(fleetseal.MAGIC)
    assert b"hunter2" not in raw and disk[0] not in raw
    for cut in (1, 4096, 7919, len(raw)):
        assert await _open(raw, cut=cut) == b"".join(disk)
    _, frames = _frames(raw)
    assert len(frames) == 5  # the big chunk is cut in two frames; the empty chunk makes none; then the last


async def test_an_empty_stream_is_a_last_frame_only() -> None:
    raw = await _sealed([])
    assert len(_frames(raw)[1]) == 1
    assert await _open(raw) == b""


async def test_two_seals_of_the_same_bytes_differ() -> None:
    assert await _sealed([b"same"]) != await _sealed([b"same"])  # a fresh salt each time


@pytest.mark.parametrize("secret, auth, why", [
    ("another-fleet-secret-0123456789", AUTH, "does not authenticate"),
    (SECRET, fleetauth.sign(SECRET, "GET", "/fleet/v1/volumes/web-OS-1/stream", time.time() - 5), "does not "
     "authenticate"),  # the same path, asked another time: a recorded answer does not pass for this one
])
async def test_another_secret_or_another_request_does_not_open(secret: str, auth: str, why: str) -> None:
    raw = await _sealed([b"x" * 5000])
    with pytest.raises(SealError, match=why):
        await _open(raw, secret=secret, auth=auth)


async def test_every_altered_byte_is_refused() -> None:
    raw = await _sealed([b"a" * 300, b"b" * 300])
    for at in range(len(fleetseal.MAGIC), len(raw), 7):  # salt, lengths, ciphertexts, tags
        bad = bytearray(raw)
        bad[at] ^= 0x01
        with pytest.raises(SealError):
            await _open(bytes(bad))


async def test_a_stream_cut_anywhere_is_refused() -> None:
    raw = await _sealed([b"a" * 300, b"b" * 300])
    for end in range(0, len(raw)):
        with pytest.raises(SealError, match=r"cut short|not a sealed stream"):
            await _open(raw[:end])


async def test_reordered_dropped_or_extra_frames_are_refused() -> None:
    raw = await _sealed([b"first" * 100, b"second" * 100, b"third" * 100])
    head, frames = _frames(raw)
    for frames_wrong in ([frames[1], frames[0], *frames[2:]],  # swapped
                         [frames[0], *frames[2:]],  # one dropped
                         [*frames[:-1], frames[0], frames[-1]]):  # one replayed
        with pytest.raises(SealError, match="does not authenticate"):
            await _open(head + b"".join(frames_wrong))
    with pytest.raises(SealError, match="after the stream's last frame"):
        await _open(raw + frames[0])
    with pytest.raises(SealError, match="after the stream's last frame"):
        await _open(raw + b"\0")


async def test_a_plain_answer_or_a_huge_frame_is_refused_before_any_allocation() -> None:
    with pytest.raises(SealError, match="not a sealed stream"):
        await _open(b"\0" * 4096)  # an unsealed stream, as a peer of an older Cello sends
    head = (await _sealed([]))[:20]
    with pytest.raises(SealError, match="a frame of 4294967295 bytes"):
        await _open(head + b"\xff\xff\xff\xff" + b"\0" * 64)
