from __future__ import annotations

import pytest

import naming
from iscsi import names
from iscsi.model import NameError_

U = "3f1c2b4e-9d8a-4c6b-8e2f-1a2b3c4d5e6f"
HOSTILE = [
    "", "a b", "a{b", "a}b", 'a"b', "a'b", "a\nb", "a#b", "a;b", "a\\b", "a/b", "../x", "A", "-a",
    "a" * 223, "tiny\x00", "tïny", "a\tb",
]


def test_volume_names_follow_hcc_cello() -> None:
    assert names.template_volume("tiny") == "tiny-template"
    assert names.snapshot_name("tiny", "v1") == "tiny-template@v1"
    assert names.os_volume("tiny", U) == f"tiny-OS-{U}"
    assert names.data_volume("tiny", U, 1) == f"tiny-DATA-{U}"
    assert names.data_volume("tiny", U, 2) == f"tiny-DATA-{U}-2"
    assert names.data_volume("debian.12_x", U, 17) == f"debian.12_x-DATA-{U}-17"


def test_parse_volume_says_what_it_is() -> None:
    assert names.parse_volume("tiny-template") == names.VolumeName("tiny-template", "template", "tiny")
    assert names.parse_volume(f"a-b-OS-{U}") == names.VolumeName(f"a-b-OS-{U}", "os", "a-b", U, 1)
    assert names.parse_volume(f"a-b-OS-{U}-g12") == names.VolumeName(f"a-b-OS-{U}-g12", "os", "a-b", U, 12)
    assert names.parse_volume(f"tiny-DATA-{U}-3").index == 3
    assert names.parse_volume(f"tiny-DATA-{U}").index == 1
    assert names.parse_snapshot("tiny-template@v12") == ("tiny", "v12")


@pytest.mark.parametrize("bad", HOSTILE)
def test_hostile_os_names_are_refused(bad: str) -> None:
    with pytest.raises(NameError_):
        names.os_name(bad)
    with pytest.raises(NameError_):
        names.volume(bad)


@pytest.mark.parametrize("bad", [
    U.upper(), U.replace("-", ""), "{" + U + "}", U + "\n", "00000000-0000-0000-0000-00000000000",
])
def test_uuid_must_be_canonical_lowercase(bad: str) -> None:
    with pytest.raises(NameError_):
        names.server_uuid(bad)


@pytest.mark.parametrize("bad", ["1", "V1", "v", "v1a", "v-1", "v1\n", "v" + "9" * 10])
def test_versions(bad: str) -> None:
    with pytest.raises(NameError_):
        names.version(bad)


@pytest.mark.parametrize("bad", [f"tiny-DATA-{U}-1", f"tiny-DATA-{U}-0", f"tiny-DATA-{U}-02",
                                 f"tiny-OS-{U}-2", "tiny-template@v1", "tiny-Template",
                                 f"tiny-OS-{U}-g1", f"tiny-OS-{U}-g0", f"tiny-OS-{U}-g02", f"tiny-OS-{U}-g10000",
                                 f"tiny-OS-{U}-G2", f"tiny-OS-{U}g2", f"tiny-OS-{U}-g", f"tiny-DATA-{U}-g2",
                                 f"tiny-OS-{U}@s1"])
def test_malformed_volume_names(bad: str) -> None:
    with pytest.raises(NameError_):
        names.parse_volume(bad)


def test_os_volume_generations() -> None:
    # generation 1 keeps hcc-cello's name; an upgrade clones the next generation beside it
    assert names.os_volume("tiny", U, 1) == f"tiny-OS-{U}"
    assert names.os_volume("tiny", U, 2) == f"tiny-OS-{U}-g2"
    assert names.os_volume("debian.12_x", U, 9999) == f"debian.12_x-OS-{U}-g9999"
    for gen in (1, 2, 10, 317, 9999):
        vol = names.parse_volume(names.os_volume("tiny", U, gen))
        assert (vol.kind, vol.os, vol.uuid, vol.index) == ("os", "tiny", U, gen)
    for bad in (0, -1, 10000, True, 2.0, "2"):
        with pytest.raises(NameError_, match="generation"):
            names.os_volume("tiny", U, bad)  # type: ignore[arg-type]
    with pytest.raises(NameError_):
        names.os_volume("tiny", U.upper(), 2)


def test_os_volume_snapshots() -> None:
    assert names.volume_snapshot(f"tiny-OS-{U}", "s1") == f"tiny-OS-{U}@s1"
    assert names.volume_snapshot(f"tiny-OS-{U}-g3", "before-upgrade.2") == f"tiny-OS-{U}-g3@before-upgrade.2"
    assert names.volume_snapshot(f"tiny-OS-{U}", "a" * 32) == f"tiny-OS-{U}@{'a' * 32}"
    assert names.parse_volume_snapshot(f"tiny-OS-{U}-g3@pre_v2") == (f"tiny-OS-{U}-g3", "pre_v2")
    # only an OS volume has snapshots of its own; a template's stay <os>-template@vN
    for vol in ("tiny-template", f"tiny-DATA-{U}", f"tiny-DATA-{U}-2"):
        with pytest.raises(NameError_, match="only OS volumes"):
            names.volume_snapshot(vol, "s1")
    for bad_vol in (f"tiny-OS-{U}@x", "tiny-OS-", f"tiny-OS-{U}-g1"):
        with pytest.raises(NameError_):
            names.volume_snapshot(bad_vol, "s1")
    for bad in ["tiny-template@v1", f"tiny-DATA-{U}@s1", f"tiny-OS-{U}", f"tiny-OS-{U}@", f"tiny-OS-{U}@a@b",
                f"tiny-OS-{U}@-s", f"tiny-OS-{U}@S1"]:
        with pytest.raises(NameError_):
            names.parse_volume_snapshot(bad)


@pytest.mark.parametrize("bad", [*HOSTILE, "a" * 33, "_a", ".a", "a@b", "v1 ", "A1"])
def test_snapshot_label_rule(bad: str) -> None:
    assert naming.SNAPSHOT.ok("a" * 32) and naming.SNAPSHOT.ok("v1") and naming.SNAPSHOT.ok("0.pre-upgrade_x")
    with pytest.raises(NameError_, match="invalid snapshot name"):
        names.volume_snapshot(f"tiny-OS-{U}", bad)


def test_data_index_bounds() -> None:
    for bad in (0, -1, 1024, True):
        with pytest.raises(NameError_):
            names.data_volume("tiny", U, bad)


def test_iqn_length_limit_is_rfc_3720s_223() -> None:
    base = "iqn.2026-11.io.cello:"
    assert names.iqn(base + "a" * (223 - len(base)))
    with pytest.raises(NameError_):
        names.iqn(base + "a" * (224 - len(base)))
    for bad in ["iqn.2026-11.io.cello:A", "iqn.2026-11.io.cello: x", 'iqn.2026-11.io"x', "iqn.26-11.x"]:
        with pytest.raises(NameError_):
            names.iqn(bad)


def test_portals_and_initiator_portals() -> None:
    assert names.portal("0.0.0.0:3260") == ("0.0.0.0", 3260)
    assert names.portal("[::1]:13260") == ("::1", 13260)
    assert names.format_portal("::1", 3260) == "[::1]:3260"
    assert names.initiator_portal("10.77.0.9/24") == "10.77.0.0/24"
    for bad in ["0.0.0.0", "host:3260", "::1:3260", "1.2.3.4:0", "1.2.3.4:70000", "[1.2.3.4]:1"]:
        with pytest.raises(NameError_):
            names.portal(bad)
    with pytest.raises(NameError_):
        names.initiator_portal("10.77.0.0/33")


def test_chap_secret_length_12_to_16() -> None:
    assert names.chap_secret("a" * 12) and names.chap_secret("a" * 16)
    for bad in ["a" * 11, "a" * 17, "abc def ghijkl", 'abcdefghijk"l', "abcdefghijk#l", "abcdefghijk}l"]:
        with pytest.raises(NameError_):
            names.chap_secret(bad)


def test_pool_names() -> None:
    assert names.pool("tank/cello") == "tank/cello"
    for bad in ["", "/tank", "tank/", "tank//x", "tank x", "tank@s", "-tank"]:
        with pytest.raises(NameError_):
            names.pool(bad)


def test_stable_lun_identities() -> None:
    vol = f"tiny-OS-{U}"
    assert names.lun_serial(vol) == names.lun_serial(vol) and len(names.lun_serial(vol)) == 16
    assert names.serial(names.lun_serial(vol)) and names.device_id(names.lun_device_id(vol))
    assert len(names.lun_device_id(vol)) <= 36  # survives tgt's truncation unchanged
    assert names.lun_serial(vol) != names.lun_serial(f"tiny-DATA-{U}")
    assert names.target_iqn("iqn.2026-11.io.cello", U) == f"iqn.2026-11.io.cello:{U}"
    with pytest.raises(NameError_):
        names.lun_serial("a b")


# -- what ctld would refuse or misread (issue 17) ------------------------------------------------


@pytest.mark.parametrize("zoned", ["fe80::1%eth0", "fe80::%eth0/64", "fe80::1%1"])
def test_initiator_portal_with_an_ipv6_zone_is_refused(zoned: str) -> None:
    # ctld: inet_pton has no zones: 'invalid initiator portal "fe80::1%eth0" for auth-group …', whole file refused
    with pytest.raises(NameError_) as info:
        names.initiator_portal(zoned)
    assert str(info.value) == f"invalid initiator portal {zoned!r}: an IPv6 zone (%…) is refused: ctld cannot parse it"


@pytest.mark.parametrize(("mapped", "ipv4"), [
    ("::ffff:10.77.0.5", "10.77.0.5"),
    ("::ffff:a4d:5", "10.77.0.5"),
    ("::FFFF:10.77.0.5", "10.77.0.5"),
    ("::ffff:10.77.0.0/120", "10.77.0.0/24"),
    ("::ffff:10.77.0.9/128", "10.77.0.9/32"),
    ("::ffff:0.0.0.0/96", "0.0.0.0/0"),
])
def test_ipv4_mapped_initiator_portal_becomes_its_ipv4_form(mapped: str, ipv4: str) -> None:
    # ctld would keep ::ffff:a4d:5 (AF_INET6), which never matches an IPv4 initiator (AF_INET)
    assert names.initiator_portal(mapped) == ipv4


def test_plain_ipv6_initiator_portals_stay_ipv6() -> None:
    assert names.initiator_portal("fd00::1") == "fd00::1"
    assert names.initiator_portal("fd00::1/64") == "fd00::/64"
    assert names.initiator_portal("::1") == "::1"


def test_scoped_listen_portal_is_refused() -> None:
    with pytest.raises(NameError_) as info:
        names.portal("[fe80::1%em0]:3260")
    assert str(info.value) == ("invalid portal '[fe80::1%em0]:3260': a scoped IPv6 address (%zone) is refused: "
                               "listen on the address alone")


@pytest.mark.parametrize(("given", "twice", "first"), [
    (["0.0.0.0:3260", "0.0.0.0:3260"], "0.0.0.0:3260", "0.0.0.0:3260"),
    (["[::]:3260", "0.0.0.0:3260", "[0::0]:3260"], "[0::0]:3260", "[::]:3260"),
    (["[fd00::1]:3260", "[FD00:0::1]:3260"], "[FD00:0::1]:3260", "[fd00::1]:3260"),
])
def test_duplicate_portals_after_canonicalisation_are_refused(given: list[str], twice: str, first: str) -> None:
    canonical = names.format_portal(*names.portal(first))
    with pytest.raises(NameError_) as info:
        names.portals(given)
    assert str(info.value) == (f"invalid portal {twice!r}: given twice (as {first!r} too): "
                               f"ctld's second listen on {canonical} fails")


def test_portals_are_canonical_and_distinct_ones_pass() -> None:
    assert names.portals(["0.0.0.0:3260", "[0::0]:3260", "0.0.0.0:3261", "10.0.0.1:3260"]) == (
        "0.0.0.0:3260", "[::]:3260", "0.0.0.0:3261", "10.0.0.1:3260")


def test_lun_size_must_be_a_multiple_of_the_blocksize() -> None:
    assert names.lun_size(1 << 30, "lun 'x'") == 1 << 30
    assert names.lun_size(4096 * 3, "lun 'x'", 4096) == 4096 * 3
    with pytest.raises(NameError_) as info:
        names.lun_size((1 << 30) + 100, "lun 'x'")
    assert str(info.value) == ("invalid size 1073741924 for lun 'x': must be a multiple of its 512-byte "
                               "blocksize (ctld refuses the whole ctl.conf otherwise)")
    with pytest.raises(NameError_) as info:
        names.lun_size(512 * 3, "lun 'x'", 4096)
    assert "must be a multiple of its 4096-byte blocksize" in str(info.value)
    for bad in (0, -512, True):
        with pytest.raises(NameError_, match="must be a positive number of bytes"):
            names.lun_size(bad, "lun 'x'")
