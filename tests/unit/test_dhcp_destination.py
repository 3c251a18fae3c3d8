"""Where a proxyDHCP reply goes (dhcp.pxe.reply_destination): RFC 2131 §4.1 and PXE 2.1 §2.2.5."""

from __future__ import annotations

import pytest

from dhcp import packet as p
from dhcp.pxe import Kind, reply_destination

MAC = b"\x52\x54\x00\x78\x02\x01"


def packet(*, ciaddr: str = "0.0.0.0", giaddr: str = "0.0.0.0") -> p.DhcpPacket:
    return p.DhcpPacket(op=p.BOOTREQUEST, xid=1, chaddr=MAC, ciaddr=ciaddr, giaddr=giaddr)


def dest(pkt: p.DhcpPacket, source: tuple[str, int], kind: Kind) -> tuple[str, int]:
    return reply_destination(pkt, source, kind, relay_port=67, client_port=68, broadcast="255.255.255.255")


@pytest.mark.parametrize(("pkt", "source", "want"), [
    # relayed: to the relay agent's server port, whatever the client's own address
    (packet(giaddr="10.1.0.1"), ("10.1.0.1", 67), ("10.1.0.1", 67)),
    (packet(giaddr="10.1.0.1", ciaddr="10.2.0.7"), ("10.1.0.1", 67), ("10.1.0.1", 67)),
    # a client that has an address (renewing, or iPXE asking again): unicast to it, at the client port
    (packet(ciaddr="10.2.0.7"), ("10.2.0.7", 68), ("10.2.0.7", 68)),
    # no address yet, not relayed: broadcast (a proxy does not know the yiaddr the site server gives)
    (packet(), ("0.0.0.0", 68), ("255.255.255.255", 68)),
])
def test_discover_on_67(pkt: p.DhcpPacket, source: tuple[str, int], want: tuple[str, int]) -> None:
    assert dest(pkt, source, Kind.DISCOVER) == want


@pytest.mark.parametrize(("pkt", "source", "want"), [
    # PXE 2.1 §2.2.5: the boot server answers where the client asked from: its ciaddr, at its source port
    (packet(ciaddr="10.2.0.7"), ("10.2.0.7", 68), ("10.2.0.7", 68)),
    (packet(ciaddr="10.2.0.7"), ("10.2.0.7", 1234), ("10.2.0.7", 1234)),
    # no ciaddr: the datagram's source address
    (packet(), ("10.2.0.8", 68), ("10.2.0.8", 68)),
    # giaddr plays no part on 4011 (the client unicasts to the boot server itself)
    (packet(giaddr="10.1.0.1"), ("10.2.0.8", 68), ("10.2.0.8", 68)),
    # nothing known at all: broadcast to the client port
    (packet(), ("0.0.0.0", 68), ("255.255.255.255", 68)),
])
def test_request_on_4011(pkt: p.DhcpPacket, source: tuple[str, int], want: tuple[str, int]) -> None:
    assert dest(pkt, source, Kind.REQUEST) == want


def test_ports_and_broadcast_come_from_the_caller() -> None:
    """Tests on loopback answer at 127.0.0.1 and unprivileged ports: nothing here is hard-wired."""
    assert reply_destination(packet(), ("0.0.0.0", 68), Kind.DISCOVER, relay_port=6767, client_port=6868,
                             broadcast="127.0.0.1") == ("127.0.0.1", 6868)
    assert reply_destination(packet(giaddr="10.1.0.1"), ("10.1.0.1", 67), Kind.DISCOVER, relay_port=6767,
                             client_port=6868) == ("10.1.0.1", 6767)
    assert reply_destination(packet(), ("0.0.0.0", 68), Kind.REQUEST, relay_port=1) == ("255.255.255.255", 68)
