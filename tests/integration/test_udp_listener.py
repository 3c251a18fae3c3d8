"""udpio.udp on loopback: bind_udp's errors, and UdpListener's replies, error boundary and fatal loss."""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from collections.abc import Iterator

import pytest

from udpio.udp import BindError, UdpListener, bind_udp


@pytest.fixture
def holder() -> Iterator[socket.socket]:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    try:
        yield s
    finally:
        s.close()


def test_bind_udp_gives_a_bound_non_blocking_socket_configured_before_the_bind() -> None:
    seen: list[int] = []

    def configure(sock: socket.socket) -> None:
        assert sock.getsockname()[1] == 0  # not bound yet
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        seen.append(sock.fileno())

    with bind_udp("127.0.0.1", 0, configure=configure) as sock:
        assert seen == [sock.fileno()] and sock.getsockname()[1] != 0 and not sock.getblocking()
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST) == 1


def test_bind_udp_in_use_is_a_bind_error(holder: socket.socket) -> None:
    port = holder.getsockname()[1]
    with pytest.raises(BindError) as info:
        bind_udp("127.0.0.1", port)
    assert info.value.errno == errno.EADDRINUSE
    assert str(info.value) == (f"cannot listen on 127.0.0.1:{port}: Address already in use "
                               "(another program is listening there)")


def test_what_configure_raises_goes_through_and_the_socket_is_closed() -> None:
    kept: list[socket.socket] = []

    def configure(sock: socket.socket) -> None:
        kept.append(sock)
        raise RuntimeError("needs CAP_NET_RAW")

    with pytest.raises(RuntimeError, match="needs CAP_NET_RAW"):
        bind_udp("127.0.0.1", 0, configure=configure)
    assert kept[0].fileno() == -1  # closed


async def test_listener_in_use_is_a_bind_error(holder: socket.socket) -> None:
    port = holder.getsockname()[1]
    listener = UdpListener("test", "127.0.0.1", port, lambda data, addr: None)
    with pytest.raises(BindError, match=rf"^cannot listen on 127\.0\.0\.1:{port}: Address already in use"):
        await listener.start()
    assert listener.transport is None


async def test_listener_replies_and_survives_a_failing_handler(caplog: pytest.LogCaptureFixture) -> None:
    def handler(data: bytes, addr: tuple[str, int]) -> bytes | None:
        if data == b"boom":
            raise ValueError("a bug")
        return None if data == b"quiet" else data.upper()

    fatal: list[BaseException] = []
    listener = UdpListener("test", "127.0.0.1", 0, handler, on_fatal=fatal.append)
    await listener.start()
    await listener.start()  # idempotent
    loop = asyncio.get_running_loop()
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.bind(("127.0.0.1", 0))
    client.setblocking(False)
    try:
        for data in (b"boom", b"quiet", b"hello"):
            await loop.sock_sendto(client, data, listener.address)
        assert await asyncio.wait_for(loop.sock_recv(client, 100), 2) == b"HELLO"  # only the one reply
        assert "test: datagram from 127.0.0.1" in caplog.text and "a bug" in caplog.text
    finally:
        client.close()
        await listener.stop()
        await listener.stop()
    assert fatal == [] and listener.transport is None  # stopping is not a loss


async def test_a_lost_socket_is_the_services_fatal_error(caplog: pytest.LogCaptureFixture) -> None:
    fatal: list[BaseException] = []
    listener = UdpListener("test", "127.0.0.1", 0, lambda data, addr: None, on_fatal=fatal.append)
    await listener.start()
    assert listener.transport is not None
    with caplog.at_level(logging.ERROR):
        # what asyncio does on an error it cannot go on from: close the transport (connection_lost)
        listener.transport.abort()
        for _ in range(3):
            await asyncio.sleep(0)
    assert [str(e) for e in fatal] == ["listening socket closed: closed"]
    assert isinstance(fatal[0], RuntimeError) and listener.transport is None
    assert "test: listening socket closed" in caplog.text
    await listener.stop()  # nothing left to stop
    assert len(fatal) == 1



async def test_max_batch_reads_the_queued_datagrams_in_one_readiness() -> None:
    """A burst queued on the socket is handled before the loop turns (asyncio reads one per turn)."""
    loop = asyncio.get_running_loop()
    seen: list[bytes] = []
    at_next_turn: list[int] = []

    def handler(data: bytes, addr: tuple[str, int]) -> bytes | None:
        if not seen:
            loop.call_soon(lambda: at_next_turn.append(len(seen)))  # runs before the next readiness
        seen.append(data)
        return None

    listener = UdpListener("test", "127.0.0.1", 0, handler, max_batch=16)
    await listener.start()
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        for i in range(8):  # queued before the loop looks at the socket
            client.sendto(b"d%d" % i, listener.address)
        for _ in range(100):
            if at_next_turn:
                break
            await asyncio.sleep(0.01)
        assert at_next_turn == [8] and seen == [b"d%d" % i for i in range(8)]
    finally:
        client.close()
        await listener.stop()
    assert listener._drain_sock is None  # the duplicate descriptor is closed with the listener


async def test_between_runs_after_each_datagram_of_a_batch(caplog: pytest.LogCaptureFixture) -> None:
    """The service's hook runs between two datagrams of a batch (TFTP serves its fresh transfers there);
    a failing hook is logged and the batch goes on."""
    order: list[str] = []

    def handler(data: bytes, addr: tuple[str, int]) -> bytes | None:
        order.append(data.decode())
        return None

    def between() -> None:
        order.append("|")
        if order.count("|") == 2:
            raise ValueError("a bug")

    listener = UdpListener("test", "127.0.0.1", 0, handler, max_batch=16, between=between)
    await listener.start()
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        for i in range(3):
            client.sendto(b"d%d" % i, listener.address)
        for _ in range(100):
            if order.count("d2"):
                break
            await asyncio.sleep(0.01)
        assert order[:5] == ["d0", "|", "d1", "|", "d2"]
        assert "serving between datagrams failed" in caplog.text
    finally:
        client.close()
        await listener.stop()
