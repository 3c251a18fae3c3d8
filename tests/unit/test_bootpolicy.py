from __future__ import annotations

from pathlib import Path

from bootfiles.profiles import BUILTIN_PROFILES
from bootfiles.render import render_ipxe
from bootfiles.tree import BootTree
from domain.bootpolicy import ApplianceBootPolicy, build_index, unknown_node_files
from domain.store import ServerRow, TemplateVersion, VolumeRow
from iscsi.model import ExportState

U1 = "3f1c2b4e-0000-4000-8000-000000000001"
U2 = "3f1c2b4e-0000-4000-8000-000000000002"


def _server(uuid: str, state: str = "available", macs: tuple[str, ...] = (), profile: str = "ipxe") -> ServerRow:
    return ServerRow(uuid=uuid, template="tiny", version="v1", profile=profile, owner="alice", state=state,
                     reason="", macs=macs, hostname="n1", address="", created_at=1, updated_at=1)


def _index(servers: list[ServerRow], exports: ExportState | None) -> object:
    volumes = [VolumeRow(f"tiny-OS-{s.uuid}", s.uuid, "os", 0, 1 << 26, "available", "abc") for s in servers]
    versions = [TemplateVersion("tiny", "v1", "tiny", 1 << 26, "templates/tiny/v1/vmlinuz",
                                "templates/tiny/v1/initrd.img", 1.0)]
    return build_index(servers, volumes, versions, profiles=BUILTIN_PROFILES, iqn_prefix="iqn.2026-11.io.cello",
                       portal=("10.77.0.2", 3260), http_base="http://10.77.0.2:8080", exports=exports,
                       lun_number=lambda idx: idx + 1)


def test_index_uses_the_lun_the_driver_really_used_and_falls_back_to_its_rule() -> None:
    iqn = f"iqn.2026-11.io.cello:{U1}"
    idx = _index([_server(U1, macs=("52:54:00:77:00:10",)), _server(U2)],
                 ExportState({iqn: {f"tiny-OS-{U1}": 7}}))
    a = idx.by_uuid[U1]  # type: ignore[attr-defined]
    assert (a.root.target_iqn, a.root.lun, a.root.portal_ip) == (iqn, 7, "10.77.0.2")
    assert a.root.initiator_iqn == f"iqn.2026-11.io.cello:node-{U1}"
    assert a.kernel == "templates/tiny/v1/vmlinuz" and a.profile.loader == "ipxe"
    assert idx.by_mac["52:54:00:77:00:10"] is a  # type: ignore[attr-defined]
    assert idx.by_uuid[U2].root.lun == 1  # type: ignore[attr-defined]  # not in the export state: tgt's rule


def test_dns_names_come_from_servers_with_a_name_and_an_address() -> None:
    named = _server(U1)
    named = ServerRow(**{**named.__dict__, "address": "10.77.0.101"})
    idx = _index([named, _server(U2)], None)
    assert idx.names == {"n1": "10.77.0.101"}  # type: ignore[attr-defined]


def test_only_available_servers_boot() -> None:
    idx = _index([_server(U1, state="creating"), _server(U2, state="error")], None)
    assert idx.by_uuid == {}  # type: ignore[attr-defined]


def _policy(unknown: str, versions: list[TemplateVersion], template: str = "") -> ApplianceBootPolicy:
    policy = ApplianceBootPolicy(
        None,  # type: ignore[arg-type]  # the store is only read by refresh(), not used here
        profiles=BUILTIN_PROFILES, iqn_prefix="iqn.2026-11.io.cello", portal=("10.77.0.2", 3260),
        http_base="http://10.77.0.2:8080", unknown=unknown, exports=lambda: None, lun_number=lambda i: i + 1,
        unknown_template=template)
    policy.unknown_files = unknown_node_files(versions, template)
    return policy


V1 = TemplateVersion("tiny", "v1", "tiny", 1, "templates/tiny/v1/vmlinuz", "templates/tiny/v1/initrd.img", 1.0)
V2 = TemplateVersion("tiny", "v2", "tiny", 1, "templates/tiny/v2/vmlinuz", "templates/tiny/v2/initrd.img", 2.0)
D1 = TemplateVersion("deb", "v1", "debian", 1, "templates/deb/v1/vmlinuz", "templates/deb/v1/initrd.img", 3.0)


def test_unknown_nodes_get_nothing_by_default() -> None:
    assert _policy("ignore", [V1]).boot_spec(uuid=U1, mac="52:54:00:00:00:99") is None


def test_an_unknown_node_profile_boots_the_unknown_template_diskless() -> None:
    spec = _policy("ipxe", [V1, V2, D1], template="tiny").boot_spec(uuid=U1.upper(), mac=None)
    assert spec is not None and spec.root is None and spec.server_uuid == U1
    assert (spec.kernel, spec.profile.name) == ("templates/tiny/v2/vmlinuz", "ipxe")
    by_mac = _policy("compute", [V1, V2, D1]).boot_spec(uuid=None, mac="52:54:00:00:00:99")
    assert by_mac is not None and by_mac.kernel == "templates/deb/v1/vmlinuz"  # '' = the newest built
    assert by_mac.server_uuid == "00000000-0000-0000-0000-000000000000"
    assert _policy("compute", []).boot_spec(uuid=U1, mac=None) is None  # nothing built: nothing to boot


async def test_the_tree_renders_a_diskless_config_for_an_unknown_node(tmp_path: Path) -> None:
    tree = BootTree([], tmp_path, _policy("compute", [V1]))
    opened = await tree.open("pxelinux.cfg/default", ("10.77.0.120", 2000))
    assert opened.data is not None
    text = opened.data.decode()
    assert "KERNEL /templates/tiny/v1/vmlinuz" in text
    assert "APPEND console=ttyS0 quiet cello.server=00000000-0000-0000-0000-000000000000\n" in text
    assert "ISCSI" not in text and "netroot" not in text
    assert "sanhook" not in render_ipxe(_policy("ipxe", [V1]).boot_spec(uuid=U1, mac=None))  # type: ignore[arg-type]
