from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from domain.errors import Conflict, QuotaExceeded
from domain.schema import MIGRATIONS, SCHEMA_VERSION
from domain.store import ServerRow, Store, User, VolumeRow


def _server(uuid: str, owner: str = "alice", macs: tuple[str, ...] = ()) -> ServerRow:
    return ServerRow(uuid=uuid, template="tiny", version="v1", profile="compute", owner=owner, state="creating",
                     reason="", macs=macs, hostname="", address="", created_at=1.0, updated_at=1.0)


def _vol(name: str, server: str, idx: int = 0, size: int = 1 << 30) -> VolumeRow:
    return VolumeRow(name, server, "os" if idx == 0 else "data", idx, size, "creating", "s" + name[-8:])


def test_fresh_store_is_wal_and_current(tmp_path: Path) -> None:
    s = Store(tmp_path / "c.db")
    assert s.version == SCHEMA_VERSION
    mode = sqlite3.connect(tmp_path / "c.db").execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"


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
    assert s.version == SCHEMA_VERSION == 6
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


def test_duplicates_are_conflicts(tmp_path: Path) -> None:
    s = Store(tmp_path / "c.db")
    s.create_server(_server("u1", macs=("52:54:00:00:00:01",)), [_vol("tiny-OS-u1", "u1")])
    with pytest.raises(Conflict, match="already exists"):
        s.create_server(_server("u1"), [])
    with pytest.raises(Conflict, match="MAC 52:54:00:00:00:01 already belongs to server u1"):
        s.create_server(_server("u2", macs=("52:54:00:00:00:01",)), [])
    assert s.server("u2") is None  # nothing half-recorded


def test_quota_is_checked_in_the_same_transaction(tmp_path: Path) -> None:
    s = Store(tmp_path / "c.db")
    s.put_user(User("alice", max_volumes=2, max_data_gb=10))

    def check(n: int, data: int) -> str | None:
        return "too many" if n > 2 else None

    s.create_server(_server("u1"), [_vol("tiny-OS-u1", "u1")], check)
    with pytest.raises(QuotaExceeded):
        s.create_server(_server("u2"), [_vol("tiny-OS-u2", "u2"), _vol("tiny-DATA-u2", "u2", 1)], check)
    assert s.usage("alice") == (1, 0)
    assert s.server("u2") is None


def test_tokens_are_stored_hashed(tmp_path: Path) -> None:
    s = Store(tmp_path / "c.db")
    s.add_token("secret-token-value-1234", "alice", admin=False)
    assert s.token("secret-token-value-1234") == ("alice", False)
    assert s.token("other") is None
    raw = sqlite3.connect(tmp_path / "c.db").execute("SELECT hash FROM tokens").fetchall()
    assert raw and all("secret" not in r[0] for r in raw)


def test_events_are_bounded_and_filtered(tmp_path: Path) -> None:
    s = Store(tmp_path / "c.db")
    s.add_events([(1, 1.0, "tftp", "u1", {"file": "pxelinux.0"}), (2, 2.0, "dhcp", None, {"mac": "x"})])
    assert [e["kind"] for e in s.events()] == ["tftp", "dhcp"]
    assert s.events(server="u1") == [{"id": 1, "at": 1.0, "kind": "tftp", "server": "u1", "file": "pxelinux.0"}]


def test_each_server_lists_its_own_macs_whoever_asks(tmp_path: Path) -> None:
    s = Store(tmp_path / "c.db")
    s.create_server(_server("u1", macs=("52:54:00:00:00:02", "52:54:00:00:00:01")), [])
    s.create_server(_server("u2", owner="bob"), [])
    s.create_server(_server("u3", owner="bob", macs=("52:54:00:00:00:03",)), [])
    assert [(r.uuid, r.macs) for r in s.servers()] == [
        ("u1", ("52:54:00:00:00:01", "52:54:00:00:00:02")), ("u2", ()), ("u3", ("52:54:00:00:00:03",))]
    assert [(r.uuid, r.macs) for r in s.servers("bob")] == [("u2", ()), ("u3", ("52:54:00:00:00:03",))]
    one = s.server("u1")
    assert one is not None and one.macs == ("52:54:00:00:00:01", "52:54:00:00:00:02")
    assert s.server("nope") is None
    s.delete_server("u1")
    assert [r.uuid for r in s.servers()] == ["u2", "u3"]


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


async def test_event_ids_go_on_across_a_restart(tmp_path: Path) -> None:
    """A reader resuming with Last-Event-ID after the appliance restarted must get the new events."""
    from domain.events import EventBus
    from domain.store import AsyncStore

    first = AsyncStore(Store(tmp_path / "e.db"))
    bus = EventBus(first)
    await bus.start()
    ids = [bus.publish("tftp", {"server": "u1"}).id for _ in range(3)]
    await bus.stop()
    first.close()
    again = AsyncStore(Store(tmp_path / "e.db"))
    bus = EventBus(again)
    await bus.start()
    after = bus.publish("dhcp", {"server": "u1"}).id
    await bus.stop()
    assert after > max(ids)
    assert [e["id"] for e in again.sync.events("u1")] == [*ids, after]  # stored under the ids streamed
    again.close()


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
