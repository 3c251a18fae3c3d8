"""Discovered nodes: the in-memory record the DHCP handler feeds (bounded, evicting the least recently seen),
its batched saves to a real SQLite store (counts added, the table trimmed), a restart, the adopt rule and
the boot policy's filter (a client a server record names is never 'discovered'), and the proxy's side:
what it tells the policy of an unknown client."""

from __future__ import annotations

import dataclasses
import struct
from pathlib import Path

import pytest

from appliance.config import ConfigError, parse_config
from bootfiles.profiles import BUILTIN_PROFILES
from bootfiles.spec import PxeClient
from dhcp import packet as p
from dhcp import pxe
from dhcp.proxy import ProxyDHCP
from domain.bootpolicy import ApplianceBootPolicy
from domain.discovered import EVENTS_PER_SECOND, AdoptRule, DiscoveredNodes, usable_uuid
from domain.events import EventBus
from domain.store import AsyncStore, DiscoveredRow, ServerRow, Store
from tests.dhcp_lab import PROFILES, StaticPolicy, make_spec

UUID = "3f1c2b4e-0000-4000-8000-0000000d1501"


def client(n: int, *, uuid: str | None = None, arch: int = 0, address: str | None = None) -> PxeClient:
    return PxeClient(mac=f"52:54:00:d1:00:{n:02x}", uuid=uuid, arch=arch, vendor_class="PXEClient:Arch:00000",
                     user_class="", address=address)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


def test_seen_counts_keeps_first_seen_and_publishes_discovered_once() -> None:
    bus = EventBus()
    nodes = DiscoveredNodes(None, bus, clock=Clock())
    nodes.seen(client(1, uuid=UUID))
    nodes.seen(client(1, uuid=UUID, arch=7))
    nodes.seen(client(2))
    listing = nodes.listing()
    assert [n.mac for n in listing] == ["52:54:00:d1:00:02", "52:54:00:d1:00:01"]  # most recent first
    one = nodes.get("52-54-00-D1-00-01")
    assert one is not None and one.count == 2 and one.arch == 7 and one.uuid == UUID
    assert one.first_seen == 1001.0 and one.last_seen == 1002.0
    assert [(e.kind, e.data["mac"]) for e in bus.recent()] == [("discovered", "52:54:00:d1:00:01"),
                                                               ("discovered", "52:54:00:d1:00:02")]


def test_an_address_is_kept_once_known_and_strangers_are_not_recorded_by_it() -> None:
    nodes = DiscoveredNodes(None, EventBus())
    nodes.address("52:54:00:d1:00:09", "10.0.0.9")  # never seen booting: nothing recorded
    assert len(nodes) == 0
    nodes.seen(client(1))
    nodes.address("52:54:00:d1:00:01", "10.0.0.5")  # its REQUEST to the site server
    nodes.seen(client(1))  # a DISCOVER says no address: the known one stays
    node = nodes.get("52:54:00:d1:00:01")
    assert node is not None and node.address == "10.0.0.5"


def test_a_flood_of_invented_macs_stays_within_capacity_evicting_the_oldest() -> None:
    bus = EventBus()
    nodes = DiscoveredNodes(None, bus, capacity=50)
    nodes.seen(client(0))
    for n in range(1, 5000):
        nodes.seen(PxeClient(mac=f"02:00:00:{n >> 16 & 255:02x}:{n >> 8 & 255:02x}:{n & 255:02x}", uuid=None,
                             arch=0, vendor_class="PXEClient", user_class="", address=None))
        if n % 10 == 0:
            nodes.seen(client(0))  # a real node that keeps booting stays
    assert len(nodes) == 50
    assert nodes.get("52:54:00:d1:00:00") is not None
    assert nodes.get("02:00:00:00:00:01") is None
    assert len(nodes._unsaved) <= 50
    # nor the event stream: at most EVENTS_PER_SECOND 'discovered' events a second, the rest counted
    published = sum(e.kind == "discovered" for e in bus.recent())
    assert published <= 2 * EVENTS_PER_SECOND and published + nodes.events_suppressed == 5000


async def test_batches_reach_the_store_with_counts_added_and_the_table_trimmed(tmp_path: Path) -> None:
    store = AsyncStore(Store(tmp_path / "c.db"))
    try:
        nodes = DiscoveredNodes(store, EventBus(), capacity=3)
        nodes.seen(client(1, uuid=UUID))
        nodes.seen(client(1, uuid=UUID))
        assert await store.call(store.sync.discovered) == []  # the handler's side writes nothing
        await nodes.flush()
        rows = await store.call(store.sync.discovered)
        assert [(r.mac, r.count, r.uuid) for r in rows] == [("52:54:00:d1:00:01", 2, UUID)]
        nodes.seen(client(1, uuid=UUID, address="10.0.0.7"))
        for n in (2, 3, 4):
            nodes.seen(client(n))
        await nodes.flush()
        rows = await store.call(store.sync.discovered)
        assert {r.mac: r.count for r in rows} == {"52:54:00:d1:00:02": 1, "52:54:00:d1:00:03": 1,
                                                  "52:54:00:d1:00:04": 1}  # the first was the oldest seen
        assert await nodes.flush() is None and nodes._unsaved == {}

        # A restart: the records come back, and a node seen before is not 'discovered' again.
        nodes.seen(client(4))
        await nodes.stop()
        bus = EventBus()
        again = DiscoveredNodes(store, bus, capacity=3)
        await again.load()
        four = again.get("52:54:00:d1:00:04")
        assert four is not None and four.count == 2
        again.seen(client(4))
        assert bus.recent() == []
        assert await again.forget("52:54:00:d1:00:04") is True
        assert await store.call(store.sync.discovered_node, "52:54:00:d1:00:04") is None
        assert await again.forget("52:54:00:d1:00:04") is False
    finally:
        store.close()


def test_store_upsert_adds_counts_and_keeps_the_known_address(tmp_path: Path) -> None:
    s = Store(tmp_path / "c.db")
    row = DiscoveredRow("52:54:00:d1:00:01", "", 0, "PXEClient", "", "10.0.0.3", 5.0, 6.0, 3)
    s.save_discovered([row], keep=10)
    s.save_discovered([DiscoveredRow("52:54:00:d1:00:01", UUID, 7, "PXEClient", "iPXE", "", 9.0, 10.0, 2)], keep=10)
    got = s.discovered_node("52:54:00:d1:00:01")
    assert got == DiscoveredRow("52:54:00:d1:00:01", UUID, 7, "PXEClient", "iPXE", "10.0.0.3", 5.0, 10.0, 5)


async def test_an_adopted_mac_is_not_recorded_again_while_its_server_is_made() -> None:
    nodes = DiscoveredNodes(None, EventBus())
    nodes.seen(client(1))
    assert await nodes.forget("52:54:00:d1:00:01", adopted=True)
    nodes.seen(client(1))
    assert len(nodes) == 0


def test_the_adopt_rule_matches_every_condition_given() -> None:
    row = DiscoveredRow("52:54:00:d1:00:01", "", 7, "PXEClient", "", "", 1.0, 1.0, 1)
    assert AdoptRule("tiny", "lab", mac_prefix="52:54:00").matches(row)
    assert AdoptRule("tiny", "lab", arch=7).matches(row)
    assert not AdoptRule("tiny", "lab", mac_prefix="52:54:00", arch=0).matches(row)
    assert not AdoptRule("tiny", "lab", mac_prefix="52:54:01").matches(row)
    assert usable_uuid(UUID.upper()) == UUID
    assert usable_uuid("") is None and usable_uuid("00000000-0000-0000-0000-000000000000") is None


def test_config_adopt_rule_and_its_refusals() -> None:
    c = parse_config({"dhcp": {"adopt": {"mac_prefix": "52-54-00", "arch": 7, "template": "tiny", "user": "lab"}}})
    assert c.dhcp.adopt == AdoptRule("tiny", "lab", mac_prefix="52:54:00", arch=7)
    assert parse_config({}).dhcp.adopt is None
    for raw, message in (
        ({"template": "tiny", "user": "lab"}, "dhcp.adopt: needs mac_prefix or arch"),
        ({"mac_prefix": "52:54", "user": "lab"}, "dhcp.adopt.template: required"),
        ({"mac_prefix": "zz", "template": "tiny", "user": "lab"}, "dhcp.adopt.mac_prefix: must be"),
        ({"arch": "7", "template": "tiny", "user": "lab"}, "dhcp.adopt.arch: must be an integer"),
        ({"arch": 70000, "template": "tiny", "user": "lab"}, "dhcp.adopt.arch: must be 0..65535"),
        ({"arch": 7, "template": "Tiny!", "user": "lab"}, "dhcp.adopt.template:"),
        ({"arch": 7, "template": "tiny", "user": "lab", "colour": 1}, "dhcp.adopt.colour: unknown key"),
        ({"arch": 7, "template": "tiny", "user": "lab", "profile": "nope"}, "dhcp.adopt.profile: no profile"),
    ):
        with pytest.raises(ConfigError, match=message):
            parse_config({"dhcp": {"adopt": raw}})


async def test_the_policy_notes_only_clients_no_server_record_names(tmp_path: Path) -> None:
    store = AsyncStore(Store(tmp_path / "c.db"))
    try:
        known = ServerRow(uuid=UUID, template="tiny", version="v1", profile="compute", owner="alice", state="error",
                          reason="x", macs=("52:54:00:d1:00:01",), hostname="", address="", created_at=1.0,
                          updated_at=1.0)
        await store.call(store.sync.create_server, known, [])
        nodes = DiscoveredNodes(store, EventBus())
        policy = ApplianceBootPolicy(store, profiles=BUILTIN_PROFILES, iqn_prefix="iqn.2026-11.io.cello",
                                     portal=("127.0.0.1", 3260), http_base="http://127.0.0.1:8080", unknown="ignore",
                                     exports=lambda: None, lun_number=lambda i: i, discovered=nodes)
        await policy.refresh()
        policy.client_unknown(client(1))  # its MAC is a server's (one in error: it boots nothing, yet known)
        policy.client_unknown(client(2, uuid=UUID))  # its UUID is
        policy.client_unknown(client(3))
        policy.client_seen(mac="52:54:00:d1:00:03", uuid=None, address="10.0.0.3")
        assert [(n.mac, n.address) for n in nodes.listing()] == [("52:54:00:d1:00:03", "10.0.0.3")]
    finally:
        store.close()


def _discover(mac: bytes, arch: int, *, uuid: str | None = None, user_class: bytes | None = None,
              mtype: int = p.DHCPDISCOVER, ciaddr: str = "0.0.0.0") -> bytes:
    opts: list[tuple[int, bytes]] = [(p.OPT_MESSAGE_TYPE, bytes([mtype])),
                                     (p.OPT_VENDOR_CLASS, b"PXEClient:Arch:00007:UNDI:003016\x01"),
                                     (p.OPT_CLIENT_ARCH, struct.pack("!H", arch))]
    if uuid is not None:
        opts.append((p.OPT_CLIENT_GUID, b"\x00" + pxe.guid_bytes(uuid)))
    if user_class is not None:
        opts.append((p.OPT_USER_CLASS, bytes([len(user_class)]) + user_class))
    return p.encode(p.DhcpPacket(op=p.BOOTREQUEST, htype=p.HTYPE_ETHERNET, xid=0x77, chaddr=mac, ciaddr=ciaddr,
                                 options=p.Options.of(opts)))


def test_the_proxy_tells_the_policy_of_unknown_clients_only() -> None:
    known = make_spec(UUID, PROFILES["pxelinux"], "http://127.0.0.1:8080")
    policy = StaticPolicy(by_uuid={UUID: known})
    proxy = ProxyDHCP(policy, "10.0.0.2")
    mac = bytes.fromhex("525400d10042")
    assert proxy.handle(_discover(mac, 0, uuid=UUID), ("0.0.0.0", 68), pxe.Kind.DISCOVER) is not None
    assert policy.unknown_clients == []
    assert proxy.handle(_discover(mac, 7, user_class=b"iPXE"), ("0.0.0.0", 68), pxe.Kind.DISCOVER) is None
    assert proxy.handle(_discover(mac, 7, mtype=p.DHCPREQUEST), ("10.0.0.42", 4011), pxe.Kind.REQUEST) is None
    assert policy.unknown_clients == [
        PxeClient("52:54:00:d1:00:42", None, 7, "PXEClient:Arch:00007:UNDI:003016?", "iPXE", None),
        PxeClient("52:54:00:d1:00:42", None, 7, "PXEClient:Arch:00007:UNDI:003016?", "", "10.0.0.42"),
    ]
    # The unknown-node profile's spec (no root disk) is an answer, and the client is still unknown.
    policy.unknown = dataclasses.replace(known, server_uuid="00000000-0000-0000-0000-000000000000", root=None)
    assert proxy.handle(_discover(mac, 0), ("0.0.0.0", 68), pxe.Kind.DISCOVER) is not None
    assert len(policy.unknown_clients) == 3
