"""images/scrub.py for real: ext4 images made by mkfs.ext4 -d from a tree, read back with debugfs."""

from __future__ import annotations

import asyncio
import os
import subprocess
from pathlib import Path

import pytest

from images.scrub import ScrubError, parse_ls, scrub_identity, superblock_kind
from tests.tools import require

MB = 1 << 20
MACHINE_ID = "0123456789abcdef0123456789abcdef\n"


@pytest.fixture(autouse=True)
def _e2fsprogs() -> None:
    require("mkfs.ext4", "debugfs", "e2fsck", packages="e2fsprogs")


def booted_node_tree(root: Path) -> None:
    """What a node's root holds once it booted: identity, markers, and what must stay."""
    files = {
        "etc/machine-id": MACHINE_ID,
        "etc/hostname": "cello-node\n",
        "etc/ssh/ssh_host_ed25519_key": "PRIVATE ed25519\n",
        "etc/ssh/ssh_host_ed25519_key.pub": "ssh-ed25519 AAAA node\n",
        "etc/ssh/ssh_host_rsa_key": "PRIVATE rsa\n",
        "etc/ssh/ssh_host_rsa_key.pub": "ssh-rsa AAAA node\n",
        "etc/ssh/sshd_config": "PermitRootLogin no\n",
        "etc/ssh_host_not_a_key": "stays: not in /etc/ssh\n",
        "var/lib/systemd/random-seed": "seed\n",
        "var/lib/systemd/timers/stamp-x": "stays\n",
        "cello-booted": "uuid=3f1c2b4e-9d8a-4c6b-8e2f-1a2b3c4d5e6f\nboots=3\n",
        "cello-writeloop": "7 12.5\n",
        "home/user/cello-booted": "stays: only the root's marker goes\n",
    }
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    (root / "etc/machine-id").chmod(0o444)
    (root / "var/lib/dbus").mkdir(parents=True)
    (root / "var/lib/dbus/machine-id").symlink_to("/etc/machine-id")


def mkfs(tree: Path, image: Path, fstype: str = "ext4") -> None:
    with open(image, "wb") as f:
        f.truncate(32 * MB)
    subprocess.run([f"mkfs.{fstype}", "-q", "-F", "-d", str(tree), str(image)], check=True, capture_output=True)


def debugfs(image: Path, request: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["debugfs", "-R", request, str(image)], capture_output=True, text=True, check=True)


def exists(image: Path, path: str) -> bool:
    return "File not found" not in debugfs(image, f"stat {path}").stderr


def cat(image: Path, path: str) -> str:
    return debugfs(image, f"cat {path}").stdout


def fsck_clean(image: Path) -> bool:
    return subprocess.run(["e2fsck", "-fn", str(image)], capture_output=True).returncode == 0


@pytest.fixture
def node_image(tmp_path: Path) -> Path:
    tree, image = tmp_path / "tree", tmp_path / "root.img"
    booted_node_tree(tree)
    mkfs(tree, image)
    return image


async def test_scrub_removes_the_identity_and_keeps_the_rest(node_image: Path) -> None:
    assert await asyncio.to_thread(cat, node_image, "/etc/machine-id") == MACHINE_ID
    changed = await scrub_identity(str(node_image))
    assert changed == [
        "/etc/machine-id",
        "/cello-booted", "/cello-writeloop",
        "/etc/ssh/ssh_host_ed25519_key", "/etc/ssh/ssh_host_ed25519_key.pub",
        "/etc/ssh/ssh_host_rsa_key", "/etc/ssh/ssh_host_rsa_key.pub",
        "/var/lib/dbus/machine-id",
        "/var/lib/systemd/random-seed",
    ]
    # machine-id: the same file, empty, still 0444 root (systemd makes a new id at the next boot)
    ls = parse_ls((await asyncio.to_thread(debugfs, node_image, "ls -p /etc")).stdout)
    assert ls["machine-id"].size == 0 and ls["machine-id"].mode == 0o100444
    assert await asyncio.to_thread(cat, node_image, "/etc/machine-id") == ""
    for path in changed[1:]:
        assert not await asyncio.to_thread(exists, node_image, path), path
    for path, text in [("/etc/hostname", "cello-node\n"), ("/etc/ssh/sshd_config", "PermitRootLogin no\n"),
                       ("/etc/ssh_host_not_a_key", "stays: not in /etc/ssh\n"),
                       ("/var/lib/systemd/timers/stamp-x", "stays\n"),
                       ("/home/user/cello-booted", "stays: only the root's marker goes\n")]:
        assert await asyncio.to_thread(cat, node_image, path) == text, path
    assert await asyncio.to_thread(fsck_clean, node_image)
    assert await scrub_identity(str(node_image)) == []  # nothing left to scrub: no change the second time


async def test_a_template_without_identity_is_left_alone(tmp_path: Path) -> None:
    tree, image = tmp_path / "tree", tmp_path / "tiny.img"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc/machine-id").write_text("")  # as the Debian template is built: already empty
    (tree / "sbin").mkdir()
    (tree / "sbin/init").write_text("#!/bin/sh\n")
    await asyncio.to_thread(mkfs, tree, image)
    before = await asyncio.to_thread(image.read_bytes)
    assert await scrub_identity(str(image)) == []
    assert await asyncio.to_thread(image.read_bytes) == before


async def test_an_unreplayed_journal_is_replayed_before_the_scrub(node_image: Path) -> None:
    # as a node powered off without unmounting leaves it: a replay after the scrub would undo it
    await asyncio.to_thread(subprocess.run, ["debugfs", "-w", "-R", "feature needs_recovery", str(node_image)],
                            check=True, capture_output=True)
    head = await asyncio.to_thread(lambda: node_image.read_bytes()[:2048])
    assert superblock_kind(head) == ("ext4", True)
    assert "/cello-booted" in await scrub_identity(str(node_image))
    head = await asyncio.to_thread(lambda: node_image.read_bytes()[:2048])
    assert superblock_kind(head) == ("ext4", False)
    assert not await asyncio.to_thread(exists, node_image, "/cello-booted")
    assert await asyncio.to_thread(fsck_clean, node_image)


async def test_non_ext4_images_are_refused(tmp_path: Path) -> None:
    zeros = tmp_path / "zeros.img"
    await asyncio.to_thread(zeros.write_bytes, bytes(64 * 1024))
    with pytest.raises(ScrubError, match="is not an ext4 image: no ext2/3/4 superblock"):
        await scrub_identity(str(zeros))
    tree, ext2 = tmp_path / "tree", tmp_path / "ext2.img"
    booted_node_tree(tree)
    await asyncio.to_thread(mkfs, tree, ext2, "ext2")
    with pytest.raises(ScrubError, match="is not an ext4 image: an ext2/ext3 filesystem"):
        await scrub_identity(str(ext2))
    assert await asyncio.to_thread(exists, ext2, "/cello-booted")  # untouched
    with pytest.raises(ScrubError, match="cannot read"):
        await scrub_identity(str(tmp_path / "missing.img"))
    short = tmp_path / "short.img"
    await asyncio.to_thread(short.write_bytes, b"x")
    with pytest.raises(ScrubError, match="is not an ext4 image"):
        await scrub_identity(str(short))


async def test_a_name_debugfs_cannot_take_is_refused_before_any_change(tmp_path: Path) -> None:
    tree, image = tmp_path / "tree", tmp_path / "root.img"
    booted_node_tree(tree)
    (tree / "etc/ssh/ssh_host_odd key").write_text("x\n")
    await asyncio.to_thread(mkfs, tree, image)
    before = await asyncio.to_thread(image.read_bytes)
    with pytest.raises(ScrubError, match="ssh_host_odd key"):
        await scrub_identity(str(image))
    assert await asyncio.to_thread(image.read_bytes) == before


async def test_a_scrub_that_does_not_take_is_an_error(node_image: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if os.geteuid() == 0:
        # root writes through file modes: stand for a read-only image by a debugfs that opens it read-only
        import images.scrub as scrub

        real = scrub._debugfs

        async def read_only(image: str, *args: str) -> str:
            return await real(image, *[a for a in args if a != "-w"])

        monkeypatch.setattr(scrub, "_debugfs", read_only)
    else:
        await asyncio.to_thread(node_image.chmod, 0o444)
    with pytest.raises(ScrubError, match="left /etc/machine-id"):
        await scrub_identity(str(node_image))
    assert await asyncio.to_thread(cat, node_image, "/etc/machine-id") == MACHINE_ID
