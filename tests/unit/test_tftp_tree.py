"""The virtual boot tree: name validation, routing to rendered files, static roots, cache, symlinks."""

from __future__ import annotations

import asyncio
import dataclasses
import os
from pathlib import Path

import pytest

from bootfiles.render import BUILTIN_PROFILES
from bootfiles.spec import BootSpec, IscsiRoot
from bootfiles.tree import (
    BootTree,
    Denied,
    NotFound,
    Refused,
    RenderFailed,
    default_static_roots,
    pxelinux_config_names,
    split_name,
)

UUID = "3f1c0000-0000-4000-8000-000000000001"
MAC = "52:54:00:77:00:10"
CLIENT = ("127.0.0.1", 40000)


def make_spec(uuid: str, lun: int = 1, kernel: str = "templates/tiny/v1/vmlinuz") -> BootSpec:
    return BootSpec(
        server_uuid=uuid,
        profile=BUILTIN_PROFILES["compute"],
        kernel=kernel,
        initrd="templates/tiny/v1/initrd.img",
        root=IscsiRoot(f"iqn.2026-11.io.cello:{uuid}", "10.77.0.2", 3260, lun, f"iqn.2026-11.io.cello:node-{uuid}"),
        http_base="http://10.77.0.2:8080",
    )


class StorePolicy:
    """A tiny store-backed BootPolicy, as the appliance implements it (UUID, then MAC, then unknown)."""

    def __init__(self) -> None:
        self.by_uuid: dict[str, BootSpec] = {}
        self.macs: dict[str, str] = {}
        self.unknown: BootSpec | None = None
        self.calls: list[tuple[str | None, str | None]] = []
        self.at: dict[str, str] = {}  # server uuid -> its node's address (what DHCP told the appliance)

    def boot_spec(self, *, uuid: str | None, mac: str | None) -> BootSpec | None:
        self.calls.append((uuid, mac))
        if uuid is not None and uuid in self.by_uuid:
            return self.by_uuid[uuid]
        if mac is not None and mac in self.macs:
            return self.by_uuid[self.macs[mac]]
        return self.unknown if uuid is None and mac is None else None

    def client_seen(self, *, mac: str, uuid: str | None, address: str) -> None:
        raise AssertionError("the tree never reports DHCP clients")

    def may_fetch(self, spec: BootSpec, address: str) -> bool:
        return spec.root is None or self.at.get(spec.server_uuid) == address


@pytest.fixture
def layout(tmp_path: Path) -> dict[str, Path]:
    files = tmp_path / "files"
    (files / "templates/tiny/v1").mkdir(parents=True)
    (files / "templates/tiny/v1/vmlinuz").write_bytes(b"K" * 1000)
    loaders = tmp_path / "loaders"
    loaders.mkdir()
    (loaders / "pxelinux.0").write_bytes(b"PXE" * 100)
    (loaders / "ldlinux.c32").write_bytes(b"LDL")
    (loaders / "sub").mkdir()
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "passwd").write_bytes(b"root:x:0:0")
    os.symlink(secret / "passwd", loaders / "escape")
    os.symlink(secret, loaders / "escapedir")
    os.symlink(loaders / "pxelinux.0", loaders / "alias.0")
    os.symlink(files / "templates/tiny/v1/vmlinuz", loaders / "cross-root")
    return {"files": files, "loaders": loaders, "secret": secret, "tmp": tmp_path}


@pytest.fixture
def policy() -> StorePolicy:
    p = StorePolicy()
    p.by_uuid[UUID] = make_spec(UUID)
    p.macs[MAC] = UUID
    p.at[UUID] = CLIENT[0]
    return p


@pytest.fixture
def tree(layout: dict[str, Path], policy: StorePolicy) -> BootTree:
    return BootTree([layout["loaders"]], layout["files"], policy, cache_bytes=10_000, resolve_ttl=0, link_targets=())


@pytest.mark.parametrize(
    "name",
    [
        "../secret/passwd",
        "sub/../../secret/passwd",
        "..",
        "./pxelinux.0",
        "pxelinux.cfg/.hidden",
        "a//b",
        "//etc/passwd",
        "..\\secret\\passwd",
        "pxelinux.0\0.txt",
        "x\ny",
        "a" * 256,
        "",
        "/",
    ],
)
def test_split_name_refuses(name: str) -> None:
    with pytest.raises(Refused):
        split_name(name)


def test_split_name_accepts_root_relative_forms() -> None:
    assert split_name("/templates/tiny/v1/vmlinuz") == ["templates", "tiny", "v1", "vmlinuz"]
    assert split_name("::pxelinux.0") == ["pxelinux.0"]


def test_pxelinux_config_names() -> None:
    names = pxelinux_config_names(UUID, MAC, "10.77.0.100")
    assert names[:3] == [f"pxelinux.cfg/{UUID}", "pxelinux.cfg/01-52-54-00-77-00-10", "pxelinux.cfg/0A4D0064"]
    assert names[-2:] == ["pxelinux.cfg/0", "pxelinux.cfg/default"]
    assert len(names) == 11


async def test_static_files_from_both_roots(tree: BootTree) -> None:
    f = await tree.open("pxelinux.0", CLIENT)
    assert f.data == b"PXE" * 100 and f.size == 300 and f.server_uuid is None and f.kind == "static"
    f = await tree.open("/templates/tiny/v1/vmlinuz", CLIENT)
    assert f.data == b"K" * 1000


async def test_symlinks(tree: BootTree) -> None:
    assert (await tree.open("alias.0", CLIENT)).data == b"PXE" * 100
    assert (await tree.open("cross-root", CLIENT)).data == b"K" * 1000
    with pytest.raises(Refused):
        await tree.open("escape", CLIENT)
    with pytest.raises(Refused):
        await tree.open("escapedir/passwd", CLIENT)


async def test_link_targets_allow_packaged_links_only(layout: dict[str, Path], policy: StorePolicy) -> None:
    tree = BootTree([layout["loaders"]], None, policy, link_targets=[layout["secret"]])
    assert (await tree.open("escape", CLIENT)).data == b"root:x:0:0"
    # The link-target folder itself is not a root: nothing in it is served by name.
    with pytest.raises(NotFound):
        await tree.open("passwd", CLIENT)


@pytest.mark.parametrize("name", ["etc/passwd", "/etc/passwd", "sub", "missing.c32", "templates"])
async def test_absent_and_directories_not_found(tree: BootTree, name: str) -> None:
    with pytest.raises(NotFound):
        await tree.open(name, CLIENT)


async def test_rendered_by_uuid_mac_and_prefix(tree: BootTree, policy: StorePolicy) -> None:
    by_uuid = await tree.open(f"pxelinux.cfg/{UUID}", CLIENT)
    by_mac = await tree.open("pxelinux.cfg/01-52-54-00-77-00-10", CLIENT)
    by_prefix = await tree.open(f"{UUID}/pxelinux.cfg/default", CLIENT)
    assert by_uuid.data == by_mac.data == by_prefix.data
    assert by_uuid.data is not None and by_uuid.data.startswith(b"DEFAULT cello\n")
    assert by_uuid.server_uuid == UUID and by_uuid.kind == "rendered"
    assert policy.calls == [(UUID, None), (None, MAC), (UUID, None)]


async def test_pxelinux_byte_swapped_uuid_finds_the_server(tree: BootTree, policy: StorePolicy) -> None:
    # pxelinux 6.04 names its config after option 97's wire bytes: the SMBIOS UUID's first three
    # fields byte-swapped (captured from qemu's ROM in tests/system/test_dhcp_lab.py).
    smbios = "3f1c2a4b-5d6e-4f70-8192-a3b4c5d6e7f8"
    policy.by_uuid[smbios] = make_spec(smbios)
    policy.at[smbios] = CLIENT[0]
    f = await tree.open("pxelinux.cfg/4b2a1c3f-6e5d-704f-8192-a3b4c5d6e7f8", CLIENT)
    assert f.server_uuid == smbios
    with pytest.raises(NotFound):  # grub and iPXE print the UUID as SMBIOS does: no swapped lookup
        await tree.open("grub/grub.cfg-4b2a1c3f-6e5d-704f-8192-a3b4c5d6e7f8", CLIENT)


async def test_kernel_fetches_are_attributed_to_the_server_whose_config_the_client_fetched(
        tree: BootTree, policy: StorePolicy) -> None:
    policy.at[UUID] = "10.77.0.104"  # the node's address
    assert (await tree.open("templates/tiny/v1/vmlinuz", ("10.77.0.104", 2000))).server_uuid is None
    await tree.open("pxelinux.cfg/01-52-54-00-77-00-10", ("10.77.0.104", 2001))
    assert (await tree.open("/templates/tiny/v1/vmlinuz", ("10.77.0.104", 2002))).server_uuid == UUID
    assert (await tree.open("templates/tiny/v1/vmlinuz", ("10.77.0.105", 2003))).server_uuid is None


async def test_the_attribution_of_a_client_address_expires(layout: dict[str, Path], policy: StorePolicy) -> None:
    from bootfiles.tree import CLIENT_TTL

    now = [0.0]
    tree = BootTree([layout["loaders"]], layout["files"], policy, resolve_ttl=0, link_targets=(),
                    clock=lambda: now[0])
    policy.at[UUID] = "10.77.0.104"
    await tree.open("pxelinux.cfg/01-52-54-00-77-00-10", ("10.77.0.104", 2001))
    now[0] += CLIENT_TTL - 1
    assert tree.server_of("10.77.0.104") == UUID
    now[0] += 2  # the address may belong to another node by now
    assert tree.server_of("10.77.0.104") is None
    assert (await tree.open("templates/tiny/v1/vmlinuz", ("10.77.0.104", 2002))).server_uuid is None


async def test_prefix_reaches_static_files(tree: BootTree) -> None:
    f = await tree.open(f"{UUID}/ldlinux.c32", CLIENT)
    assert f.data == b"LDL" and f.server_uuid == UUID


async def test_unknown_node_policy(tree: BootTree, policy: StorePolicy) -> None:
    for name in ("pxelinux.cfg/default", "pxelinux.cfg/0A4D0064", "grub/grub.cfg", "ipxe/default.ipxe"):
        with pytest.raises(NotFound):
            await tree.open(name, CLIENT)
    with pytest.raises(NotFound):
        await tree.open("pxelinux.cfg/01-00-00-00-00-00-01", CLIENT)
    other = "0d2b0000-0000-4000-8000-00000000000f"
    policy.unknown = dataclasses.replace(make_spec(other), root=None)  # diskless: no secret, anyone's
    f = await tree.open("pxelinux.cfg/0A4D", ("10.77.0.200", 2000))
    assert f.server_uuid == other
    assert (None, None) in policy.calls


async def test_grub_and_ipxe_names(tree: BootTree) -> None:
    g1 = await tree.open("grub/grub.cfg-01-52-54-00-77-00-10", CLIENT)
    g2 = await tree.open(f"grub/grub.cfg-{UUID}", CLIENT)
    assert g1.data == g2.data and g1.data is not None and g1.data.startswith(b"set default=0")
    i1 = await tree.open(f"ipxe/{UUID}.ipxe", CLIENT)
    i2 = await tree.open(f"boot/{UUID}.ipxe", CLIENT)
    i3 = await tree.open("ipxe/01-52-54-00-77-00-10.ipxe", CLIENT)
    assert i1.data == i2.data == i3.data and i1.data is not None and i1.data.startswith(b"#!ipxe\n")


async def test_store_change_shows_in_next_request(tree: BootTree, policy: StorePolicy) -> None:
    before = await tree.open(f"pxelinux.cfg/{UUID}", CLIENT)
    policy.by_uuid[UUID] = make_spec(UUID, lun=3, kernel="templates/tiny/v2/vmlinuz")
    after = await tree.open(f"pxelinux.cfg/{UUID}", CLIENT)
    assert before.data is not None and after.data is not None
    assert b"cello.lun=1" in before.data and b"cello.lun=3" in after.data
    assert b"KERNEL /templates/tiny/v2/vmlinuz" in after.data


async def test_render_error_is_reported(tree: BootTree, policy: StorePolicy) -> None:
    policy.by_uuid[UUID] = make_spec(UUID, kernel="bad path")
    with pytest.raises(RenderFailed):
        await tree.open(f"pxelinux.cfg/{UUID}", CLIENT)


async def test_cache_hits_and_reload_on_change(tree: BootTree, layout: dict[str, Path]) -> None:
    a = await tree.open("pxelinux.0", CLIENT)
    b = await tree.open("pxelinux.0", CLIENT)
    assert a.data is b.data  # same object: served from memory
    assert tree.cache.misses == 1 and tree.cache.hits == 1
    (layout["loaders"] / "pxelinux.0").write_bytes(b"NEW")
    c = await tree.open("pxelinux.0", CLIENT)
    assert c.data == b"NEW" and tree.cache.misses == 2


async def test_cache_is_bounded(tree: BootTree, layout: dict[str, Path]) -> None:
    for i in range(20):
        (layout["loaders"] / f"f{i}").write_bytes(bytes([i]) * 900)
        await tree.open(f"f{i}", CLIENT)
    assert tree.cache.used_bytes <= 10_000


async def test_large_file_is_read_from_disk(layout: dict[str, Path], tree: BootTree) -> None:
    big = os.urandom(8000)  # > max_entry_bytes (half of 10_000)
    (layout["loaders"] / "big").write_bytes(big)
    f = await tree.open("big", CLIENT)
    try:
        assert f.data is None and f.size == 8000
        assert bytes(f.source.read(1000, 512)) == big[1000:1512]
        assert bytes(f.source.read(7900, 512)) == big[7900:]
    finally:
        f.close()
    assert tree.cache.used_bytes == 0


async def test_resolution_is_reused_for_a_short_while(layout: dict[str, Path], policy: StorePolicy) -> None:
    now = [100.0]
    tree = BootTree([layout["loaders"]], None, policy, resolve_ttl=0.2, clock=lambda: now[0])
    assert (await tree.open("ldlinux.c32", CLIENT)).data == b"LDL"
    (layout["loaders"] / "ldlinux.c32").write_bytes(b"LDL2")
    now[0] += 0.19
    assert (await tree.open("ldlinux.c32", CLIENT)).data == b"LDL"  # within the TTL: no stat at all
    now[0] += 0.02
    assert (await tree.open("ldlinux.c32", CLIENT)).data == b"LDL2"


async def test_open_now_keeps_its_answer_for_its_resolution(layout: dict[str, Path], policy: StorePolicy) -> None:
    """open_now remembers a static name's answer (a storm asks for it hundreds of times) and, within
    its resolution's time, answers without looking at the disk."""
    now = [100.0]
    tree = BootTree([layout["loaders"]], None, policy, resolve_ttl=0.2, clock=lambda: now[0])
    assert (await tree.open("ldlinux.c32", CLIENT)).data == b"LDL"
    first = tree.open_now("ldlinux.c32", CLIENT)
    (layout["loaders"] / "ldlinux.c32").write_bytes(b"LDL2")
    now[0] += 0.19
    again = tree.open_now("ldlinux.c32", CLIENT)
    assert first is not None and again is not None and first.data == again.data == b"LDL"
    assert not tree._refreshing  # nothing looked up within the resolution's time


async def _refreshed(tree: BootTree) -> None:
    for _ in range(200):
        if not tree._refreshing:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the background look-up never ended")


async def test_an_expired_answer_is_served_while_it_is_looked_up_again(layout: dict[str, Path],
                                                                       policy: StorePolicy) -> None:
    """Past its resolution (and within stale_ttl) open_now still answers, with no wait, and looks the
    name up in the background: a replaced file is served whole, the old bytes until that look-up has
    seen the change and the new ones after it; an unchanged one keeps being answered at once."""
    now = [100.0]
    tree = BootTree([layout["loaders"]], None, policy, resolve_ttl=0.2, stale_ttl=5.0, clock=lambda: now[0])
    for name in ("ldlinux.c32", "pxelinux.0"):
        await tree.open(name, CLIENT)
        assert tree.open_now(name, CLIENT) is not None
    (layout["loaders"] / "ldlinux.c32").write_bytes(b"LDL2")
    now[0] += 3.0
    stale = tree.open_now("ldlinux.c32", CLIENT)
    assert stale is not None and stale.data == b"LDL"  # answered at once, from the old answer
    same = tree.open_now("pxelinux.0", CLIENT)
    assert same is not None and same.data == (layout["loaders"] / "pxelinux.0").read_bytes()
    assert set(tree._refreshing) == {"ldlinux.c32", "pxelinux.0"}
    await _refreshed(tree)
    assert tree.open_now("ldlinux.c32", CLIENT) is None  # changed: the next request opens it
    assert (await tree.open("ldlinux.c32", CLIENT)).data == b"LDL2"
    fresh = tree.open_now("ldlinux.c32", CLIENT)
    assert fresh is not None and fresh.data == b"LDL2"
    kept = tree.open_now("pxelinux.0", CLIENT)  # unchanged: kept for another resolution's time
    assert kept is not None and not tree._refreshing


async def test_an_answer_past_its_stale_time_is_not_served(layout: dict[str, Path], policy: StorePolicy) -> None:
    now = [100.0]
    tree = BootTree([layout["loaders"]], None, policy, resolve_ttl=0.2, stale_ttl=5.0, clock=lambda: now[0])
    await tree.open("ldlinux.c32", CLIENT)
    assert tree.open_now("ldlinux.c32", CLIENT) is not None
    (layout["loaders"] / "ldlinux.c32").write_bytes(b"LDL2")
    now[0] += 5.3
    assert tree.open_now("ldlinux.c32", CLIENT) is None  # too old to answer from: the caller opens
    assert not tree._refreshing
    assert (await tree.open("ldlinux.c32", CLIENT)).data == b"LDL2"


async def test_a_name_removed_meanwhile_is_dropped_by_its_look_up(layout: dict[str, Path],
                                                                  policy: StorePolicy) -> None:
    now = [100.0]
    tree = BootTree([layout["loaders"]], None, policy, resolve_ttl=0.2, stale_ttl=5.0, clock=lambda: now[0])
    await tree.open("ldlinux.c32", CLIENT)
    assert tree.open_now("ldlinux.c32", CLIENT) is not None
    (layout["loaders"] / "ldlinux.c32").unlink()
    now[0] += 1.0
    assert tree.open_now("ldlinux.c32", CLIENT) is not None  # the old answer, while it is looked up
    await _refreshed(tree)
    with pytest.raises(NotFound):
        tree.open_now("ldlinux.c32", CLIENT)


async def test_big_cold_file_served_from_disk_while_it_loads(layout: dict[str, Path], policy: StorePolicy) -> None:
    big = os.urandom(3 << 20)
    (layout["loaders"] / "kernel").write_bytes(big)
    tree = BootTree([layout["loaders"]], None, policy, cache_bytes=16 << 20, resolve_ttl=0)
    first = await tree.open("kernel", CLIENT)
    try:
        assert first.data is None and bytes(first.source.read(0, 100)) == big[:100]
    finally:
        first.close()
    for _ in range(100):
        if tree.cache.used_bytes:
            break
        await asyncio.sleep(0.01)
    second = await tree.open("kernel", CLIENT)
    assert second.data == big and tree.cache.misses == 1


async def test_debian_loader_folders(policy: StorePolicy) -> None:
    """The OS folders as installed: pxelinux.0, ldlinux.c32, undionly.kpxe, and Debian's packaged link
    /usr/lib/ipxe/ipxe.efi -> /boot/ipxe.efi (allowed as a link target, while /boot is never a root)."""
    roots = default_static_roots()
    if not roots:
        pytest.fail("no OS loader folders: install pxelinux, syslinux-common and ipxe")
    tree = BootTree(roots, None, policy)
    for name, path in [
        ("pxelinux.0", "/usr/lib/PXELINUX/pxelinux.0"),
        ("ldlinux.c32", "/usr/lib/syslinux/modules/bios/ldlinux.c32"),
        ("undionly.kpxe", "/usr/lib/ipxe/undionly.kpxe"),
        ("ipxe.efi", "/usr/lib/ipxe/ipxe.efi"),
    ]:
        assert (await tree.open(name, CLIENT)).data == await asyncio.to_thread(Path(path).read_bytes), name
    with pytest.raises(NotFound):
        await tree.open("vmlinuz", CLIENT)


async def test_a_config_with_a_root_disk_goes_only_to_its_node(tree: BootTree, policy: StorePolicy) -> None:
    names = [f"pxelinux.cfg/{UUID}", "pxelinux.cfg/01-52-54-00-77-00-10", f"{UUID}/pxelinux.cfg/default",
             "pxelinux.cfg/4b2a1c3f-6e5d-704f-8192-a3b4c5d6e7f8", f"grub/grub.cfg-{UUID}",
             "grub/grub.cfg-01-52-54-00-77-00-10", f"ipxe/{UUID}.ipxe", "ipxe/01-52-54-00-77-00-10.ipxe",
             f"boot/{UUID}.ipxe"]
    policy.by_uuid["3f1c2a4b-5d6e-4f70-8192-a3b4c5d6e7f8"] = make_spec(UUID)  # pxelinux's byte-swapped name
    for name in names:
        assert (await tree.open(name, CLIENT)).server_uuid == UUID, name
        with pytest.raises(Denied) as denied:
            await tree.open(name, ("127.0.0.2", 40000))
        assert denied.value.code == 2 and denied.value.outcome == "denied", name
        assert (denied.value.server_uuid, denied.value.client) == (UUID, "127.0.0.2")
        assert "only to its node's own address" in denied.value.reply_text()
    # a stranger is not remembered as the node: its kernel fetch names no server
    assert (await tree.open("templates/tiny/v1/vmlinuz", ("127.0.0.2", 40001))).server_uuid is None


async def test_open_now_answers_only_what_needs_no_waiting(layout: dict[str, Path], policy: StorePolicy) -> None:
    tree = BootTree([layout["loaders"]], layout["files"], policy, cache_bytes=10_000, link_targets=())
    assert tree.open_now("pxelinux.0", CLIENT) is None  # not resolved yet: the caller awaits open()
    await tree.open("pxelinux.0", CLIENT)  # resolves and loads it into the cache
    opened = tree.open_now("pxelinux.0", CLIENT)
    assert opened is not None and opened.data == b"PXE" * 100 and opened.kind == "static"
    rendered = tree.open_now(f"pxelinux.cfg/{UUID}", CLIENT)  # rendered configs never wait
    assert rendered is not None and rendered.server_uuid == UUID
    with pytest.raises(Denied):
        tree.open_now(f"pxelinux.cfg/{UUID}", ("127.0.0.9", 1))
    with pytest.raises(Refused):
        tree.open_now("../secret/passwd", CLIENT)


async def test_concurrent_opens_of_one_name_share_one_resolution(layout: dict[str, Path], policy: StorePolicy,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    tree = BootTree([layout["loaders"]], layout["files"], policy, cache_bytes=10_000, link_targets=())
    calls: list[list[str]] = []
    resolve = tree._resolve_static

    def counted(parts: list[str]) -> object:
        calls.append(parts)
        return resolve(parts)

    monkeypatch.setattr(tree, "_resolve_static", counted)
    opened = await asyncio.gather(*(tree.open("pxelinux.0", CLIENT) for _ in range(20)))
    assert {o.data for o in opened} == {b"PXE" * 100}
    assert calls == [["pxelinux.0"]]  # one worker-thread resolution for the whole burst
    with pytest.raises(NotFound):  # a missing name's burst: each gets NotFound, from one resolution
        await asyncio.gather(*(tree.open("absent.0", CLIENT) for _ in range(3)))
    assert calls[1:] == [["absent.0"]]


async def test_an_answer_opened_once_is_kept_for_the_next_burst(layout: dict[str, Path], policy: StorePolicy) -> None:
    """A name a request had to open (a storm's first burst) is answered by open_now for the next
    burst, even one that comes after its resolution's time, with no wait for a look-up."""
    now = [100.0]
    tree = BootTree([layout["loaders"]], None, policy, resolve_ttl=0.2, stale_ttl=5.0, clock=lambda: now[0])
    assert tree.open_now("ldlinux.c32", CLIENT) is None  # never seen: the caller opens it
    assert (await tree.open("ldlinux.c32", CLIENT)).data == b"LDL"
    now[0] += 2.0
    later = tree.open_now("ldlinux.c32", CLIENT)
    assert later is not None and later.data == b"LDL"
