"""The DNS responder on a loopback port, queried over real UDP by dnslib's client (in a thread)."""

from __future__ import annotations

import asyncio
import socket

import pytest
from dnslib import RCODE, DNSRecord

from dnsd.server import DnsResponder


async def query(port: int, name: str, qtype: str) -> DNSRecord:
    q = DNSRecord.question(name, qtype)
    raw = await asyncio.to_thread(q.send, "127.0.0.1", port, timeout=2)
    return DNSRecord.parse(raw)


async def test_a_ptr_refused_and_live_records() -> None:
    records = {"node1": "10.78.0.11"}
    dns = DnsResponder(lambda: records, "cello.lab", listen="127.0.0.1", port=0)
    await dns.start()
    try:
        assert dns.bound is not None
        port = dns.bound[1]
        r = await query(port, "node1.cello.lab", "A")
        assert r.header.rcode == RCODE.NOERROR and [str(x.rdata) for x in r.rr] == ["10.78.0.11"]
        r = await query(port, "11.0.78.10.in-addr.arpa", "PTR")
        assert [str(x.rdata) for x in r.rr] == ["node1.cello.lab."]
        r = await query(port, "www.example.com", "A")
        assert r.header.rcode == RCODE.REFUSED and not r.rr
        records["node2"] = "10.78.0.12"  # a newly provisioned server is visible at once
        r = await query(port, "node2.cello.lab", "A")
        assert [str(x.rdata) for x in r.rr] == ["10.78.0.12"]
        # Garbage does not stop it.
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for junk in (b"", b"\x00", b"\xff" * 40):
            s.sendto(junk, ("127.0.0.1", port))
        s.close()
        # The junk is queued on the responder's socket before the query that follows: once the answer
        # is here, the junk has been read (no sleep needed).
        r = await query(port, "node1.cello.lab", "A")
        assert r.rr and dns.malformed >= 2 and dns.errors == 0
    finally:
        await dns.stop()
        await dns.stop()
    assert dns.bound is None


async def test_port_in_use() -> None:
    holder = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    holder.bind(("127.0.0.1", 0))
    try:
        dns = DnsResponder(dict, "cello.lab", listen="127.0.0.1", port=holder.getsockname()[1])
        with pytest.raises(OSError, match=r"^cannot listen on 127\.0\.0\.1:\d+: Address already in use"):
            await dns.start()
    finally:
        holder.close()
