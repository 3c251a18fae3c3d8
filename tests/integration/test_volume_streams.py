"""Template replication and server moves between two appliances' backends (issue 16's transport):
file → file in two directories, zfs → zfs between two zfs-fuse pools. The stream goes straight from
the sender's iterator into the receiver, as the fleet channel carries it."""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from iscsi.file_backend import FileBackend
from iscsi.model import StorageError, VolumeBackend
from iscsi.zfs_backend import MOVE_SNAPSHOT, ZfsBackend
from tests.integration.test_file_backend import xfs_mount  # noqa: F401  (a fixture)
from tests.integration.test_zfs_fuse import create_pool, destroy_pool, read_at, write_at
from tests.tools import require

U1 = "3f1c2b4e-9d8a-4c6b-8e2f-1a2b3c4d5e6f"
U2 = "0a1b2c3d-4e5f-4a6b-9c8d-7e6f5a4b3c2d"
MB = 1 << 20
OS_VOL = f"tiny-OS-{U1}"
DATA_VOL = f"tiny-DATA-{U1}"


async def collect(chunks: AsyncIterator[bytes]) -> bytes:
    return b"".join([c async for c in chunks])


async def replay(data: bytes, *, step: int = 64 * 1024) -> AsyncIterator[bytes]:
    for i in range(0, len(data), step):
        yield data[i:i + step]


async def cut_after(chunks: AsyncIterator[bytes], limit: int) -> AsyncIterator[bytes]:
    """The sender's stream, cut off after `limit` bytes (a connection that dropped)."""
    sent = 0
    async for chunk in chunks:
        if sent + len(chunk) >= limit:
            yield chunk[: limit - sent]
            return
        sent += len(chunk)
        yield chunk


async def broken(chunks: AsyncIterator[bytes], after: int) -> AsyncIterator[bytes]:
    n = 0
    async for chunk in chunks:
        yield chunk
        n += len(chunk)
        if n >= after:
            raise ConnectionResetError("peer went away")


def flipped(data: bytes, at: int) -> bytes:
    bad = bytearray(data)
    bad[at] ^= 0x40
    return bytes(bad)


def listdir(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir()) if path.exists() else []


async def build_template(b: VolumeBackend, path_of: str) -> None:
    """tiny-template@v1 and @v2 on the sender: some data, holes between."""
    await b.create_template("tiny", 64 * MB)
    img = Path(path_of)
    await asyncio.to_thread(write_at, img, 0, b"BOOT" * 1024)
    await asyncio.to_thread(write_at, img, 40 * MB, os.urandom(2 * MB))
    await b.snapshot_template("tiny", "v1")
    await asyncio.to_thread(write_at, img, 50 * MB, b"V2" * 4096)
    await b.snapshot_template("tiny", "v2")


# -- file backend -----------------------------------------------------------------------------------


@pytest.fixture
def two_dirs(tmp_path: Path) -> tuple[FileBackend, FileBackend]:
    return FileBackend(tmp_path / "a"), FileBackend(tmp_path / "b")


async def test_file_template_replication(two_dirs: tuple[FileBackend, FileBackend]) -> None:
    a, b = two_dirs
    await build_template(a, a.path("tiny-template"))

    got = await b.receive_template("tiny", "v1", a.send_template("tiny", "v1"))
    assert got == await a.template_checksum("tiny", "v1") == await b.template_checksum("tiny", "v1")
    assert got.startswith("sha256:")
    snap = b.directory / "tiny-template@v1.img"
    st = await asyncio.to_thread(snap.stat)
    assert st.st_size == 64 * MB and st.st_blocks * 512 < 4 * MB  # sparse: about its 2 MB of data
    assert st.st_mode & 0o777 == 0o444
    assert await b.snapshots() == ["tiny-template@v1"]
    assert {v.name for v in await b.list()} == {"tiny-template"}  # made from it: none was here

    # v2 as a delta from v1: only what changed travels, the result is v2 whole
    delta = await collect(a.send_template("tiny", "v2", base="v1"))
    assert len(delta) < MB
    got2 = await b.receive_template("tiny", "v2", replay(delta), base="v1")
    assert got2 == await a.template_checksum("tiny", "v2") != got
    assert await b.snapshots() == ["tiny-template@v1", "tiny-template@v2"]
    clone = await b.clone_os("tiny", "v2", U2)  # placeable: a clone of the copy works
    assert await asyncio.to_thread(read_at, Path(clone.path), 50 * MB, 4) == b"V2V2"

    with pytest.raises(StorageError, match="tiny-template@v1 already exists here"):
        await b.receive_template("tiny", "v1", a.send_template("tiny", "v1"))
    assert await b.template_checksum("tiny", "v1") == got  # untouched


async def test_file_failed_receives_leave_nothing(two_dirs: tuple[FileBackend, FileBackend]) -> None:
    a, b = two_dirs
    await build_template(a, a.path("tiny-template"))
    whole = await collect(a.send_template("tiny", "v1"))

    for bad in (cut_after(a.send_template("tiny", "v1"), len(whole) // 2),
                cut_after(a.send_template("tiny", "v1"), len(whole) - 1),  # all but the trailer's last byte
                replay(flipped(whole, len(whole) // 2)),  # a byte of data changed: checksum mismatch
                replay(b"GIF89a" + whole),
                broken(a.send_template("tiny", "v1"), MB)):
        with pytest.raises(StorageError):
            await b.receive_template("tiny", "v1", bad)
        assert await asyncio.to_thread(listdir, b.directory) == []  # not even a hidden .recv file

    # a delta whose base is not here
    with pytest.raises(StorageError, match="tiny-template@v1 does not exist here"):
        await b.receive_template("tiny", "v2", a.send_template("tiny", "v2", base="v1"), base="v1")
    assert await asyncio.to_thread(listdir, b.directory) == []
    # a delta where a full stream was promised: refused, as it cannot be checked without its base
    await b.receive_template("tiny", "v1", a.send_template("tiny", "v1"))
    with pytest.raises(StorageError, match="no base was named"):
        await b.receive_template("tiny", "v2", a.send_template("tiny", "v2", base="v1"))
    assert await b.snapshots() == ["tiny-template@v1"]
    # the sender's missing snapshot is the sender's error
    with pytest.raises(StorageError, match="tiny-template@v9 does not exist"):
        await collect(a.send_template("tiny", "v9"))


async def test_file_move_of_an_os_clone_and_a_data_volume(two_dirs: tuple[FileBackend, FileBackend]) -> None:
    a, b = two_dirs
    await build_template(a, a.path("tiny-template"))
    await b.receive_template("tiny", "v1", a.send_template("tiny", "v1"))
    clone = await a.clone_os("tiny", "v1", U1)
    await asyncio.to_thread(write_at, Path(clone.path), 10 * MB, b"NODE" * 1024)
    await asyncio.to_thread(write_at, Path(clone.path), 0, bytes(4096))  # zeros over template data
    data = await a.create_data("tiny", U1, 1, 16 * MB)
    await asyncio.to_thread(write_at, Path(data.path), 5 * MB, b"DATA")

    full = await collect(a.send_volume(OS_VOL))
    delta = await collect(a.send_volume(OS_VOL, origin=("tiny", "v1")))
    assert len(delta) < 64 * 1024 < 2 * MB < len(full)  # only the node's own changes travel
    got = await b.receive_volume(OS_VOL, replay(delta), origin=("tiny", "v1"))
    assert got == await a.volume_checksum(OS_VOL) == await b.volume_checksum(OS_VOL)
    assert await b.receive_volume(DATA_VOL, a.send_volume(DATA_VOL)) == await a.volume_checksum(DATA_VOL)

    moved = {v.name: v for v in await b.list()}
    assert moved[OS_VOL].origin == "tiny-template@v1" and moved[DATA_VOL].origin is None
    assert await asyncio.to_thread(read_at, Path(b.path(OS_VOL)), 10 * MB, 4) == b"NODE"
    assert await asyncio.to_thread(read_at, Path(b.path(OS_VOL)), 0, 8) == bytes(8)
    assert await asyncio.to_thread(read_at, Path(b.path(OS_VOL)), 40 * MB, 4) == \
        await asyncio.to_thread(read_at, Path(a.path(OS_VOL)), 40 * MB, 4)
    assert moved[DATA_VOL].used < MB  # sparse
    with pytest.raises(StorageError, match="has clones"):
        await b.destroy_snapshot("tiny", "v1")  # the moved root is a clone of it here too

    # never overwritten
    with pytest.raises(StorageError, match=f"{OS_VOL} already exists here"):
        await b.receive_volume(OS_VOL, a.send_volume(OS_VOL, origin=("tiny", "v1")), origin=("tiny", "v1"))
    assert await b.volume_checksum(OS_VOL) == got
    # a cut move leaves nothing
    with pytest.raises(StorageError, match="truncated"):
        await b.receive_volume(f"tiny-DATA-{U1}-2", cut_after(a.send_volume(DATA_VOL), 100))
    assert f"tiny-DATA-{U1}-2" not in {v.name for v in await b.list()}
    assert not [n for n in await asyncio.to_thread(listdir, b.directory) if n.startswith(".")]
    with pytest.raises(StorageError, match="data volume"):
        a.send_volume(DATA_VOL, origin=("tiny", "v1"))


async def test_file_delta_receive_reflinks_on_xfs(tmp_path: Path, xfs_mount: Path) -> None:  # noqa: F811
    """Where clones are reflinks, a moved root is one too: the delta is applied to a reflink of the
    template snapshot, so it shares the template's blocks."""
    a, b = FileBackend(tmp_path / "a"), FileBackend(xfs_mount / "b")
    await build_template(a, a.path("tiny-template"))
    await b.receive_template("tiny", "v1", a.send_template("tiny", "v1"))
    clone = await a.clone_os("tiny", "v1", U1)
    await asyncio.to_thread(write_at, Path(clone.path), 10 * MB, b"NODE")
    free = (await b.capacity()).free
    await b.receive_volume(OS_VOL, a.send_volume(OS_VOL, origin=("tiny", "v1")), origin=("tiny", "v1"))
    assert b.clone_method == "reflink"
    assert free - (await b.capacity()).free < MB  # not another 2 MB of template data
    assert await b.volume_checksum(OS_VOL) == await a.volume_checksum(OS_VOL)


# -- zfs backend on zfs-fuse ------------------------------------------------------------------------


def zfs_get(*args: str) -> dict[str, dict[str, str]]:
    out = subprocess.run(["zfs", "get", "-Hp", "-o", "name,property,value", *args],
                         capture_output=True, text=True, check=True).stdout
    got: dict[str, dict[str, str]] = {}
    for line in out.splitlines():
        name, prop, value = line.split("\t")
        got.setdefault(name, {})[prop] = value
    return got


def datasets(pool: str) -> list[str]:
    return sorted(zfs_get("-r", "type", pool))


@pytest.fixture
def two_pools(tmp_path: Path) -> Iterator[tuple[ZfsBackend, ZfsBackend]]:
    require("zfs-fuse", "zpool", "zfs", root=True, packages="zfs-fuse")
    made = []
    try:
        for side in ("a", "b"):
            name = f"cellos{side}{os.getpid()}"
            (tmp_path / side).mkdir()
            create_pool(name, tmp_path / side)
            made.append(name)
        yield ZfsBackend(made[0], "file"), ZfsBackend(made[1], "file")
    finally:
        for name in made:
            release_pool(name)


def release_pool(name: str) -> None:
    """destroy_pool, given longer: zfs-fuse can stay busy with a pool for seconds after a receive."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if subprocess.run(["zpool", "destroy", "-f", name], capture_output=True).returncode == 0:
            return
        time.sleep(0.5)
    destroy_pool(name)


async def zfs_sender(a: ZfsBackend) -> None:
    await a.create_template("tiny", 64 * MB)  # learns the mountpoint
    await build_template_data(a)


async def build_template_data(a: ZfsBackend) -> None:
    img = Path(a.path("tiny-template"))
    await asyncio.to_thread(write_at, img, 0, b"BOOT" * 1024)
    await asyncio.to_thread(write_at, img, 40 * MB, os.urandom(2 * MB))
    await a.snapshot_template("tiny", "v1")
    await asyncio.to_thread(write_at, img, 50 * MB, b"V2" * 4096)
    await a.snapshot_template("tiny", "v2")


async def test_zfs_template_replication_full_and_incremental(two_pools: tuple[ZfsBackend, ZfsBackend]) -> None:
    a, b = two_pools
    await zfs_sender(a)
    got = await b.receive_template("tiny", "v1", a.send_template("tiny", "v1"))
    # zfs send/recv carries the snapshot's guid over: what both sides compare
    guid_a = zfs_get("guid", f"{a.pool}/tiny-template@v1")[f"{a.pool}/tiny-template@v1"]["guid"]
    guid_b = zfs_get("guid", f"{b.pool}/tiny-template@v1")[f"{b.pool}/tiny-template@v1"]["guid"]
    assert got == f"zfs-guid:{guid_a}" and guid_a == guid_b
    assert got == await a.template_checksum("tiny", "v1") == await b.template_checksum("tiny", "v1")

    stream = await collect(a.send_template("tiny", "v2", base="v1"))
    assert len(stream) < MB  # incremental: not v1's 2 MB again
    got2 = await b.receive_template("tiny", "v2", replay(stream), base="v1")
    assert got2 == await a.template_checksum("tiny", "v2")
    assert await b.snapshots() == ["tiny-template@v1", "tiny-template@v2"]
    clone = await b.clone_os("tiny", "v2", U2)
    assert await asyncio.to_thread(read_at, Path(clone.path), 50 * MB, 4) == b"V2V2"

    with pytest.raises(StorageError, match="already exists here"):
        await b.receive_template("tiny", "v2", a.send_template("tiny", "v2", base="v1"), base="v1")
    await a.snapshot_template("tiny", "v3")
    with pytest.raises(StorageError, match="tiny-template exists here: send v3 incrementally"):
        await b.receive_template("tiny", "v3", a.send_template("tiny", "v3"))


async def test_zfs_failed_receives_leave_no_dataset(two_pools: tuple[ZfsBackend, ZfsBackend]) -> None:
    a, b = two_pools
    await zfs_sender(a)
    before = datasets(b.pool)
    whole = await collect(a.send_template("tiny", "v1"))
    for bad, why in [(replay(whole[: len(whole) // 2]), "exited with"),  # zfs recv: cut stream
                     (replay(flipped(whole, len(whole) // 2)), "exited with"),  # checksum mismatch
                     (replay(whole[:100]), "truncated"),  # not even a BEGIN record
                     (replay(b"\0" * 4096), "bad magic"),
                     (broken(a.send_template("tiny", "v1"), 128 * 1024), "broke off"),
                     (a.send_template("tiny", "v2"), "carries .*tiny-template@v2, not tiny-template@v1"),
                     (a.send_template("tiny", "v1", base="v1"), "exited with")]:  # the sender's zfs send fails
        with pytest.raises(StorageError, match=why):
            await b.receive_template("tiny", "v1", bad)
        assert datasets(b.pool) == before, why
    with pytest.raises(StorageError, match="is incremental, but no base"):
        await b.receive_template("tiny", "v2", a.send_template("tiny", "v2", base="v1"))
    assert datasets(b.pool) == before

    await b.receive_template("tiny", "v1", replay(whole))
    held = datasets(b.pool)
    delta = await collect(a.send_template("tiny", "v2", base="v1"))
    for bad, why in [(replay(delta[: len(delta) - 200]), "exited with"),
                     (a.send_template("tiny", "v2"), "full one, not incremental from tiny-template@v1")]:
        with pytest.raises(StorageError, match=why):
            await b.receive_template("tiny", "v2", bad, base="v1")
        assert datasets(b.pool) == held, why


async def test_zfs_move_of_an_os_clone_stays_a_clone(two_pools: tuple[ZfsBackend, ZfsBackend]) -> None:
    a, b = two_pools
    await zfs_sender(a)
    await b.receive_template("tiny", "v1", a.send_template("tiny", "v1"))
    clone = await a.clone_os("tiny", "v1", U1)
    await asyncio.to_thread(write_at, Path(clone.path), 10 * MB, b"NODE" * 1024)
    data = await a.create_data("tiny", U1, 1, 16 * MB)
    await asyncio.to_thread(write_at, Path(data.path), 5 * MB, b"DATA")

    stream = await collect(a.send_volume(OS_VOL, origin=("tiny", "v1")))
    assert len(stream) < MB  # from the template snapshot: the node's changes only
    assert await a.volume_snapshots(OS_VOL) == []  # the move snapshot is not an operator's
    got = await b.receive_volume(OS_VOL, replay(stream), origin=("tiny", "v1"))
    assert got == await a.volume_checksum(OS_VOL)
    assert zfs_get("origin", f"{b.pool}/{OS_VOL}")[f"{b.pool}/{OS_VOL}"]["origin"] == f"{b.pool}/tiny-template@v1"
    assert f"{b.pool}/{OS_VOL}@{MOVE_SNAPSHOT}" not in datasets(b.pool)
    moved = {v.name: v for v in await b.list()}
    assert moved[OS_VOL].origin == "tiny-template@v1"
    assert await asyncio.to_thread(read_at, Path(b.path(OS_VOL)), 10 * MB, 4) == b"NODE"
    assert await asyncio.to_thread(read_at, Path(b.path(OS_VOL)), 0, 4) == b"BOOT"
    with pytest.raises(StorageError, match="has clones"):
        await b.destroy_snapshot("tiny", "v1")

    await b.receive_volume(DATA_VOL, a.send_volume(DATA_VOL))
    assert await asyncio.to_thread(read_at, Path(b.path(DATA_VOL)), 5 * MB, 4) == b"DATA"

    # never overwritten; a stream of another volume, or a clone's sent whole where a clone is wanted
    before = datasets(b.pool)
    with pytest.raises(StorageError, match=f"volume {OS_VOL} already exists here"):
        await b.receive_volume(OS_VOL, a.send_volume(OS_VOL, origin=("tiny", "v1")), origin=("tiny", "v1"))
    u2_vol = f"tiny-OS-{U2}"
    with pytest.raises(StorageError, match="carries"):
        await b.receive_volume(u2_vol, a.send_volume(OS_VOL, origin=("tiny", "v1")), origin=("tiny", "v1"))
    await a.clone_os("tiny", "v1", U2)
    with pytest.raises(StorageError, match="full one"):
        await b.receive_volume(u2_vol, a.send_volume(u2_vol), origin=("tiny", "v1"))
    u2_stream = await collect(a.send_volume(u2_vol, origin=("tiny", "v1")))
    with pytest.raises(StorageError, match="exited with"):
        await b.receive_volume(u2_vol, replay(u2_stream[:-100]), origin=("tiny", "v1"))
    assert datasets(b.pool) == before
    # a second send replaces the sender's stale move snapshot
    await collect(a.send_volume(OS_VOL, origin=("tiny", "v1")))
    assert await a.volume_checksum(OS_VOL) != got
    # the moved volumes go as any other (their snapshots included)
    await b.destroy(OS_VOL)
    await a.destroy(OS_VOL)
    assert f"{a.pool}/{OS_VOL}@{MOVE_SNAPSHOT}" not in datasets(a.pool)
