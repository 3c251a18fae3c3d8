"""File backend pieces: the sparse copy (both paths), reflink refusal, name checks before any file."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from iscsi.file_backend import FileBackend, sparse_copy
from iscsi.model import NameError_, StorageError

MB = 1 << 20


def make_src(path: Path) -> None:
    with open(path, "wb") as f:
        f.truncate(32 * MB)
        f.seek(3 * MB)
        f.write(b"A" * MB)
        f.write(bytes(MB))  # allocated zeros: the read/write path keeps them as a hole
        f.seek(20 * MB)
        f.write(b"B" * 4096)


@pytest.mark.parametrize("kernel_copy", [True, False])
def test_sparse_copy_copies_data_and_keeps_holes(tmp_path: Path, kernel_copy: bool,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    if not kernel_copy:
        def no_cfr(*args: object) -> int:
            raise OSError(errno.EXDEV, "cross-device")
        monkeypatch.setattr(os, "copy_file_range", no_cfr)
    src, dst = tmp_path / "src.img", tmp_path / "dst.img"
    make_src(src)
    sparse_copy(src, dst)
    assert dst.read_bytes() == src.read_bytes()
    assert dst.stat().st_size == 32 * MB
    assert dst.stat().st_blocks * 512 <= 3 * MB  # not 32 MB of zeros
    if not kernel_copy:
        assert dst.stat().st_blocks * 512 < src.stat().st_blocks * 512


def test_sparse_copy_never_overwrites(tmp_path: Path) -> None:
    src, dst = tmp_path / "src.img", tmp_path / "dst.img"
    make_src(src)
    dst.write_bytes(b"keep")
    with pytest.raises(FileExistsError):
        sparse_copy(src, dst)
    assert dst.read_bytes() == b"keep"


async def test_names_are_checked_before_any_file(tmp_path: Path) -> None:
    b = FileBackend(tmp_path / "vols")
    for bad in ["../etc", "a b", "x/y", "Tiny", "t\n"]:
        with pytest.raises(NameError_):
            await b.create_template(bad, MB)
        with pytest.raises(NameError_):
            await b.destroy(bad)
    with pytest.raises(StorageError, match="multiple of 512"):
        await b.create_template("tiny", 1000)
    assert not (tmp_path / "vols").exists()


async def test_stray_files_are_ignored_by_list(tmp_path: Path) -> None:
    b = FileBackend(tmp_path)
    await b.create_template("tiny", MB)
    (tmp_path / "notes.img").write_bytes(b"x")
    (tmp_path / "bad name.img").write_bytes(b"x")
    assert [v.name for v in await b.list()] == ["tiny-template"]
    assert str(b.status()["clone_method"]).startswith("unknown")
    assert os.path.basename(b.path("tiny-template")) == "tiny-template.img"
