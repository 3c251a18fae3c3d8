"""Template builds against real tools: mkfs.ext4 -d, debugfs, tar, modprobe, depmod — and real sparse volumes.

The volumes come from the project's real FileBackend (sparse image files; snapshots and clones are
reflink or sparse copies), the backend the appliance uses where there is no ZFS.
"""

from __future__ import annotations

import gzip
import io
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from images.build import (
    TemplateBuildError,
    TemplateSourceError,
    build_template,
    next_version,
)
from images.initramfs import decode_newc
from iscsi.file_backend import FileBackend
from iscsi.model import VolumeBackend

UUID_A = "3f1c2b4e-0000-4000-8000-0000000000a1"


def make_backend(directory: Path) -> VolumeBackend:
    backend: VolumeBackend = FileBackend(directory)
    return backend


def debugfs_cat(image: str, path: str) -> str:
    out = subprocess.run(["debugfs", "-R", f"cat {path}", image], capture_output=True, check=True, timeout=30)
    return out.stdout.decode()


def debugfs_write(image: str, local: Path, path: str) -> None:
    subprocess.run(["debugfs", "-w", "-R", f"write {local} {path}", image], capture_output=True, check=True,
                   timeout=30)


@pytest.fixture
def lab(tmp_path: Path) -> dict[str, Path]:
    dirs = {name: tmp_path / name for name in ("volumes", "files", "work")}
    for d in dirs.values():
        d.mkdir()
    return dirs


async def test_tiny_builds_v1_with_marker_init_and_boot_files(lab: dict[str, Path]) -> None:
    backend = make_backend(lab["volumes"])
    lines: list[str] = []
    build = await build_template(backend, "tiny", None, "tiny", lab["files"], lab["work"], lines.append)

    assert (build.version, build.snapshot, build.created_volume) == ("v1", "tiny-template@v1", True)
    assert build.size == 100 * 1024**3  # DESIGN.md's default, and sparse: only a few MiB really used
    (template,) = [v for v in await backend.list() if v.name == "tiny-template"]
    assert template.size == build.size and template.used < 64 * 1024 * 1024
    assert build.kernel == "templates/tiny/v1/vmlinuz" and build.initrd == "templates/tiny/v1/initrd.img"
    assert "tiny-template@v1" in await backend.snapshots()
    image = backend.path("tiny-template")
    init = debugfs_cat(image, "/sbin/init")
    assert "cello-root-ok" in init and "/cello-booted" in init
    assert "version=v1" in debugfs_cat(image, "/etc/cello-template")
    label = subprocess.run(["e2label", image], capture_output=True, text=True, check=True)  # noqa: ASYNC221
    assert label.stdout.strip() == "cello-root"

    kernel = lab["files"] / build.kernel
    assert kernel.read_bytes()[0x202:0x206] == b"HdrS"  # x86 boot protocol header of a bzImage
    entries = {e.name: e for e in decode_newc(gzip.decompress((lab["files"] / build.initrd).read_bytes()))}
    init_script = entries["init"].data.decode()
    assert 'set -- "$@" -i "$initiator" -t "$target"' in init_script and '-U "$username_in"' in init_script
    assert "switch_root /newroot" in init_script
    assert entries["dev/console"].rdev_major == 5
    modules = entries["etc/cello-modules"].data.decode().split()
    names = [m.rsplit("/", 1)[1] for m in modules]
    for needed in ("e1000.ko", "virtio_net.ko", "crc32c_generic.ko", "iscsi_tcp.ko", "iscsi_ibft.ko",
                   "sd_mod.ko", "ext4.ko"):
        assert needed in names
    assert names.index("scsi_mod.ko") < min(names.index("iscsi_tcp.ko"), names.index("sd_mod.ko"))
    assert names.index("jbd2.ko") < names.index("ext4.ko")
    assert all(m.lstrip("/") in entries for m in modules)
    assert any(n.endswith("modules.dep") for n in entries)  # depmod -b ran on the staged tree
    assert not list(lab["work"].iterdir())  # the scratch folder is gone
    assert any(line.startswith("snapshot:") for line in lines)


async def test_rebuild_makes_v2_and_clone_of_v1_keeps_its_content(lab: dict[str, Path], tmp_path: Path) -> None:
    backend = make_backend(lab["volumes"])
    await build_template(backend, "tiny", None, "tiny", lab["files"], lab["work"], lambda _: None)
    clone = await backend.clone_os("tiny", "v1", UUID_A)
    note = tmp_path / "note"
    note.write_text("written by the node\n")
    debugfs_write(clone.path, note, "/node-note")

    assert await next_version(backend, "tiny") == "v2"
    v2 = await build_template(backend, "tiny", None, "tiny", lab["files"], lab["work"], lambda _: None)

    assert (v2.version, v2.created_volume) == ("v2", False)
    assert {"tiny-template@v1", "tiny-template@v2"} <= set(await backend.snapshots())
    assert (lab["files"] / "templates/tiny/v1/vmlinuz").exists()
    assert (lab["files"] / "templates/tiny/v2/initrd.img").exists()
    assert "version=v2" in debugfs_cat(backend.path("tiny-template"), "/etc/cello-template")
    assert debugfs_cat(clone.path, "/node-note") == "written by the node\n"
    assert "version=v1" in debugfs_cat(clone.path, "/etc/cello-template")
    assert debugfs_cat(backend.path("tiny-template"), "/node-note") == ""  # the template never saw it


def _tar_with(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o755
            tar.addfile(info, io.BytesIO(data))


async def test_tar_source_builds_with_host_kernel_when_it_has_none(lab: dict[str, Path], tmp_path: Path) -> None:
    backend = make_backend(lab["volumes"])
    tar = tmp_path / "rootfs.tar"
    _tar_with(tar, {"sbin/init": b"#!/bin/sh\necho hello from tar\n", "etc/motd": b"operator's root\n"})
    build = await build_template(backend, "ops", "v1", f"tar:{tar}", lab["files"], lab["work"], lambda _: None)
    assert build.source == f"tar:{tar}"
    assert debugfs_cat(backend.path("ops-template"), "/etc/motd") == "operator's root\n"
    assert (lab["files"] / build.initrd).stat().st_size > 1_000_000  # Cello's initramfs, not a stub


async def test_corrupt_tar_leaves_no_version_and_no_volume(lab: dict[str, Path], tmp_path: Path) -> None:
    backend = make_backend(lab["volumes"])
    good = tmp_path / "good.tar"
    _tar_with(good, {"sbin/init": b"#!/bin/sh\n", "big": os.urandom(200_000)})
    corrupt = tmp_path / "corrupt.tar"
    corrupt.write_bytes(good.read_bytes()[:30_000])  # header fine, body cut short
    with pytest.raises(TemplateSourceError, match="cannot unpack"):
        await build_template(backend, "ops", None, f"tar:{corrupt}", lab["files"], lab["work"], lambda _: None)
    assert await backend.snapshots() == []
    assert await backend.list() == []
    assert not (lab["files"] / "templates/ops").exists() or not any((lab["files"] / "templates/ops").iterdir())
    assert not list(lab["work"].iterdir())


async def test_failure_after_volume_creation_removes_the_volume(lab: dict[str, Path], tmp_path: Path) -> None:
    backend = make_backend(lab["volumes"])
    tar = tmp_path / "too-big.tar"
    _tar_with(tar, {"sbin/init": b"#!/bin/sh\n", "blob": os.urandom(8 * 1024 * 1024)})
    lines: list[str] = []
    with pytest.raises(TemplateBuildError, match=r"mkfs\.ext4"):
        await build_template(backend, "ops", None, f"tar:{tar}", lab["files"], lab["work"], lines.append,
                             size=4 * 1024 * 1024)  # the root does not fit: mkfs -d fails after create
    assert any("volume: creating" in line for line in lines)
    assert await backend.list() == [] and await backend.snapshots() == []
    assert not any((lab["files"] / "templates/ops").iterdir())


async def test_failure_after_snapshot_of_v2_keeps_v1_and_removes_v2(lab: dict[str, Path]) -> None:
    backend = make_backend(lab["volumes"])
    await build_template(backend, "tiny", None, "tiny", lab["files"], lab["work"], lambda _: None)
    clone = await backend.clone_os("tiny", "v1", UUID_A)

    def explode_after_snapshot(line: str) -> None:
        if line.startswith("done:"):
            raise RuntimeError("provisioner went away")

    with pytest.raises(RuntimeError, match="went away"):
        await build_template(backend, "tiny", None, "tiny", lab["files"], lab["work"], explode_after_snapshot)
    assert await backend.snapshots() == ["tiny-template@v1"]
    assert [v.name for v in await backend.list()] == sorted(["tiny-template", f"tiny-OS-{UUID_A}"])
    assert sorted(p.name for p in (lab["files"] / "templates/tiny").iterdir()) == ["v1"]
    assert "version=v1" in debugfs_cat(clone.path, "/etc/cello-template")
    assert await next_version(backend, "tiny") == "v2"


async def test_existing_version_is_refused(lab: dict[str, Path]) -> None:
    backend = make_backend(lab["volumes"])
    await build_template(backend, "tiny", "v1", "tiny", lab["files"], lab["work"], lambda _: None)
    with pytest.raises(TemplateBuildError, match="already has version v1"):
        await build_template(backend, "tiny", "v1", "tiny", lab["files"], lab["work"], lambda _: None)
    assert await backend.snapshots() == ["tiny-template@v1"]


def test_tools_are_installed() -> None:
    for tool in ("mkfs.ext4", "debugfs", "e2label", "depmod", "modprobe", "tar", "cp"):
        assert shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/sbin"), tool
