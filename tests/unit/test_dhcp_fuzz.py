"""Mutation fuzz: every golden packet, mutated, goes through the codec, the classifier, the text dump
and the whole responder pipeline; anything but the codec's own PacketError fails the test."""

from __future__ import annotations

import pathlib
import random

from dhcp import packet as p
from dhcp import pxe
from dhcp.proxy import ProxyDHCP
from dhcp.text import describe
from tests.dhcp_lab import PROFILES, StaticPolicy, make_spec

DATA = pathlib.Path(__file__).resolve().parent.parent / "data" / "dhcp"
SEEDS = [bytes.fromhex("".join(f.read_text().split())) for f in sorted(DATA.glob("*.hex"))]
ROUNDS = 1500  # per seed packet: ~20k mutations, about 3 s


def mutate(rng: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 6)):
        op = rng.randrange(6)
        if op == 0 and b:
            b[rng.randrange(len(b))] = rng.randrange(256)
        elif op == 1 and b:  # hit the options area harder: lengths and codes live there
            i = rng.randrange(236, len(b)) if len(b) > 236 else rng.randrange(len(b))
            b[i] = rng.choice([0, 1, 2, 52, 53, 60, 77, 93, 94, 97, 43, 175, 255, rng.randrange(256)])
        elif op == 2:
            del b[rng.randrange(len(b) + 1):]
        elif op == 3:
            i = rng.randrange(len(b) + 1)
            b[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        elif op == 4 and len(b) > 2:
            i = rng.randrange(len(b) - 1)
            del b[i : i + rng.randint(1, 8)]
        else:
            b += bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
    return bytes(b)


def test_mutations_raise_only_packet_error() -> None:
    rng = random.Random(0xCE110)
    policy = StaticPolicy(unknown=make_spec("9b2e4a10-0000-4000-8000-00000000c0de", PROFILES["ipxe"],
                                            "http://10.78.0.2:8080"))
    proxy = ProxyDHCP(policy, "10.78.0.2")
    decoded = rejected = answered = 0
    for seed in SEEDS:
        for _ in range(ROUNDS):
            data = mutate(rng, seed)
            try:
                packet = p.decode(data)
                describe(packet)
                for kind in pxe.Kind:
                    pxe.classify(packet, kind)
                decoded += 1
            except p.PacketError:
                rejected += 1
            for kind in pxe.Kind:
                try:
                    reply = proxy.handle(data, ("10.78.0.50", 68), kind)
                except p.PacketError:
                    continue
                if reply is not None:
                    answered += 1
                    p.decode(reply.data)  # our own replies always decode
    # The fuzz must exercise all three outcomes, or it tests nothing.
    assert decoded > 1000 and rejected > 1000 and answered > 100
    assert proxy.stats.errors == 0
