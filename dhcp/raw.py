"""Raw-socket listening for port 67 when a local DHCP server already holds it.

scapy opens the AF_PACKET socket and compiles the BPF filter (so only DHCP requests are copied to us);
frames are parsed and built here with struct (no scapy on the per-packet path). The kernel still gives
each request to the local DHCP server as well: that server hands out addresses, we only add boot info.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from collections.abc import Callable
from typing import Any, Protocol

ETH_P_IP = 0x0800
PACKET_OUTGOING = 4  # <linux/if_packet.h>
BROADCAST_MAC = b"\xff" * 6


class _ReplyLike(Protocol):
    @property
    def data(self) -> bytes: ...
    @property
    def dest(self) -> tuple[str, int]: ...
    @property
    def chaddr(self) -> bytes: ...


Handler = Callable[[bytes, tuple[str, int], int], "_ReplyLike | None"]


class Counters(Protocol):
    """Where the listener counts the socket errors it cannot do anything about (dhcp.proxy.Stats)."""

    recv_errors: int
    send_failures: int


def parse_udp_frame(frame: bytes, port: int) -> tuple[str, int, bytes] | None:
    """(source ip, source port, payload) of an Ethernet/IPv4/UDP frame to `port`, else None."""
    if len(frame) < 14 + 20 + 8 or struct.unpack_from("!H", frame, 12)[0] != ETH_P_IP:
        return None
    ihl = (frame[14] & 0x0F) * 4
    if frame[14] >> 4 != 4 or ihl < 20 or frame[23] != socket.IPPROTO_UDP:
        return None
    if struct.unpack_from("!H", frame, 20)[0] & 0x3FFF:  # fragments: DHCP requests are never fragmented
        return None
    udp = 14 + ihl
    if len(frame) < udp + 8:
        return None
    sport, dport, length = struct.unpack_from("!HHH", frame, udp)
    if dport != port or length < 8:
        return None
    payload = frame[udp + 8 : udp + length]
    src = str(ipaddress.IPv4Address(frame[26:30]))
    return src, sport, payload


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return int(~total & 0xFFFF)


def build_udp_frame(
    src_mac: bytes, dst_mac: bytes, src_ip: str, dst_ip: str, sport: int, dport: int, payload: bytes
) -> bytes:
    udp = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload  # UDP checksum 0: none (IPv4)
    ip = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64, socket.IPPROTO_UDP, 0,
        ipaddress.IPv4Address(src_ip).packed, ipaddress.IPv4Address(dst_ip).packed,
    )
    ip = ip[:10] + struct.pack("!H", _checksum(ip)) + ip[12:]
    return dst_mac + src_mac + struct.pack("!H", ETH_P_IP) + ip + udp


class RawListener:
    """Receives DHCP requests on `interface` from an AF_PACKET socket and sends replies the same way."""

    def __init__(
        self, interface: str, advertise: str, port: int, reply_port: int, handler: Handler, stats: Counters
    ) -> None:
        self.interface = interface
        self.advertise = advertise
        self.port = port
        self.reply_port = reply_port
        self.handler = handler
        self.stats = stats
        self._sock: Any = None
        self._mac = b""
        self._ifindex = 0

    def open(self) -> None:
        """Blocking (scapy import, filter compilation): call it from a thread."""
        from scapy.arch import get_if_hwaddr
        from scapy.arch.linux import L2Socket
        from scapy.config import conf

        if not self.interface:
            self.interface = str(conf.route.route(self.advertise)[0])
        self._mac = bytes.fromhex(get_if_hwaddr(self.interface).replace(":", ""))
        self._ifindex = socket.if_nametoindex(self.interface)
        self._sock = L2Socket(iface=self.interface, filter=f"udp and dst port {self.port}")
        self._sock.ins.setblocking(False)

    def fileno(self) -> int:
        """The packet socket, for the caller's poller (the proxy's thread or its loop) to watch."""
        return int(self._sock.ins.fileno())

    def settimeout(self, seconds: float) -> None:
        """Receive blocking, for at most `seconds` at a time (a thread of its own serves it)."""
        self._sock.ins.settimeout(seconds)

    def close(self) -> None:
        """Close the socket; the caller has stopped watching it."""
        if self._sock is None:
            return
        self._sock.close()
        self._sock = None

    def on_readable(self) -> None:
        for _ in range(256):
            try:
                frame, addr = self._sock.ins.recvfrom(65535)
            except (BlockingIOError, InterruptedError, TimeoutError):  # nothing queued (now, or for a while)
                return
            except OSError:  # e.g. ENETDOWN: the interface went down; the socket stays ours
                self.stats.recv_errors += 1
                return
            if len(addr) > 2 and addr[2] == PACKET_OUTGOING:
                continue
            parsed = parse_udp_frame(frame, self.port)
            if parsed is None:
                continue
            src, sport, payload = parsed
            reply = self.handler(payload, (src, sport), self._ifindex)
            if reply is None:
                continue
            dst_ip, dport = reply.dest
            if dst_ip == "255.255.255.255":
                dst_mac = BROADCAST_MAC
            elif self._mac == bytes(6):  # loopback: frames to any other MAC are dropped as PACKET_OTHERHOST
                dst_mac = self._mac
            else:
                dst_mac = reply.chaddr[:6]
            frame_out = build_udp_frame(self._mac, dst_mac, self.advertise, dst_ip, self.port, dport, reply.data)
            try:
                self._sock.ins.send(frame_out)
            except OSError:  # a full queue or a link down: as lost as on the wire, the client asks again
                self.stats.send_failures += 1
