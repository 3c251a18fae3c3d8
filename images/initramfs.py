"""The Cello tiny initramfs: busybox, `iscsistart` and the kernel modules an iSCSI root needs, as newc cpio.

The archive is written here rather than by `cpio -o`: a pure encoder can add `/dev/console` as a device
node without privileges (the kernel needs it to give /init a console) and tests can decode it again.
"""

from __future__ import annotations

import asyncio
import gzip
import os
import shutil
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from iscsi.runner import run_output

# Modules the initramfs loads, in this order (their dependencies come first, from `modprobe --show-depends`).
# NICs: e1000 is qemu's default and the lab's; virtio for VMs; e1000e/igb for common bare-metal boards.
# crc32c_generic: without it the iSCSI login fails ("Received iferror -12"), see LAB.md.
DEFAULT_MODULES: tuple[str, ...] = (
    "e1000",
    "e1000e",
    "igb",
    "virtio_pci",
    "virtio_net",
    "crc32c_generic",
    "iscsi_tcp",
    "iscsi_ibft",
    "sd_mod",
    "ext4",
)

# Module index files copied next to the modules so `depmod -b` can rebuild modules.dep for busybox modprobe.
_MODULE_INDEX_FILES = ("modules.order", "modules.builtin", "modules.builtin.modinfo")


# --- newc cpio codec (pure) ---------------------------------------------------------------------------

NEWC_MAGIC = b"070701"  # "new ASCII" format, see the kernel's Documentation/driver-api/early-userspace
NEWC_HEADER_SIZE = 110  # magic + 13 fields of 8 hex digits
NEWC_TRAILER = "TRAILER!!!"


class CpioError(ValueError):
    """A newc archive could not be decoded; `offset` is where."""

    def __init__(self, message: str, offset: int) -> None:
        super().__init__(f"{message} at byte {offset}")
        self.offset = offset


@dataclass(frozen=True)
class CpioEntry:
    name: str  # relative path, no leading "/"
    mode: int  # st_mode with the file type bits
    data: bytes = b""  # file content, or the target of a symlink
    rdev_major: int = 0
    rdev_minor: int = 0
    uid: int = 0
    gid: int = 0
    mtime: int = 0


def _pad4(n: int) -> int:
    return (4 - n % 4) % 4


def _header(ino: int, entry: CpioEntry, name_size: int) -> bytes:
    nlink = 2 if stat.S_ISDIR(entry.mode) else 1
    fields = (
        ino,
        entry.mode,
        entry.uid,
        entry.gid,
        nlink,
        entry.mtime,
        len(entry.data),
        0,  # devmajor
        0,  # devminor
        entry.rdev_major,
        entry.rdev_minor,
        name_size,
        0,  # check (only for the "crc" format)
    )
    return NEWC_MAGIC + b"".join(b"%08X" % f for f in fields)


def encode_newc(entries: Iterable[CpioEntry]) -> bytes:
    """Encode entries (parents before children) as one newc archive with its trailer."""
    out = bytearray()
    ino = 1
    for entry in [*entries, CpioEntry(NEWC_TRAILER, 0)]:
        name = entry.name.encode() + b"\0"
        if entry.name != NEWC_TRAILER and (entry.name.startswith("/") or not entry.name):
            raise ValueError(f"cpio entry name must be relative: {entry.name!r}")
        out += _header(ino if entry.name != NEWC_TRAILER else 0, entry, len(name))
        out += name + b"\0" * _pad4(NEWC_HEADER_SIZE + len(name))
        out += entry.data + b"\0" * _pad4(len(entry.data))
        ino += 1
    return bytes(out)


def decode_newc(data: bytes) -> list[CpioEntry]:
    """Decode a newc archive up to its trailer. Raises CpioError only."""
    entries: list[CpioEntry] = []
    pos = 0
    while True:
        if pos + NEWC_HEADER_SIZE > len(data):
            raise CpioError("truncated header", pos)
        if data[pos : pos + 6] != NEWC_MAGIC:
            raise CpioError("bad magic", pos)
        try:
            fields = [int(data[pos + 6 + 8 * i : pos + 14 + 8 * i], 16) for i in range(13)]
        except ValueError:
            raise CpioError("bad hex field", pos) from None
        mode, uid, gid, _nlink, mtime, size = fields[1:7]
        rdev_major, rdev_minor, name_size = fields[9:12]
        name_start = pos + NEWC_HEADER_SIZE
        name_end = name_start + name_size
        if name_size == 0 or name_end > len(data) or data[name_end - 1] != 0:
            raise CpioError("bad name", name_start)
        try:
            name = data[name_start : name_end - 1].decode()
        except UnicodeDecodeError:
            raise CpioError("name is not UTF-8", name_start) from None
        data_start = name_end + _pad4(NEWC_HEADER_SIZE + name_size)
        data_end = data_start + size
        if data_end > len(data):
            raise CpioError("truncated file data", data_start)
        if name == NEWC_TRAILER:
            return entries
        entries.append(
            CpioEntry(name, mode, data[data_start:data_end], rdev_major, rdev_minor, uid, gid, mtime)
        )
        pos = data_end + _pad4(size)


# --- parsers of tool output (pure) -------------------------------------------------------------------


def parse_show_depends(text: str) -> list[str]:
    """Module files from `modprobe --show-depends` output, in load order (builtins dropped)."""
    paths: list[str] = []
    for line in text.splitlines():
        words = line.split()
        if len(words) >= 2 and words[0] == "insmod":
            paths.append(words[1])
    return paths


def parse_ldd(text: str) -> list[str]:
    """Absolute library paths from `ldd` output (the vdso, which has no file, is dropped)."""
    libs: list[str] = []
    for line in text.splitlines():
        words = line.split()
        if "=>" in words:
            i = words.index("=>")
            if i + 1 < len(words) and words[i + 1].startswith("/"):
                libs.append(words[i + 1])
        elif words and words[0].startswith("/"):
            libs.append(words[0])
    return libs


def dedupe(items: Iterable[str]) -> list[str]:
    """Items in their first order, each once."""
    return list(dict.fromkeys(items))


# --- assembly (host files → staging tree → archive) ------------------------------------------------


@dataclass(frozen=True)
class HostKernel:
    version: str  # "6.1.0-57-amd64"
    image: Path  # /boot/vmlinuz-<version>
    modules: Path  # /lib/modules/<version>


def _version_key(version: str) -> list[tuple[int, str]]:
    parts: list[tuple[int, str]] = []
    for piece in version.replace("-", ".").split("."):
        parts.append((int(piece), "") if piece.isdigit() else (-1, piece))
    return parts


def find_host_kernel(boot_dir: Path = Path("/boot"), modules_dir: Path = Path("/lib/modules")) -> HostKernel:
    """The newest kernel in boot_dir that has its modules installed; FileNotFoundError if none."""
    candidates = []
    for image in boot_dir.glob("vmlinuz-*"):
        version = image.name.removeprefix("vmlinuz-")
        if (modules_dir / version / "modules.dep").exists() or (modules_dir / version / "kernel").is_dir():
            candidates.append(HostKernel(version, image, modules_dir / version))
    if not candidates:
        raise FileNotFoundError(f"no kernel in {boot_dir} with modules in {modules_dir}")
    return max(candidates, key=lambda k: _version_key(k.version))


def is_static_elf(path: Path) -> bool:
    """True when an ELF executable has no program interpreter (PT_INTERP), i.e. is statically linked."""
    with path.open("rb") as f:
        head = f.read(64)
        if len(head) < 64 or head[:4] != b"\x7fELF" or head[4] != 2:  # 64-bit only
            return False
        order: Literal["little", "big"] = "little" if head[5] == 1 else "big"
        phoff = int.from_bytes(head[32:40], order)
        phentsize = int.from_bytes(head[54:56], order)
        phnum = int.from_bytes(head[56:58], order)
        f.seek(phoff)
        table = f.read(phentsize * phnum)
    return not any(
        int.from_bytes(table[i * phentsize : i * phentsize + 4], order) == 3  # PT_INTERP
        for i in range(phnum)
    )


async def module_files(kernel: HostKernel, names: Sequence[str]) -> list[str]:
    """Absolute paths of the modules `names` and their dependencies, in load order, each once."""
    ordered: list[str] = []
    base = kernel.modules.parents[2]  # modprobe's -d: the folder holding lib/modules/<version>
    for name in names:
        base_args = [] if base == Path("/") else ["-d", str(base)]
        out = await run_output(["modprobe", *base_args, "-S", kernel.version, "--show-depends", name])
        ordered.extend("/" + p.lstrip("/") for p in parse_show_depends(out))
    return dedupe(ordered)


def busybox_applets_from_list(text: str) -> list[str]:
    """Applet paths from `busybox --list-full` ("usr/bin/[", "sbin/ifconfig", ...)."""
    return [line.strip() for line in text.splitlines() if line.strip() and "/" in line]


@dataclass(frozen=True)
class InitramfsInputs:
    kernel: HostKernel
    init_script: Path
    udhcpc_script: Path
    busybox: Path = Path("/bin/busybox")
    iscsistart: Path = Path("/usr/sbin/iscsistart")
    modules: tuple[str, ...] = DEFAULT_MODULES


def _tree_entries(stage: Path) -> list[CpioEntry]:
    """Every file, dir and symlink below stage as cpio entries (parents first), owned by root."""
    entries: list[CpioEntry] = []
    for dirpath, dirnames, filenames in os.walk(stage):
        dirnames.sort()
        base = Path(dirpath)
        rel_dir = base.relative_to(stage)
        if rel_dir != Path("."):
            entries.append(CpioEntry(str(rel_dir), stat.S_IFDIR | 0o755))
        for name in sorted(filenames) + [d for d in dirnames if (base / d).is_symlink()]:
            path = base / name
            rel = str(path.relative_to(stage))
            if path.is_symlink():
                entries.append(CpioEntry(rel, stat.S_IFLNK | 0o777, os.readlink(path).encode()))
            else:
                mode = path.stat().st_mode
                entries.append(CpioEntry(rel, stat.S_IFREG | stat.S_IMODE(mode), path.read_bytes()))
        dirnames[:] = [d for d in dirnames if not (base / d).is_symlink()]
    return entries


def copy_into(stage: Path, source: Path) -> None:
    """Copy a host file to the same absolute path inside stage (following symlinks for the content)."""
    target = stage / str(source).lstrip("/")
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(source, target)


async def host_libraries(*binaries: Path) -> list[str]:
    """The shared libraries (and the loader) the binaries need on this host, from `ldd`, each once."""
    libs: list[str] = []
    for binary in binaries:
        libs += parse_ldd(await run_output(["ldd", str(binary)]))
    return dedupe(libs)


def _stage(stage: Path, inputs: InitramfsInputs, modules: list[str], libs: list[str], applets: list[str]) -> None:
    for d in ("proc", "sys", "dev", "run", "tmp", "newroot", "etc", "bin", "sbin", "usr/bin", "usr/sbin"):
        (stage / d).mkdir(parents=True, exist_ok=True)
    shutil.copy2(inputs.busybox, stage / "bin/busybox")
    for applet in applets:
        link = stage / applet
        if link.exists() or link.is_symlink() or applet == "bin/busybox":
            continue
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to("/bin/busybox")
    shutil.copy2(inputs.iscsistart, stage / "sbin/iscsistart")
    for lib in libs:
        copy_into(stage, Path(lib))
    kernel = inputs.kernel
    staged_modules = stage / "lib/modules" / kernel.version
    load_order: list[str] = []
    for module in modules:
        rel = Path(module).relative_to(kernel.modules)
        (staged_modules / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(module, staged_modules / rel)
        load_order.append(f"/lib/modules/{kernel.version}/{rel}")
    for index in _MODULE_INDEX_FILES:
        if (kernel.modules / index).exists():
            shutil.copy2(kernel.modules / index, staged_modules / index)
    (stage / "etc/cello-modules").write_text("".join(m + "\n" for m in load_order))
    shutil.copy2(inputs.init_script, stage / "init")
    (stage / "init").chmod(0o755)
    shutil.copy2(inputs.udhcpc_script, stage / "etc/udhcpc.script")
    (stage / "etc/udhcpc.script").chmod(0o755)
    (stage / "etc/iscsi").mkdir(exist_ok=True)


def _pack(stage: Path, out: Path) -> int:
    devices = [
        CpioEntry("dev/console", stat.S_IFCHR | 0o600, rdev_major=5, rdev_minor=1),
        CpioEntry("dev/null", stat.S_IFCHR | 0o666, rdev_major=1, rdev_minor=3),
    ]
    entries = _tree_entries(stage)
    dev_index = next(i for i, e in enumerate(entries) if e.name == "dev") + 1
    entries[dev_index:dev_index] = devices
    archive = gzip.compress(encode_newc(entries), compresslevel=6, mtime=0)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_bytes(archive)
    tmp.replace(out)
    return len(archive)


async def build_initramfs(inputs: InitramfsInputs, out: Path, scratch: Path) -> int:
    """Write the gzip'd newc initramfs to `out`; return its size. `scratch` is an empty work folder."""
    modules = await module_files(inputs.kernel, inputs.modules)
    libs = await host_libraries(inputs.iscsistart)
    applets = busybox_applets_from_list(await run_output([str(inputs.busybox), "--list-full"]))
    stage = scratch / "initramfs"
    await asyncio.to_thread(_stage, stage, inputs, modules, libs, applets)
    await run_output(["depmod", "-b", str(stage), inputs.kernel.version])
    return await asyncio.to_thread(_pack, stage, out)
