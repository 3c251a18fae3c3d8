"""The store's parity suite: every test here runs on SQLite and on a real PostgreSQL (tests/pgserver.py, a
throwaway cluster), through the same `Store` and the same queries. What only one engine has is tested
apart: the SQLite file (WAL, mode 0600, PRAGMA migrations) in tests/unit/test_store.py, PostgreSQL's
lock, migration race, lost connection and 503 at the end here.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import psycopg
import pytest

from domain.errors import Conflict, QuotaExceeded, StoreError
from domain.schema_pg import PG_SCHEMA_VERSION
from domain.store import (
    ApplianceRow,
    AsyncStore,
    DiscoveredRow,
    ServerRow,
    Store,
    TemplateCopyRow,
    TemplateVersion,
    User,
    VolumeRow,
    open_store,
)
from tests.pgserver import PgServer, fresh_database, pg_server

__all__ = ["pg_server"]  # the session fixture, for this module's tests

Opener = Callable[[], Store]


def _server(uuid: str, owner: str = "alice", macs: tuple[str, ...] = (), appliance: str = "",
            moving_to: str = "") -> ServerRow:
    return ServerRow(uuid=uuid, template="tiny", version="v1", profile="compute", owner=owner, state="creating",
                     reason="", macs=macs, hostname="", address="", created_at=1.0, updated_at=1.0,
                     appliance=appliance, moving_to=moving_to)


def _vol(server: str, idx: int, size: int = 1 << 30) -> VolumeRow:
    kind = "os" if idx == 0 else "prev" if idx < 0 else "data"
    return VolumeRow(f"v-{server}-{idx}", server, kind, idx, size, "creating", f"s{server}{idx}")


def _appliance(name: str, **changes: Any) -> ApplianceRow:
    return replace(ApplianceRow(name=name, api_url=f"https://{name}:8443", advertise="10.0.0.1"), **changes)


@pytest.fixture(params=["sqlite", "postgresql"])
def reopen(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Opener]:
    """Opens a store on the test's own SQLite file or PostgreSQL database, again on each call (a restart)."""
    pg: PgServer | None = request.getfixturevalue("pg_server") if request.param == "postgresql" else None
    name, url = fresh_database(pg) if pg is not None else ("", "")
    opened: list[Store] = []

    def again() -> Store:
        opened.append(open_store(url, tmp_path / "c.db"))
        return opened[-1]

    yield again
    for s in opened:
        s.close()
    if pg is not None:
        pg.drop_database(name)


@pytest.fixture
def store(reopen: Opener) -> Store:
    return reopen()


# --- what every store does --------------------------------------------------------------------------------

def test_duplicates_are_conflicts(store: Store) -> None:
    store.create_server(_server("u1", macs=("52:54:00:00:00:01",)), [_vol("u1", 0)])
    with pytest.raises(Conflict, match="already exists"):
        store.create_server(_server("u1"), [])
    with pytest.raises(Conflict, match="MAC 52:54:00:00:00:01 already belongs to server u1"):
        store.create_server(_server("u2", macs=("52:54:00:00:00:01",)), [])
    with pytest.raises(Conflict, match="volume already exists"):
        store.create_server(_server("u3"), [_vol("u1", 0)])  # the name is taken
    assert store.server("u2") is None and store.server("u3") is None  # nothing half-recorded
    tv = TemplateVersion("tiny", "v1", "src", 64, "vmlinuz", "initrd", 1.0)
    store.add_template_version(tv)
    with pytest.raises(Conflict, match="template tiny already has version v1"):
        store.add_template_version(tv)


def test_quota_is_checked_in_the_same_transaction(store: Store) -> None:
    store.put_user(User("alice", max_volumes=2, max_data_gb=10))

    def check(n: int, data: int) -> str | None:
        return "too many" if n > 2 else None

    store.create_server(_server("u1"), [_vol("u1", 0)], check)
    with pytest.raises(QuotaExceeded):
        store.create_server(_server("u2"), [_vol("u2", 0), _vol("u2", 1)], check)
    assert store.usage("alice") == (1, 0)
    assert store.server("u2") is None


def test_users_upsert_and_go_only_without_servers(store: Store) -> None:
    store.put_user(User("bob", 1, 1))
    store.put_user(User("bob", 5, 50))
    store.put_user(User("alice", 2, 2))
    assert store.users() == [User("alice", 2, 2), User("bob", 5, 50)]
    store.create_server(_server("u1", owner="bob"), [])
    with pytest.raises(Conflict, match="still owns servers"):
        store.delete_user("bob")
    store.delete_server("u1")
    store.delete_user("bob")
    assert store.user("bob") is None


def test_tokens_are_stored_hashed(store: Store) -> None:
    store.add_token("secret-token-value-1234", "alice", admin=False)
    assert store.token("secret-token-value-1234") == ("alice", False)
    assert store.token("other") is None
    raw = store._all("SELECT hash FROM tokens")
    assert raw and all("secret" not in r[0] for r in raw)
    store.add_token("secret-token-value-1234", None, admin=True, scope="read")  # the same token again: replaced
    assert store.token_with_scope("secret-token-value-1234") == (None, True, "read")
    assert store.has_admin_token()


def test_events_are_bounded_and_filtered(store: Store) -> None:
    store.add_events([(1, 1.0, "tftp", "u1", {"file": "pxelinux.0"}), (2, 2.0, "dhcp", None, {"mac": "x"})])
    store.add_events([(2, 2.0, "dhcp", None, {"mac": "x"})])  # an id stored already is not stored twice
    assert [e["kind"] for e in store.events()] == ["tftp", "dhcp"]
    assert store.events(server="u1") == [{"id": 1, "at": 1.0, "kind": "tftp", "server": "u1", "file": "pxelinux.0"}]
    assert store.last_event_id() == 2


def test_each_appliance_numbers_its_own_events(store: Store) -> None:
    store.add_events([(1, 1.0, "tftp", "u1", {"file": "pxelinux.0"})])  # before fleets: appliance ''
    store.add_events([(2, 5.0, "dhcp", "u1", {"mac": "x"}), (3, 6.0, "tftp", "u1", {})], appliance="a")
    store.add_events([(2, 5.5, "dhcp", "u2", {"mac": "y"})], appliance="b")  # b's id 2 is not a's
    assert [(e["kind"], e.get("appliance"), e["at"]) for e in store.events()] == [
        ("tftp", None, 1.0), ("dhcp", "a", 5.0), ("dhcp", "b", 5.5), ("tftp", "a", 6.0)]  # by time
    assert store.last_event_id("a") == 3 and store.last_event_id("b") == 2
    assert store.last_event_id("c") == 1  # a new appliance goes on above the ids of before fleets
    assert [e["server"] for e in store.events(server="u2")] == ["u2"]


def test_the_audit_log_numbers_its_rows(store: Store) -> None:
    store.add_audit([(1.0, "admin", "POST", "/api/v1/users", 201, ""), (2.0, "bob", "DELETE", "/x", 404, "%_")])
    rows = store.audit()
    assert [(r[2], r[6]) for r in rows] == [("admin", ""), ("bob", "%_")]
    assert store.audit(since=rows[0][0]) == rows[1:]


def test_each_server_lists_its_own_macs_whoever_asks(store: Store) -> None:
    store.create_server(_server("u1", macs=("52:54:00:00:00:02", "52:54:00:00:00:01")), [])
    store.create_server(_server("u2", owner="bob"), [])
    store.create_server(_server("u3", owner="bob", macs=("52:54:00:00:00:03",)), [])
    assert [(r.uuid, r.macs) for r in store.servers()] == [
        ("u1", ("52:54:00:00:00:01", "52:54:00:00:00:02")), ("u2", ()), ("u3", ("52:54:00:00:00:03",))]
    assert [(r.uuid, r.macs) for r in store.servers("bob")] == [("u2", ()), ("u3", ("52:54:00:00:00:03",))]
    one = store.server("u1")
    assert one is not None and one.macs == ("52:54:00:00:00:01", "52:54:00:00:00:02")
    assert store.server("nope") is None
    store.delete_server("u1")
    assert [r.uuid for r in store.servers()] == ["u2", "u3"]


def test_sizes_past_32_bits_and_the_root_swap(store: Store) -> None:
    huge = 3 << 40
    store.put_user(User("alice", 10, 10_000))
    store.create_server(_server("u1"), [_vol("u1", 0, 64), _vol("u1", 1, huge)])
    assert store.usage("alice") == (2, huge)
    store.add_volume(VolumeRow("v-new", "u1", "os", -2, 64, "creating", "sn", "tiny@v2"), "alice")
    assert store.swap_root("u1", "v-new", "tiny", "v2", {"chap_secret": "x" * 16}) is None
    assert [(v.name, v.kind, v.idx) for v in store.volumes("u1")] == [
        ("v-u1-0", "prev", -1), ("v-new", "os", 0), ("v-u1-1", "data", 1)]
    store.swap_back("u1", "tiny", "v1", {})
    assert [(v.name, v.kind, v.idx) for v in store.volumes("u1")] == [
        ("v-new", "prev", -1), ("v-u1-0", "os", 0), ("v-u1-1", "data", 1)]
    server = store.server("u1")
    assert server is not None and (server.version, server.chap_secret) == ("v1", "x" * 16)


def test_clones_of_match_the_template_exactly(store: Store) -> None:
    store.create_server(_server("u1"), [replace(_vol("u1", 0), origin="Tiny@v1")])
    store.create_server(replace(_server("u2"), template="other"), [replace(_vol("u2", 0), origin="tiny@v3")])
    store.create_server(replace(_server("u3"), template="t_ny"), [replace(_vol("u3", 0), origin="t_ny@v1")])
    assert store.clones_of("tiny") == ["u1", "u2"]  # u1 by its record, u2 by its root's origin
    assert store.clones_of("tiny", "v3") == ["u2"]
    assert store.clones_of("Tiny") == ["u1"] and store.clones_of("t_ny") == ["u3"]  # no LIKE wildcards


def test_snapshots_labels_bmc_and_services(store: Store) -> None:
    store.create_server(_server("u1"), [_vol("u1", 0)])
    store.add_snapshot("u1", "before", "v-u1-0", "alice")
    with pytest.raises(Conflict, match="already has a snapshot before"):
        store.add_snapshot("u1", "before", "v-u1-0", "alice")
    assert [(n, v) for n, v, _ in store.snapshots_of("u1")] == [("before", "v-u1-0")]
    assert store.usage("alice") == (2, 0)
    store.delete_snapshot("u1", "before")
    store.set_labels("u1", {"rack": "3"})
    store.set_bmc("u1", "ipmi://10.0.0.9", "admin", "pw")
    server = store.server("u1")
    assert server is not None and server.label_map == {"rack": "3"} and server.bmc_password == "pw"
    store.set_service("dhcp", False)
    store.set_service("dhcp", True)
    store.set_service("tftp", False)
    assert store.services() == {"dhcp": True, "tftp": False}
    # an appliance's own switches, over those of before fleets; another appliance's are not its
    store.set_service("dhcp", False, appliance="a")
    store.set_service("export", False, appliance="b")
    assert store.services("a") == {"dhcp": False, "tftp": False}
    assert store.services("b") == {"dhcp": True, "tftp": False, "export": False}


def test_discovered_nodes_upsert_and_are_trimmed(store: Store) -> None:
    mac = "52:54:00:d1:00:01"
    store.save_discovered([DiscoveredRow(mac, "", 0, "PXEClient", "", "10.0.0.3", 5.0, 6.0, 3)], keep=10)
    store.save_discovered([DiscoveredRow(mac, "u", 7, "PXEClient", "iPXE", "", 4.0, 10.0, 2)], keep=10)
    assert store.discovered_node(mac) == DiscoveredRow(mac, "u", 7, "PXEClient", "iPXE", "10.0.0.3", 4.0, 10.0, 5)
    store.save_discovered([DiscoveredRow(f"52:54:00:d1:00:0{n}", "", 0, "", "", "", 20.0 + n, 20.0 + n, 1)
                           for n in (2, 3)], keep=2)
    assert [r.mac for r in store.discovered()] == ["52:54:00:d1:00:03", "52:54:00:d1:00:02"]
    assert [r.mac for r in store.discovered(limit=1)] == ["52:54:00:d1:00:03"]
    assert store.forget_discovered("52:54:00:d1:00:03") and not store.forget_discovered("52:54:00:d1:00:03")


async def test_event_ids_go_on_across_a_restart(reopen: Opener) -> None:
    """A reader resuming with Last-Event-ID after the appliance restarted must get the new events."""
    from domain.events import EventBus

    first = AsyncStore(reopen())
    bus = EventBus(first)
    await bus.start()
    ids = [bus.publish("tftp", {"server": "u1"}).id for _ in range(3)]
    await bus.stop()
    first.close()
    again = AsyncStore(reopen())
    bus = EventBus(again)
    await bus.start()
    after = bus.publish("dhcp", {"server": "u1"}).id
    await bus.stop()
    assert after > max(ids)
    assert [e["id"] for e in again.sync.events("u1")] == [*ids, after]  # stored under the ids streamed
    again.close()


async def test_events_published_before_start_are_streamed_not_kept(reopen: Opener) -> None:
    """An appliance started without its store (domain.core start_offline) publishes events before the
    bus has read the stored ids: those are streamed live only, not piled up nor saved under ids that
    may be taken."""
    from domain.events import EventBus

    store = AsyncStore(reopen())
    bus = EventBus(store)
    bus.publish("tftp", {"server": "u2"})
    await bus.flush()
    await bus.start()
    later = bus.publish("tftp", {"server": "u2"}).id
    await bus.stop()
    assert [e["id"] for e in store.sync.events("u2")] == [later]
    store.close()


# --- the fleet tables (schema 6) -----------------------------------------------------------------------------

def test_an_appliance_registers_and_a_restart_keeps_the_operators_disable(store: Store) -> None:
    store.register_appliance(_appliance("b", version="1.0", started_at=5.0, labels='{"rack": "2"}'))
    store.register_appliance(_appliance("a", capacity_bytes=1 << 40, free_bytes=1 << 39, answers_unknown=True))
    assert [a.name for a in store.appliances()] == ["a", "b"]
    a = store.appliance("a")
    assert a is not None and a.capacity_bytes == 1 << 40 and a.free_bytes == 1 << 39
    assert a.answers_unknown is True and a.disabled is False
    b = store.appliance("b")
    assert b is not None and b.label_map == {"rack": "2"} and b.version == "1.0"
    assert store.appliance("nope") is None

    assert store.set_appliance_disabled("b", True, "disk swap")
    # the restart registers everything anew, disabled=False included: the operator's setting stays
    store.register_appliance(_appliance("b", version="1.1", started_at=9.0, api_url="https://b2:8443"))
    b = store.appliance("b")
    assert b is not None and (b.disabled, b.disabled_reason) == (True, "disk swap")
    assert (b.version, b.started_at, b.api_url, b.labels) == ("1.1", 9.0, "https://b2:8443", "{}")
    assert store.set_appliance_disabled("b", False)
    b = store.appliance("b")
    assert b is not None and (b.disabled, b.disabled_reason) == (False, "")
    assert not store.set_appliance_disabled("nope", True, "x")


def test_heartbeat_reports_space_and_tells_a_forgotten_appliance(store: Store) -> None:
    store.register_appliance(_appliance("a"))
    assert store.heartbeat("a", 42.5, 1000, 600)
    a = store.appliance("a")
    assert a is not None and (a.heartbeat_at, a.capacity_bytes, a.free_bytes) == (42.5, 1000, 600)
    assert not store.heartbeat("nope", 1.0, 0, 0)


def test_an_appliance_holding_servers_is_not_forgotten(store: Store) -> None:
    for name in ("a", "b"):
        store.register_appliance(_appliance(name))
    store.create_server(_server("u1", appliance="a", moving_to="b"), [])
    store.set_template_copy(TemplateCopyRow("tiny", "v1", "b", "ready", updated_at=1.0))
    store.set_template_copy(TemplateCopyRow("tiny", "v1", "a", "ready", updated_at=1.0))
    with pytest.raises(Conflict, match="appliance a still holds servers"):
        store.forget_appliance("a")
    with pytest.raises(Conflict, match="appliance b still holds servers"):
        store.forget_appliance("b")  # the target of a move in progress
    store.set_server_appliance("u1", "b")
    store.forget_appliance("a")
    assert [a.name for a in store.appliances()] == ["b"]
    assert [c.appliance for c in store.template_copies()] == ["b"]  # its copies went with it
    store.forget_appliance("nope")  # nothing to forget is no error


def test_servers_made_before_fleets_go_to_the_first_appliance(store: Store) -> None:
    store.create_server(_server("u1"), [])
    store.create_server(_server("u2"), [])
    store.create_server(_server("u3", appliance="b"), [])
    assert store.claim_unowned_servers("a") == 2
    assert store.claim_unowned_servers("c") == 0
    assert [(s.uuid, s.appliance) for s in store.servers()] == [("u1", "a"), ("u2", "a"), ("u3", "b")]


def test_servers_filter_by_owner_appliance_or_both(store: Store) -> None:
    store.create_server(_server("u1", owner="alice", appliance="a"), [])
    store.create_server(_server("u2", owner="bob", appliance="a"), [])
    store.create_server(_server("u3", owner="alice", appliance="b"), [])
    assert [s.uuid for s in store.servers()] == ["u1", "u2", "u3"]
    assert [s.uuid for s in store.servers("alice")] == ["u1", "u3"]
    assert [s.uuid for s in store.servers(appliance="a")] == ["u1", "u2"]
    assert [s.uuid for s in store.servers("alice", appliance="a")] == ["u1"]
    assert store.servers("bob", appliance="b") == []


def test_placed_counts_data_in_full_clones_at_the_reserve_and_a_move_on_both_ends(store: Store) -> None:
    big = 5 << 40  # beyond 2^32: provisioned bytes are 64-bit
    store.create_server(_server("u1", appliance="a"), [_vol("u1", 0, 100), _vol("u1", 1, big), _vol("u1", -1, 7)])
    store.create_server(_server("u2", appliance="a", moving_to="b"), [_vol("u2", 0, 10)])
    store.create_server(_server("u3", appliance="c"), [])
    store.create_server(_server("u4"), [_vol("u4", 0, 1)])  # unclaimed: on no appliance
    # data volumes at their size; the OS clone and the restore point at the reserve, whatever their size
    assert store.placed(3) == {"a": (2, 3 + big + 3 + 3), "b": (1, 3), "c": (1, 0)}
    assert store.placed() == {"a": (2, big), "b": (1, 0), "c": (1, 0)}
    store.set_moving_to("u2", "")
    assert store.placed(3)["a"] == (2, 3 + big + 3 + 3) and "b" not in store.placed(3)


def test_a_move_begins_and_ends(store: Store) -> None:
    store.create_server(_server("u1", appliance="a"), [])
    store.set_moving_to("u1", "b")
    s = store.server("u1")
    assert s is not None and (s.appliance, s.moving_to) == ("a", "b")
    store.set_server_appliance("u1", "b")
    s = store.server("u1")
    assert s is not None and (s.appliance, s.moving_to) == ("b", "")


def test_template_copies_upsert_filter_and_are_marked_when_their_version_goes(store: Store) -> None:
    for v in ("v1", "v2"):
        store.add_template_version(TemplateVersion("tiny", v, "src", 64, "vmlinuz", "initrd", 1.0))
    store.set_template_copy(TemplateCopyRow("tiny", "v1", "b", "copying", updated_at=1.0))
    store.set_template_copy(TemplateCopyRow("tiny", "v1", "a", "ready", checksum="sha256:ab", updated_at=2.0))
    store.set_template_copy(TemplateCopyRow("tiny", "v2", "a", "copying", updated_at=3.0))
    store.set_template_copy(TemplateCopyRow("tiny", "v1", "b", "failed", detail="disk full", updated_at=4.0))
    assert store.template_copies("tiny", "v1") == [
        TemplateCopyRow("tiny", "v1", "a", "ready", "", "sha256:ab", 2.0),
        TemplateCopyRow("tiny", "v1", "b", "failed", "disk full", "", 4.0)]
    assert [(c.version, c.appliance) for c in store.template_copies()] == [("v1", "a"), ("v1", "b"), ("v2", "a")]
    assert [c.version for c in store.template_copies("tiny")] == ["v1", "v1", "v2"]
    assert [c.appliance for c in store.template_copies(version="v2")] == ["a"]
    assert store.template_copies("other") == []
    store.delete_template_copy("tiny", "v1", "b")
    assert [(c.version, c.appliance) for c in store.template_copies()] == [("v1", "a"), ("v2", "a")]
    store.set_template_copy(TemplateCopyRow("tiny", "v1", "c", "ready", updated_at=5.0))
    store.delete_template_version("tiny", "v1", here="a")
    # a's copy goes with it (a destroyed its snapshot); c's stays, marked, until c has destroyed its own
    assert [(c.version, c.appliance, c.state) for c in store.template_copies()] == [
        ("v1", "c", "deleting"), ("v2", "a", "copying")]
    with pytest.raises(Exception, match=r"(?i)check"):  # the driver's own error: a bug, not a request
        store.set_template_copy(TemplateCopyRow("tiny", "v2", "a", "bogus", updated_at=1.0))


# --- PostgreSQL's own: appliances racing on one database, and the database going away -----------------------

@pytest.fixture
def pg_url(pg_server: PgServer) -> Iterator[str]:
    name, url = fresh_database(pg_server)
    yield url
    pg_server.drop_database(name)


def _in_threads(n: int, work: Callable[[int], Any]) -> list[Any]:
    """`work(i)` for i < n, started together; each result or the exception it raised."""
    start, results = threading.Barrier(n), [None] * n

    def run(i: int) -> None:
        start.wait()
        try:
            results[i] = work(i)
        except Exception as e:
            results[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results


def test_appliances_starting_together_migrate_once(pg_url: str, tmp_path: Path) -> None:
    stores = _in_threads(3, lambda _: open_store(pg_url, tmp_path / "unused.db"))
    assert all(isinstance(s, Store) for s in stores), stores
    assert [s.version for s in stores] == [PG_SCHEMA_VERSION] * 3
    with psycopg.connect(pg_url) as conn:
        assert conn.execute("SELECT version FROM cello_schema").fetchall() == [(PG_SCHEMA_VERSION,)]
    for s in stores:
        s.close()


def test_two_appliances_cannot_both_slip_under_a_quota(pg_url: str, tmp_path: Path) -> None:
    """Each write takes the store's advisory lock first: the second create waits for the first to commit
    and then counts its volume. (Without the lock both read 0 used during the check's pause.)"""
    a, b = open_store(pg_url, tmp_path / "a.db"), open_store(pg_url, tmp_path / "b.db")
    a.put_user(User("alice", max_volumes=1, max_data_gb=10))

    def check(n: int, data: int) -> str | None:
        time.sleep(0.3)  # the other appliance's create runs meanwhile, were nothing serialising them
        return "too many volumes" if n > 1 else None

    def create(i: int) -> str:
        (a, b)[i].create_server(_server(f"u{i}"), [_vol(f"u{i}", 0)], check)
        return "created"

    results = _in_threads(2, create)
    assert sorted(map(str, results)) == ["created", "too many volumes"], results
    assert a.usage("alice") == (1, 0) and len(b.servers("alice")) == 1
    a.close()
    b.close()


def test_a_newer_schema_is_refused(pg_url: str, tmp_path: Path) -> None:
    open_store(pg_url, tmp_path / "unused.db").close()
    with psycopg.connect(pg_url) as conn:
        conn.execute("UPDATE cello_schema SET version = version + 1")
    with pytest.raises(StoreError, match=f"store schema {PG_SCHEMA_VERSION + 1} is newer than this Cello"):
        open_store(pg_url, tmp_path / "unused.db")


def test_a_lost_connection_fails_the_call_and_the_next_one_connects_again(pg_url: str, tmp_path: Path) -> None:
    store = open_store(pg_url, tmp_path / "unused.db")
    store.set_service("dhcp", True)

    def cut() -> None:  # what a database restart or a network cut does to the appliance's session
        with psycopg.connect(pg_url, autocommit=True) as conn:
            conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                         "WHERE datname = current_database() AND pid <> pg_backend_pid()")

    cut()
    with pytest.raises(StoreError, match="store unreachable"):
        store.services()
    assert store.services() == {"dhcp": True}
    cut()
    with pytest.raises(StoreError, match="store unreachable"):
        store.set_service("dhcp", False)  # a write transaction
    store.set_service("dhcp", False)
    assert store.services() == {"dhcp": False}
    store.close()


def test_an_unreachable_database_is_a_store_error(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="store unreachable"):
        open_store(f"postgresql:///cello?host={tmp_path}", tmp_path / "unused.db")
    with pytest.raises(StoreError, match="store url"):
        open_store("postgresql://x/db?bogus=1", tmp_path / "unused.db")
    with pytest.raises(StoreError, match="store url"):
        open_store("mysql://x/db", tmp_path / "unused.db")
