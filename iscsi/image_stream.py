"""The blocking halves of the `file` backend's volume streams: an image file read into `volstream`
frames, and frames written into an image file. The backend runs every call in a worker thread.

Data is found with SEEK_DATA/SEEK_HOLE and cut on a fixed 1 MiB grid, so a frame never exceeds
`volstream.MAX_PAYLOAD` and the same content always gives the same pieces; an all-zero piece inside
a data extent is left out like a hole (the receiver keeps it unallocated).
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from iscsi import volstream
from iscsi.model import StorageError

PIECE = volstream.MAX_PAYLOAD
_ZEROS = bytes(PIECE)


def data_ranges(fd: int, size: int) -> list[tuple[int, int]]:
    """[start, end) of each data region of the open file (a filesystem without SEEK_DATA reports
    the whole file as data, which is still correct, only not sparse)."""
    out = []
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # no data after pos
                break
            raise
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        if start >= end:
            break
        out.append((start, end))
        pos = end
    return out


def union(a: list[tuple[int, int]], b: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for start, end in sorted(a + b):
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


def pieces(ranges: list[tuple[int, int]]) -> Iterator[tuple[int, int]]:
    """(offset, length) pieces of ascending, disjoint ranges, each cut where it crosses the grid."""
    for start, end in ranges:
        off = start
        while off < end:
            stop = min((off // PIECE + 1) * PIECE, end)
            yield off, stop - off
            off = stop


def _pread_exact(fd: int, n: int, off: int, what: Path) -> bytes:
    data = os.pread(fd, n, off)
    if len(data) != n:
        raise StorageError(f"{what} shrank while being read (at byte {off})")
    return data


def digest_fd(fd: int, size: int, what: Path) -> bytes:
    """The sha256 of the open file's logical content; only its data regions are read."""
    h = volstream.LogicalHash()
    for off, n in pieces(data_ranges(fd, size)):
        h.data(off, _pread_exact(fd, n, off, what))
    return h.finish(size)


def digest_file(path: Path) -> bytes:
    with open(path, "rb") as f:
        return digest_fd(f.fileno(), os.fstat(f.fileno()).st_size, path)


class ImageEncoder:
    """`img` as volstream frames: a full stream, or a delta against `base` (a file of the same size
    that the receiver holds too) of the pieces that differ. `next_frame` and `close` take a lock, so
    closing after a cancelled read waits for that read instead of closing its file under it."""

    def __init__(self, img: Path, base: Path | None = None) -> None:
        self._lock = threading.Lock()
        self._img = img
        self._f: BinaryIO = open(img, "rb")
        self._base: BinaryIO | None = None
        try:
            self.size = os.fstat(self._f.fileno()).st_size
            if base is not None:
                self._base = open(base, "rb")
                base_size = os.fstat(self._base.fileno()).st_size
                if base_size != self.size:  # a delta needs the same grid on both sides
                    raise StorageError(f"{img} is {self.size} bytes, its base {base} {base_size}: no delta")
        except BaseException:
            self.close()
            raise
        self.digest: bytes | None = None  # once the trailer has been made
        self._frames = self._make_frames()

    def next_frame(self) -> bytes | None:
        with self._lock:
            return next(self._frames, None)

    def close(self) -> None:
        with self._lock:
            self._frames_close()
            self._f.close()
            if self._base is not None:
                self._base.close()

    def _frames_close(self) -> None:
        frames = getattr(self, "_frames", None)
        if frames is not None:
            frames.close()

    def _make_frames(self) -> Iterator[bytes]:
        fd, size = self._f.fileno(), self.size
        bfd = self._base.fileno() if self._base is not None else None
        yield volstream.encode_header(size, delta=bfd is not None)
        ranges = data_ranges(fd, size)
        if bfd is not None:
            # where the base has data and the image a hole, the receiver must be told "zeros here"
            ranges = union(ranges, data_ranges(bfd, size))
        h = volstream.LogicalHash()
        for off, n in pieces(ranges):
            chunk = _pread_exact(fd, n, off, self._img)
            h.data(off, chunk)
            zero = chunk == _ZEROS[:n]
            if bfd is None:
                if not zero:
                    yield volstream.encode_data(off, chunk)
            elif os.pread(bfd, n, off) != chunk:
                yield volstream.encode_zero(off, n) if zero else volstream.encode_data(off, chunk)
        self.digest = h.finish(size)
        yield volstream.encode_end(size, self.digest)


class ImageWriter:
    """Applies decoded events to `path`: a full stream makes it (it must not exist, or is emptied
    when the backend had cloned a base there), a delta patches the base copy already there. The End
    event fsyncs, and checks a delta's result against the trailer's digest."""

    def __init__(self, path: Path, *, base_copied: bool) -> None:
        self._lock = threading.Lock()
        self.path = path
        self._base_copied = base_copied
        self._fd: int | None = None
        self._size = 0
        self.digest: bytes | None = None

    def absorb(self, decoder: volstream.Decoder, chunk: bytes) -> None:
        with self._lock:
            try:
                for event in decoder.feed(chunk):
                    self._apply(event)
            except OSError as exc:
                raise StorageError(f"writing {self.path.name}: {exc}") from None

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def _apply(self, event: volstream.Event) -> None:
        if isinstance(event, volstream.Header):
            self._start(event)
            return
        fd = self._fd
        assert fd is not None  # the decoder yields the header first
        if isinstance(event, volstream.Data):
            _pwrite_all(fd, event.data, event.offset)
        elif isinstance(event, volstream.Zero):
            self._zero(fd, event.offset, event.length)
        else:
            os.fsync(fd)
            if not event.verified and digest_fd(fd, self._size, self.path) != event.digest:
                raise StorageError(f"{self.path.name}: checksum mismatch after applying the delta "
                                   "(the base here differs from the sender's)")
            self.digest = event.digest

    def _start(self, header: volstream.Header) -> None:
        if header.delta and not self._base_copied:
            raise StorageError("a delta stream arrived, but no base was named for it here")
        if header.size % 512:
            raise StorageError(f"stream of a {header.size}-byte volume: not a multiple of 512")
        flags = os.O_RDWR if self._base_copied else os.O_RDWR | os.O_CREAT | os.O_EXCL
        self._fd = os.open(self.path, flags, 0o644)
        self._size = header.size
        if header.delta:
            have = os.fstat(self._fd).st_size
            if have != header.size:
                raise StorageError(f"delta of a {header.size}-byte volume, the base here is {have} bytes")
        else:
            os.ftruncate(self._fd, 0)  # a base copied in vain (the sender sent it whole) goes
            os.ftruncate(self._fd, header.size)

    @staticmethod
    def _zero(fd: int, offset: int, length: int) -> None:
        """Zeros over base data. Written, not punched (os has no fallocate(PUNCH_HOLE)); a piece that
        already reads as zeros is left alone, so holes stay holes."""
        end = offset + length
        while offset < end:
            n = min(PIECE - offset % PIECE, end - offset)
            if os.pread(fd, n, offset) != _ZEROS[:n]:
                _pwrite_all(fd, _ZEROS[:n], offset)
            offset += n


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n
