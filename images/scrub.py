"""Scrub a node's identity out of an ext4 root image, so the clones of a captured template don't share it.

What a node makes its own once it has booted, and what goes:
- `/etc/machine-id` is emptied (the file stays, 0 bytes: systemd makes a new id on the next boot, as the
  Debian template is built, images/rootfs.py); `/var/lib/dbus/machine-id` (D-Bus's copy or link) goes;
- `/etc/ssh/ssh_host_*`: the host keys;
- `/var/lib/systemd/random-seed` and `credential.secret`: entropy and a host secret systemd keeps;
- Cello's own markers of a booted node: `/cello-booted` (uuid + boot counter, written by the tiny
  template's init and the Debian template's cello-booted, image-build/), its temp `/cello-booted.new`,
  and `/cello-writeloop` (the tiny init's test loop).

The image (a file, or a block device) is changed in place with e2fsprogs' `debugfs -w`: no mount, so
no root needed for a file. A journal left unreplayed (a node powered off without unmounting) is
replayed first (`e2fsck -E journal_only`): a replay after the scrub would undo it. debugfs exits 0 even
when a request fails, so what was asked is read back and checked.
"""

from __future__ import annotations

import asyncio
import re
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

from iscsi.model import StorageError
from iscsi.runner import CommandError, run_command

MACHINE_ID = "/etc/machine-id"
# Whole files that go, by folder: a name or, ending in "*", a prefix.
REMOVE: dict[str, tuple[str, ...]] = {
    "/": ("cello-booted", "cello-booted.new", "cello-writeloop"),
    "/etc/ssh": ("ssh_host_*",),
    "/var/lib/dbus": ("machine-id",),
    "/var/lib/systemd": ("random-seed", "credential.secret"),
}
TIMEOUT = 300.0  # seconds for one e2fsprogs command (a large image's journal replay)

# ext4's superblock (fs/ext4/ext4.h): 1024 bytes in, s_magic at +56, feature words at +92, +96, +100
_SB_OFFSET = 1024
_EXT_MAGIC = 0xEF53
_INCOMPAT_RECOVER = 0x4  # the journal holds transactions not yet replayed
# features only ext4 has: incompat extents, 64bit, flex_bg; ro_compat huge_file, gdt_csum, dir_nlink,
# extra_isize, metadata_csum (what blkid also tells ext4 from ext2/ext3 by)
_EXT4_INCOMPAT = 0x40 | 0x80 | 0x200
_EXT4_RO_COMPAT = 0x8 | 0x10 | 0x20 | 0x40 | 0x400
# a name that can go into a debugfs request as it stands (debugfs splits requests at blanks and quotes)
STAMP = "/etc/cello-template"
_PLAIN_NAME = re.compile(r"\A[A-Za-z0-9_.@+-]+\Z")
_MODE_TYPE = 0o170000
_REGULAR, _DIRECTORY = 0o100000, 0o040000


class ScrubError(StorageError):
    """The image is not ext4, or its identity could not be scrubbed; the message says which and why."""


@dataclass(frozen=True)
class Entry:
    """One line of `debugfs ls -p`: `/inode/mode/uid/gid/name/size/`."""

    name: str
    mode: int
    size: int | None  # None for a folder

    @property
    def regular(self) -> bool:
        return self.mode & _MODE_TYPE == _REGULAR


def parse_ls(text: str) -> dict[str, Entry]:
    """`debugfs -R "ls -p DIR"` output → {name: Entry}, without `.` and `..`."""
    out: dict[str, Entry] = {}
    for line in text.splitlines():
        parts = line.split("/")
        # ['', inode, mode, uid, gid, name, size or '', ''] (a name cannot hold a "/")
        if len(parts) != 8 or parts[0] or parts[7] or not parts[2].isdigit():
            continue
        name, mode = parts[5], int(parts[2], 8)
        if name in (".", ".."):
            continue
        size = int(parts[6]) if parts[6].isdigit() else None
        out[name] = Entry(name, mode, None if mode & _MODE_TYPE == _DIRECTORY else size)
    return out


def superblock_kind(head: bytes) -> tuple[str, bool]:
    """From the first 2 KiB of an image: ("ext4" | "ext2/ext3" | "not ext", journal needs replay)."""
    if len(head) < _SB_OFFSET + 104:
        return "not ext", False
    magic = struct.unpack_from("<H", head, _SB_OFFSET + 56)[0]
    if magic != _EXT_MAGIC:
        return "not ext", False
    incompat, ro_compat = struct.unpack_from("<II", head, _SB_OFFSET + 96)
    kind = "ext4" if incompat & _EXT4_INCOMPAT or ro_compat & _EXT4_RO_COMPAT else "ext2/ext3"
    return kind, bool(incompat & _INCOMPAT_RECOVER)


def _read_head(image: str) -> bytes:
    try:
        with open(image, "rb") as f:
            return f.read(2048)
    except OSError as exc:
        raise ScrubError(f"cannot read {image}: {exc.strerror or exc}") from None


async def _superblock(image: str) -> bool:
    """Refuse what is not ext4; True if its journal needs replaying."""
    kind, needs_recovery = superblock_kind(await asyncio.to_thread(_read_head, image))
    if kind != "ext4":
        what = "no ext2/3/4 superblock at byte 1024 (a partition table, another filesystem, or empty?)" \
            if kind == "not ext" else "an ext2/ext3 filesystem"
        raise ScrubError(f"{image} is not an ext4 image: {what}; only a whole-disk ext4 root can be scrubbed")
    return needs_recovery


async def _debugfs(image: str, *args: str) -> str:
    try:
        return (await run_command(["debugfs", *args, image], timeout=TIMEOUT)).stdout
    except CommandError as exc:
        raise ScrubError(f"debugfs on {image} failed: {exc}") from None


async def _listing(image: str) -> dict[str, dict[str, Entry]]:
    """{folder: its entries} for every folder scrubbing looks in (a missing folder lists empty)."""
    folders = sorted({*REMOVE, str(Path(MACHINE_ID).parent)})
    texts = await asyncio.gather(*(_debugfs(image, "-R", f"ls -p {d}") for d in folders))
    return {d: parse_ls(t) for d, t in zip(folders, texts, strict=True)}


def _join(folder: str, name: str) -> str:
    return f"/{name}" if folder == "/" else f"{folder}/{name}"


def _plan(listing: dict[str, dict[str, Entry]]) -> tuple[list[str], list[str]]:
    """(paths to remove, debugfs requests); the machine-id to empty comes first when it has content."""
    requests: list[str] = []
    changed: list[str] = []
    folder, name = MACHINE_ID.rsplit("/", 1)
    machine_id = listing[folder].get(name)
    if machine_id is not None and machine_id.regular and machine_id.size:
        # the same inode, emptied: its owner and mode (0444) stay as the template made them
        requests += [f"punch {MACHINE_ID} 0", f"sif {MACHINE_ID} size 0"]
        changed.append(MACHINE_ID)
    for folder, patterns in REMOVE.items():
        for entry in sorted(listing[folder].values(), key=lambda e: e.name):
            if entry.size is None or not any(
                    entry.name.startswith(p[:-1]) if p.endswith("*") else entry.name == p for p in patterns):
                continue
            path = _join(folder, entry.name)
            if not _PLAIN_NAME.match(entry.name):
                raise ScrubError(f"{path!r}: a name debugfs cannot be given safely; remove it by hand")
            requests.append(f"rm {path}")
            changed.append(path)
    return changed, requests


def _left_over(listing: dict[str, dict[str, Entry]], changed: list[str]) -> list[str]:
    left = []
    for path in changed:
        folder, name = path.rsplit("/", 1)
        entry = listing[folder or "/"].get(name)
        if path == MACHINE_ID:
            if entry is None or entry.size != 0:
                left.append(f"{path} (not emptied)")
        elif entry is not None:
            left.append(path)
    return left


async def _replay_journal(image: str) -> None:
    try:
        # exit 1: "errors corrected" (the replay itself); 2 or more is a real failure
        result = await run_command(["e2fsck", "-y", "-E", "journal_only", image], check=False, timeout=TIMEOUT)
    except CommandError as exc:
        raise ScrubError(f"e2fsck on {image} failed: {exc}") from None
    if result.returncode not in (0, 1):
        raise ScrubError(f"{image}: its journal needs replaying and e2fsck -E journal_only failed "
                         f"(exit {result.returncode}): {(result.stderr or result.stdout).strip()[-500:]}")


def _write_requests(requests: list[str]) -> str:
    with tempfile.NamedTemporaryFile("w", prefix="cello-scrub-", suffix=".debugfs", delete=False) as f:
        f.write("".join(r + "\n" for r in requests))
        return f.name


async def scrub_identity(image: str) -> list[str]:
    """Remove the node identity from the ext4 filesystem in `image` (see the module doc); returns the paths
    it changed, in order (`/etc/machine-id` when it was emptied, then each file removed). A node's image
    with nothing to scrub returns []. Raises ScrubError for a non-ext4 image or a scrub that did not take.
    The image must not be in use (mounted, or exported to a running node)."""
    if await _superblock(image):
        await _replay_journal(image)
        if await _superblock(image):
            raise ScrubError(f"{image}: its journal still needs replaying after e2fsck -E journal_only")
    changed, requests = _plan(await _listing(image))
    if not requests:
        return []
    cmdfile = await asyncio.to_thread(_write_requests, requests)
    try:
        await _debugfs(image, "-w", "-f", cmdfile)
    finally:
        await asyncio.to_thread(Path(cmdfile).unlink, True)
    left = _left_over(await _listing(image), changed)
    if left:
        raise ScrubError(f"debugfs -w on {image} left {', '.join(left)} (read-only image, or in use?)")
    return changed


async def stamp_template(image: str, os_name: str, version: str, source: str) -> None:
    """Write the root's `/etc/cello-template` (what a template build stamps, images/rootfs.py) for a version
    made by capture: a captured root still says which version it was cloned from, and its nodes would print
    that version at boot."""
    text = f"os={os_name}\nversion={version}\nsource={source}\n"
    for value in (os_name, version, source):
        if not _PLAIN_NAME.match(value.replace(":", "")):  # debugfs writes the file; the name rules hold
            raise ScrubError(f"cannot stamp {value!r} into {image}")

    def write_file() -> str:
        with tempfile.NamedTemporaryFile("w", prefix="cello-stamp-", delete=False) as f:
            f.write(text)
            return f.name

    host_file = await asyncio.to_thread(write_file)
    cmdfile = await asyncio.to_thread(_write_requests, [f"rm {STAMP}", f"write {host_file} {STAMP}"])
    try:
        await _debugfs(image, "-w", "-f", cmdfile)
    finally:
        await asyncio.to_thread(Path(cmdfile).unlink, True)
        await asyncio.to_thread(Path(host_file).unlink, True)
    if (await _debugfs(image, "-R", f"cat {STAMP}")) != text:
        raise ScrubError(f"debugfs -w on {image} did not write {STAMP}")
