"""Calls a socket's handler when a datagram waits on it: one epoll for all TFTP transfer sockets.

A lock-step transfer costs one ACK in and one DATA out per block, so whatever the event loop spends per
readiness (a selector key, a Handle, one trip through its run loop per socket) is spent per block. With
epoll (Linux) every transfer socket sits behind one epoll that is a single reader on the loop: the loop
wakes once for all the ready transfers, one poll returns them all, and each costs a dict lookup and a
call. Level-triggered like the loop's own selector, so a socket with a second datagram queued is simply
returned again. Elsewhere (kqueue on FreeBSD) each socket is a reader on the loop, as asyncio offers it.

Handlers are called with the time (`clock`, the loop's by default), read once per round.

A transfer that has sent its first answer (OACK or DATA 1) and waits for the client's first ACK is
*fresh*: its socket sits in a second epoll, which the TFTP listener polls between the requests of a
burst (`poll_fresh`), so that each transfer's first block leaves as soon as its client asks for it
instead of after the whole burst's setup (the time to first byte of a boot storm; bench/tftp_bench.py).
Only fresh sockets are served there: running transfers wait for the burst to end, by at most one batch
of requests, far below any retransmission timer. A socket leaves the fresh set with `promote`.
"""

from __future__ import annotations

import logging
import select
from collections.abc import Callable
from typing import Protocol

log = logging.getLogger(__name__)

Handler = Callable[[float], None]  # called with the time when its socket is readable

POLL_EVENTS = 256  # events taken from one poll
DRAIN_ROUNDS = 4  # polls per wake-up at the most
DRAIN_MIN_EVENTS = 4  # a round with fewer ready sockets than this ends the wake-up


class Loop(Protocol):
    """What the poller needs of the event loop (asyncio's, or a test's)."""

    def add_reader(self, fd: int, callback: Callable[..., object], *args: object) -> object: ...
    def remove_reader(self, fd: int) -> object: ...
    def time(self) -> float: ...


class Epoll(Protocol):
    """What the poller needs of `select.epoll`."""

    @property
    def closed(self) -> bool: ...
    def fileno(self) -> int: ...
    def register(self, fd: int, eventmask: int = ...) -> None: ...
    def unregister(self, fd: int) -> None: ...
    def poll(self, timeout: float | None = ..., maxevents: int = ...) -> list[tuple[int, int]]: ...
    def close(self) -> None: ...


def platform_epoll() -> Epoll | None:
    """An epoll where the OS has one (Linux), else None: each socket then is a reader on the loop."""
    return select.epoll() if hasattr(select, "epoll") else None


class Poller:
    def __init__(self, loop: Loop, epoll: Epoll | None, *, clock: Callable[[], float] | None = None,
                 fresh_epoll: Epoll | None = None) -> None:
        self.loop = loop
        self.clock = clock or loop.time
        self._handlers: dict[int, Handler] = {}
        self._epoll = epoll
        self._fresh_epoll: Epoll | None = None
        self._fresh: set[int] = set()
        if epoll is not None:
            loop.add_reader(epoll.fileno(), self._ready)
            if fresh_epoll is not None:
                self._fresh_epoll = fresh_epoll
                loop.add_reader(fresh_epoll.fileno(), self.poll_fresh)

    @property
    def fds(self) -> frozenset[int]:
        return frozenset(self._handlers)

    def add(self, fd: int, handler: Handler, *, fresh: bool = False) -> None:
        """Call `handler` when `fd` is readable; `fresh`: in the fresh set until `promote(fd)`.

        An `fd` added already only gets the new handler, where it is registered (no system call): the
        TFTP server registers its spare sockets ahead of a burst and hands each to a transfer."""
        if fd in self._handlers:
            self._handlers[fd] = handler
            return
        self._handlers[fd] = handler
        if self._epoll is None:
            self.loop.add_reader(fd, self._call, fd)
        elif fresh and self._fresh_epoll is not None:
            self._fresh_epoll.register(fd, select.EPOLLIN)
            self._fresh.add(fd)
        else:
            self._epoll.register(fd, select.EPOLLIN)

    def promote(self, fd: int) -> None:
        """`fd` leaves the fresh set (a no-op for a socket that is not in it)."""
        if fd not in self._fresh:
            return
        self._fresh.discard(fd)
        assert self._fresh_epoll is not None and self._epoll is not None
        self._fresh_epoll.unregister(fd)
        self._epoll.register(fd, select.EPOLLIN)

    def remove(self, fd: int) -> None:
        if self._handlers.pop(fd, None) is None:
            return
        if self._epoll is None:
            self.loop.remove_reader(fd)
        elif fd in self._fresh:
            self._fresh.discard(fd)
            assert self._fresh_epoll is not None
            self._fresh_epoll.unregister(fd)
        else:
            self._epoll.unregister(fd)

    def poll_fresh(self) -> None:
        """Serve the fresh sockets that are readable now, once (never waits)."""
        if not self._fresh:
            return
        assert self._fresh_epoll is not None
        self._serve(self._fresh_epoll.poll(0, POLL_EVENTS))

    def close(self) -> None:
        for fd in list(self._handlers):
            self.remove(fd)
        for epoll in (self._epoll, self._fresh_epoll):
            if epoll is not None and not epoll.closed:
                self.loop.remove_reader(epoll.fileno())
                epoll.close()

    def _call(self, fd: int) -> None:
        handler = self._handlers.get(fd)
        if handler is None:
            return
        try:
            handler(self.clock())
        except Exception:  # the error boundary: one transfer's bug never stops the loop
            log.exception("tftp: transfer socket handler failed")

    def _ready(self) -> None:
        assert self._epoll is not None
        poll = self._epoll.poll
        # Under load the ACKs answering the DATA just sent are queued by the time a round ends: polling
        # again at once serves them without a trip through the event loop. Only a busy round pays for
        # that extra poll, and the rounds are bounded so that the other services still get the loop.
        for _ in range(DRAIN_ROUNDS):
            events = poll(0, POLL_EVENTS)
            self._serve(events)
            if len(events) < DRAIN_MIN_EVENTS:
                return

    def _serve(self, events: list[tuple[int, int]]) -> None:
        handlers = self._handlers
        now = self.clock()  # one clock read per round: the timeouts are counted in seconds
        for fd, _mask in events:
            handler = handlers.get(fd)
            if handler is None:
                continue  # closed by an earlier handler of this round
            try:
                handler(now)
            except Exception:  # the error boundary: one transfer's bug never stalls the others
                log.exception("tftp: transfer socket handler failed")
