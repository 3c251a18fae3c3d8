"""Pure parts of template builds: source strings, host checks, the newc codec, tool-output parsers."""

from __future__ import annotations

import gzip
import stat
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from images.build import TemplateBuildError, default_size, validate_names
from images.initramfs import (
    CpioEntry,
    CpioError,
    busybox_applets_from_list,
    decode_newc,
    dedupe,
    encode_newc,
    find_host_kernel,
    is_static_elf,
    parse_ldd,
    parse_show_depends,
)
from images.rootfs import host_debian_mirror, tarball_boot_files
from images.sources import (
    HostPaths,
    TemplateSource,
    TemplateSourceError,
    check_source,
    parse_source,
)

# --- source strings ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "kind", "canonical"),
    [
        ("tiny", "tiny", "tiny"),
        ("debian", "debian", "debian"),
        ("debian:trixie", "debian", "debian:trixie"),
        ("debian:bookworm", "debian", "debian"),
        ("tar:/srv/rootfs.tar", "tar", "tar:/srv/rootfs.tar"),
    ],
)
def test_parse_source(text: str, kind: str, canonical: str) -> None:
    parsed = parse_source(text)
    assert parsed.kind == kind and str(parsed) == canonical


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("ubuntu", "unknown template source"),
        ("", "unknown template source"),
        ("tar:", "needs a path"),
        ("tar:rootfs.tar", "must be absolute"),
        ("debian:Bad;suite", "bad Debian suite"),
    ],
)
def test_parse_source_refuses(text: str, message: str) -> None:
    with pytest.raises(TemplateSourceError, match=message):
        parse_source(text)


def test_check_source_missing_and_non_tar_files(tmp_path: Path) -> None:
    with pytest.raises(TemplateSourceError, match="no such file"):
        check_source(f"tar:{tmp_path}/absent.tar")
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"not an archive at all" * 100)
    with pytest.raises(TemplateSourceError, match="is not a tar archive"):
        check_source(f"tar:{junk}")


def test_check_source_names_the_apt_packages_a_bare_host_lacks(tmp_path: Path) -> None:
    bare = HostPaths(path=str(tmp_path), boot_dir=tmp_path, modules_dir=tmp_path,
                     busybox=tmp_path / "busybox", iscsistart=tmp_path / "iscsistart")
    with pytest.raises(TemplateSourceError) as info:
        check_source("tiny", bare)
    message = str(info.value)
    for package in ("e2fsprogs", "kmod", "busybox-static", "open-iscsi", "linux-image-amd64"):
        assert f"apt install {package}" in message
    with pytest.raises(TemplateSourceError, match="apt install debootstrap"):
        check_source("debian", bare)


def test_check_source_wants_a_static_busybox() -> None:
    dynamic = HostPaths(busybox=Path("/usr/sbin/iscsistart"))  # any dynamically linked binary
    with pytest.raises(TemplateSourceError, match="statically linked"):
        check_source("tiny", dynamic)


async def test_check_source_passes_on_this_host() -> None:
    from images.build import validate_source

    assert await validate_source("tiny") == TemplateSource("tiny")
    with pytest.raises(TemplateSourceError, match="unknown template source"):
        await validate_source("windows")


def test_names_and_sizes() -> None:
    validate_names("tiny", "v12")
    for os_name, version in (("Tiny", "v1"), ("a/b", "v1"), ("tiny", "1"), ("tiny", "v0"), ("tiny", "v1;x")):
        with pytest.raises(TemplateBuildError):
            validate_names(os_name, version)
    assert default_size() == 100 * 1024**3  # DESIGN.md: 100G sparse templates
    big = default_size(60 * 1024**3 + 5)
    assert big >= 120 * 1024**3 and big % (1024 * 1024) == 0


# --- newc cpio codec ---------------------------------------------------------------------------------

SAMPLE = [
    CpioEntry("bin", stat.S_IFDIR | 0o755),
    CpioEntry("bin/hello", stat.S_IFREG | 0o755, b"#!/bin/sh\necho hi\n"),
    CpioEntry("bin/sh", stat.S_IFLNK | 0o777, b"hello"),
    CpioEntry("dev", stat.S_IFDIR | 0o755),
    CpioEntry("dev/console", stat.S_IFCHR | 0o600, rdev_major=5, rdev_minor=1),
    CpioEntry("odd", stat.S_IFREG | 0o644, b"x" * 5),
]


def test_newc_round_trip_and_alignment() -> None:
    data = encode_newc(SAMPLE)
    assert len(data) % 4 == 0 and data.startswith(b"070701")
    assert decode_newc(data) == SAMPLE


def test_newc_is_read_by_gnu_cpio(tmp_path: Path) -> None:
    archive = tmp_path / "a.cpio"
    archive.write_bytes(encode_newc(SAMPLE))
    listing = subprocess.run(["cpio", "-t", "-v", "-F", str(archive)], capture_output=True, text=True,
                             check=True, timeout=10).stdout
    lines = {line.split()[-1] if "->" not in line else line.split()[-3]: line for line in listing.splitlines()}
    assert set(lines) == {e.name for e in SAMPLE}
    assert lines["dev/console"].startswith("crw-------") and "5," in lines["dev/console"]
    assert lines["bin/sh"].startswith("l") and lines["bin/hello"].startswith("-rwxr-xr-x")
    out = tmp_path / "out"
    out.mkdir()
    subprocess.run(["cpio", "-i", "-d", "--no-absolute-filenames", "-F", str(archive), "bin/*"], cwd=out,
                   check=True, capture_output=True, timeout=10)
    assert (out / "bin/hello").read_bytes() == SAMPLE[1].data
    assert (out / "bin/sh").readlink() == Path("hello")


def test_newc_refuses_absolute_names() -> None:
    with pytest.raises(ValueError, match="relative"):
        encode_newc([CpioEntry("/etc", stat.S_IFDIR | 0o755)])


def test_newc_errors_carry_the_offset() -> None:
    data = encode_newc(SAMPLE)
    with pytest.raises(CpioError, match="bad magic at byte 0"):
        decode_newc(b"X" + data[1:])
    with pytest.raises(CpioError) as info:
        decode_newc(data[:200])
    assert 0 < info.value.offset <= 200
    second = data.index(b"070701", 6)
    broken = data[:second + 10] + b"zz" + data[second + 12:]
    with pytest.raises(CpioError) as info:
        decode_newc(broken)
    assert info.value.offset == second


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_newc_decoder_raises_only_its_own_error(data: st.DataObject) -> None:
    blob = bytearray(encode_newc(SAMPLE))
    for _ in range(data.draw(st.integers(1, 8))):
        pos = data.draw(st.integers(0, len(blob) - 1))
        blob[pos] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(blob)))
    try:
        decode_newc(bytes(blob[:cut]))
    except CpioError:
        pass


# --- tool output and host files ----------------------------------------------------------------------


def test_parse_show_depends_keeps_order_and_drops_builtins() -> None:
    text = (
        "insmod /lib/modules/6.1.0-57-amd64/kernel/drivers/scsi/scsi_common.ko \n"
        "builtin crc32c\n"
        "insmod /lib/modules/6.1.0-57-amd64/kernel/drivers/scsi/scsi_mod.ko \n"
        "insmod /lib/modules/6.1.0-57-amd64/kernel/drivers/scsi/sd_mod.ko \n"
    )
    names = [p.rsplit("/", 1)[1] for p in parse_show_depends(text)]
    assert names == ["scsi_common.ko", "scsi_mod.ko", "sd_mod.ko"]
    assert dedupe(["a", "b", "a", "c", "b"]) == ["a", "b", "c"]


def test_parse_ldd() -> None:
    text = (
        "\tlinux-vdso.so.1 (0x00007ffd)\n"
        "\tlibkmod.so.2 => /lib/x86_64-linux-gnu/libkmod.so.2 (0x00007fa1)\n"
        "\tlibmissing.so.1 => not found\n"
        "\t/lib64/ld-linux-x86-64.so.2 (0x00007fa2)\n"
    )
    assert parse_ldd(text) == ["/lib/x86_64-linux-gnu/libkmod.so.2", "/lib64/ld-linux-x86-64.so.2"]


def test_busybox_applet_list() -> None:
    assert busybox_applets_from_list("usr/bin/[\nsbin/ifconfig\n\nbusybox\n") == ["usr/bin/[", "sbin/ifconfig"]


def test_is_static_elf(tmp_path: Path) -> None:
    assert is_static_elf(Path("/bin/busybox"))  # busybox-static
    assert not is_static_elf(Path("/usr/sbin/iscsistart"))
    text = tmp_path / "script"
    text.write_text("#!/bin/sh\n")
    assert not is_static_elf(text)


def test_find_host_kernel_picks_the_newest_with_modules(tmp_path: Path) -> None:
    boot, mods = tmp_path / "boot", tmp_path / "modules"
    for version in ("6.1.0-9-amd64", "6.1.0-10-amd64", "6.9.0-1-amd64"):
        (boot / f"vmlinuz-{version}").parent.mkdir(exist_ok=True)
        (boot / f"vmlinuz-{version}").write_bytes(b"k")
    for version in ("6.1.0-9-amd64", "6.1.0-10-amd64"):  # 6.9 has no modules: unusable
        (mods / version / "kernel").mkdir(parents=True)
    assert find_host_kernel(boot, mods).version == "6.1.0-10-amd64"
    with pytest.raises(FileNotFoundError):
        find_host_kernel(tmp_path / "nothing", mods)


def test_host_debian_mirror_reads_deb822_and_one_line_sources(tmp_path: Path) -> None:
    d = tmp_path / "sources.list.d"
    d.mkdir()
    (d / "other.sources").write_text("Types: deb\nURIs: https://example.invalid/node_20.x\nSuites: nodistro\n")
    (d / "debian.sources").write_text("Types: deb\nURIs: http://mirror.example.invalid/debian/\n"
                                      "Suites: bookworm\nComponents: main\n")
    assert host_debian_mirror((d,)) == "http://mirror.example.invalid/debian"
    one = tmp_path / "sources.list"
    one.write_text("# comment\ndeb [arch=amd64] http://m2.example.invalid/debian bookworm main\n")
    assert host_debian_mirror((tmp_path / "absent", one)) == "http://m2.example.invalid/debian"
    with pytest.raises(TemplateSourceError, match="no Debian archive"):
        host_debian_mirror((tmp_path / "absent",))


def test_tarball_boot_files_pairs_kernel_and_initrd(tmp_path: Path) -> None:
    boot = tmp_path / "boot"
    boot.mkdir()
    (boot / "vmlinuz-6.1.0-1").write_bytes(b"k")
    assert tarball_boot_files(tmp_path) is None  # a kernel without its initrd is not enough
    (boot / "initrd.img-6.1.0-1").write_bytes(gzip.compress(b""))
    found = tarball_boot_files(tmp_path)
    assert found is not None and found.initrd.name == "initrd.img-6.1.0-1"


def test_mounts_below_finds_leftover_mounts_deepest_first(tmp_path: Path) -> None:
    from images.build import mounts_below

    root = tmp_path / "build-x"
    mountinfo = (
        "22 1 0:21 / /proc rw - proc proc rw\n"
        f"90 22 0:50 / {root}/root/proc rw - proc proc rw\n"
        f"91 90 0:51 / {root}/root/proc/sys/fs/binfmt_misc rw - binfmt_misc x rw\n"
        f"92 1 0:52 / {root}-other rw - tmpfs t rw\n"
    )
    assert mounts_below(root, mountinfo) == [f"{root}/root/proc/sys/fs/binfmt_misc", f"{root}/root/proc"]
