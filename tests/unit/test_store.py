"""The SQLite file's own: WAL, mode 0600, the PRAGMA user_version migrations from every old version. What
every store does, on SQLite and PostgreSQL alike, is tests/integration/test_store_backends.py."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from domain.schema import MIGRATIONS, SCHEMA_VERSION
from domain.store import Store, VolumeRow


def test_fresh_store_is_wal_and_current(tmp_path: Path) -> None:
    s = Store(tmp_path / "c.db")
    assert s.version == SCHEMA_VERSION
    mode = sqlite3.connect(tmp_path / "c.db").execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"
    assert (tmp_path / "c.db").stat().st_mode & 0o777 == 0o600  # it holds CHAP secrets and BMC passwords


def test_an_old_schema_upgrades_with_its_data_kept(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    db.executescript(MIGRATIONS[0] + "; PRAGMA user_version = 1;")
    db.execute("INSERT INTO servers (uuid, template, version, profile, owner, state, reason, created_at, updated_at)"
               " VALUES ('u1', 'tiny', 'v1', 'compute', 'alice', 'available', '', 1, 1)")
    db.execute("INSERT INTO server_macs VALUES ('52:54:00:00:00:01', 'u1')")
    db.commit()
    db.close()

    s = Store(path)
    assert s.version == SCHEMA_VERSION == 7
    server = s.server("u1")
    assert server is not None and server.state == "available" and server.macs == ("52:54:00:00:00:01",)
    assert server.hostname == ""  # the column that version 2 added, with its default
    # version 3's CHAP: a server made before it keeps no secret, so its running node's next login works
    assert (server.chap_user, server.chap_secret, server.chap_mutual_secret) == ("", "", "")
    s.set_service("dhcp", False)
    assert s.services() == {"dhcp": False}


def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "new.db"
    sqlite3.connect(path).execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(Exception, match="newer than this Cello"):
        Store(path)


def test_version_4_keeps_every_volume_and_records_each_roots_origin(tmp_path: Path) -> None:
    """3 → 4 makes the volumes table again (a new kind, 'prev'): rows, states and serials survive, and an
    OS volume learns the template version it was cloned from."""
    path = tmp_path / "v3.db"
    db = sqlite3.connect(path)
    db.executescript("".join(MIGRATIONS[:3]) + "; PRAGMA user_version = 3;")
    db.execute("INSERT INTO servers (uuid, template, version, profile, owner, state, reason, created_at, updated_at)"
               " VALUES ('u1', 'tiny', 'v2', 'compute', 'alice', 'available', '', 1, 1)")
    db.executemany("INSERT INTO volumes VALUES (?, 'u1', ?, ?, ?, 'available', ?, 1)",
                   [("tiny-OS-u1", "os", 0, 64, "s0"), ("tiny-DATA-u1", "data", 1, 1 << 30, "s1")])
    db.commit()
    db.close()
    s = Store(path)
    assert s.version == SCHEMA_VERSION
    assert s.volumes("u1") == [VolumeRow("tiny-OS-u1", "u1", "os", 0, 64, "available", "s0", "tiny@v2"),
                               VolumeRow("tiny-DATA-u1", "u1", "data", 1, 1 << 30, "available", "s1", "")]
    assert s.usage("alice") == (2, 1 << 30)
    server = s.server("u1")
    assert server is not None and server.label_map == {} and server.bmc_url == ""


def test_version_6_gives_old_servers_no_appliance_yet(tmp_path: Path) -> None:
    """5 → 6: a server from before fleets is on no appliance until the first one to start claims it."""
    path = tmp_path / "v5.db"
    db = sqlite3.connect(path)
    db.executescript("".join(MIGRATIONS[:5]) + "; PRAGMA user_version = 5;")
    db.execute("INSERT INTO servers (uuid, template, version, profile, owner, state, reason, created_at, updated_at)"
               " VALUES ('u1', 'tiny', 'v1', 'compute', 'alice', 'available', '', 1, 1)")
    db.commit()
    db.close()
    s = Store(path)
    server = s.server("u1")
    assert server is not None and (server.appliance, server.moving_to) == ("", "")
    assert s.appliances() == [] and s.template_copies() == []
    assert s.claim_unowned_servers("a") == 1
