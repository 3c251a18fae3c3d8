from __future__ import annotations

from appliance.bootpolicy import build_index
from appliance.store import ServerRow, TemplateVersion, VolumeRow
from bootfiles.profiles import BUILTIN_PROFILES
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
