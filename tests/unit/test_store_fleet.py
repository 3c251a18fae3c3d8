"""The fleet tables of schema 6: appliances, where each server lives, template copies."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from domain.errors import Conflict
from domain.store import ApplianceRow, ServerRow, Store, TemplateCopyRow, TemplateVersion, VolumeRow


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "c.db")


def _server(uuid: str, owner: str = "alice", appliance: str = "", moving_to: str = "") -> ServerRow:
    return ServerRow(uuid=uuid, template="tiny", version="v1", profile="compute", owner=owner, state="creating",
                     reason="", macs=(), hostname="", address="", created_at=1.0, updated_at=1.0,
                     appliance=appliance, moving_to=moving_to)


def _vol(server: str, idx: int, size: int) -> VolumeRow:
    kind = "os" if idx == 0 else "prev" if idx < 0 else "data"
    return VolumeRow(f"v-{server}-{idx}", server, kind, idx, size, "available", f"s{server}{idx}")


def _appliance(name: str, **changes: Any) -> ApplianceRow:
    return replace(ApplianceRow(name=name, api_url=f"https://{name}:8443", advertise="10.0.0.1"), **changes)


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


def test_placed_counts_a_moving_server_on_both_ends(store: Store) -> None:
    big = 5 << 40  # beyond 2^32: provisioned bytes are 64-bit
    store.create_server(_server("u1", appliance="a"), [_vol("u1", 0, 100), _vol("u1", 1, big), _vol("u1", -1, 7)])
    store.create_server(_server("u2", appliance="a", moving_to="b"), [_vol("u2", 0, 10)])
    store.create_server(_server("u3", appliance="c"), [])
    store.create_server(_server("u4"), [_vol("u4", 0, 1)])  # unclaimed: on no appliance
    assert store.placed() == {"a": (2, 100 + big + 7 + 10), "b": (1, 10), "c": (1, 0)}
    store.set_moving_to("u2", "")
    assert store.placed()["a"] == (2, 100 + big + 7 + 10) and "b" not in store.placed()


def test_a_move_begins_and_ends(store: Store) -> None:
    store.create_server(_server("u1", appliance="a"), [])
    store.set_moving_to("u1", "b")
    s = store.server("u1")
    assert s is not None and (s.appliance, s.moving_to) == ("a", "b")
    store.set_server_appliance("u1", "b")
    s = store.server("u1")
    assert s is not None and (s.appliance, s.moving_to) == ("b", "")


def test_template_copies_upsert_filter_and_go_with_their_version(store: Store) -> None:
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
    store.delete_template_version("tiny", "v1")
    assert [(c.version, c.appliance) for c in store.template_copies()] == [("v2", "a")]
    with pytest.raises(Exception, match="CHECK"):
        store.set_template_copy(TemplateCopyRow("tiny", "v2", "a", "bogus", updated_at=1.0))
