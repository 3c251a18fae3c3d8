"""The answer of a small authoritative DNS zone: a pure function of (query bytes, records, zone).

dnslib is the codec. Nothing is forwarded or cached:

- `<name>.<zone>` A → the server's address (AA); another type for a known name → NOERROR, no answer
  (so that a resolver asking A and AAAA together still takes the A); an unknown name in the zone →
  NXDOMAIN (AA).
- `<d.c.b.a>.in-addr.arpa` PTR for an address of a known server → `<name>.<zone>` (AA).
- Everything else (other zones, other reverse addresses, other opcodes) → REFUSED.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping

from dnslib import CLASS, OPCODE, PTR, QTYPE, RCODE, RR, A, DNSError, DNSLabel, DNSRecord

MAX_QUERY_SIZE = 4096  # refuse to parse anything larger
MAX_UDP_REPLY = 512  # RFC 1035 §4.2.1 (no EDNS support: set TC above this)
TTL = 60

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


def check_zone(zone: str) -> None:
    """Refuse an unusable zone name (ValueError) before the first query meets it."""
    _label(zone)
    if not zone.strip("."):
        raise ValueError("DNS zone must not be empty")
