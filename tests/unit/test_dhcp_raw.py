"""The socket errors of the proxy's receive loops are counted, not swallowed (dhcp.raw, dhcp.proxy)."""

from __future__ import annotations

import errno
from dataclasses import dataclass, field

from dhcp import pxe
from dhcp.proxy import ProxyDHCP, Reply, Stats
from dhcp.raw import PACKET_OUTGOING, RawListener, build_udp_frame, parse_udp_frame
from tests.dhcp_lab import StaticPolicy

MAC = bytes.fromhex("525400780201")


@dataclass
class FakeIns:
    """A packet socket's receiving side: hands out `frames`, then raises `then`."""

    frames: list[tuple[bytes, tuple[object, ...]]]
    then: OSError
    send_error: OSError | None = None
    sent: list[bytes] = field(default_factory=list)

    def recvfrom(self, size: int) -> tuple[bytes, tuple[object, ...]]:
        if self.frames:
            return self.frames.pop(0)
        raise self.then

    def send(self, frame: bytes) -> int:
        if self.send_error is not None:
            raise self.send_error
        self.sent.append(frame)
        return len(frame)


@dataclass
class FakeL2:
    ins: FakeIns


def frame(payload: bytes = b"dhcp") -> tuple[bytes, tuple[object, ...]]:
    return (build_udp_frame(MAC, b"\xff" * 6, "10.0.0.9", "255.255.255.255", 68, 67, payload),
            ("eth0", 0x0800, 0))


def listener(ins: FakeIns, stats: Stats) -> RawListener:
    reply = Reply(b"offer", ("255.255.255.255", 68), 0, MAC)
    raw = RawListener("eth0", "10.0.0.2", 67, 68, lambda data, source, ifindex: reply, stats)
    raw._sock, raw._mac, raw._ifindex = FakeL2(ins), bytes.fromhex("020000000001"), 2
    return raw


def test_a_receive_error_is_counted() -> None:
    stats = Stats()
    raw = listener(FakeIns([], OSError(errno.ENETDOWN, "Network is down")), stats)
    raw.on_readable()
    assert stats.recv_errors == 1 and stats.send_failures == 0


def test_the_end_of_the_queue_is_not_an_error() -> None:
    stats = Stats()
    ins = FakeIns([frame()], BlockingIOError())
    raw = listener(ins, stats)
    raw.on_readable()
    assert stats.recv_errors == 0 and len(ins.sent) == 1
    parsed = parse_udp_frame(ins.sent[0], 68)
    assert parsed is not None and parsed[2] == b"offer"


def test_a_send_error_is_counted_and_the_loop_goes_on() -> None:
    stats = Stats()
    ins = FakeIns([frame(), frame()], BlockingIOError(), send_error=OSError(errno.ENOBUFS, "No buffer space"))
    raw = listener(ins, stats)
    raw.on_readable()
    assert stats.send_failures == 2 and stats.recv_errors == 0  # both requests were tried


def test_our_own_outgoing_frames_are_skipped() -> None:
    stats = Stats()
    outgoing = (frame()[0], ("eth0", 0x0800, PACKET_OUTGOING))
    ins = FakeIns([outgoing], BlockingIOError())
    listener(ins, stats).on_readable()
    assert ins.sent == [] and stats.recv_errors == 0


class FailingUdp:
    def recvmsg(self, bufsize: int, ancbufsize: int) -> tuple[bytes, list[object], int, tuple[str, int]]:
        raise ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")  # an ICMP error for a reply


def test_the_udp_path_counts_its_receive_errors_too() -> None:
    proxy = ProxyDHCP(StaticPolicy(), "127.0.0.1", clock=lambda: 0.0)
    proxy._on_readable(FailingUdp(), pxe.Kind.DISCOVER)  # type: ignore[arg-type]
    assert proxy.stats.recv_errors == 1 and proxy.stats.errors == 0
