"""bootfiles.poller with real UDP sockets on loopback, behind a real epoll and as plain loop readers."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator

import pytest

from bootfiles.poller import Poller, platform_epoll


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    b = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for s in (a, b):
        s.bind(("127.0.0.1", 0))
        s.setblocking(False)
    a.connect(b.getsockname())
    try:
        yield a, b
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("use_epoll", [True, False])
async def test_level_triggered_one_datagram_per_call(pair: tuple[socket.socket, socket.socket],
                                                     use_epoll: bool) -> None:
    """Each call reads one datagram; a second one queued comes back in a later call (level-triggered),
    and a removed socket is called no more."""
    sender, receiver = pair
    loop = asyncio.get_running_loop()
    epoll = platform_epoll() if use_epoll else None
    if use_epoll:
        assert epoll is not None  # Linux
    poller = Poller(loop, epoll)
    got: list[bytes] = []
    two = asyncio.Event()

    def on_readable(now: float) -> None:
        assert now <= loop.time()
        got.append(receiver.recv(100))
        if len(got) == 2:
            two.set()

    try:
        poller.add(receiver.fileno(), on_readable)
        sender.send(b"one")
        sender.send(b"two")
        await asyncio.wait_for(two.wait(), 2)
        assert got == [b"one", b"two"]
        poller.remove(receiver.fileno())
        sender.send(b"three")
        for _ in range(5):  # a few loop turns: nothing may call the removed handler
            await asyncio.sleep(0)
        assert got == [b"one", b"two"]
        assert receiver.recv(100) == b"three"
    finally:
        poller.close()
    if epoll is not None:
        assert epoll.closed
