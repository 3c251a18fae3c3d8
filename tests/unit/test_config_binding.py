"""Who may fetch a node's boot config: the packet rule (dhcp/binding.py), the binding table
(appliance/bindings.py) and the policy that joins them with the servers' configured addresses."""

from __future__ import annotations

import dataclasses

import pytest

from bootfiles.profiles import BUILTIN_PROFILES
from dhcp import packet as p
from dhcp import pxe
from dhcp.binding import OPT_REQUESTED_IP, SeenClient, client_address, seen_client
from domain.bindings import BindingTable, ipv4_of
from domain.bootpolicy import ApplianceBootPolicy, build_index, node_access
from domain.store import ServerRow, TemplateVersion, VolumeRow

MAC = "52:54:00:77:00:10"
U1 = "3f1c2b4e-0000-4000-8000-000000000001"
U2 = "3f1c2b4e-0000-4000-8000-000000000002"
DISCOVER, REQUEST = pxe.Kind.DISCOVER, pxe.Kind.REQUEST  # :67 and :4011


def packet(mtype: int, *, ciaddr: str = "0.0.0.0", giaddr: str = "0.0.0.0", requested: str | None = None,
           guid: bytes | None = None, mac: str = MAC) -> p.DhcpPacket:
    opts: list[tuple[int, bytes]] = [(p.OPT_MESSAGE_TYPE, bytes([mtype]))]
    if requested is not None:
        opts.append((OPT_REQUESTED_IP, p.ip_bytes(requested, "requested")))
    if guid is not None:
        opts.append((p.OPT_CLIENT_GUID, b"\x00" + guid))
    return p.DhcpPacket(op=p.BOOTREQUEST, xid=7, chaddr=bytes.fromhex(mac.replace(":", "")), ciaddr=ciaddr,
                        giaddr=giaddr, options=p.Options(tuple(opts)))


def wire(pkt: p.DhcpPacket) -> p.DhcpPacket:
    """Through the codec and back, as the proxy sees it."""
    return p.decode(p.encode(pkt))


# --- the packet rule ---------------------------------------------------------------------------------

def test_a_broadcast_discover_from_nowhere_says_nothing() -> None:
    assert client_address(wire(packet(p.DHCPDISCOVER)), ("0.0.0.0", 68), DISCOVER) is None
    # option 50 in a DISCOVER is only a wish (RFC 2131 §4.4.1)
    assert client_address(wire(packet(p.DHCPDISCOVER, requested="10.77.0.120")), ("0.0.0.0", 68), DISCOVER) is None


def test_the_request_to_the_site_server_names_the_address_it_takes() -> None:
    req = wire(packet(p.DHCPREQUEST, requested="10.77.0.120"))
    assert client_address(req, ("0.0.0.0", 68), DISCOVER) == "10.77.0.120"
    renew = wire(packet(p.DHCPREQUEST, ciaddr="10.77.0.121"))
    assert client_address(renew, ("10.77.0.121", 68), DISCOVER) == "10.77.0.121"


def test_a_relayed_packet_never_names_the_relay() -> None:
    relayed = wire(packet(p.DHCPREQUEST, giaddr="10.77.9.1"))
    assert client_address(relayed, ("10.77.9.1", 67), DISCOVER) is None
    assert client_address(relayed, ("10.77.9.1", 4011), REQUEST) is None
    # what the packet itself says still counts
    with_50 = wire(packet(p.DHCPREQUEST, giaddr="10.77.9.1", requested="10.77.9.50"))
    assert client_address(with_50, ("10.77.9.1", 67), DISCOVER) == "10.77.9.50"


def test_the_4011_request_is_unicast_from_the_client() -> None:
    assert client_address(wire(packet(p.DHCPREQUEST)), ("10.77.0.130", 68), REQUEST) == "10.77.0.130"
    assert client_address(wire(packet(p.DHCPINFORM)), ("10.77.0.131", 68), REQUEST) == "10.77.0.131"
    ciaddr = wire(packet(p.DHCPREQUEST, ciaddr="10.77.0.132"))
    assert client_address(ciaddr, ("10.77.0.133", 68), REQUEST) == "10.77.0.132"
    assert client_address(wire(packet(p.DHCPREQUEST)), ("0.0.0.0", 68), REQUEST) is None


def test_the_source_of_a_67_packet_is_never_used() -> None:
    assert client_address(wire(packet(p.DHCPREQUEST)), ("10.77.0.140", 68), DISCOVER) is None


def test_release_decline_and_odd_addresses_say_nothing() -> None:
    src = ("10.77.0.120", 68)
    assert client_address(wire(packet(p.DHCPRELEASE, ciaddr="10.77.0.120")), src, DISCOVER) is None
    assert client_address(wire(packet(p.DHCPDECLINE, requested="10.77.0.120")), src, DISCOVER) is None
    for bad in ("255.255.255.255", "224.0.0.1"):
        assert client_address(wire(packet(p.DHCPREQUEST, requested=bad)), src, DISCOVER) is None
        assert client_address(wire(packet(p.DHCPREQUEST)), (bad, 68), REQUEST) is None
    short_50 = p.DhcpPacket(op=p.BOOTREQUEST, xid=1, chaddr=bytes(6), options=p.Options(
        ((p.OPT_MESSAGE_TYPE, bytes([p.DHCPREQUEST])), (OPT_REQUESTED_IP, b"\x0a\x4d"))))
    assert client_address(short_50, src, DISCOVER) is None


def test_seen_client_carries_mac_and_smbios_uuid() -> None:
    seen = seen_client(wire(packet(p.DHCPREQUEST, requested="10.77.0.120", guid=pxe.guid_bytes(U1))),
                       ("0.0.0.0", 68), DISCOVER)
    assert seen == SeenClient(MAC, U1, "10.77.0.120")
    broken = seen_client(wire(packet(p.DHCPREQUEST, requested="10.77.0.120", guid=bytes(16))), ("0.0.0.0", 68),
                         DISCOVER)
    assert broken == SeenClient(MAC, None, "10.77.0.120")
    reply = dataclasses.replace(packet(p.DHCPREQUEST, requested="10.77.0.120"), op=p.BOOTREPLY)
    assert seen_client(reply, ("0.0.0.0", 68), DISCOVER) is None


# --- the table ---------------------------------------------------------------------------------------

class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_binding_expires_after_its_ttl() -> None:
    clock = Clock()
    table = BindingTable(ttl=600, clock=clock)
    table.learn("10.77.0.120", mac=MAC.upper(), uuid=U1.upper())
    clock.now += 599
    assert table.address_of_mac(MAC) == "10.77.0.120" and table.address_of_uuid(U1) == "10.77.0.120"
    table.learn("10.77.0.120", mac=MAC)  # seen again: the MAC's binding lasts longer, the UUID's does not
    clock.now += 1
    assert table.address_of_uuid(U1) is None and table.address_of_mac(MAC) == "10.77.0.120"
    assert len(table) == 1
    clock.now += 600
    assert table.address_of_mac(MAC) is None and len(table) == 0


def test_re_dhcp_to_a_new_address_replaces_the_old_one() -> None:
    table = BindingTable(clock=Clock())
    table.learn("10.77.0.120", mac=MAC, uuid=U1)
    table.learn("10.77.0.133", mac=MAC, uuid=U1)
    assert table.address_of_mac(MAC) == "10.77.0.133" and table.address_of_uuid(U1) == "10.77.0.133"


def test_the_table_is_bounded_and_drops_the_least_recently_learned() -> None:
    table = BindingTable(capacity=4, clock=Clock())
    macs = [f"52:54:00:00:00:{i:02x}" for i in range(10)]
    for i, mac in enumerate(macs):
        table.learn(f"10.0.0.{i + 1}", mac=mac)
        if i == 5:
            table.learn("10.0.0.1", mac=macs[0])  # learned again: young again
    assert len(table) == 4
    assert [table.address_of_mac(m) for m in macs] == [None] * 6 + ["10.0.0.7", "10.0.0.8", "10.0.0.9", "10.0.0.10"]
    table = BindingTable(capacity=4, clock=Clock())
    for i, mac in enumerate(macs[:5]):
        table.learn(f"10.0.0.{i + 1}", mac=mac)
        if i == 2:
            table.learn("10.0.0.1", mac=macs[0])
    assert table.address_of_mac(macs[0]) == "10.0.0.1" and table.address_of_mac(macs[1]) is None


def test_addresses_are_canonical_ipv4() -> None:
    assert ipv4_of("::ffff:10.77.0.120") == "10.77.0.120" and ipv4_of("10.77.0.120") == "10.77.0.120"
    assert ipv4_of("fd77::5") is None and ipv4_of("") is None and ipv4_of("node1") is None
    with pytest.raises(ValueError):
        BindingTable().learn("fd77::5", mac=MAC)
    with pytest.raises(ValueError):
        BindingTable(ttl=0)


# --- the policy --------------------------------------------------------------------------------------

def _server(uuid: str, macs: tuple[str, ...] = (), address: str = "") -> ServerRow:
    return ServerRow(uuid=uuid, template="tiny", version="v1", profile="ipxe", owner="alice", state="available",
                     reason="", macs=macs, hostname="", address=address, created_at=1, updated_at=1)


def _policy(servers: list[ServerRow], clock: Clock) -> ApplianceBootPolicy:
    policy = ApplianceBootPolicy(
        None,  # type: ignore[arg-type]  # the store is only read by refresh(), not used here
        profiles=BUILTIN_PROFILES, iqn_prefix="iqn.2026-11.io.cello", portal=("10.77.0.2", 3260),
        http_base="http://10.77.0.2:8080", unknown="ipxe", exports=lambda: None, lun_number=lambda i: i + 1,
        bindings=BindingTable(ttl=600, capacity=64, clock=clock))
    volumes = [VolumeRow(f"tiny-OS-{s.uuid}", s.uuid, "os", 0, 1 << 26, "available", "abc") for s in servers]
    versions = [TemplateVersion("tiny", "v1", "tiny", 1 << 26, "templates/tiny/v1/vmlinuz",
                                "templates/tiny/v1/initrd.img", 1.0)]
    policy.index = build_index(servers, volumes, versions, profiles=BUILTIN_PROFILES,
                               iqn_prefix="iqn.2026-11.io.cello", portal=("10.77.0.2", 3260),
                               http_base="http://10.77.0.2:8080", exports=None, lun_number=lambda i: i + 1)
    policy.nodes = node_access(servers)
    policy.unknown_files = ("templates/tiny/v1/vmlinuz", "templates/tiny/v1/initrd.img")
    return policy


def test_a_known_nodes_config_goes_only_where_its_dhcp_came_from() -> None:
    clock = Clock()
    policy = _policy([_server(U1, macs=(MAC,)), _server(U2)], clock)
    spec = policy.boot_spec(uuid=U1, mac=None)
    assert spec is not None and spec.root is not None
    assert not policy.may_fetch(spec, "10.77.0.120")  # nothing seen yet: nobody
    policy.client_seen(mac=MAC.upper(), uuid=None, address="10.77.0.120")
    assert policy.may_fetch(spec, "10.77.0.120") and policy.may_fetch(spec, "::ffff:10.77.0.120")
    assert not policy.may_fetch(spec, "10.77.0.121")
    policy.client_seen(mac="52:54:00:99:99:99", uuid=U2, address="10.77.0.122")  # U2 known by UUID only
    spec2 = policy.boot_spec(uuid=U2, mac=None)
    assert spec2 is not None and policy.may_fetch(spec2, "10.77.0.122") and not policy.may_fetch(spec, "10.77.0.122")
    clock.now += 601
    assert not policy.may_fetch(spec, "10.77.0.120") and not policy.may_fetch(spec2, "10.77.0.122")


def test_strangers_are_not_kept_and_diskless_configs_are_public() -> None:
    clock = Clock()
    policy = _policy([_server(U1, macs=(MAC,))], clock)
    for i in range(200):
        policy.client_seen(mac=f"02:00:00:00:{i >> 8:02x}:{i & 0xff:02x}", uuid=f"0d2b0000-0000-4000-8000-{i:012x}",
                           address=f"10.77.1.{i % 250 + 1}")
    assert len(policy.bindings) == 0
    stranger = policy.boot_spec(uuid="0d2b0000-0000-4000-8000-000000000001", mac=None)
    assert stranger is not None and stranger.root is None and policy.may_fetch(stranger, "10.77.1.2")


def test_a_configured_address_needs_no_dhcp() -> None:
    policy = _policy([_server(U1, macs=(MAC,), address="10.77.0.150")], Clock())
    spec = policy.boot_spec(uuid=U1, mac=None)
    assert spec is not None and policy.may_fetch(spec, "10.77.0.150") and not policy.may_fetch(spec, "10.77.0.151")
    policy.client_seen(mac=MAC, uuid=U1, address="10.77.0.151")  # DHCP elsewhere: that address too
    assert policy.may_fetch(spec, "10.77.0.151") and policy.may_fetch(spec, "10.77.0.150")
