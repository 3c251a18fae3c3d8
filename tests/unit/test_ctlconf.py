"""ctl.conf: golden files, round trips (hypothesis), hostile names refused before any file is written."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import os
import tarfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from images.build import TemplateBuildError, build_template
from iscsi import ctlconf
from iscsi.ctld import CtldDriver
from iscsi.file_backend import FileBackend
from iscsi.model import LunSpec, NameError_, StorageError, TargetAuth, TargetSpec
from iscsi.runner import RecordingRunner
from tests.unit.test_iscsi_specs import PREFIX, U1, sample_targets, stable_lun

DATA = Path(__file__).resolve().parent.parent / "data" / "ctld"
PORTALS = ["0.0.0.0:3260", "[::]:3260"]


def golden(name: str, text: str) -> None:
    path = DATA / name
    if os.environ.get("CELLO_REGEN_GOLDEN"):
        path.write_text(text)
    assert text == path.read_text(), f"{path} differs (CELLO_REGEN_GOLDEN=1 regenerates it)"


def test_golden_sample() -> None:
    text = ctlconf.render(ctlconf.from_specs(sample_targets(), PORTALS))
    golden("sample.conf", text)
    assert ctlconf.parse(text) == ctlconf.from_specs(sample_targets(), PORTALS)


def test_golden_empty() -> None:
    golden("empty.conf", ctlconf.render(ctlconf.from_specs([], ["0.0.0.0:3260"])))


def test_define_before_use_one_block_per_line_everything_quoted() -> None:
    text = ctlconf.render(ctlconf.from_specs(sample_targets(), PORTALS))
    lines = text.splitlines()[1:]
    kinds = [line.split()[0] for line in lines]
    assert kinds == sorted(kinds, key=["auth-group", "portal-group", "lun", "target"].index)
    for line in lines:
        assert line.endswith("}") and line.count("{") == 1
        words = line.replace("{", " ").replace("}", " ").replace(";", " ").split()
        # every second token of a statement is a value, and every value is quoted
        assert all(w.startswith('"') and w.endswith('"') for w in words[1:2])
    assert 'lun "3" "tiny-DATA-' in text  # LUN number = stable index: deleting DATA-2 renumbered nothing


def test_deterministic_regardless_of_input_order() -> None:
    a = ctlconf.render(ctlconf.from_specs(sample_targets(), PORTALS))
    b = ctlconf.render(ctlconf.from_specs(list(reversed(sample_targets())), PORTALS))
    assert a == b


def test_parse_reads_a_hand_written_file_with_comments_and_newlines() -> None:
    text = f'''
# hand written
auth-group ag1 {{
    chap user1 "secretsecret12"
    initiator-portal 10.0.0.0/8
}}
portal-group pg0 {{
    discovery-auth-group no-authentication
    listen 0.0.0.0:3260
}}
lun tiny-OS-{U1} {{
    path /dev/zvol/tank/tiny-OS-{U1}
    serial "S1"; device-id "D1"
}}
target {PREFIX}:{U1} {{
    auth-group ag1
    portal-group pg0
    lun 0 tiny-OS-{U1}
}}
'''
    conf = ctlconf.parse(text)
    assert conf.auth_groups[0] == ctlconf.AuthGroup("ag1", "chap", (("user1", "secretsecret12"),), (),
                                                   ("10.0.0.0/8",))
    assert conf.targets[0].luns == ((0, f"tiny-OS-{U1}"),)
    assert ctlconf.parse(ctlconf.render(conf)) == conf


@pytest.mark.parametrize(("text", "offset"), [
    ("target", 6),
    ('lun "x" { path "/a" ', 20),
    ('bogus "x" { }', 0),
    ('lun "x" { colour "red"; }', 10),
    ('lun "x" { path "/a\n" }', 15),
    ('target "x" { lun "zero" "y"; }', 13),
    ('lun "x" { path "/a"; }', 0),
])
def test_parse_errors_carry_offsets(text: str, offset: int) -> None:
    with pytest.raises(ctlconf.CtlConfError) as info:
        ctlconf.parse(text)
    assert info.value.offset == offset


# -- round trip property ------------------------------------------------------------------------

_os = st.from_regex(r"\A[a-z0-9][a-z0-9_.-]{0,12}\Z")
_uuid = st.uuids().map(str)
_secret = st.from_regex(r"\A[A-Za-z0-9._~+=!@%^*:,/-]{12,16}\Z")
_user = st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9._:-]{0,20}\Z")
_net = st.ip_addresses(v=4).map(lambda a: f"{a}/24").map(lambda n: str(__import__("ipaddress").ip_network(n,
                                                                                                         strict=False)))


@st.composite
def target_specs(draw: st.DrawFn) -> list[TargetSpec]:
    out = []
    for uuid in draw(st.lists(_uuid, min_size=0, max_size=6, unique=True)):
        os_name = draw(_os)
        indexes = draw(st.lists(st.integers(1, 1023), max_size=4, unique=True))
        luns = [stable_lun(f"{os_name}-OS-{uuid}", 0, "S" + uuid[:8])]
        luns += [stable_lun(f"{os_name}-DATA-{uuid}" + ("" if i == 1 else f"-{i}"), i, f"D{i}x{uuid[:8]}")
                 for i in indexes]
        chap = draw(st.none() | st.tuples(_user, _secret))
        auth = TargetAuth(
            chap_user=chap[0] if chap else None, chap_secret=chap[1] if chap else None,
            initiator_names=tuple(draw(st.lists(st.just(f"{PREFIX}:node-{uuid}"), max_size=1))),
            initiator_portals=tuple(draw(st.lists(_net, max_size=2, unique=True))),
        )
        out.append(TargetSpec(f"{PREFIX}:{uuid}", tuple(luns), auth))
    return out


@settings(max_examples=150, deadline=None)
@given(target_specs(), st.lists(st.sampled_from(["0.0.0.0:3260", "127.0.0.1:13260", "[::1]:3260"]),
                                min_size=1, max_size=3, unique=True))
def test_parse_render_round_trip(specs: list[TargetSpec], portals: list[str]) -> None:
    conf = ctlconf.from_specs(specs, portals)
    text = ctlconf.render(conf)
    assert ctlconf.parse(text) == conf
    assert ctlconf.render(ctlconf.parse(text)) == text


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_parser_raises_only_its_own_error(text: str) -> None:
    try:
        ctlconf.parse(text)
    except ctlconf.CtlConfError:
        pass


# -- hostile names never reach the file --------------------------------------------------------

HOSTILE = ["a b", "a{b", "a}b", 'a"b', "a\nb", "a#b", "x" * 223, "a;b", "a\\b"]


def _variants(bad: str) -> list[list[TargetSpec]]:
    good = sample_targets()[1]
    lun = good.luns[0]
    return [
        [dataclasses.replace(good, iqn=f"{PREFIX}:{bad}")],
        [dataclasses.replace(good, luns=(dataclasses.replace(lun, volume=bad),))],
        [dataclasses.replace(good, luns=(dataclasses.replace(lun, path=f"/dev/zvol/{bad}"),))],
        [dataclasses.replace(good, luns=(dataclasses.replace(lun, serial=bad),))],
        [dataclasses.replace(good, luns=(dataclasses.replace(lun, device_id=bad),))],
        [dataclasses.replace(good, auth=TargetAuth(chap_user=bad, chap_secret="secretsecret12"))],
        [dataclasses.replace(good, auth=TargetAuth(chap_user="u", chap_secret=bad))],
        [dataclasses.replace(good, auth=TargetAuth(initiator_names=(bad,)))],
        [dataclasses.replace(good, auth=TargetAuth(initiator_portals=(bad,)))],
    ]


@pytest.mark.parametrize("bad", HOSTILE)
async def test_hostile_names_refused_before_any_file_is_written(bad: str, tmp_path: Path) -> None:
    conf = tmp_path / "ctl.conf"
    runner = RecordingRunner()
    driver = CtldDriver(conf, ["0.0.0.0:3260"], runner)
    for variant in _variants(bad):
        with pytest.raises(NameError_):
            await driver.apply(variant)
    assert not conf.exists() and _entries(tmp_path) == []
    assert runner.calls == []


def _entries(directory: Path) -> list[Path]:
    return list(directory.iterdir())


def test_hostile_portal_refused_at_construction(tmp_path: Path) -> None:
    for bad in ["0.0.0.0:3260\n", '1.2.3.4:3260"', "0.0.0.0:3260 #"]:
        with pytest.raises(NameError_):
            CtldDriver(tmp_path / "ctl.conf", [bad], RecordingRunner())


def test_1024_luns_per_target_limit() -> None:
    uuid = U1
    luns = [stable_lun(f"t-OS-{uuid}", 0, "S0")]
    luns += [stable_lun(f"t-DATA-{uuid}" + ("" if i == 1 else f"-{i}"), i, f"S{i}") for i in range(1, 1024)]
    ok = TargetSpec(f"{PREFIX}:{uuid}", tuple(luns))
    assert len(ctlconf.from_specs([ok], ["0.0.0.0:3260"]).targets[0].luns) == 1024
    extra = LunSpec(f"t-DATA-{uuid}-1024", "/dev/zvol/tank/x", 1024, 1, "S1024", "D1024")
    with pytest.raises(StorageError, match="1024"):
        ctlconf.from_specs([dataclasses.replace(ok, luns=(*ok.luns, extra))], ["0.0.0.0:3260"])
    with pytest.raises(ctlconf.LimitError, match=r"outside 0\.\.1023"):
        ctlconf.from_specs([TargetSpec(ok.iqn, (dataclasses.replace(ok.luns[0], index=1024),))],
                           ["0.0.0.0:3260"])


# -- what ctld refuses or misreads is refused here, with the reason (issue 17) ------------------


async def _refused_before_writing(tmp_path: Path, targets: list[TargetSpec], portals: list[str] | None = None) -> str:
    conf = tmp_path / "ctl.conf"
    runner = RecordingRunner()
    with pytest.raises(NameError_) as info:
        driver = CtldDriver(conf, portals or ["0.0.0.0:3260"], runner)
        await driver.apply(targets)
    assert not conf.exists() and _entries(tmp_path) == [] and runner.calls == []
    return str(info.value)


@pytest.mark.parametrize("zoned", ["fe80::1%eth0", "fe80::%eth0/64"])
async def test_initiator_portal_with_a_zone_is_refused_before_writing(zoned: str, tmp_path: Path) -> None:
    good = sample_targets()[1]
    spec = dataclasses.replace(good, auth=TargetAuth(initiator_portals=(zoned,)))
    assert await _refused_before_writing(tmp_path, [spec]) == (
        f"invalid initiator portal {zoned!r}: an IPv6 zone (%…) is refused: ctld cannot parse it")


def test_ipv4_mapped_initiator_portal_is_rendered_in_its_ipv4_form() -> None:
    good = sample_targets()[1]
    spec = dataclasses.replace(good, auth=TargetAuth(initiator_portals=("::ffff:10.77.0.5", "::ffff:10.78.0.0/120")))
    text = ctlconf.render(ctlconf.from_specs([spec], PORTALS))
    assert 'initiator-portal "10.77.0.5"; initiator-portal "10.78.0.0/24";' in text
    assert "::ffff" not in text


def test_a_parsed_mapped_initiator_portal_is_not_canonical() -> None:
    conf = ctlconf.CtlConf(auth_groups=(ctlconf.AuthGroup("ag1", initiator_portals=("::ffff:10.77.0.5",)),))
    with pytest.raises(NameError_) as info:
        ctlconf.validate(conf)
    assert str(info.value) == "initiator portal '::ffff:10.77.0.5' is not in canonical form"


async def test_scoped_listen_portal_is_refused_before_writing(tmp_path: Path) -> None:
    assert await _refused_before_writing(tmp_path, sample_targets(), ["[fe80::1%em0]:3260"]) == (
        "invalid portal '[fe80::1%em0]:3260': a scoped IPv6 address (%zone) is refused: listen on the address alone")


@pytest.mark.parametrize(("portals", "message"), [
    (["0.0.0.0:3260", "0.0.0.0:3260"],
     "invalid portal '0.0.0.0:3260': given twice (as '0.0.0.0:3260' too): ctld's second listen on 0.0.0.0:3260 fails"),
    (["[::]:3260", "[0:0::0]:3260"],
     "invalid portal '[0:0::0]:3260': given twice (as '[::]:3260' too): ctld's second listen on [::]:3260 fails"),
])
async def test_duplicate_portals_are_refused_before_writing(portals: list[str], message: str, tmp_path: Path) -> None:
    assert await _refused_before_writing(tmp_path, sample_targets(), portals) == message
    conf = ctlconf.CtlConf(portal_groups=(ctlconf.PortalGroup("pg1", tuple(portals)),))
    with pytest.raises(NameError_) as info:
        ctlconf.validate(conf)  # a parsed or hand-made file is checked the same way
    assert str(info.value) == message


async def test_lun_size_not_a_multiple_of_the_blocksize_is_refused_before_writing(tmp_path: Path) -> None:
    good = sample_targets()[1]
    odd = dataclasses.replace(good.luns[0], size=(1 << 30) + 1000)
    assert await _refused_before_writing(tmp_path, [dataclasses.replace(good, luns=(odd,))]) == (
        f"invalid size 1073742824 for lun 'debian.12-OS-{good.iqn.rsplit(':', 1)[1]}': must be a multiple of "
        "its 512-byte blocksize (ctld refuses the whole ctl.conf otherwise)")


def test_lun_size_is_checked_against_its_own_blocksize() -> None:
    lun = ctlconf.Lun(f"tiny-OS-{U1}", f"/dev/zvol/tank/tiny-OS-{U1}", "S1", "D1", size=4096 * 10 + 512,
                      blocksize=4096)
    with pytest.raises(NameError_, match="must be a multiple of its 4096-byte blocksize"):
        ctlconf.validate(ctlconf.CtlConf(luns=(lun,)))
    ctlconf.validate(ctlconf.CtlConf(luns=(dataclasses.replace(lun, size=4096 * 10),)))


def test_discovery_shows_an_initiator_only_its_own_targets() -> None:
    text = ctlconf.render(ctlconf.from_specs(sample_targets(), PORTALS))
    assert ('portal-group "pg-cello" { discovery-auth-group "no-authentication"; '
            'discovery-filter "portal-name"; listen "0.0.0.0:3260"; listen "[::]:3260"; }') in text
    # a file that names no filter is read with ctld's default, "none" (every target to every initiator)
    parsed = ctlconf.parse('portal-group pg0 { discovery-auth-group no-authentication; listen 0.0.0.0:3260 }')
    assert parsed.portal_groups[0].discovery_filter == "none"
    with pytest.raises(NameError_) as info:
        ctlconf.validate(ctlconf.CtlConf(portal_groups=(ctlconf.PortalGroup("pg1", ("0.0.0.0:3260",),
                                                                            discovery_filter="names"),)))
    assert str(info.value) == ("portal-group 'pg1': discovery-filter must be one of none, portal, portal-name, "
                               "portal-name-auth")


async def test_template_build_refuses_an_existing_volume_size_ctld_would_refuse(tmp_path: Path) -> None:
    """The branch that reuses the template volume's size: a size that is no multiple of 512 would make
    every clone's LUN refused by ctld, so the build stops before mkfs writes anything."""
    backend = FileBackend(tmp_path / "volumes")
    await backend.create_template("tiny", 64 << 20)
    volume = Path(backend.path("tiny-template"))
    os.truncate(volume, (64 << 20) + 100)  # grown by hand, or a zfs `file`-kind image made outside Cello
    before = await asyncio.to_thread(_head, volume)
    tarball = tmp_path / "rootfs.tar"
    with tarfile.open(tarball, "w") as tar:
        for name in ("boot/vmlinuz-1", "boot/initrd.img-1", "sbin/init"):
            info = tarfile.TarInfo(name)
            info.size = 4
            tar.addfile(info, io.BytesIO(b"test"))
    files_root = tmp_path / "boot"
    with pytest.raises(TemplateBuildError) as err:
        await build_template(backend, "tiny", None, f"tar:{tarball}", files_root, tmp_path / "work", lambda _: None)
    assert str(err.value) == (
        "template tiny v1: invalid size 67108964 for template volume tiny-template (its clones become LUNs): "
        "must be a multiple of its 512-byte blocksize (ctld refuses the whole ctl.conf otherwise)")
    assert await backend.snapshots() == [] and await asyncio.to_thread(_head, volume) == before  # no mkfs
    assert not any(files_root.rglob("*vmlinuz*"))


def _head(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(1 << 16)  # where mkfs.ext4 writes its superblock and group descriptors
