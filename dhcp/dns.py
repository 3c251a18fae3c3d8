"""A small authoritative DNS responder (UDP) so diskless nodes can find each other by name.

dnslib is the codec; `answer()` is a pure function of (query bytes, records, zone); the asyncio protocol
around it is a few lines with an error boundary. Nothing is forwarded or cached:

- `<name>.<zone>` A → the server's address (AA); another type for a known name → NOERROR, no answer
  (so that a resolver asking A and AAAA together still takes the A); an unknown name in the zone →
  NXDOMAIN (AA).
- `<d.c.b.a>.in-addr.arpa` PTR for an address of a known server → `<name>.<zone>` (AA).
- Everything else (other zones, other reverse addresses, other opcodes) → REFUSED.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections.abc import Callable, Mapping
from typing import cast

from dnslib import CLASS, OPCODE, PTR, QTYPE, RCODE, RR, A, DNSError, DNSLabel, DNSRecord

from .ratelimit import RateLimitedLog

log = logging.getLogger("cello.dns")

MAX_QUERY_SIZE = 4096  # refuse to parse anything larger
MAX_UDP_REPLY = 512  # RFC 1035 §4.2.1 (no EDNS support: set TC above this)
TTL = 60

Records = Callable[[], Mapping[str, str]]


def _label(name: str) -> DNSLabel:
    return DNSLabel(name.strip(".").lower())


def _host_of(key: str, zone: DNSLabel) -> DNSLabel:
    """A record key may be a bare host name ("node1") or already within the zone ("node1.lab")."""
    label = _label(key)
    return label if label.matchSuffix(zone) else DNSLabel(label.label + zone.label)


def answer(query: bytes, records: Mapping[str, str], zone: str) -> bytes | None:
    """The reply to one query datagram, or None to stay silent (responses, undecodable garbage).
    Raises DNSError for a malformed query."""
    if len(query) > MAX_QUERY_SIZE:
        raise DNSError(f"query of {len(query)} bytes is larger than {MAX_QUERY_SIZE}")
    request = DNSRecord.parse(query)
    if request.header.qr:  # never answer an answer (no loops between responders)
        return None
    reply = request.reply()
    reply.header.ra = 0
    if request.header.opcode != OPCODE.QUERY:
        reply.header.rcode = RCODE.NOTIMP
        reply.header.aa = 0
        return bytes(reply.pack())
    if len(request.questions) != 1:
        reply.header.rcode = RCODE.FORMERR
        reply.header.aa = 0
        return bytes(reply.pack())
    q = request.questions[0]
    zone_label = _label(zone)
    qname = _label(str(q.qname))
    hosts: dict[DNSLabel, str] = {}
    for key, addr in records.items():
        try:
            hosts[_host_of(key, zone_label)] = str(ipaddress.IPv4Address(addr))
        except ValueError:
            continue  # a record without a valid IPv4 address is not published
    if q.qclass != CLASS.IN:
        reply.header.rcode = RCODE.REFUSED
        reply.header.aa = 0
    elif qname.matchSuffix(zone_label):
        if qname in hosts:
            if q.qtype in (QTYPE.A, QTYPE.ANY):
                reply.add_answer(RR(q.qname, QTYPE.A, rdata=A(hosts[qname]), ttl=TTL))
        elif qname != zone_label:
            reply.header.rcode = RCODE.NXDOMAIN
    elif q.qtype == QTYPE.PTR and qname.matchSuffix("in-addr.arpa"):
        names = _reverse(qname, hosts)
        if names:
            for name in names:
                reply.add_answer(RR(q.qname, QTYPE.PTR, rdata=PTR(name), ttl=TTL))
        else:
            reply.header.rcode = RCODE.REFUSED
            reply.header.aa = 0
    else:
        reply.header.rcode = RCODE.REFUSED
        reply.header.aa = 0
    out: bytes = reply.pack()
    if len(out) > MAX_UDP_REPLY:
        reply.rr = []
        reply.header.tc = 1
        out = reply.pack()
    return out


def _reverse(qname: DNSLabel, hosts: Mapping[DNSLabel, str]) -> list[DNSLabel]:
    parts = [p.decode("ascii", "replace") for p in qname.label[:-2]]
    if len(parts) != 4:
        return []
    try:
        addr = str(ipaddress.IPv4Address(".".join(reversed(parts))))
    except ValueError:
        return []
    return sorted((name for name, ip in hosts.items() if ip == addr), key=str)


class _Protocol(asyncio.DatagramProtocol):
    def __init__(self, owner: DnsResponder) -> None:
        self.owner = owner
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        out = self.owner.serve_datagram(data, addr)
        if out is not None and self.transport is not None:
            self.transport.sendto(out, addr)

    def error_received(self, exc: Exception) -> None:
        self.owner._log.warning("recv", "DNS socket error: %s", exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self.owner._listener_lost(exc)


class DnsResponder:
    """Authoritative A/PTR responder for `zone`. Off by default in the appliance; `start()` binds."""

    def __init__(
        self,
        records: Records,
        zone: str,
        *,
        listen: str = "127.0.0.1",
        port: int = 53,
        clock: Callable[[], float] = time.monotonic,
        on_fatal: Callable[[BaseException], None] | None = None,
    ) -> None:
        _label(zone)  # refuse an unusable zone name early
        if not zone.strip("."):
            raise ValueError("DNS zone must not be empty")
        self.records = records
        self.zone = zone
        self.listen = listen
        self.port = port
        self.answered = 0
        self.malformed = 0
        self.errors = 0
        self._log = RateLimitedLog(log, clock=clock)
        self.on_fatal = on_fatal
        self._transport: asyncio.DatagramTransport | None = None
        self.bound: tuple[str, int] | None = None

    async def start(self) -> None:
        if self._transport is not None:
            return
        loop = asyncio.get_running_loop()
        try:
            transport, _ = await loop.create_datagram_endpoint(
                lambda: _Protocol(self), local_addr=(self.listen, self.port)
            )
        except PermissionError as e:
            raise RuntimeError(
                f"cannot bind DNS {self.listen}:{self.port}: port {self.port} needs root or CAP_NET_BIND_SERVICE"
            ) from e
        except OSError as e:
            raise OSError(e.errno, f"cannot bind DNS {self.listen}:{self.port}: {e.strerror}") from e
        self._transport = transport
        self.bound = transport.get_extra_info("sockname")[:2]

    def _listener_lost(self, exc: Exception | None) -> None:
        if self._transport is None:
            return  # stop() closed it
        # asyncio closes a datagram transport only on an error it cannot go on from.
        self._transport, self.bound = None, None
        error = RuntimeError(f"listening socket closed: {exc or 'closed'}")
        log.error("%s: %s", __name__, error)
        if self.on_fatal is not None:
            self.on_fatal(error)

    async def stop(self) -> None:
        transport, self._transport = self._transport, None
        if transport is not None:
            transport.close()
        self.bound = None

    def serve_datagram(self, data: bytes, addr: tuple[str, int]) -> bytes | None:
        try:
            out = answer(data, self.records(), self.zone)
        except DNSError as e:
            self.malformed += 1
            self._log.warning("malformed", "dropped malformed DNS query from %s:%d: %s", addr[0], addr[1], e)
            return None
        except Exception:
            self.errors += 1
            self._log.exception("bug", "error answering DNS query from %s:%d", addr[0], addr[1])
            return None
        if out is not None:
            self.answered += 1
        return out
