"""OS template builds: source → root filesystem → template volume → snapshot `@vN` → kernel + initrd.

A build makes one new template version. Its steps, each undone when a later one fails:

1. check the source (TemplateSourceError says what is wrong or which apt package is missing)
2. make the root tree and its kernel + initrd in a scratch folder under `workdir`
3. stage kernel + initrd under `files_root/templates/<os>/.<version>.partial`
4. create the template volume `<os>-template` if it does not exist yet   (undo: destroy it)
5. `mkfs.ext4 -F -L cello-root -d <rootdir> <volume path>`
6. `snapshot_template(os, version)`                                       (undo: destroy the snapshot)
7. publish the boot files by renaming the staging folder to `<version>`

Existing clones are never touched: they hang off earlier snapshots. The scratch folder is always removed.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import naming
from images.rootfs import IMAGE_BUILD_DIR, ROOT_LABEL, Progress, RootfsContext, make_rootfs, tree_size
from images.sources import (
    HostPaths,
    TemplateSource,
    TemplateSourceError,
    check_source,
    parse_source,
)
from iscsi import names
from iscsi.model import StorageError, VolumeBackend
from iscsi.runner import CommandError, run_output

__all__ = [
    "TemplateBuild",
    "TemplateBuildError",
    "TemplateSource",
    "TemplateSourceError",
    "build_template",
    "check_source",
    "default_size",
    "next_version",
    "parse_source",
    "validate_source",
]

MiB = 1024 * 1024
GiB = 1024 * MiB
# DESIGN.md: template volumes are 100G sparse by default — the size is a ceiling, not an allocation.
# mkfs runs with lazy inode-table init (the template stays a few MiB) and the nodes mount with
# noinit_itable, so no clone's kernel zeroes gigabytes of inode tables into its own volume.
DEFAULT_SIZE = 100 * GiB


class TemplateBuildError(Exception):
    """A template build failed; nothing of the new version is left behind."""


@dataclass(frozen=True)
class TemplateBuild:
    os_name: str
    version: str  # "v1"
    source: str  # canonical source string ("tiny", "tar:/path/rootfs.tar", ...)
    size: int  # bytes of the template volume
    volume: str  # "<os>-template"
    snapshot: str  # "<os>-template@<version>"
    kernel: str  # relative to files_root, e.g. "templates/tiny/v1/vmlinuz"
    initrd: str  # relative to files_root, e.g. "templates/tiny/v1/initrd.img"
    created_volume: bool  # this build made the template volume (first version)


async def validate_source(source: str, host: HostPaths | None = None) -> TemplateSource:
    """check_source off the event loop: for the API to refuse a bad source (400) before starting a build."""
    return await asyncio.to_thread(check_source, source, host)


def template_volume(os_name: str) -> str:
    return f"{os_name}-template"


def validate_names(os_name: str, version: str) -> None:
    naming.TEMPLATE.check(os_name, TemplateBuildError)
    naming.VERSION.check(version, TemplateBuildError)


async def next_version(backend: VolumeBackend, os_name: str) -> str:
    """`v<N+1>` for the highest existing snapshot `<os>-template@vN` (v1 when there is none)."""
    prefix = template_volume(os_name) + "@"
    numbers = [
        naming.version_number(snap[len(prefix):])
        for snap in await backend.snapshots()
        if snap.startswith(prefix) and naming.VERSION.ok(snap[len(prefix):])
    ]
    return f"v{max(numbers, default=0) + 1}"


def default_size(rootdir_bytes: int = 0) -> int:
    """The default template volume size: 100G, or twice what the root tree holds plus headroom."""
    wanted = 2 * rootdir_bytes + 256 * MiB
    return max(DEFAULT_SIZE, -(-wanted // MiB) * MiB)


def boot_dir(files_root: Path, os_name: str, version: str) -> Path:
    return files_root / "templates" / os_name / version


def _stage_boot_files(kernel: Path, initrd: Path, staging: Path) -> None:
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    shutil.copyfile(kernel, staging / "vmlinuz")
    shutil.copyfile(initrd, staging / "initrd.img")
    for name in ("vmlinuz", "initrd.img"):
        (staging / name).chmod(0o644)


def mounts_below(path: Path, mountinfo: str) -> list[str]:
    """Mount points at or below `path` in /proc/self/mountinfo text, deepest first."""
    prefix = str(path.resolve()).rstrip("/")
    points = []
    for line in mountinfo.splitlines():
        fields = line.split()
        if len(fields) > 4:
            point = fields[4].replace("\\040", " ")
            if point == prefix or point.startswith(prefix + "/"):
                points.append(point)
    return sorted(points, key=len, reverse=True)


def _unmount_below(path: Path) -> None:
    """Lazily unmount what an interrupted earlier build left mounted in its scratch folder (e.g. /proc)."""
    try:
        mountinfo = Path("/proc/self/mountinfo").read_text()
    except OSError:
        return
    for point in mounts_below(path, mountinfo):
        subprocess.run(["umount", "-l", point], capture_output=True, check=False, timeout=30)


def _remove_tree(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        _unmount_below(path)
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


async def build_template(
    backend: VolumeBackend,
    os_name: str,
    version: str | None,
    source: str,
    files_root: Path,
    workdir: Path,
    progress: Progress,
    *,
    size: int | None = None,
    host: HostPaths | None = None,
    image_build_dir: Path = IMAGE_BUILD_DIR,
    debian_mirror: str | None = None,
) -> TemplateBuild:
    """Build template `os_name` version `version` (None = the next free vN) from `source`.

    Raises TemplateSourceError for an unusable source (before anything is made) and TemplateBuildError
    when a step fails; in both cases no part of the new version is left (see the module docstring).
    """
    host = host or HostPaths()
    parsed = await validate_source(source, host)
    version = version or await next_version(backend, os_name)
    validate_names(os_name, version)
    volume = template_volume(os_name)
    snapshot = f"{volume}@{version}"
    if snapshot in await backend.snapshots():
        raise TemplateBuildError(f"template {os_name} already has version {version}")
    final_boot = boot_dir(files_root, os_name, version)
    if final_boot.exists():
        raise TemplateBuildError(f"boot files for {os_name} {version} already exist in {final_boot}")

    scratch = workdir / f"build-{os_name}-{version}"
    staging = final_boot.with_name(f".{version}.partial")
    undo: list[tuple[str, Callable[[], Awaitable[None]]]] = []
    progress(f"build {os_name} {version} from {parsed}")
    try:
        await asyncio.to_thread(_remove_tree, scratch)
        await asyncio.to_thread(scratch.mkdir, parents=True)
        ctx = RootfsContext(os_name, version, scratch, host, progress, image_build_dir, debian_mirror)
        rootdir = scratch / "root"
        boot = await make_rootfs(rootdir, parsed, ctx)

        undo.append(("boot files", lambda: asyncio.to_thread(_remove_tree, staging)))
        await asyncio.to_thread(_stage_boot_files, boot.kernel, boot.initrd, staging)

        existing = {v.name: v for v in await backend.list()}
        created = volume not in existing
        if created:
            want = size or default_size(await asyncio.to_thread(tree_size, rootdir))
            names.lun_size(want, f"template volume {volume} (its clones become LUNs)")
            progress(f"volume: creating {volume} ({want // MiB} MiB, sparse)")
            info = await backend.create_template(os_name, want)
            undo.append((f"volume {volume}", lambda: backend.destroy(volume)))
        else:
            info = existing[volume]
            names.lun_size(info.size, f"template volume {volume} (its clones become LUNs)")
            if size is not None and size != info.size:
                progress(f"volume: {volume} exists with {info.size // MiB} MiB; keeping that size")
        progress(f"filesystem: mkfs.ext4 -L {ROOT_LABEL} -d <root> on {volume}")
        await run_output(
            [
                "mkfs.ext4", "-F", "-q", "-L", ROOT_LABEL,
                "-E", "lazy_itable_init=1,lazy_journal_init=1,nodiscard",
                "-d", str(rootdir), backend.path(volume),
            ],
            timeout=1800,
        )  # fmt: skip

        progress(f"snapshot: {snapshot}")
        await backend.snapshot_template(os_name, version)
        undo.append((f"snapshot {snapshot}", lambda: backend.destroy_snapshot(os_name, version)))

        await asyncio.to_thread(staging.replace, final_boot)
        undo.append(("published boot files", lambda: asyncio.to_thread(_remove_tree, final_boot)))
        result = TemplateBuild(
            os_name=os_name,
            version=version,
            source=str(parsed),
            size=info.size,
            volume=volume,
            snapshot=snapshot,
            kernel=str(final_boot.relative_to(files_root) / "vmlinuz"),
            initrd=str(final_boot.relative_to(files_root) / "initrd.img"),
            created_volume=created,
        )
        progress(f"done: {os_name} {version} ({result.kernel}, {result.initrd})")
        return result
    except BaseException as exc:
        await _undo(undo, progress)
        if isinstance(exc, TemplateSourceError | TemplateBuildError) or not isinstance(exc, Exception):
            raise
        if isinstance(exc, CommandError | StorageError | OSError):
            raise TemplateBuildError(f"template {os_name} {version}: {exc}") from exc
        raise
    finally:
        await asyncio.to_thread(_remove_tree, scratch)


async def _undo(undo: list[tuple[str, Callable[[], Awaitable[None]]]], progress: Progress) -> None:
    """Run the compensations newest first; one failing does not stop the others."""
    for what, step in reversed(undo):
        try:
            await asyncio.shield(step())
            progress(f"undo: removed {what}")
        except Exception as exc:  # report and go on: the rest must still be undone
            progress(f"undo: could not remove {what}: {exc}")
