"""The fleet channel's streams (template versions, a moving server's volumes) sealed with the fleet's
secret, so that what they carry — a node's disk, and whatever secrets are on it — is not readable on the
wire between appliances, and cannot be altered or cut short there unnoticed. The channel runs on the API
listener, which the boot LAN may reach; the signed request (web/fleetauth.py) proves who asks, this hides
and guards what is answered.

A sealed stream is MAGIC, a 16-byte random salt, then frames: a 4-byte big-endian length and that many
bytes of AES-256-GCM output (ciphertext and its 16-byte tag). The key is HKDF-SHA256 of the secret with
that salt and, as its info, the request's own `Authorization` header (its time and signature): a
recorded answer does not pass for the answer to another request, not even one for the same path. The
nonce is the frame's number; the last frame (possibly empty) says so in its associated data, so a
stream that stops early, or goes on after its end, is refused. Encryption runs off the event loop.
"""

from __future__ import annotations

import asyncio
import os
import struct
from collections.abc import AsyncIterator

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from iscsi.model import StorageError

MAGIC = b"CFS1"
SALT = 16
TAG = 16
FRAME_MAX = 4 << 20  # plaintext per frame: a bigger chunk is cut; a peer's bigger frame is refused
COMPACT_AT = 8 << 20  # bytes already opened that the receiver drops from its buffer at once
_LEN = struct.Struct(">I")
_INFO = b"cello fleet stream v1\n"
_MORE, _LAST = b"more", b"last"


class SealError(StorageError):
    """A sealed stream that does not open: another secret, altered, cut short, or not sealed at all."""


def _aead(secret: str, salt: bytes, request_auth: str) -> AESGCM:
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=_INFO + request_auth.encode()).derive(
        secret.encode())
    return AESGCM(key)


def _nonce(n: int) -> bytes:
    return b"\0\0\0\0" + n.to_bytes(8, "big")


async def seal(chunks: AsyncIterator[bytes], secret: str, request_auth: str) -> AsyncIterator[bytes]:
    """The sealed form of `chunks`, for the request whose Authorization header is `request_auth`."""
    salt = os.urandom(SALT)
    aead = _aead(secret, salt, request_auth)
    yield MAGIC + salt
    n = 0
    async for chunk in chunks:
        for at in range(0, len(chunk), FRAME_MAX):
            piece = chunk if len(chunk) <= FRAME_MAX else chunk[at:at + FRAME_MAX]
            sealed = await asyncio.to_thread(aead.encrypt, _nonce(n), piece, _MORE)
            n += 1
            yield _LEN.pack(len(sealed))  # apart: joining them would copy the frame once more
            yield sealed
    last = aead.encrypt(_nonce(n), b"", _LAST)
    yield _LEN.pack(len(last)) + last


def _open(aead: AESGCM, n: int, frame: bytes | memoryview) -> bytes | None:
    """Frame n's plaintext; None for the (empty) last frame."""
    try:
        return aead.decrypt(_nonce(n), frame, _MORE)
    except InvalidTag:
        pass
    try:
        last = aead.decrypt(_nonce(n), frame, _LAST)
    except InvalidTag:
        raise SealError("fleet channel: a frame does not authenticate (another fleet's secret, or altered on "
                        "the way)") from None
    if last:
        raise SealError("fleet channel: a last frame that carries data")
    return None


async def unseal(raw: AsyncIterator[bytes], secret: str, request_auth: str) -> AsyncIterator[bytes]:
    """The plaintext of a sealed stream that answers the request signed `request_auth`; SealError when
    it does not open, or ends before its last frame, or carries anything after it."""
    buf = bytearray()  # bytes received and not yet opened start at `at` (copied once, on arrival)
    at = 0
    stream = raw.__aiter__()

    async def need(count: int) -> bool:
        nonlocal at
        while len(buf) - at < count:
            if at > COMPACT_AT:  # what was opened goes, before the buffer grows further
                del buf[:at]
                at = 0
            try:
                buf.extend(await stream.__anext__())
            except StopAsyncIteration:
                return False
        return True

    if not await need(len(MAGIC) + SALT) or bytes(buf[:len(MAGIC)]) != MAGIC:
        raise SealError("fleet channel: the answer is not a sealed stream (a peer of another Cello version?)")
    aead = _aead(secret, bytes(buf[len(MAGIC):len(MAGIC) + SALT]), request_auth)
    at = len(MAGIC) + SALT
    n = 0
    while True:
        if not await need(_LEN.size):
            raise SealError("fleet channel: the stream was cut short (no last frame)")
        (size,) = _LEN.unpack_from(buf, at)
        if not TAG <= size <= FRAME_MAX + TAG:
            raise SealError(f"fleet channel: a frame of {size} bytes (at most {FRAME_MAX + TAG})")
        if not await need(_LEN.size + size):
            raise SealError("fleet channel: the stream was cut short (inside a frame)")
        # opened in place, no copy of the frame; both views released before the buffer changes again
        with memoryview(buf) as view, view[at + _LEN.size:at + _LEN.size + size] as frame:
            plain = await asyncio.to_thread(_open, aead, n, frame)
        at += _LEN.size + size
        if plain is None:  # the last frame
            if len(buf) > at or await need(1):
                raise SealError("fleet channel: bytes after the stream's last frame")
            return
        n += 1
        yield plain
