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


# -- snapshots of an OS volume, generations and copies (issue 13) ----------------------------------

VOL = f"tiny-OS-{U1}"
VOL_DS = f"tank/cello/{VOL}"


def txg_get(ds: str) -> tuple[str, ...]:
    return ("zfs", "get", "-Hp", "-r", "-o", "name,property,value", "createtxg", ds)


def snapshot_lines(ds: str, snaps: list[str]) -> str:
    """What `zfs get -r … LIST_PROPS` prints for snapshots of `ds`."""
    return "".join(f"{ds}@{s}\t{prop}\t{value}\n" for s in snaps
                   for prop, value in (("type", "snapshot"), ("volsize", "107374182400"), ("used", "0"),
                                       ("referenced", "1263136768"), ("origin", "-"), ("mountpoint", "-"),
                                       ("available", "-")))


def volume_runner(txgs: str | None, extra: str = "",
                  fail: tuple[str, ...] = ()) -> RecordingRunner:
    """The fixture pool plus `extra` lines; `txgs` is what `zfs get createtxg` prints for the OS volume
    (None: "dataset does not exist"). Datasets made by `zfs create` appear in later answers; a command
    starting with `fail` exits 1."""
    made: list[str] = []

    def everything() -> str:
        lines = fixture("get_r_zvol.txt") + extra
        for ds in made:
            lines += "".join(f"{ds}\t{p}\t{v}\n" for p, v in (("type", "volume"), ("volsize", "107374182400"),
                                                           ("used", "57344"), ("origin", "-"), ("mountpoint", "-")))
        return lines

    def respond(argv: tuple[str, ...]) -> tuple[int, str, str] | str | None:
        if fail and argv[:len(fail)] == fail:
            return 1, "", "simulated failure"
        if argv[:4] == ("zfs", "get", "-Hp", "-r") and argv[-2] == "createtxg":
            if argv[-1] != VOL_DS or txgs is None:
                return 1, "", f"cannot open '{argv[-1]}': dataset does not exist"
            return txgs
        if argv == GET_R:
            return everything()
        if argv[:2] == ("zfs", "get"):
            return "".join(line + "\n" for line in everything().splitlines() if line.split("\t")[0] == argv[-1])
        if argv[:3] == ("zfs", "create", "-s"):
            made.append(argv[-1])
        return None

    return RecordingRunner(respond)


# as zfs-fuse and OpenZFS print it: the dataset, then its snapshots in createtxg order; shuffled here
TXGS = (f"{VOL_DS}\tcreatetxg\t7\n{VOL_DS}@before-v2\tcreatetxg\t40\n{VOL_DS}@zz\tcreatetxg\t12\n"
        f"{VOL_DS}@auto:hourly\tcreatetxg\t30\n{VOL_DS}@aa\tcreatetxg\t17\n")


def mutations(runner: RecordingRunner) -> list[tuple[str, ...]]:
    return [c for c in runner.calls if c[1] != "get"]


async def test_clone_os_of_a_later_generation() -> None:
    g2 = "".join(f"{VOL_DS}-g2\t{prop}\t{value}\n" for prop, value in
                 (("type", "volume"), ("volsize", "107374182400"), ("origin", "tank/cello/tiny-template@v2")))
    runner = volume_runner(TXGS, g2)
    info = await backend(runner).clone_os("tiny", "v2", U1, generation=2)
    assert mutations(runner) == [("zfs", "clone", "tank/cello/tiny-template@v2", f"{VOL_DS}-g2")]
    assert (info.name, info.origin, info.path) == (f"{VOL}-g2", "tiny-template@v2", f"/dev/zvol/{VOL_DS}-g2")


async def test_volume_snapshots_are_in_createtxg_order() -> None:
    runner = volume_runner(TXGS)
    b = backend(runner)
    # oldest first by txg, not by name or output order; a snapshot named outside Cello's rule is left out
    assert await b.volume_snapshots(VOL) == ["zz", "aa", "before-v2"]
    assert runner.calls == [txg_get(VOL_DS)]
    assert await backend(volume_runner(None)).volume_snapshots(VOL) == []  # missing volume
    with pytest.raises(NameError_):
        await b.volume_snapshots("tiny-template")


async def test_volume_snapshot_listing_errors_are_not_taken_for_a_missing_volume() -> None:
    runner = RecordingRunner(lambda argv: (1, "", "permission denied"))
    with pytest.raises(StorageError, match="permission denied"):
        await backend(runner).volume_snapshots(VOL)


async def test_snapshot_volume_command_line_and_refusals() -> None:
    runner = volume_runner(TXGS)
    b = backend(runner)
    await b.snapshot_volume(VOL, "pre-upgrade")
    with pytest.raises(StorageError, match=f"snapshot {VOL}@aa already exists"):
        await b.snapshot_volume(VOL, "aa")
    assert mutations(runner) == [("zfs", "snapshot", f"{VOL_DS}@pre-upgrade")]
    missing = volume_runner(None)
    with pytest.raises(StorageError, match=f"volume {VOL} does not exist"):
        await backend(missing).snapshot_volume(VOL, "s1")
    assert mutations(missing) == []


async def test_restore_is_a_rollback_refused_while_newer_snapshots_exist() -> None:
    runner = volume_runner(TXGS)
    b = backend(runner)
    with pytest.raises(InUseError, match=f"{VOL}@aa has newer snapshots: auto:hourly, before-v2"):
        await b.restore_volume_snapshot(VOL, "aa")  # a foreign newer snapshot counts: -r would destroy it
    with pytest.raises(StorageError, match="does not exist"):
        await b.restore_volume_snapshot(VOL, "nope")
    await b.restore_volume_snapshot(VOL, "before-v2")
    assert mutations(runner) == [("zfs", "rollback", f"{VOL_DS}@before-v2")]  # never -r


async def test_destroy_volume_snapshot_and_volume_with_snapshots() -> None:
    runner = volume_runner(TXGS, snapshot_lines(VOL_DS, ["zz", "aa"]))
    b = backend(runner)
    await b.destroy_volume_snapshot(VOL, "zz")
    await b.destroy_volume_snapshot(VOL, "gone")  # missing: a no-op
    await b.destroy(VOL)  # its own snapshots go with it
    assert mutations(runner) == [("zfs", "destroy", f"{VOL_DS}@zz"), ("zfs", "destroy", "-r", VOL_DS)]
    # the volume snapshots are neither volumes nor template snapshots
    assert VOL in {v.name for v in await b.list()} and not [v for v in await b.list() if "@" in v.name]
    assert await b.snapshots() == ["tiny-template@v1", "tiny-template@v2"]


async def test_a_volume_snapshot_with_a_clone_is_not_destroyed() -> None:
    clone = (f"tank/cello/tiny-OS-{U2}-g2\ttype\tvolume\ntank/cello/tiny-OS-{U2}-g2\torigin\t{VOL_DS}@zz\n")
    runner = volume_runner(TXGS, snapshot_lines(VOL_DS, ["zz"]) + clone)
    with pytest.raises(InUseError, match=f"tiny-OS-{U2}-g2"):
        await backend(runner).destroy_volume_snapshot(VOL, "zz")
    assert mutations(runner) == []


async def test_copy_zvol_onto_a_new_volume_is_a_sparse_dd() -> None:
    runner = volume_runner(TXGS)
    info = await backend(runner).copy_volume(VOL, "cap-template")
    assert mutations(runner) == [
        ("zfs", "create", "-s", "-V", "107374182400", "tank/cello/cap-template"),
        ("dd", f"if=/dev/zvol/{VOL_DS}", "of=/dev/zvol/tank/cello/cap-template", "bs=1048576",
         "conv=sparse,fsync", "status=none"),
    ]
    assert (info.name, info.size, info.origin) == ("cap-template", 107374182400, None)


async def test_copy_zvol_onto_an_existing_volume_writes_every_block() -> None:
    runner = volume_runner(TXGS)
    await backend(runner).copy_volume(VOL, "debian.12-template")  # same 100 GiB volsize
    assert mutations(runner) == [
        ("dd", f"if=/dev/zvol/{VOL_DS}", "of=/dev/zvol/tank/cello/debian.12-template", "bs=1048576",
         "conv=fsync", "status=none"),  # no conv=sparse: skipped zero blocks would keep its old bytes
    ]


async def test_copy_refusals_and_a_failed_copy_leaves_nothing() -> None:
    runner = volume_runner(TXGS)
    b = backend(runner)
    with pytest.raises(StorageError, match="same size"):
        await b.copy_volume(VOL, f"tiny-DATA-{U1}")  # 10 GiB
    with pytest.raises(StorageError, match="does not exist"):
        await b.copy_volume(f"tiny-OS-{'e' * 8}-0000-4000-8000-000000000000", "cap-template")
    with pytest.raises(StorageError, match="onto itself"):
        await b.copy_volume(VOL, VOL)
    assert mutations(runner) == []
    failing = volume_runner(TXGS, fail=("dd",))
    with pytest.raises(StorageError, match="simulated failure"):
        await backend(failing).copy_volume(VOL, "cap-template")
    assert mutations(failing)[-1] == ("zfs", "destroy", "tank/cello/cap-template")  # the new volume went


@pytest.mark.parametrize(("vol", "snap"), [("tiny-template", "s1"), (f"tiny-DATA-{U1}", "s1"), (VOL, "a;b"),
                                           (VOL, "-r"), (VOL, "S1"), ("tiny;rm", "s1"), (VOL, "a" * 33)])
async def test_hostile_snapshot_names_run_no_command(vol: str, snap: str) -> None:
    runner = zfs_fixture_runner()
    b = backend(runner)
    for call in (b.snapshot_volume(vol, snap), b.destroy_volume_snapshot(vol, snap),
                 b.restore_volume_snapshot(vol, snap)):
        with pytest.raises(NameError_):
            await call
    for bad in (b.copy_volume(vol if "@" not in vol else VOL, "../x"), b.copy_volume("x y", VOL),
                b.clone_os("tiny", "v1", U1, generation=10000)):
        with pytest.raises(NameError_):
            await bad
    assert runner.calls == []


async def test_libzfs_core_snapshots_an_os_volume_but_the_cli_rolls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys
    fake = FakeLzc()
    monkeypatch.setitem(sys.modules, "libzfs_core", fake)
    runner = volume_runner(TXGS)
    b = ZfsBackend("tank/cello", "zvol", runner, use_lzc=True, device_timeout=0)
    await b.snapshot_volume(VOL, "s9")
    await b.restore_volume_snapshot(VOL, "before-v2")
    assert fake.calls == [("lzc_snapshot", [f"{VOL_DS}@s9".encode()])]
    assert mutations(runner) == [("zfs", "rollback", f"{VOL_DS}@before-v2")]
