"""Pure: which address a DHCP packet the proxy saw says its client holds (for the config binding).

A node's boot config carries its CHAP secret, so the appliance serves it only to the address the node
booted from. That address is learned from the DHCP traffic the proxy sees anyway — the packets it
answers and the ones it does not (the client's REQUEST to the site server on :67):

    ciaddr != 0                  the client says it holds ciaddr (RFC 2131 §4.4.5 renew, INFORM, some
                                 PXE ROMs' :4011 request)
    :67  DHCPREQUEST, option 50  the address the site server offered and the client now takes
                                 (RFC 2131 §4.3.2: SELECTING and INIT-REBOOT)
    :4011 REQUEST / INFORM       sent unicast from the address the client holds (PXE 2.1 §2.2.5), so
                                 the UDP source is the client — unless the packet was relayed

Never the UDP source of a packet with giaddr != 0: that is the relay agent (RFC 2131 §4.1), and on :67
never the source at all (a broadcast from 0.0.0.0, or a relay). DISCOVERs without ciaddr tell nothing
(an option 50 in a DISCOVER is only a wish, RFC 2131 §4.4.1), nor do RELEASE and DECLINE (the client
gives the address up).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from . import packet as p
from . import pxe

OPT_REQUESTED_IP = 50  # RFC 2132 §9.1

_LEARN_FROM = frozenset({p.DHCPDISCOVER, p.DHCPREQUEST, p.DHCPINFORM})


@dataclass(frozen=True, slots=True)
class SeenClient:
    """A client the proxy saw, and the IPv4 address its packet says it holds."""

    mac: str
    uuid: str | None  # SMBIOS UUID from option 97, canonical; None when absent or broken
    address: str


def usable_address(text: str) -> str | None:
    """`text` when it is an address a client can hold (unicast IPv4), else None."""
    try:
        ip = ipaddress.IPv4Address(text)
    except ValueError:
        return None
    if ip.is_unspecified or ip.is_multicast or ip == ipaddress.IPv4Address("255.255.255.255"):
        return None
    return str(ip)


def client_address(packet: p.DhcpPacket, source: tuple[str, int], kind: pxe.Kind) -> str | None:
    """The address this packet says its client holds, or None when it says nothing reliable."""
    if packet.message_type not in _LEARN_FROM:
        return None
    if packet.ciaddr != "0.0.0.0":
        return usable_address(packet.ciaddr)
    relayed = packet.giaddr != "0.0.0.0"
    if kind is pxe.Kind.REQUEST:
        return None if relayed else usable_address(source[0])
    if packet.message_type == p.DHCPREQUEST:
        requested = packet.options.get(OPT_REQUESTED_IP)
        if requested is None or len(requested) != 4:
            return None
        return usable_address(p.decode_ip(requested, OPT_REQUESTED_IP))
    return None


def seen_client(packet: p.DhcpPacket, source: tuple[str, int], kind: pxe.Kind) -> SeenClient | None:
    """Who sent this client request and at which address, or None (not an Ethernet client request, or
    no reliable address). Raises PacketError only for a malformed message type option."""
    if packet.op != p.BOOTREQUEST or not packet.dhcp or packet.htype != p.HTYPE_ETHERNET:
        return None
    if len(packet.chaddr) != 6:
        return None
    address = client_address(packet, source, kind)
    if address is None:
        return None
    try:
        guid = packet.client_guid
    except p.PacketError:  # a malformed GUID identifies nothing; the MAC still does
        guid = None
    return SeenClient(packet.mac, None if guid is None else pxe.smbios_uuid(guid), address)
