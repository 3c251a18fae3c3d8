"""File backend for real: sparse copies on this host's filesystem, reflinks on a loop-mounted xfs."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from iscsi.file_backend import FileBackend
from iscsi.model import InUseError, NameError_, StorageError
from tests.tools import require

U1 = "3f1c2b4e-9d8a-4c6b-8e2f-1a2b3c4d5e6f"
U2 = "0a1b2c3d-4e5f-4a6b-9c8d-7e6f5a4b3c2d"
MB = 1 << 20


def write_at(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def read_at(path: Path, offset: int, n: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(n)


def _fstype(path: Path) -> str:
    return subprocess.run(["stat", "-f", "-c", "%T", str(path)], capture_output=True, text=True).stdout


async def lifecycle(b: FileBackend, expect: str) -> None:
    tpl = await b.create_template("tiny", 64 * MB)
    assert (tpl.size, tpl.origin) == (64 * MB, None) and tpl.used < MB  # sparse
    await asyncio.to_thread(write_at, Path(tpl.path), 0, b"BOOT" * 1024)
    await asyncio.to_thread(write_at, Path(tpl.path), 40 * MB, b"ROOT" * 1024)
    await b.snapshot_template("tiny", "v1")
    clone = await b.clone_os("tiny", "v1", U1)
    assert b.status()["clone_method"] == expect
    assert clone.origin == "tiny-template@v1" and clone.size == 64 * MB
    assert clone.used < 4 * MB, clone  # sparse copy / reflink: no 64 MB of zeros written
    path = Path(clone.path)
    assert await asyncio.to_thread(read_at, path, 40 * MB, 4) == b"ROOT"
    await asyncio.to_thread(write_at, path, 40 * MB, b"NODE")
    await asyncio.to_thread(write_at, path, 60 * MB, b"NEW!")
    snap = Path(b.path("tiny-template")).with_name("tiny-template@v1.img")
    for f in (Path(tpl.path), snap):
        assert await asyncio.to_thread(read_at, f, 40 * MB, 4) == b"ROOT"  # the template is unchanged
        assert await asyncio.to_thread(read_at, f, 60 * MB, 4) == b"\0" * 4

    data = await b.create_data("tiny", U1, 2, 16 * MB)
    assert data.name == f"tiny-DATA-{U1}-2" and data.size == 16 * MB
    listed = {v.name: v for v in await b.list()}
    assert set(listed) == {"tiny-template", f"tiny-OS-{U1}", f"tiny-DATA-{U1}-2"}
    assert listed[f"tiny-OS-{U1}"].origin == "tiny-template@v1"
    assert await b.snapshots() == ["tiny-template@v1"]
    cap = await b.capacity()
    assert cap.total > cap.free > 0 and cap.used > 0

    with pytest.raises(InUseError, match=f"tiny-OS-{U1}"):
        await b.destroy("tiny-template")
    with pytest.raises(InUseError, match=f"tiny-OS-{U1}"):
        await b.destroy_snapshot("tiny", "v1")
    with pytest.raises(InUseError, match="still exported"):
        await b.destroy(f"tiny-OS-{U1}", exported=lambda v: True)
    with pytest.raises(StorageError, match="already exists"):
        await b.clone_os("tiny", "v1", U1)
    with pytest.raises(StorageError, match="does not exist"):
        await b.clone_os("tiny", "v9", U2)
    await b.destroy(f"tiny-OS-{U1}")
    await b.destroy(f"tiny-OS-{U1}")  # idempotent
    await b.destroy("tiny-template")  # its unused snapshot goes with it
    assert [v.name for v in await b.list()] == [f"tiny-DATA-{U1}-2"] and await b.snapshots() == []


async def test_sparse_copy_where_there_is_no_reflink(tmp_path: Path) -> None:
    fs = await asyncio.to_thread(_fstype, tmp_path)
    if fs.strip() in ("xfs", "btrfs"):
        pytest.skip(f"{tmp_path} is {fs.strip()}, which reflinks")
    await lifecycle(FileBackend(tmp_path / "vols"), "sparse-copy")


@pytest.fixture
def xfs_mount(tmp_path: Path) -> Iterator[Path]:
    require("mkfs.xfs", root=True, packages="xfsprogs")  # root: a loop-mounted xfs
    img, mnt = tmp_path / "xfs.img", tmp_path / "mnt"
    mnt.mkdir()
    with open(img, "wb") as f:
        f.truncate(320 * MB)
    subprocess.run(["mkfs.xfs", "-q", "-m", "reflink=1", str(img)], check=True)
    subprocess.run(["mount", "-o", "loop", str(img), str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


@pytest.fixture
async def xfs_backend(xfs_mount: Path) -> AsyncIterator[FileBackend]:
    yield FileBackend(xfs_mount / "vols")


async def test_reflink_clones_on_xfs(xfs_backend: FileBackend) -> None:
    await lifecycle(xfs_backend, "reflink")


# -- snapshots of an OS volume, generations and copies (issue 13) ----------------------------------


def _facts(path: Path) -> tuple[int, int, int]:
    """(mode, size, bytes allocated)"""
    st = path.stat()
    return st.st_mode & 0o777, st.st_size, st.st_blocks * 512


def _listdir(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir())


async def volume_snapshots_lifecycle(b: FileBackend) -> None:
    tpl = await b.create_template("tiny", 32 * MB)
    await asyncio.to_thread(write_at, Path(tpl.path), 0, b"TMPL")
    await b.snapshot_template("tiny", "v1")
    vol = f"tiny-OS-{U1}"
    clone = await b.clone_os("tiny", "v1", U1)
    path = Path(clone.path)
    await asyncio.to_thread(write_at, path, 20 * MB, b"AAAA")
    await b.snapshot_volume(vol, "zz")  # names that sort the other way round: the order is creation order
    await asyncio.to_thread(write_at, path, 20 * MB, b"BBBB")
    await b.snapshot_volume(vol, "aa")
    await asyncio.to_thread(write_at, path, 20 * MB, b"CCCC")
    assert await b.volume_snapshots(vol) == ["zz", "aa"]
    snap_img = path.with_name(f"{vol}@zz.img")
    mode, _, used = await asyncio.to_thread(_facts, snap_img)
    assert mode == 0o444 and used < 4 * MB  # read-only, sparse
    assert await asyncio.to_thread(read_at, snap_img, 20 * MB, 4) == b"AAAA"
    # volumes and template snapshots are listed as before: an OS volume's snapshots are neither
    assert {v.name for v in await b.list()} == {"tiny-template", vol}
    assert await b.snapshots() == ["tiny-template@v1"]

    with pytest.raises(StorageError, match="already exists"):
        await b.snapshot_volume(vol, "aa")
    with pytest.raises(StorageError, match="does not exist"):
        await b.snapshot_volume(f"tiny-OS-{U2}", "s1")
    with pytest.raises(InUseError, match=f"{vol}@zz has newer snapshots: aa"):
        await b.restore_volume_snapshot(vol, "zz")  # as zfs rollback refuses without -r
    assert await asyncio.to_thread(read_at, path, 20 * MB, 4) == b"CCCC"
    with pytest.raises(StorageError, match="does not exist"):
        await b.restore_volume_snapshot(vol, "nope")

    await b.restore_volume_snapshot(vol, "aa")
    assert await asyncio.to_thread(read_at, path, 20 * MB, 4) == b"BBBB"
    assert await asyncio.to_thread(read_at, path, 0, 4) == b"TMPL"
    assert (await asyncio.to_thread(_facts, path))[:2] == (0o644, 32 * MB)  # a writable volume of its size
    assert {v.name: v.origin for v in await b.list()}[vol] == "tiny-template@v1"
    await asyncio.to_thread(write_at, path, 20 * MB, b"DDDD")
    await b.destroy_volume_snapshot(vol, "aa")
    await b.destroy_volume_snapshot(vol, "aa")  # missing: a no-op
    assert await b.volume_snapshots(vol) == ["zz"]
    await b.restore_volume_snapshot(vol, "zz")
    assert await asyncio.to_thread(read_at, path, 20 * MB, 4) == b"AAAA"
    await b.snapshot_volume(vol, "aa")  # a name can be used again once destroyed, and sorts newest
    assert await b.volume_snapshots(vol) == ["zz", "aa"]

    # an upgrade's next generation stands beside the first
    g2 = await b.clone_os("tiny", "v1", U1, generation=2)
    assert g2.name == f"tiny-OS-{U1}-g2" and g2.origin == "tiny-template@v1"
    await b.snapshot_volume(g2.name, "zz")
    assert await b.volume_snapshots(g2.name) == ["zz"] and await b.volume_snapshots(vol) == ["zz", "aa"]
    assert await b.volume_snapshots(f"tiny-OS-{U2}") == []

    # destroying an OS volume takes its own snapshots (images and sidecars) and nothing else
    await b.destroy(vol)
    assert await b.volume_snapshots(vol) == [] and await b.volume_snapshots(g2.name) == ["zz"]
    left = await asyncio.to_thread(_listdir, path.parent)
    assert not [n for n in left if n.startswith((f"{vol}@", f"{vol}."))], left
    await b.destroy(g2.name)
    await b.destroy("tiny-template")
    assert await asyncio.to_thread(_listdir, path.parent) == []


async def test_volume_snapshots_by_sparse_copy(tmp_path: Path) -> None:
    await volume_snapshots_lifecycle(FileBackend(tmp_path / "vols"))


async def test_volume_snapshots_by_reflink_on_xfs(xfs_backend: FileBackend) -> None:
    await volume_snapshots_lifecycle(xfs_backend)
    assert xfs_backend.status()["clone_method"] == "reflink"


async def test_snapshot_names_are_checked_before_any_file_is_touched(tmp_path: Path) -> None:
    b = FileBackend(tmp_path / "vols")
    for vol, snap in [("tiny-template", "s1"), (f"tiny-DATA-{U1}", "s1"), (f"tiny-OS-{U1}", "../x"),
                      (f"tiny-OS-{U1}", "a b"), (f"tiny-OS-{U1}", "S1"), ("../tiny", "s1")]:
        for call in (b.snapshot_volume(vol, snap), b.destroy_volume_snapshot(vol, snap),
                     b.restore_volume_snapshot(vol, snap)):
            with pytest.raises(NameError_):
                await call
    with pytest.raises(NameError_):
        await b.volume_snapshots("tiny-template")
    with pytest.raises(NameError_):
        await b.copy_volume(f"tiny-OS-{U1}", "../x")
    with pytest.raises(NameError_):
        await b.clone_os("tiny", "v1", U1, generation=0)
    assert not (tmp_path / "vols").exists()


async def copy_lifecycle(b: FileBackend) -> None:
    await b.create_template("tiny", 32 * MB)
    await b.snapshot_template("tiny", "v1")
    vol = (await b.clone_os("tiny", "v1", U1)).name
    await asyncio.to_thread(write_at, Path(b.path(vol)), 24 * MB, b"CAPTURED")

    # capture into a new template volume: made with the source's size, the same bytes, holes kept
    cap = await b.copy_volume(vol, "cap-template")
    assert (cap.name, cap.size, cap.origin) == ("cap-template", 32 * MB, None)
    assert cap.used < 4 * MB, cap
    assert await asyncio.to_thread(read_at, Path(cap.path), 24 * MB, 8) == b"CAPTURED"
    assert (await asyncio.to_thread(_facts, Path(cap.path)))[0] == 0o644
    # onto an existing volume of the same size: its old bytes are gone, holes included
    await asyncio.to_thread(write_at, Path(cap.path), 4 * MB, b"STALE")
    await asyncio.to_thread(write_at, Path(b.path(vol)), 24 * MB, b"SECOND!!")
    again = await b.copy_volume(vol, "cap-template")
    assert await asyncio.to_thread(read_at, Path(again.path), 24 * MB, 8) == b"SECOND!!"
    assert await asyncio.to_thread(read_at, Path(again.path), 4 * MB, 5) == b"\0" * 5
    # the copy is independent of its source, and becomes a template version as any other
    await asyncio.to_thread(write_at, Path(b.path(vol)), 24 * MB, b"LATER!!!")
    await b.snapshot_template("cap", "v1")
    node = await b.clone_os("cap", "v1", U2)
    assert await asyncio.to_thread(read_at, Path(node.path), 24 * MB, 8) == b"SECOND!!"

    await b.create_template("small", 16 * MB)
    with pytest.raises(StorageError, match="same size"):
        await b.copy_volume(vol, "small-template")
    with pytest.raises(StorageError, match="does not exist"):
        await b.copy_volume(f"tiny-OS-{U2}", "other-template")
    with pytest.raises(StorageError, match="onto itself"):
        await b.copy_volume(vol, vol)
    assert "other-template" not in {v.name for v in await b.list()}


async def test_copy_volume_by_sparse_copy(tmp_path: Path) -> None:
    await copy_lifecycle(FileBackend(tmp_path / "vols"))


async def test_copy_volume_by_reflink_on_xfs(xfs_backend: FileBackend) -> None:
    await copy_lifecycle(xfs_backend)
