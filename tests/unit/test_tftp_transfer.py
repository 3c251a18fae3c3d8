"""The transfer state machines against each other in memory, on a simulated lossy link (no sleeps)."""

from __future__ import annotations

import hashlib
import heapq
import random
from dataclasses import dataclass

import pytest

from bootfiles import tftp_packet as tp
from bootfiles.tftp_transfer import BytesSource, Limits, ReceiveTransfer, SendTransfer, negotiate, negotiated


@dataclass
class Link:
    loss: float = 0.0
    dup: float = 0.0
    jitter: float = 0.0  # > latency means reordering
    latency: float = 0.001


@dataclass
class Run:
    client: ReceiveTransfer
    server: SendTransfer | None
    to_server: list[bytes]
    to_client: list[bytes]
    end: float


def simulate(
    data: bytes,
    options: dict[str, str] | None = None,
    *,
    link: Link | None = None,
    limits: Limits | None = None,
    seed: int = 1,
    max_events: int = 2_000_000,
    mutate_to_server: object = None,
) -> Run:
    link = link or Link()
    limits = limits or Limits(retries=12)
    rng = random.Random(seed)
    now = 0.0
    client = ReceiveTransfer("file", now, options=options, retries=12)
    server: SendTransfer | None = None
    queue: list[tuple[float, int, str, bytes]] = []
    seq = 0
    log_s: list[bytes] = []
    log_c: list[bytes] = []

    def send(direction: str, datagrams: list[bytes]) -> None:
        nonlocal seq
        for d in datagrams:
            (log_s if direction == "s" else log_c).append(d)
            copies = 0 if rng.random() < link.loss else 1
            if copies and rng.random() < link.dup:
                copies = 2
            for _ in range(copies):
                seq += 1
                heapq.heappush(queue, (now + link.latency + rng.random() * link.jitter, seq, direction, d))

    send("s", client.datagrams_to_send())
    for _ in range(max_events):
        if client.done and (server is None or server.done) and not queue:
            break
        candidates = [t for t in (client.next_timeout(), server.next_timeout() if server else None) if t]
        if queue:
            candidates.append(queue[0][0])
        if not candidates:
            break
        now = max(now, min(candidates))
        while queue and queue[0][0] <= now:
            _, _, direction, d = heapq.heappop(queue)
            if direction == "s":
                if server is None:
                    request = tp.decode(d)
                    assert isinstance(request, tp.ReadRequest)
                    server = SendTransfer(BytesSource(data), request.options, limits, now)
                elif d[:2] != b"\x00\x01":
                    server.receive(d, now)
                send("c", server.datagrams_to_send())
            else:
                client.receive(d, now)
                send("s", client.datagrams_to_send())
        client.on_timeout(now)
        send("s", client.datagrams_to_send())
        if server is not None:
            server.on_timeout(now)
            send("c", server.datagrams_to_send())
    else:
        raise AssertionError("simulation did not finish")
    return Run(client, server, log_s, log_c, now)


def payload(n: int, seed: int = 7) -> bytes:
    return random.Random(seed).randbytes(n)


def data_blocks(datagrams: list[bytes]) -> list[int]:
    return [int.from_bytes(d[2:4], "big") for d in datagrams if d[:2] == b"\x00\x03"]


@pytest.mark.parametrize("size", [0, 1, 511, 512, 513, 1024, 5000])
def test_plain_rfc1350_transfer(size: int) -> None:
    data = payload(size)
    run = simulate(data)
    assert run.client.outcome == "ok"
    assert bytes(run.client.data) == data
    assert run.server is not None and run.server.outcome == "ok"
    assert run.server.bytes_sent == size
    # A file of n*512 bytes ends with an empty block.
    assert len(data_blocks(run.to_client)) == size // 512 + 1


def test_options_negotiated_and_capped() -> None:
    data = payload(100_000)
    run = simulate(data, {"blksize": "9000", "tsize": "0", "windowsize": "200", "timeout": "3"})
    oack = tp.decode(run.to_client[0])
    assert oack == tp.OptionAck({"blksize": "1468", "tsize": "100000", "timeout": "3", "windowsize": "64"})
    assert run.client.blksize == 1468 and run.client.windowsize == 64 and run.client.tsize == 100_000
    assert bytes(run.client.data) == data


@pytest.mark.parametrize(
    ("requested", "accepted"),
    [
        ({"blksize": "4"}, {}),  # below RFC 2348's minimum: ignored
        ({"blksize": "abc"}, {}),
        ({"blksize": "70000"}, {"blksize": "1468"}),
        ({"timeout": "0"}, {}),
        ({"timeout": "256"}, {}),
        ({"windowsize": "0"}, {}),
        ({"tsize": "x"}, {}),
        ({"multicast": ""}, {}),  # RFC 2090: not supported, silently dropped
        ({"blksize": "1024", "windowsize": "8"}, {"blksize": "1024", "windowsize": "8"}),
    ],
)
def test_negotiation_table(requested: dict[str, str], accepted: dict[str, str]) -> None:
    assert negotiate(requested, 10, Limits()).accepted == accepted


def test_rollover_past_65535_blocks() -> None:
    data = payload(70_000 * 8 + 3)  # 70001 blocks of 8 bytes: the 16-bit counter wraps once
    run = simulate(data, {"blksize": "8", "windowsize": "16"})
    assert run.client.outcome == "ok"
    assert hashlib.sha256(run.client.data).digest() == hashlib.sha256(data).digest()
    blocks = data_blocks(run.to_client)
    assert blocks[65534:65537] == [65535, 0, 1]


def test_rollover_lockstep() -> None:
    data = payload(65_536 * 8)  # exactly 65536 full blocks + an empty block 65537 (wire number 1)
    run = simulate(data, {"blksize": "8"})
    assert bytes(run.client.data) == data
    assert data_blocks(run.to_client)[-2:] == [0, 1]


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("window", ["1", "8", "64"])
def test_loss_duplication_reordering(seed: int, window: str) -> None:
    data = payload(300_000, seed)
    link = Link(loss=0.08, dup=0.08, jitter=0.004, latency=0.001)
    run = simulate(data, {"blksize": "1024", "windowsize": window, "tsize": "0"}, link=link, seed=seed)
    assert run.client.outcome == "ok", run.client.error
    assert bytes(run.client.data) == data
    assert run.server is not None and run.server.outcome == "ok"


def test_duplicate_acks_do_not_cause_retransmission() -> None:
    """Sorcerer's Apprentice: every ACK arrives twice; each block must still be sent exactly once."""
    data = payload(512 * 200 + 1)
    run = simulate(data, link=Link(dup=1.0))
    assert bytes(run.client.data) == data
    blocks = data_blocks(run.to_client)
    # The client re-ACKs each duplicated DATA, so duplicates flow both ways; still no block goes twice.
    assert len(blocks) == len(set(blocks)) == 201


def test_late_and_future_acks_are_ignored() -> None:
    server = SendTransfer(BytesSource(payload(5000)), {}, Limits(), 0.0)
    assert data_blocks(server.datagrams_to_send()) == [1]
    server.on_ack(1, 0.01)
    assert data_blocks(server.datagrams_to_send()) == [2]
    server.on_ack(1, 0.02)  # duplicate
    server.on_ack(0, 0.02)  # late
    server.on_ack(7, 0.02)  # never sent
    assert server.datagrams_to_send() == []
    assert server.bytes_sent == 512


def test_partial_window_ack_restarts_after_it() -> None:
    server = SendTransfer(BytesSource(payload(512 * 20)), {"windowsize": "4"}, Limits(), 0.0)
    server.datagrams_to_send()  # OACK
    server.on_ack(0, 0.0)
    assert data_blocks(server.datagrams_to_send()) == [1, 2, 3, 4]
    server.on_ack(2, 0.01)  # client lost block 3
    assert data_blocks(server.datagrams_to_send()) == [3, 4, 5, 6]


def test_timeout_backoff_and_retry_limit() -> None:
    limits = Limits(timeout=1.0, retries=4, backoff_max=4.0)
    server = SendTransfer(BytesSource(b"abc"), {}, limits, 0.0)
    first = server.datagrams_to_send()
    deadlines = []
    now = 0.0
    while not server.done:
        deadline = server.next_timeout()
        assert deadline is not None
        deadlines.append(deadline - now)
        server.on_timeout(deadline - 0.001)  # too early: nothing happens
        assert server.datagrams_to_send() == []
        now = deadline
        server.on_timeout(now)
        sent = server.datagrams_to_send()
        if not server.done:
            assert sent == first  # the same window again
    assert deadlines == [1.0, 2.0, 4.0, 4.0, 4.0]
    assert server.outcome == "timeout"
    assert tp.decode(sent[-1]) == tp.Error(0, "timeout")


def test_client_timeout_option_disables_backoff() -> None:
    server = SendTransfer(BytesSource(b"abc"), {"timeout": "2"}, Limits(retries=3), 0.0)
    server.datagrams_to_send()
    now, gaps = 0.0, []
    while not server.done:
        deadline = server.next_timeout()
        assert deadline is not None
        gaps.append(deadline - now)
        now = deadline
        server.on_timeout(now)
    assert gaps == [2.0, 2.0, 2.0, 2.0]


def test_uefi_tsize_probe_is_not_a_failure() -> None:
    server = SendTransfer(BytesSource(payload(4096)), {"tsize": "0", "blksize": "1468"}, Limits(), 0.0)
    assert tp.decode(server.datagrams_to_send()[0]) == tp.OptionAck({"blksize": "1468", "tsize": "4096"})
    server.receive(tp.encode(tp.Error(8, "User aborted the transfer")), 0.01)
    assert server.done and server.outcome == "tsize-probe"
    assert server.datagrams_to_send() == []


def test_error_mid_transfer_is_an_abort() -> None:
    server = SendTransfer(BytesSource(payload(4096)), {}, Limits(), 0.0)
    server.on_ack(1, 0.01)
    server.receive(tp.encode(tp.Error(0, "disk full")), 0.02)
    assert server.outcome == "aborted"


def test_garbage_on_transfer_port_is_ignored() -> None:
    server = SendTransfer(BytesSource(payload(2000)), {}, Limits(), 0.0)
    server.datagrams_to_send()
    for junk in (b"", b"\x00", b"\x00\x09zz", tp.encode(tp.Data(1, b"x")), b"\x00\x01a\x00octet\x00"):
        server.receive(junk, 0.01)
    assert not server.done and server.datagrams_to_send() == []


def _lockstep(data: bytes, options: dict[str, str], fast: bool, lose_every: int = 0) -> list[tuple[float, bytes]]:
    """What the server sends, at what time, to a client that ACKs each block at once (dropping every
    lose_every-th ACK, which the server's timer recovers); with `fast` the hot path answers first."""
    now = 0.0
    t = SendTransfer(BytesSource(data), options, Limits(), now)
    sent = [(now, d) for d in t.datagrams_to_send()]
    acks = 0
    while not t.done:
        assert now < 1000
        last = sent[-1][1]
        block = 0 if last[1] == tp.OP_OACK else (last[2] << 8) | last[3]
        acks += 1
        if lose_every and acks % lose_every == 0:
            deadline = t.next_timeout()
            assert deadline is not None
            now = deadline
            t.on_timeout(now)
        else:
            now += 0.001
            datagram = t.next_block_for(block, now) if fast else None
            if datagram is None:
                t.on_ack(block, now)
            else:
                sent.append((now, datagram))
                assert t.next_timeout() == now + t.params.timeout
        sent += [(now, d) for d in t.datagrams_to_send()]
    return sent


@pytest.mark.parametrize("size", [0, 1, 1467, 1468, 1469, 1468 * 40, 1468 * 40 + 7])
@pytest.mark.parametrize("options", [{}, {"blksize": "1468"}, {"blksize": "1468", "tsize": "0"}])
@pytest.mark.parametrize("lose_every", [0, 7])
def test_lockstep_hot_path_sends_exactly_what_on_ack_would(size: int, options: dict[str, str], lose_every: int) -> None:
    data = random.Random(size).randbytes(size)
    assert _lockstep(data, options, fast=True, lose_every=lose_every) == \
        _lockstep(data, options, fast=False, lose_every=lose_every)


def test_lockstep_hot_path_declines_what_is_not_the_next_block() -> None:
    t = SendTransfer(BytesSource(bytes(1468 * 4)), {"windowsize": "2"}, Limits(), 0.0)
    assert t.next_block_for(1, 0.1) is None  # windowed: on_ack's job
    t = SendTransfer(BytesSource(bytes(1468 * 4)), {"blksize": "1468"}, Limits(), 0.0)
    assert t.next_block_for(0, 0.1) is None  # the OACK's ACK
    t.on_ack(0, 0.1)
    t.datagrams_to_send()
    assert t.next_block_for(0, 0.2) is None and t.next_block_for(2, 0.2) is None  # duplicate, from the future
    assert t.next_block_for(1, 0.2) is not None


def test_negotiated_is_negotiate_remembered_with_its_oack() -> None:
    requested = {"blksize": "1400", "tsize": "0", "bogus": "1"}
    params, oack = negotiated(requested, 5000, Limits())
    assert params == negotiate(requested, 5000, Limits())
    assert oack == tp.encode(tp.OptionAck({"blksize": "1400", "tsize": "5000"}))
    assert negotiated(dict(requested), 5000, Limits())[0] is params  # the same answer, not computed again
    assert negotiated(requested, 5001, Limits())[1] != oack  # another size: another tsize
    assert negotiated({}, 5000, Limits())[1] == b""  # nothing accepted: no OACK
