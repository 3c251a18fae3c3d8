"""The zfs backend's zvol kind: exact command lines and parsing of captured OpenZFS `-Hp` output."""

from __future__ import annotations

from pathlib import Path

import pytest

from iscsi.model import InUseError, NameError_, PoolCapacity, StorageError, VolumeInfo
from iscsi.runner import RecordingRunner
from iscsi.zfs_backend import LIST_PROPS, ZfsBackend, ZfsOutputError, parse_get
from tests.unit.test_iscsi_specs import U1, U2

DATA = Path(__file__).resolve().parent.parent / "data" / "zfs"
GET_R = ("zfs", "get", "-Hp", "-r", "-o", "name,property,value", LIST_PROPS, "tank/cello")


def fixture(name: str) -> str:
    return (DATA / name).read_text()


def zfs_fixture_runner() -> RecordingRunner:
    everything = fixture("get_r_zvol.txt")

    def respond(argv: tuple[str, ...]) -> str | None:
        if argv == GET_R:
            return everything
        if argv[:2] == ("zfs", "get") and "-r" not in argv:
            ds = argv[-1]
            if argv[-2] == "used,available":
                return fixture("get_capacity.txt")
            return "".join(line + "\n" for line in everything.splitlines() if line.split("\t")[0] == ds)
        return None

    return RecordingRunner(respond)


def backend(runner: RecordingRunner) -> ZfsBackend:
    return ZfsBackend("tank/cello", "zvol", runner, device_timeout=0)


async def test_list_reports_exact_bytes_and_origins() -> None:
    vols = await backend(zfs_fixture_runner()).list()
    assert [v.name for v in vols] == [
        "debian.12-template", f"tiny-DATA-{U1}", f"tiny-DATA-{U1}-2", f"tiny-OS-{U2}", f"tiny-OS-{U1}",
        "tiny-template",
    ]  # "backups" is not a Cello name and is left alone
    by = {v.name: v for v in vols}
    assert by[f"tiny-OS-{U1}"] == VolumeInfo(f"tiny-OS-{U1}", 107374182400, 8470528, "tiny-template@v1",
                                             f"/dev/zvol/tank/cello/tiny-OS-{U1}")
    assert by[f"tiny-DATA-{U1}-2"].size == 21474836480 and by[f"tiny-DATA-{U1}-2"].origin is None


async def test_snapshots_and_capacity() -> None:
    b = backend(zfs_fixture_runner())
    assert await b.snapshots() == ["tiny-template@v1", "tiny-template@v2"]
    assert await b.capacity() == PoolCapacity(1294929920 + 1869295239168, 1294929920, 1869295239168)


async def test_create_clone_snapshot_command_lines() -> None:
    runner = zfs_fixture_runner()
    b = backend(runner)
    await b.create_template("tiny", 100 << 30)
    await b.snapshot_template("tiny", "v3")
    await b.clone_os("tiny", "v1", U1)
    await b.create_data("tiny", U1, 2, 1000 * 512)  # rounded up to a whole 128 KiB
    mutating = [c for c in runner.calls if c[1] != "get"]
    assert mutating == [
        ("zfs", "create", "-s", "-V", str(100 << 30), "tank/cello/tiny-template"),
        ("zfs", "snapshot", "tank/cello/tiny-template@v3"),
        ("zfs", "clone", "tank/cello/tiny-template@v1", f"tank/cello/tiny-OS-{U1}"),
        ("zfs", "create", "-s", "-V", str(4 * 128 * 1024), f"tank/cello/tiny-DATA-{U1}-2"),
    ]


async def test_destroy_refuses_a_template_with_clones_and_a_snapshot_with_clones() -> None:
    runner = zfs_fixture_runner()
    b = backend(runner)
    with pytest.raises(InUseError, match=f"tiny-OS-{U1}"):
        await b.destroy("tiny-template")
    with pytest.raises(InUseError, match=f"tiny-OS-{U2}"):
        await b.destroy_snapshot("tiny", "v2")
    assert [c for c in runner.calls if c[1] == "destroy"] == []


async def test_destroy_command_lines() -> None:
    runner = zfs_fixture_runner()
    b = backend(runner)
    await b.destroy(f"tiny-OS-{U1}")
    await b.destroy("debian.12-template")
    await b.destroy(f"tiny-OS-{'f' * 8}-0000-4000-8000-000000000000")  # missing: a no-op
    assert [c for c in runner.calls if c[1] == "destroy"] == [
        ("zfs", "destroy", f"tank/cello/tiny-OS-{U1}"),
        ("zfs", "destroy", "tank/cello/debian.12-template"),  # no snapshots, so no -r
    ]


async def test_destroy_refuses_an_exported_volume_before_any_command() -> None:
    runner = zfs_fixture_runner()
    with pytest.raises(InUseError, match="still exported"):
        await backend(runner).destroy(f"tiny-OS-{U1}", exported=lambda v: v == f"tiny-OS-{U1}")
    assert runner.calls == []


@pytest.mark.parametrize("bad", ["tiny;rm", "Tiny", "tiny template", "../x", "a" * 64, "tiny\n"])
async def test_hostile_names_run_no_command(bad: str) -> None:
    runner = zfs_fixture_runner()
    b = backend(runner)
    for call in (b.create_template(bad, 1 << 20), b.snapshot_template(bad, "v1"),
                 b.clone_os(bad, "v1", U1), b.create_data(bad, U1, 1, 1 << 20), b.destroy(bad)):
        with pytest.raises(NameError_):
            await call
    with pytest.raises(NameError_):
        await b.clone_os("tiny", "v1; reboot", U1)
    assert runner.calls == []


def test_hostile_pool_refused() -> None:
    for bad in ["tank cello", "tank/../x", "-o", "tank;x"]:
        with pytest.raises(NameError_):
            ZfsBackend(bad, "zvol", RecordingRunner())


async def test_human_units_are_refused() -> None:
    def respond(argv: tuple[str, ...]) -> str:
        return fixture("get_human_units.txt")

    with pytest.raises(StorageError, match="exact byte count"):
        await ZfsBackend("tank/cello", "zvol", RecordingRunner(respond), device_timeout=0).list()


def test_parse_get_errors_carry_the_byte_offset() -> None:
    good = "tank/a\ttype\tvolume\n"
    with pytest.raises(ZfsOutputError) as info:
        parse_get(good + "tank/a type volume\n")
    assert info.value.offset == len(good)
    assert parse_get(fixture("get_capacity.txt")) == {
        "tank/cello": {"used": "1294929920", "available": "1869295239168"}}


def test_paths_and_status() -> None:
    b = ZfsBackend("tank/cello", "zvol", RecordingRunner())
    assert b.path(f"tiny-OS-{U1}") == f"/dev/zvol/tank/cello/tiny-OS-{U1}"
    assert b.status()["kind"] == "zvol" and b.status()["api"] == "zfs CLI"
    f = ZfsBackend("tank/cello", "file", RecordingRunner(), mountpoint=Path("/tank/cello"))
    assert f.path("tiny-template") == "/tank/cello/tiny-template/disk.img"


class FakeLzc:
    """Stands in for pyzfs's libzfs_core module (not installable here): records its calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[object, ...]] = []

    def __getattr__(self, fn: str) -> object:
        return lambda *args: self.calls.append((fn, *args))


async def test_libzfs_core_is_used_when_it_imports(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys
    fake = FakeLzc()
    monkeypatch.setitem(sys.modules, "libzfs_core", fake)
    runner = zfs_fixture_runner()
    b = ZfsBackend("tank/cello", "zvol", runner, use_lzc=True, device_timeout=0)
    assert b.status()["api"] == "libzfs_core"
    await b.create_data("tiny", U1, 2, 1 << 30)
    await b.snapshot_template("tiny", "v3")
    await b.clone_os("tiny", "v2", U1)
    await b.destroy(f"tiny-OS-{U2}")
    assert fake.calls == [
        ("lzc_create", f"tank/cello/tiny-DATA-{U1}-2".encode(), "zvol", {b"volsize": 1 << 30}),
        ("lzc_snapshot", [b"tank/cello/tiny-template@v3"]),
        ("lzc_clone", f"tank/cello/tiny-OS-{U1}".encode(), b"tank/cello/tiny-template@v2", {}),
        ("lzc_destroy", f"tank/cello/tiny-OS-{U2}".encode()),
    ]
    assert [c for c in runner.calls if c[1] != "get"] == []  # no zfs CLI for those


def test_requested_libzfs_core_that_does_not_import_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys
    monkeypatch.setitem(sys.modules, "libzfs_core", None)  # makes the import fail
    with pytest.raises(StorageError, match="libzfs_core"):
        ZfsBackend("tank/cello", "zvol", RecordingRunner(), use_lzc=True)
