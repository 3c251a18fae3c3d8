"""The boot index cache (domain/bootcache.py): what boots a node survives the round trip, a BMC password
never reaches the disk, the file is private and replaced whole, and a damaged file is refused."""

from __future__ import annotations

import dataclasses
import json
import stat
from pathlib import Path

import pytest

from domain import bootcache
from domain.store import ServerRow, TemplateVersion, VolumeRow

SERVER = ServerRow(uuid="5d000000-0000-4000-8000-000000000001", template="tiny", version="v1", profile="ipxe",
                   owner="alice", state="available", reason="", macs=("52:54:00:5d:00:01", "52:54:00:5d:00:02"),
                   hostname="n1", address="10.0.0.5", created_at=1.0, updated_at=2.0, chap_user="node-1",
                   chap_secret="s3cretCHAPsecret", bmc_url="ipmi://10.0.1.5", bmc_user="admin",
                   bmc_password="bmc-password-never-cached", appliance="a")
VOLUME = VolumeRow(name="tiny-OS-1", server=SERVER.uuid, kind="os", idx=0, size=1 << 30, state="available",
                   serial="abc", origin="tiny@v1")
VERSION = TemplateVersion("tiny", "v1", "tiny", 1 << 30, "templates/tiny/v1/vmlinuz", "templates/tiny/v1/initrd",
                          3.0)


def test_the_index_survives_the_round_trip_without_the_bmc_password(tmp_path: Path) -> None:
    path = tmp_path / "boot-index.json"
    bootcache.write(path, bootcache.encode([SERVER], [VOLUME], [VERSION], {"dhcp": False}), now=42.0)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert "bmc-password-never-cached" not in path.read_text()
    cached = bootcache.read(path)
    assert cached is not None
    assert cached.servers == [dataclasses.replace(SERVER, bmc_password="")]
    assert cached.servers[0].macs == SERVER.macs and cached.servers[0].chap_secret == SERVER.chap_secret
    assert (cached.volumes, cached.versions, cached.services, cached.written_at) == ([VOLUME], [VERSION],
                                                                                      {"dhcp": False}, 42.0)
    assert not list(tmp_path.glob(".*.part"))  # replaced whole: no temporary file left


def test_no_file_is_none_and_a_damaged_one_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "boot-index.json"
    assert bootcache.read(path) is None
    for text in ("{not json", '{"format": 99}', '{"format": 1, "servers": [{"uuid": 1}]}', "[]"):
        path.write_text(text)
        with pytest.raises(ValueError, match="cached boot index"):
            bootcache.read(path)


def test_a_field_a_later_cello_added_is_dropped(tmp_path: Path) -> None:
    path = tmp_path / "boot-index.json"
    bootcache.write(path, bootcache.encode([SERVER], [VOLUME], [VERSION], {}))
    data = json.loads(path.read_text())
    data["servers"][0]["a_later_field"] = "x"
    path.write_text(json.dumps(data))
    cached = bootcache.read(path)
    assert cached is not None and cached.servers[0].uuid == SERVER.uuid


def test_an_unchanged_index_encodes_to_the_same_bytes() -> None:
    # refresh() compares these to skip a write: the time stamp is not part of them
    assert bootcache.encode([SERVER], [VOLUME], [VERSION], {}) == bootcache.encode([SERVER], [VOLUME], [VERSION], {})
    assert bootcache.encode([SERVER], [VOLUME], [VERSION], {}) != bootcache.encode([SERVER], [], [VERSION], {})
