"""The zfs send stream's BEGIN record (iscsi/zfs_stream.py) and the subprocess pipes around zfs send and
zfs recv (iscsi/pipes.py): children are reaped whatever happens to their caller."""

from __future__ import annotations

import asyncio
import contextlib
import os
import struct
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from iscsi import pipes
from iscsi.model import StorageError
from iscsi.runner import CommandError
from iscsi.zfs_stream import BEGIN_SIZE, DMU_BACKUP_MAGIC, ZfsStreamError, parse_begin

# the BEGIN record of `zfs send -i cellocap/tiny-template@v1 cellocap/tiny-OS-x@cello:move` (a clone's
# stream) on zfs-fuse 0.7 (pool version 23): 56 bytes, then the name NUL-padded to 256
CLONE_BEGIN = bytes.fromhex(
    "0000000000000000" "accbbaf502000000" "0100000000000000" "042a116b00000000"
    "0200000001000000" "85b8d0021aced251" "2b628ce9ad0864b9") + b"cellocap/tiny-OS-x@cello:move".ljust(256, b"\0")
CLONE_GUID, TEMPLATE_GUID = 5896001473293105285, 13358811937728389675  # `zfs get -Hp guid` of the two


def begin(order: str = "<", name: bytes = b"p/tiny-template@v2", fromguid: int = 0, flags: int = 0) -> bytes:
    head = struct.pack(order + "IIQQQIIQQ", 0, 0, DMU_BACKUP_MAGIC, 1, 0, 2, flags, 77, fromguid)
    return head + name.ljust(256, b"\0")


def test_a_captured_clone_stream_begin() -> None:
    assert len(CLONE_BEGIN) == BEGIN_SIZE
    got = parse_begin(CLONE_BEGIN)
    assert got.toname == "cellocap/tiny-OS-x@cello:move" and got.snapshot == "tiny-OS-x@cello:move"
    assert got.clone and (got.toguid, got.fromguid) == (CLONE_GUID, TEMPLATE_GUID)


@pytest.mark.parametrize("order", ["<", ">"])
def test_either_byte_order(order: str) -> None:
    got = parse_begin(begin(order, fromguid=5) + b"more records")
    assert (got.snapshot, got.toguid, got.fromguid, got.clone) == ("tiny-template@v2", 77, 5, False)


@pytest.mark.parametrize(("data", "message"), [
    (begin()[:100], "truncated"),
    (b"\0" * BEGIN_SIZE, "bad magic"),
    (struct.pack("<I", 7) + begin()[4:], "type 7"),
    (begin(name=b"p/tiny-template"), "not a snapshot name"),
    (begin(name=b"p/\xff@x"), "not ASCII"),
])
def test_refusals(data: bytes, message: str) -> None:
    with pytest.raises(ZfsStreamError, match=message) as info:
        parse_begin(data)
    assert isinstance(info.value, StorageError)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


def child_pids() -> set[int]:
    me = os.getpid()
    out = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == me:
                out.add(int(stat.parent.name))
    return out


async def test_stream_output_reads_and_checks_the_exit_status() -> None:
    data = b"".join([c async for c in pipes.stream_output(["head", "-c", str(3 << 20), "/dev/zero"])])
    assert data == bytes(3 << 20)
    with pytest.raises(CommandError, match=r"exited with 1: .*No such file"):
        async for _ in pipes.stream_output(["cat", "/nonexistent/x"]):
            pass
    with pytest.raises(CommandError, match="command not found"):
        async for _ in pipes.stream_output(["/nonexistent/zfs"]):
            pass


async def test_stream_output_closed_early_reaps_the_child() -> None:
    before = child_pids()
    stream = pipes.stream_output(["cat", "/dev/zero"])  # never ends by itself
    async with contextlib.aclosing(stream):
        async for chunk in stream:
            assert len(chunk) <= pipes.CHUNK
            break
    assert child_pids() == before


async def test_stream_output_cancelled_reaps_the_child() -> None:
    before = child_pids()

    async def reader() -> None:
        async for _ in pipes.stream_output(["sleep", "30"]):
            pass

    task = asyncio.create_task(reader())
    await asyncio.sleep(0.2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert child_pids() == before


async def test_feed_input_with_backpressure_and_exit_status(tmp_path: Path) -> None:
    out = tmp_path / "out"

    async def chunks(n: int) -> AsyncIterator[bytes]:
        for i in range(n):
            yield bytes([i]) * pipes.CHUNK

    await pipes.feed_input(["dd", f"of={out}", "bs=1M", "status=none"], chunks(8))
    assert out.stat().st_size == 8 * pipes.CHUNK
    with pytest.raises(CommandError, match="exited with"):
        await pipes.feed_input(["sh", "-c", "head -c 10 >/dev/null; echo no >&2; exit 3"], chunks(50))


async def test_feed_input_source_failure_closes_the_childs_input() -> None:
    """The child sees its input end (as zfs recv does, which then removes what it began) and exits."""
    before = child_pids()

    async def failing() -> AsyncIterator[bytes]:
        yield b"some"
        raise StorageError("the peer went away")

    with pytest.raises(StorageError, match="peer went away"):
        await pipes.feed_input(["cat"], failing())
    assert child_pids() == before


async def test_guarded_turns_a_source_error_into_a_storage_error() -> None:
    async def source() -> AsyncIterator[bytes]:
        yield b"x"
        raise ConnectionResetError("reset by peer")

    with pytest.raises(StorageError, match="receiving t: the stream broke off: reset by peer"):
        async with contextlib.aclosing(pipes.guarded(source(), "receiving t")) as s:
            async for _ in s:
                pass
