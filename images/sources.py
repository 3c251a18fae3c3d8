"""Template sources: parse and check a source string before any build work starts.

    tiny               the host's kernel + a busybox root and Cello's own iSCSI initramfs (seconds)
    debian[:SUITE]     a Debian root via debootstrap, booted by its own initramfs-tools iSCSI initramfs
    tar:/path/rootfs.tar   an operator's root filesystem tarball (any compression GNU tar reads)
"""

from __future__ import annotations

import shutil
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from images.initramfs import find_host_kernel, is_static_elf

SourceKind = Literal["tiny", "debian", "tar"]
DEFAULT_DEBIAN_SUITE = "bookworm"
_SUITE_CHARS = set("abcdefghijklmnopqrstuvwxyz0123456789-")


class TemplateSourceError(ValueError):
    """A template source string is unusable; the message says why and what to install or fix."""


@dataclass(frozen=True)
class TemplateSource:
    kind: SourceKind
    tar_path: Path | None = None
    suite: str = DEFAULT_DEBIAN_SUITE

    def __str__(self) -> str:
        if self.kind == "tar":
            return f"tar:{self.tar_path}"
        if self.kind == "debian" and self.suite != DEFAULT_DEBIAN_SUITE:
            return f"debian:{self.suite}"
        return self.kind


@dataclass(frozen=True)
class HostPaths:
    """Where the host's tools and kernel are; injectable so tests can model a host without them."""

    path: str | None = None  # PATH for finding commands; None = the process's PATH
    boot_dir: Path = Path("/boot")
    modules_dir: Path = Path("/lib/modules")
    busybox: Path = Path("/bin/busybox")
    iscsistart: Path = Path("/usr/sbin/iscsistart")
    iscsid: Path = Path("/usr/sbin/iscsid")  # the tiny root's initiator daemon (session recovery)
    extra_sbin: tuple[str, ...] = field(default=("/usr/sbin", "/sbin"))

    def which(self, command: str) -> str | None:
        found = shutil.which(command, path=self.path)
        if found is None and self.path is None:
            for folder in self.extra_sbin:
                found = shutil.which(command, path=folder)
                if found:
                    break
        return found


# command → Debian package that provides it
_TOOLS_COMMON = {"mkfs.ext4": "e2fsprogs"}
_TOOLS_INITRAMFS = {"modprobe": "kmod", "depmod": "kmod", "ldd": "libc-bin"}
_TOOLS_BY_KIND: dict[SourceKind, dict[str, str]] = {
    "tiny": {**_TOOLS_COMMON, **_TOOLS_INITRAMFS},
    "debian": {**_TOOLS_COMMON, "debootstrap": "debootstrap", "chroot": "coreutils", "unshare": "util-linux"},
    "tar": {**_TOOLS_COMMON, "tar": "tar"},
}


def parse_source(source: str) -> TemplateSource:
    """Syntax only: which kind of source, and its argument. Raises TemplateSourceError."""
    if source == "tiny":
        return TemplateSource("tiny")
    if source == "debian" or source.startswith("debian:"):
        suite = source.partition(":")[2] or DEFAULT_DEBIAN_SUITE
        if not set(suite) <= _SUITE_CHARS or not suite[0].isalpha():
            raise TemplateSourceError(f"template source {source!r}: bad Debian suite name {suite!r}")
        return TemplateSource("debian", suite=suite)
    if source.startswith("tar:"):
        raw = source.removeprefix("tar:")
        if not raw:
            raise TemplateSourceError("template source 'tar:' needs a path: tar:/path/to/rootfs.tar")
        path = Path(raw)
        if not path.is_absolute():
            raise TemplateSourceError(f"template source {source!r}: the tar path must be absolute")
        return TemplateSource("tar", tar_path=path)
    raise TemplateSourceError(
        f"unknown template source {source!r}: use 'tiny', 'debian' (or 'debian:SUITE') or 'tar:/path/rootfs.tar'"
    )


def missing_host_packages(kind: SourceKind, host: HostPaths) -> list[str]:
    """What the host lacks for this kind of build, as 'thing (apt package)' strings."""
    missing = [f"{cmd} (apt install {pkg})" for cmd, pkg in _TOOLS_BY_KIND[kind].items() if not host.which(cmd)]
    if kind == "tiny":
        missing += missing_initramfs_inputs(host)
        if not host.iscsid.exists():  # the tiny root runs it to recover its session
            missing.append(f"{host.iscsid} (apt install open-iscsi)")
    return missing


def missing_initramfs_inputs(host: HostPaths) -> list[str]:
    """What Cello's own initramfs needs from the host: kernel + modules, static busybox, iscsistart."""
    missing: list[str] = []
    try:
        find_host_kernel(host.boot_dir, host.modules_dir)
    except FileNotFoundError:
        missing.append(f"a kernel in {host.boot_dir} with its modules (apt install linux-image-amd64)")
    if not host.busybox.exists():
        missing.append(f"{host.busybox} (apt install busybox-static)")
    elif not is_static_elf(host.busybox):
        missing.append(f"a statically linked {host.busybox} (apt install busybox-static)")
    if not host.iscsistart.exists():
        missing.append(f"{host.iscsistart} (apt install open-iscsi)")
    missing += [f"{cmd} (apt install {pkg})" for cmd, pkg in _TOOLS_INITRAMFS.items() if not host.which(cmd)]
    return missing


def check_source(source: str, host: HostPaths | None = None) -> TemplateSource:
    """Parse a source and check that this host can build it. Raises TemplateSourceError saying what to do."""
    parsed = parse_source(source)
    host = host or HostPaths()
    if parsed.kind == "tar":
        assert parsed.tar_path is not None
        if not parsed.tar_path.is_file():
            raise TemplateSourceError(f"template source {source!r}: no such file {parsed.tar_path}")
        try:
            with parsed.tar_path.open("rb"):
                pass
        except OSError as exc:
            raise TemplateSourceError(f"template source {source!r}: cannot read it: {exc}") from None
        if not tarfile.is_tarfile(parsed.tar_path):
            raise TemplateSourceError(f"template source {source!r}: {parsed.tar_path} is not a tar archive")
    missing = missing_host_packages(parsed.kind, host)
    if missing:
        raise TemplateSourceError(
            f"this host cannot build template source {source!r}; missing: " + ", ".join(missing)
        )
    return parsed
