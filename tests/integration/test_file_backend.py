"""File backend for real: sparse copies on this host's filesystem, reflinks on a loop-mounted xfs."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from iscsi.file_backend import FileBackend
from iscsi.model import InUseError, StorageError
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
