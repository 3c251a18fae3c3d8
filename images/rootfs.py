"""Root filesystem trees for the template sources, each made in a scratch folder, plus their kernel + initrd.

Each maker fills `rootdir` and returns where the kernel and initrd for this template are; the build then
packs `rootdir` into the template volume with `mkfs.ext4 -d`.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from images.initramfs import (
    InitramfsInputs,
    build_initramfs,
    busybox_applets_from_list,
    copy_into,
    find_host_kernel,
    host_libraries,
)
from images.sources import HostPaths, TemplateSource, TemplateSourceError, missing_initramfs_inputs
from iscsi.runner import CommandError, run_output

# The repository's image-build/ folder (scripts installed into images). Overridable for installed copies.
# A checkout keeps the build scripts beside the packages; an installed appliance (the FreeBSD image)
# has them under share/cello.
_CHECKOUT_IMAGE_BUILD = Path(__file__).resolve().parent.parent / "image-build"
IMAGE_BUILD_DIR = (_CHECKOUT_IMAGE_BUILD if _CHECKOUT_IMAGE_BUILD.is_dir()
                   else Path(sys.prefix) / "share" / "cello" / "image-build")

# Modules the Debian initramfs must carry for an iSCSI root (initramfs-tools adds their dependencies).
DEBIAN_INITRAMFS_MODULES = ("e1000", "e1000e", "igb", "virtio_pci", "virtio_net", "crc32c_generic",
                            "iscsi_tcp", "iscsi_ibft", "sd_mod", "ext4")
DEBIAN_PACKAGES = ("linux-image-amd64", "open-iscsi", "initramfs-tools", "systemd-sysv", "udev", "kmod",
                   "busybox", "e2fsprogs", "iproute2")
ROOT_LABEL = "cello-root"

Progress = Callable[[str], None]


@dataclass(frozen=True)
class BootFiles:
    kernel: Path
    initrd: Path


@dataclass(frozen=True)
class RootfsContext:
    os_name: str
    version: str
    scratch: Path  # empty work folder for this build
    host: HostPaths
    progress: Progress
    image_build_dir: Path = IMAGE_BUILD_DIR
    debian_mirror: str | None = None  # None = the host's own apt mirror


def _write_template_stamp(rootdir: Path, ctx: RootfsContext, source: TemplateSource) -> None:
    etc = rootdir / "etc"
    etc.mkdir(parents=True, exist_ok=True)
    (etc / "cello-template").write_text(f"os={ctx.os_name}\nversion={ctx.version}\nsource={source}\n")


async def _cello_initramfs(ctx: RootfsContext) -> BootFiles:
    """Host kernel + Cello's own iSCSI initramfs (used by `tiny`, and by tarballs that bring no kernel)."""
    missing = missing_initramfs_inputs(ctx.host)
    if missing:
        raise TemplateSourceError("cannot make Cello's initramfs; missing: " + ", ".join(missing))
    kernel = find_host_kernel(ctx.host.boot_dir, ctx.host.modules_dir)
    out = ctx.scratch / "initrd.img"
    ctx.progress(f"initramfs: kernel {kernel.version}, busybox, iscsistart")
    size = await build_initramfs(
        InitramfsInputs(
            kernel=kernel,
            init_script=ctx.image_build_dir / "tiny/init",
            udhcpc_script=ctx.image_build_dir / "tiny/udhcpc.script",
            busybox=ctx.host.busybox,
            iscsistart=ctx.host.iscsistart,
        ),
        out,
        ctx.scratch,
    )
    ctx.progress(f"initramfs: {size // 1024} KiB")
    return BootFiles(kernel.image, out)


# --- tiny ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TinyInputs:
    busybox: Path
    applets: list[str]
    rootinit: Path
    iscsid: Path  # open-iscsi's daemon: it takes the root session over after switch_root
    iscsid_conf: Path  # its root-on-iSCSI settings (image-build/tiny/iscsid.conf)
    libs: list[str]  # what iscsid links against (ldd), copied to the same paths


def _fill_tiny(rootdir: Path, tiny: TinyInputs) -> None:
    for d in ("bin", "sbin", "usr/bin", "usr/sbin", "etc/iscsi", "proc", "sys", "dev", "tmp", "run", "root",
              "var/tmp"):
        (rootdir / d).mkdir(parents=True, exist_ok=True)
    (rootdir / "tmp").chmod(0o1777)
    shutil.copy2(tiny.busybox, rootdir / "bin/busybox")
    for applet in tiny.applets:
        link = rootdir / applet
        if applet in ("bin/busybox", "sbin/init") or link.exists() or link.is_symlink():
            continue
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to("/bin/busybox")
    shutil.copy2(tiny.rootinit, rootdir / "sbin/init")
    (rootdir / "sbin/init").chmod(0o755)
    shutil.copy2(tiny.iscsid, rootdir / "sbin/iscsid")
    for lib in tiny.libs:
        copy_into(rootdir, Path(lib))
    shutil.copy2(tiny.iscsid_conf, rootdir / "etc/iscsi/iscsid.conf")
    (rootdir / "etc/iscsi/iscsid.conf").chmod(0o600)
    (rootdir / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (rootdir / "etc/group").write_text("root:x:0:\n")
    (rootdir / "etc/hostname").write_text("cello-tiny\n")
    (rootdir / "etc/os-release").write_text('NAME="Cello tiny"\nID=cello-tiny\n')


async def make_tiny(rootdir: Path, source: TemplateSource, ctx: RootfsContext) -> BootFiles:
    ctx.progress("rootfs: busybox root with the Cello marker init and iscsid")
    tiny = TinyInputs(
        busybox=ctx.host.busybox,
        applets=busybox_applets_from_list(await run_output([str(ctx.host.busybox), "--list-full"])),
        rootinit=ctx.image_build_dir / "tiny/rootinit",
        iscsid=ctx.host.iscsid,
        iscsid_conf=ctx.image_build_dir / "tiny/iscsid.conf",
        libs=await host_libraries(ctx.host.iscsid),
    )
    await asyncio.to_thread(_fill_tiny, rootdir, tiny)
    await asyncio.to_thread(_write_template_stamp, rootdir, ctx, source)
    return await _cello_initramfs(ctx)


# --- tar -------------------------------------------------------------------------------------------


def _newest(folder: Path, pattern: str) -> Path | None:
    found = sorted(p for p in folder.glob(pattern) if p.is_file() and not p.is_symlink())
    return found[-1] if found else None


def tarball_boot_files(rootdir: Path) -> BootFiles | None:
    """A kernel and initrd of the same version inside an unpacked root (/boot/vmlinuz-V, initrd.img-V)."""
    boot = rootdir / "boot"
    for kernel in sorted(boot.glob("vmlinuz-*"), reverse=True):
        initrd = boot / ("initrd.img-" + kernel.name.removeprefix("vmlinuz-"))
        if kernel.is_file() and initrd.is_file():
            return BootFiles(kernel, initrd)
    return None


async def make_tar(rootdir: Path, source: TemplateSource, ctx: RootfsContext) -> BootFiles:
    assert source.tar_path is not None
    ctx.progress(f"rootfs: unpacking {source.tar_path}")
    try:
        await run_output(["tar", "-x", "--numeric-owner", "-p", "-f", str(source.tar_path), "-C", str(rootdir)])
    except CommandError as exc:
        raise TemplateSourceError(f"template source {source}: cannot unpack it: {exc}") from None
    if not await asyncio.to_thread(lambda: any(rootdir.iterdir())):
        raise TemplateSourceError(f"template source {source}: the archive is empty")
    await asyncio.to_thread(_write_template_stamp, rootdir, ctx, source)
    own = await asyncio.to_thread(tarball_boot_files, rootdir)
    if own is not None:
        ctx.progress(f"boot files from the tarball: {own.kernel.name}, {own.initrd.name}")
        return own
    ctx.progress("the tarball has no /boot/vmlinuz-V + initrd.img-V: using the host kernel and Cello's initramfs")
    return await _cello_initramfs(ctx)


# --- debian ----------------------------------------------------------------------------------------


def host_debian_mirror(
    sources: tuple[Path, ...] = (Path("/etc/apt/sources.list.d"), Path("/etc/apt/sources.list"))
) -> str:
    """The Debian archive URI this host's apt uses (deb822 .sources or one-line sources.list)."""
    files: list[Path] = []
    for entry in sources:
        if entry.is_dir():
            files += sorted(p for p in entry.iterdir() if p.suffix in (".sources", ".list"))
        elif entry.is_file():
            files.append(entry)
    for path in files:
        for uri in _uris(path.read_text(errors="replace"), deb822=path.suffix == ".sources"):
            if uri.rstrip("/").endswith("/debian"):
                return uri.rstrip("/")
    raise TemplateSourceError("no Debian archive in this host's apt sources: give the build a mirror")


def _uris(text: str, *, deb822: bool) -> list[str]:
    uris: list[str] = []
    for line in text.splitlines():
        line = line.strip()
        if deb822 and line.lower().startswith("uris:"):
            uris += line.split(":", 1)[1].split()
        elif not deb822 and line.startswith("deb "):
            words = [w for w in line.split()[1:] if not w.startswith("[")]
            if words:
                uris.append(words[0])
    return uris


def conf_settings(text: str) -> dict[str, str]:
    """The `key = value` lines of an open-iscsi config (comments and blank lines skipped)."""
    settings: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and not line.lstrip().startswith("#"):
            settings[key.strip()] = value.strip()
    return settings


def with_settings(text: str, settings: dict[str, str]) -> str:
    """An open-iscsi config with these keys set: a key's active line is replaced in place (a second one
    dropped); a key with none takes the place of its first commented-out line, or is appended."""
    lines = text.splitlines()
    active = set(conf_settings(text)) & set(settings)
    pending = dict(settings)
    out: list[str] = []
    for line in lines:
        commented = line.lstrip().startswith("#")
        key = line.lstrip().lstrip("#").partition("=")[0].strip()
        if "=" not in line or key not in settings or (commented and key in active):
            out.append(line)
        elif key in pending:
            out.append(f"{key} = {pending.pop(key)}")
        elif not commented:
            continue  # a second active line for a key already set
        else:
            out.append(line)
    out += [f"{key} = {value}" for key, value in pending.items()]
    return "\n".join(out) + "\n"


def _enable_unit(units: Path, target: str, unit: Path) -> None:
    wants = units / f"{target}.wants"
    wants.mkdir(parents=True, exist_ok=True)
    link = wants / unit.name
    if not link.is_symlink():
        link.symlink_to(unit)


def _configure_debian_iscsid(rootdir: Path, scripts: Path) -> None:
    """open-iscsi for a root on iSCSI: the tiny template's root-on-iSCSI settings in iscsid.conf (and in the
    initramfs, for iscsistart), iscsid started at sysinit, and kept off the root disk while it logs in."""
    etc = rootdir / "etc"
    conf = etc / "iscsi/iscsid.conf"
    current = conf.read_text() if conf.exists() else ""
    conf.write_text(with_settings(current, conf_settings((scripts / "tiny/iscsid.conf").read_text())))
    conf.chmod(0o600)
    hooks = etc / "initramfs-tools/hooks"
    hooks.mkdir(parents=True, exist_ok=True)
    shutil.copy2(scripts / "debian/iscsi-conf-hook", hooks / "cello-iscsi-conf")
    (hooks / "cello-iscsi-conf").chmod(0o755)
    units = etc / "systemd/system"
    (units / "iscsid.service.d").mkdir(parents=True, exist_ok=True)
    shutil.copy2(scripts / "debian/iscsid-root.conf", units / "iscsid.service.d/cello-root.conf")
    _enable_unit(units, "sysinit.target", Path("/lib/systemd/system/iscsid.service"))


def _configure_debian(rootdir: Path, scripts: Path) -> None:
    etc = rootdir / "etc"
    (etc / "iscsi").mkdir(parents=True, exist_ok=True)
    # An existing (empty) iscsi.initramfs makes open-iscsi's hook put iscsistart into the initramfs, whose
    # local-top script then logs in from the ISCSI_* keys on the kernel command line.
    (etc / "iscsi/iscsi.initramfs").write_text("")
    _configure_debian_iscsid(rootdir, scripts)
    modules = etc / "initramfs-tools/modules"
    with modules.open("a") as f:
        f.write("".join(m + "\n" for m in DEBIAN_INITRAMFS_MODULES))
    (etc / "initramfs-tools/conf.d").mkdir(parents=True, exist_ok=True)
    (etc / "initramfs-tools/conf.d/cello").write_text(f"ROOT=LABEL={ROOT_LABEL}\n")
    # noinit_itable: see template_build (lazy inode tables must not be zeroed into each clone).
    (etc / "fstab").write_text(f"LABEL={ROOT_LABEL} / ext4 defaults,_netdev,noinit_itable 0 1\n")
    (etc / "hostname").write_text("cello-node\n")
    sbin = rootdir / "usr/local/sbin"
    sbin.mkdir(parents=True, exist_ok=True)
    shutil.copy2(scripts / "debian/cello-booted", sbin / "cello-booted")
    (sbin / "cello-booted").chmod(0o755)
    units = etc / "systemd/system"
    shutil.copy2(scripts / "debian/cello-booted.service", units / "cello-booted.service")
    _enable_unit(units, "multi-user.target", Path("/etc/systemd/system/cello-booted.service"))
    # Nodes share one template: each clone must make its own machine-id on first boot.
    (etc / "machine-id").write_text("")


async def make_debian(rootdir: Path, source: TemplateSource, ctx: RootfsContext) -> BootFiles:
    mirror = ctx.debian_mirror
    if mirror is None:
        mirror = await asyncio.to_thread(host_debian_mirror)
    ctx.progress(f"rootfs: debootstrap {source.suite} (minbase + kernel + open-iscsi); this takes minutes")
    # The .debs are kept beside the scratch folders (in the build workdir) so a rebuild downloads less.
    cache = ctx.scratch.parent / "debootstrap-cache"
    await asyncio.to_thread(cache.mkdir, parents=True, exist_ok=True)
    await run_output(
        [
            "debootstrap",
            "--variant=minbase",
            f"--cache-dir={cache.resolve()}",
            "--include=" + ",".join(DEBIAN_PACKAGES),
            source.suite,
            str(rootdir),
            mirror,
        ],
        timeout=3600,
    )
    ctx.progress("rootfs: initramfs-tools set up for an iSCSI root")
    await asyncio.to_thread(_configure_debian, rootdir, ctx.image_build_dir)
    await asyncio.to_thread(_write_template_stamp, rootdir, ctx, source)
    # unshare: /proc for the chroot lives in a private mount namespace, so it is gone when the command
    # ends, even if this process is killed mid-build (no mount left under the scratch folder).
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C"}
    in_root = ["unshare", "--mount", "--propagation", "private", f"--mount-proc={rootdir / 'proc'}",
               "chroot", str(rootdir)]
    await run_output([*in_root, "update-initramfs", "-u", "-k", "all"], env=env, timeout=900)
    await run_output(["chroot", str(rootdir), "apt-get", "clean"], env=env)
    files = await asyncio.to_thread(tarball_boot_files, rootdir)
    if files is None:
        raise TemplateSourceError("debootstrap made no /boot/vmlinuz-V and initrd.img-V")
    return files


async def make_rootfs(rootdir: Path, source: TemplateSource, ctx: RootfsContext) -> BootFiles:
    """Fill rootdir for this source; return its kernel and initrd (which may lie inside rootdir)."""
    await asyncio.to_thread(rootdir.mkdir, parents=True, exist_ok=True)
    if source.kind == "tiny":
        return await make_tiny(rootdir, source, ctx)
    if source.kind == "tar":
        return await make_tar(rootdir, source, ctx)
    return await make_debian(rootdir, source, ctx)


def tree_size(rootdir: Path) -> int:
    """Bytes the files below rootdir hold (apparent size; symlinks counted as their own size)."""
    total = 0
    for dirpath, _dirs, files in os.walk(rootdir):
        for name in files:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except OSError:
                continue
    return total
