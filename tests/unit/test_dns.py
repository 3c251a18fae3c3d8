"""DNS responder logic (pure `answer`): A and PTR for provisioned servers, everything else REFUSED."""

from __future__ import annotations

import random

import pytest
from dnslib import QTYPE, RCODE, DNSError, DNSRecord

from dnsd.answer import answer

RECORDS = {"node1": "10.78.0.11", "node2.cello.lab": "10.78.0.12", "twin": "10.78.0.11", "bad": "not-an-ip"}
ZONE = "cello.lab"


def ask(name: str, qtype: str) -> DNSRecord:
    q = DNSRecord.question(name, qtype)
    out = answer(q.pack(), RECORDS, ZONE)
    assert out is not None
    r = DNSRecord.parse(out)
    assert r.header.id == q.header.id and r.header.qr == 1 and r.header.ra == 0
    return r


@pytest.mark.parametrize(("name", "qtype", "rcode", "aa", "answers"), [
    ("node1.cello.lab", "A", RCODE.NOERROR, 1, ["10.78.0.11"]),
    ("NODE2.Cello.Lab.", "A", RCODE.NOERROR, 1, ["10.78.0.12"]),
    ("node1.cello.lab", "AAAA", RCODE.NOERROR, 1, []),  # known name, no such type: NODATA
    ("node3.cello.lab", "A", RCODE.NXDOMAIN, 1, []),
    ("bad.cello.lab", "A", RCODE.NXDOMAIN, 1, []),  # no valid address: not published
    ("11.0.78.10.in-addr.arpa", "PTR", RCODE.NOERROR, 1, ["node1.cello.lab.", "twin.cello.lab."]),
    ("12.0.78.10.in-addr.arpa", "PTR", RCODE.NOERROR, 1, ["node2.cello.lab."]),
    ("99.0.78.10.in-addr.arpa", "PTR", RCODE.REFUSED, 0, []),
    ("example.com", "A", RCODE.REFUSED, 0, []),  # not forwarded
    ("node1.cello.lab.evil", "A", RCODE.REFUSED, 0, []),
    ("example.com", "MX", RCODE.REFUSED, 0, []),
])
def test_answers(name: str, qtype: str, rcode: int, aa: int, answers: list[str]) -> None:
    r = ask(name, qtype)
    assert r.header.rcode == rcode and r.header.aa == aa
    assert sorted(str(rr.rdata) for rr in r.rr) == answers
    if answers:
        assert all(rr.rtype == getattr(QTYPE, qtype) and rr.ttl == 60 for rr in r.rr)


def test_responses_are_not_answered() -> None:
    q = DNSRecord.question("node1.cello.lab", "A")
    assert answer(q.reply().pack(), RECORDS, ZONE) is None


def test_fuzz_raises_only_dnserror() -> None:
    rng = random.Random(53)
    seeds = [DNSRecord.question(n, t).pack() for n, t in
             (("node1.cello.lab", "A"), ("11.0.78.10.in-addr.arpa", "PTR"), ("x.example", "TXT"))]
    parsed = 0
    for _ in range(6000):
        b = bytearray(rng.choice(seeds))
        for _ in range(rng.randint(1, 4)):
            if b and rng.random() < 0.6:
                b[rng.randrange(len(b))] = rng.randrange(256)
            elif rng.random() < 0.5:
                del b[rng.randrange(len(b) + 1):]
            else:
                b += bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
        try:
            answer(bytes(b), RECORDS, ZONE)
            parsed += 1
        except DNSError:
            pass
    assert parsed > 500
