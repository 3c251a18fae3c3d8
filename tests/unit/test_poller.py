"""The transfer socket poller's bookkeeping (bootfiles.poller), on a recording loop and a scripted epoll."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from bootfiles import poller as pl
from bootfiles.poller import Poller


class FakeLoop:
    def __init__(self) -> None:
        self.readers: dict[int, tuple[Callable[..., object], tuple[object, ...]]] = {}
        self.now = 100.0

    def add_reader(self, fd: int, callback: Callable[..., object], *args: object) -> None:
        self.readers[fd] = (callback, args)

    def remove_reader(self, fd: int) -> bool:
        return self.readers.pop(fd, None) is not None

    def time(self) -> float:
        return self.now

    def fire(self, fd: int) -> None:
        callback, args = self.readers[fd]
        callback(*args)


class FakeEpoll:
    """Returns the scripted rounds of ready fds, one per poll, then nothing."""

    def __init__(self, fileno: int = 999) -> None:
        self._fileno = fileno
        self.registered: set[int] = set()
        self.rounds: list[list[int]] = []
        self.polls = 0
        self.closed = False

    def fileno(self) -> int:
        return self._fileno

    def register(self, fd: int, eventmask: int = 0) -> None:
        assert fd not in self.registered
        self.registered.add(fd)

    def unregister(self, fd: int) -> None:
        self.registered.remove(fd)

    def poll(self, timeout: float | None = None, maxevents: int = -1) -> list[tuple[int, int]]:
        assert timeout == 0  # never blocks the loop
        self.polls += 1
        ready = self.rounds.pop(0) if self.rounds else []
        return [(fd, 1) for fd in ready]

    def close(self) -> None:
        self.closed = True


def test_epoll_is_one_reader_and_sockets_register_with_it() -> None:
    loop, epoll = FakeLoop(), FakeEpoll()
    poller = Poller(loop, epoll)
    assert set(loop.readers) == {999}
    poller.add(5, lambda now: None)
    poller.add(6, lambda now: None)
    assert epoll.registered == {5, 6} and set(loop.readers) == {999} and poller.fds == {5, 6}
    poller.remove(5)
    poller.remove(5)  # twice: nothing left to unregister, no error
    assert epoll.registered == {6}
    poller.close()
    assert epoll.registered == set() and epoll.closed and loop.readers == {}
    poller.close()  # idempotent


def test_a_round_calls_the_ready_handlers_with_one_clock_read() -> None:
    loop, epoll = FakeLoop(), FakeEpoll()
    reads = iter([7.0, 8.0])
    poller = Poller(loop, epoll, clock=lambda: next(reads))
    calls: list[tuple[int, float]] = []
    for fd in (5, 6):
        poller.add(fd, lambda now, fd=fd: calls.append((fd, now)))  # type: ignore[misc]
    epoll.rounds = [[6, 5]]
    loop.fire(999)
    assert calls == [(6, 7.0), (5, 7.0)]
    assert epoll.polls == 1  # a quiet round ends the wake-up


def test_a_handler_closed_by_an_earlier_one_in_the_round_is_skipped() -> None:
    loop, epoll = FakeLoop(), FakeEpoll()
    poller = Poller(loop, epoll)
    calls: list[int] = []

    def first(now: float) -> None:
        calls.append(5)
        poller.remove(6)

    poller.add(5, first)
    poller.add(6, lambda now: calls.append(6))  # type: ignore[func-returns-value]
    epoll.rounds = [[5, 6]]
    loop.fire(999)
    assert calls == [5]


def test_busy_rounds_poll_again_but_only_so_often() -> None:
    loop, epoll = FakeLoop(), FakeEpoll()
    poller = Poller(loop, epoll)
    fds = list(range(10, 10 + pl.DRAIN_MIN_EVENTS))
    count = {"calls": 0}
    for fd in fds:
        poller.add(fd, lambda now: count.__setitem__("calls", count["calls"] + 1))
    epoll.rounds = [fds] * (pl.DRAIN_ROUNDS + 3)
    loop.fire(999)
    assert epoll.polls == pl.DRAIN_ROUNDS  # bounded: the other services still get the loop
    assert count["calls"] == pl.DRAIN_ROUNDS * len(fds)
    loop.fire(999)  # the rest come on the next wake-up: three busy rounds, then a quiet poll
    assert epoll.polls == pl.DRAIN_ROUNDS + 3 + 1


def test_one_failing_handler_does_not_stall_the_others(caplog: pytest.LogCaptureFixture) -> None:
    loop, epoll = FakeLoop(), FakeEpoll()
    poller = Poller(loop, epoll)
    calls: list[int] = []

    def broken(now: float) -> None:
        raise ValueError("a bug")

    poller.add(5, broken)
    poller.add(6, lambda now: calls.append(6))  # type: ignore[func-returns-value]
    epoll.rounds = [[5, 6]]
    loop.fire(999)
    assert calls == [6] and "transfer socket handler failed" in caplog.text


def test_without_epoll_each_socket_is_a_reader_on_the_loop() -> None:
    loop = FakeLoop()
    poller = Poller(loop, None)
    assert loop.readers == {}
    seen: list[float] = []
    poller.add(5, seen.append)
    assert set(loop.readers) == {5}
    loop.now = 3.5
    loop.fire(5)
    assert seen == [3.5]  # the loop's time by default
    poller.add(6, lambda now: 1 / 0)  # type: ignore[func-returns-value]
    loop.fire(6)  # the error boundary holds here too
    poller.close()
    assert loop.readers == {}


def test_fresh_sockets_are_served_apart_until_promoted() -> None:
    """A fresh socket is in the second epoll: poll_fresh serves it (and only it); promote moves it to the
    main one; remove finds it in either; close closes both."""
    loop, epoll, fresh = FakeLoop(), FakeEpoll(), FakeEpoll(998)
    poller = Poller(loop, epoll, fresh_epoll=fresh)
    assert set(loop.readers) == {999, 998}
    calls: list[int] = []
    poller.add(5, lambda now: calls.append(5), fresh=True)  # type: ignore[func-returns-value]
    poller.add(6, lambda now: calls.append(6))  # type: ignore[func-returns-value]
    assert fresh.registered == {5} and epoll.registered == {6}
    fresh.rounds = [[5]]
    poller.poll_fresh()
    assert calls == [5] and epoll.polls == 0
    poller.promote(5)
    poller.promote(5)  # twice: no longer fresh, nothing to move
    assert fresh.registered == set() and epoll.registered == {5, 6}
    polls = fresh.polls
    poller.poll_fresh()  # nothing fresh: not even a poll
    assert fresh.polls == polls
    poller.add(7, lambda now: None, fresh=True)
    poller.remove(7)
    assert fresh.registered == set()
    poller.close()
    assert epoll.closed and fresh.closed and loop.readers == {}


def test_without_a_fresh_epoll_fresh_sockets_are_ordinary() -> None:
    loop, epoll = FakeLoop(), FakeEpoll()
    poller = Poller(loop, epoll)
    poller.add(5, lambda now: None, fresh=True)
    assert epoll.registered == {5}
    poller.poll_fresh()
    poller.promote(5)
    assert epoll.registered == {5} and epoll.polls == 0


@pytest.mark.parametrize("with_epoll", [True, False])
def test_adding_a_socket_again_swaps_its_handler_only(with_epoll: bool) -> None:
    """The TFTP server's spare sockets are added ahead with a handler that drops datagrams; a transfer
    taking one adds it again with its own handler: no second registration, the new handler is called."""
    loop, epoll, fresh = FakeLoop(), FakeEpoll(), FakeEpoll(998)
    poller = Poller(loop, epoll if with_epoll else None, fresh_epoll=fresh if with_epoll else None)
    calls: list[str] = []
    poller.add(5, lambda now: calls.append("spare"), fresh=True)  # type: ignore[func-returns-value]
    poller.add(5, lambda now: calls.append("transfer"), fresh=True)  # type: ignore[func-returns-value]
    if with_epoll:
        assert fresh.registered == {5} and epoll.registered == set()
        fresh.rounds = [[5]]
        poller.poll_fresh()
    else:
        assert set(loop.readers) == {5}
        loop.fire(5)
    assert calls == ["transfer"]
    poller.remove(5)
    assert fresh.registered == set() and 5 not in loop.readers
