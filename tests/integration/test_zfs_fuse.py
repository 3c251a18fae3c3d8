"""The zfs backend's `file` kind for real, against zfs-fuse (pools named cellot*, own image files).

template → snapshot → clone → write → the template is unchanged → destroy (refusals included).
zfs-fuse has no zvols; the zvol kind is checked against captured OpenZFS output in the unit tests.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from iscsi.model import InUseError, StorageError
from iscsi.zfs_backend import ZfsBackend
from tests.tools import require

U1 = "3f1c2b4e-9d8a-4c6b-8e2f-1a2b3c4d5e6f"
U2 = "0a1b2c3d-4e5f-4a6b-9c8d-7e6f5a4b3c2d"
MB = 1 << 20

@pytest.fixture(autouse=True)
def _zfs_fuse_installed() -> None:
    require("zfs-fuse", "zpool", "zfs", root=True, packages="zfs-fuse")


def zfs_fuse_running() -> bool:
    return subprocess.run(["zpool", "list"], capture_output=True).returncode == 0


PIDFILE = Path("/run/zfs-fuse.pid")


def remove_stale_pidfile() -> None:
    """zfs-fuse refuses to start (exit 1, reason only to syslog) while its pid file exists, even when
    the pid in it is long dead: a killed session leaves exactly that behind for the next run."""
    try:
        pid = int(PIDFILE.read_text().strip() or "0")
    except (FileNotFoundError, ValueError):
        pid = 0
    try:
        alive = pid > 0 and Path(f"/proc/{pid}/comm").read_text().strip() == "zfs-fuse"
    except OSError:
        alive = False
    if not alive:
        PIDFILE.unlink(missing_ok=True)


def ensure_zfs_fuse() -> None:
    """Only one zfs-fuse daemon per machine: start it if none answers, and leave it running."""
    if zfs_fuse_running():
        return
    for d in ("/var/run/zfs", "/var/lock/zfs"):
        os.makedirs(d, exist_ok=True)
    remove_stale_pidfile()
    started = subprocess.run(
        ["zfs-fuse", "-p", str(PIDFILE), "--no-kstat-mount", "-m", "64"], capture_output=True, text=True
    )
    deadline = time.monotonic() + 10
    while not zfs_fuse_running():
        if time.monotonic() > deadline:
            pytest.fail(f"zfs-fuse did not come up within 10 s (exit {started.returncode}: {started.stderr.strip()})")
        time.sleep(0.1)


def create_pool(name: str, tmp_path: Path) -> Path:
    ensure_zfs_fuse()
    img, mnt = tmp_path / "pool.img", tmp_path / "mnt"
    with open(img, "wb") as f:
        f.truncate(256 * MB)
    subprocess.run(["zpool", "create", "-f", "-m", str(mnt), name, str(img)], check=True, capture_output=True)
    return mnt


def destroy_pool(name: str) -> None:
    for _ in range(10):
        if subprocess.run(["zpool", "destroy", "-f", name], capture_output=True).returncode == 0:
            return
        time.sleep(0.3)
    subprocess.run(["zpool", "export", "-f", name], capture_output=True)


@pytest.fixture
async def pool(tmp_path: Path) -> AsyncIterator[tuple[str, Path]]:
    name = f"cellot{os.getpid()}"
    mnt = await asyncio.to_thread(create_pool, name, tmp_path)
    try:
        yield name, mnt
    finally:
        await asyncio.to_thread(destroy_pool, name)


def write_at(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)
        os.fsync(f.fileno())


def read_at(path: Path, offset: int, n: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(n)


async def test_file_kind_lifecycle_on_zfs_fuse(pool: tuple[str, Path]) -> None:
    name, mnt = pool
    b = ZfsBackend(name, "file")
    tpl = await b.create_template("tiny", 32 * MB)
    assert tpl.path == str(mnt / "tiny-template" / "disk.img") and tpl.size == 32 * MB
    await asyncio.to_thread(write_at, Path(tpl.path), 8 * MB, b"TEMPLATE")
    await b.snapshot_template("tiny", "v1")
    clone = await b.clone_os("tiny", "v1", U1)
    assert clone.origin == "tiny-template@v1" and clone.path == str(mnt / f"tiny-OS-{U1}" / "disk.img")
    assert await asyncio.to_thread(read_at, Path(clone.path), 8 * MB, 8) == b"TEMPLATE"
    await asyncio.to_thread(write_at, Path(clone.path), 8 * MB, b"NODEDATA")
    assert await asyncio.to_thread(read_at, Path(tpl.path), 8 * MB, 8) == b"TEMPLATE"  # template unchanged
    data = await b.create_data("tiny", U1, 1, 8 * MB)
    assert data.size == 8 * MB and data.path.endswith(f"tiny-DATA-{U1}/disk.img")

    listed = {v.name: v for v in await b.list()}
    assert set(listed) == {"tiny-template", f"tiny-OS-{U1}", f"tiny-DATA-{U1}"}
    assert listed[f"tiny-OS-{U1}"].origin == "tiny-template@v1" and listed["tiny-template"].used > 0
    assert await b.snapshots() == ["tiny-template@v1"]
    cap = await b.capacity()
    assert cap.total == cap.used + cap.free and 0 < cap.free < 256 * MB

    with pytest.raises(InUseError, match=f"tiny-OS-{U1}"):
        await b.destroy("tiny-template")
    with pytest.raises(InUseError, match=f"tiny-OS-{U1}"):
        await b.destroy_snapshot("tiny", "v1")
    await b.destroy(f"tiny-OS-{U1}")
    await b.destroy(f"tiny-DATA-{U1}")
    await b.destroy_snapshot("tiny", "v1")
    await b.destroy("tiny-template")
    assert await b.list() == [] and await b.snapshots() == []


async def test_template_with_unused_snapshots_is_destroyed_whole(pool: tuple[str, Path]) -> None:
    name, _ = pool
    b = ZfsBackend(name, "file")
    await b.create_template("tiny", 4 * MB)
    await b.snapshot_template("tiny", "v1")
    await b.snapshot_template("tiny", "v2")
    await b.clone_os("tiny", "v2", U2)
    with pytest.raises(InUseError):
        await b.destroy("tiny-template")
    await b.destroy(f"tiny-OS-{U2}")
    await b.destroy("tiny-template")
    assert await b.list() == [] and await b.snapshots() == []


async def test_os_volume_snapshots_restore_and_copy_on_zfs_fuse(pool: tuple[str, Path]) -> None:
    """Issue 13's storage on a real ZFS: snapshots of a node's root, rollback, a capture into a template."""
    name, mnt = pool
    b = ZfsBackend(name, "file")
    tpl = await b.create_template("tiny", 16 * MB)
    await asyncio.to_thread(write_at, Path(tpl.path), 0, b"TEMPLATE")
    await b.snapshot_template("tiny", "v1")
    vol = f"tiny-OS-{U1}"
    img = Path((await b.clone_os("tiny", "v1", U1)).path)
    await asyncio.to_thread(write_at, img, 4 * MB, b"AAAA")
    await b.snapshot_volume(vol, "zz")  # sorts last by name, first by creation
    await asyncio.to_thread(write_at, img, 4 * MB, b"BBBB")
    await b.snapshot_volume(vol, "aa")  # within the same second: the order is zfs's createtxg
    await asyncio.to_thread(write_at, img, 4 * MB, b"CCCC")
    assert await b.volume_snapshots(vol) == ["zz", "aa"]
    assert await b.snapshots() == ["tiny-template@v1"]
    assert {v.name for v in await b.list()} == {"tiny-template", vol}
    with pytest.raises(StorageError, match="already exists"):
        await b.snapshot_volume(vol, "aa")

    with pytest.raises(InUseError, match="newer snapshots: aa"):
        await b.restore_volume_snapshot(vol, "zz")
    assert await b.volume_snapshots(vol) == ["zz", "aa"]  # nothing destroyed
    await b.restore_volume_snapshot(vol, "aa")
    assert await asyncio.to_thread(read_at, img, 4 * MB, 4) == b"BBBB"
    await b.destroy_volume_snapshot(vol, "aa")
    await b.destroy_volume_snapshot(vol, "aa")  # missing: a no-op
    await b.restore_volume_snapshot(vol, "zz")
    assert await asyncio.to_thread(read_at, img, 4 * MB, 4) == b"AAAA"
    assert await asyncio.to_thread(read_at, img, 0, 8) == b"TEMPLATE"
    await b.snapshot_volume(vol, "aa")

    # capture: the node's root into a new template dataset, then a template version a second node clones
    cap = await b.copy_volume(vol, "cap-template")
    assert (cap.size, cap.origin, cap.path) == (16 * MB, None, str(mnt / "cap-template" / "disk.img"))
    assert await asyncio.to_thread(read_at, Path(cap.path), 4 * MB, 4) == b"AAAA"
    await asyncio.to_thread(write_at, Path(cap.path), 8 * MB, b"STALE")
    await asyncio.to_thread(write_at, img, 4 * MB, b"DDDD")
    await b.copy_volume(vol, "cap-template")  # onto the existing one: all of its bytes replaced
    assert await asyncio.to_thread(read_at, Path(cap.path), 4 * MB, 4) == b"DDDD"
    assert await asyncio.to_thread(read_at, Path(cap.path), 8 * MB, 5) == b"\0" * 5
    await b.snapshot_template("cap", "v1")
    node = await b.clone_os("cap", "v1", U2, generation=2)
    assert node.name == f"cap-OS-{U2}-g2" and node.origin == "cap-template@v1"
    assert await asyncio.to_thread(read_at, Path(node.path), 4 * MB, 4) == b"DDDD"
    await b.create_template("small", 4 * MB)
    with pytest.raises(StorageError, match="same size"):
        await b.copy_volume(vol, "small-template")

    # an OS volume with snapshots is destroyed whole
    await b.destroy(vol)
    assert await b.volume_snapshots(vol) == []
    await b.destroy(node.name)
    for template in ("cap-template", "small-template", "tiny-template"):
        await b.destroy(template)
    assert await b.list() == [] and await b.snapshots() == []
