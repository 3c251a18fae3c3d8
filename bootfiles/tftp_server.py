"""Read-only asyncio TFTP server: the sockets around `SendTransfer`, a `BootTree` and `tftp_policy`.

Request pipeline (one listening socket, `udpio.UdpListener`): decode → `tftp_policy.decide` (pure:
refuse / ignore / serve) → open the name in the tree → negotiate → serve from a fresh ephemeral port
(RFC 1350 §4, the transfer ID), its sockets polled by `bootfiles.poller`. Every request ends in one
"tftp" event on the appliance's event stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Literal, Protocol

from bootfiles import tftp_native as native
from bootfiles import tftp_packet as tp
from bootfiles import tftp_policy as policy
from bootfiles.poller import Poller, platform_epoll
from bootfiles.spec import EventSink
from bootfiles.tftp_transfer import BytesSource, Limits, SendTransfer, negotiated
from bootfiles.tree import Denied, OpenedFile, TreeError
from udpio.udp import UdpListener

log = logging.getLogger(__name__)

Address = tuple[str, int]
_TRANSFER_RECV_BYTES = 4096
_REQUESTS_PER_WAKEUP = 64
# Transfer sockets bound (and registered with the poller) ahead of a burst: a storm's requests then
# take a port instead of making one, three system calls fewer on each one's way to its first answer.
# Refilled a moment after the pool runs low, so that a burst is not slowed by its own refill; the
# first fill comes after the first request, not at start: an appliance whose TFTP serves nothing holds
# no spare ports, and the other services' binds at start never meet 64 fresh ephemeral ports.
_SPARE_SOCKETS = 64
_REFILL_AFTER = 0.05
_REQUEST_MEMO = 256  # a storm's requests are byte for byte the same: each is decoded once
_PREPARED_MAX = 32  # the pump's parameters kept for requests of small static files (a loader) ...
_PREPARED_BYTES = 2 << 20  # ... of at most this size: at worst 64 MiB held past the file cache
_LOOK_AGAIN_AFTER = 0.005  # an RRQ for a pumped transfer still running is looked at again after this


class Tree(Protocol):
    def open(self, name: str, client: Address) -> Awaitable[OpenedFile]: ...

    def open_now(self, name: str, client: Address) -> OpenedFile | None:
        """The opened file if no waiting is needed, else None (then `open` is asked)."""
        ...


class _Pumped:
    """A transfer the native pump sees through (`tftp_native`): what the server reads of a transfer and
    of its socket, filled in from the pump's completion. Its socket is the pump's to close."""

    __slots__ = ("bytes_sent", "closed", "done", "error", "finished", "outcome", "retransmissions")

    def __init__(self, finished: asyncio.Future[None]) -> None:
        self.finished = finished
        self.done = False
        self.closed = False
        self.outcome: str | None = None
        self.error: str | None = None
        self.bytes_sent = 0
        self.retransmissions = 0

    @property
    def transfer(self) -> _Pumped:
        return self

    def close(self) -> None:
        self.closed = True


@dataclass
class _Started:
    """A transfer that has begun: what its end closes and reports."""

    request: tp.ReadRequest
    addr: Address
    opened: OpenedFile
    transfer: SendTransfer | _Pumped
    conn: _TransferSocket | _Pumped
    done: asyncio.Future[None]
    at: float  # the loop's time when its request was taken


@dataclass
class TftpStats:
    """Counters since start, for /metrics. A request either starts a transfer or is refused (or dropped)
    before one; every transfer that started ends once, with the outcome of its "tftp" event."""

    started: int = 0
    ended: dict[str, int] = field(default_factory=dict)  # outcome (ok, tsize-probe, timeout, not-found, ...) -> n
    refused: dict[str, int] = field(default_factory=dict)  # before a transfer: refused-write, bad-mode, busy, disabled
    bytes_sent: int = 0  # payload bytes of ended transfers
    retransmits: int = 0  # window / OACK retransmissions of ended transfers


def _count(table: dict[str, int], key: str) -> None:
    table[key] = table.get(key, 0) + 1


def to_netascii(data: bytes) -> bytes:
    """RFC 1350 §5 / RFC 764: CR → CR NUL, then LF → CR LF."""
    return data.replace(b"\r", b"\r\0").replace(b"\n", b"\r\n")


# Blocks acknowledged before a transfer gets its connected twin: past a burst's setup, and more than a
# config file has (16 blocks of 1468 bytes: 23 KB), so that only big files pay for the second socket.
_TWIN_AFTER_BLOCKS = 16


class _TransferSocket:
    """One transfer's port: feeds the state machine, sends what it yields, runs its timer.

    The listener is a DatagramProtocol; a transfer uses raw non-blocking sockets polled by the
    `Poller`, because this is the per-block hot path of every boot. Where the OS lets two
    sockets share the port (SO_REUSEPORT), a second one connected to the client receives exactly the
    client's datagrams and sends without naming an address: the kernel keeps the route, and neither side
    converts an address per block, which takes about 15 % off the cost of a block. The first socket,
    unconnected, then hears only strangers (RFC 1350 §4: they get error 5 and the transfer goes on).
    Without the twin (no SO_REUSEPORT, no descriptor to spare) the first socket does both jobs.
    The twin is made after the client has acknowledged _TWIN_AFTER_BLOCKS blocks, not at the request:
    in a boot storm the requests of a burst are set up one after another, and every microsecond of
    setup is paid by the first byte of the requests behind it; a small file (a config) never needs one.
    Until the client's first answer the socket is *fresh* (the `Poller` serves it between the requests
    of a burst).
    UDP gives no delivery promise anyway: a send that would block is dropped and the state machine's
    retransmission covers it, exactly as for a datagram lost on the wire.
    """

    def __init__(
        self,
        sock: socket.socket,
        transfer: SendTransfer,
        peer: Address,
        done: asyncio.Future[None],
        poller: Poller,
        buffer: bytearray,
    ) -> None:
        self.sock = sock
        self.transfer = transfer
        self.peer = peer
        self.done = done
        self.poller = poller
        self.loop = done.get_loop()
        self._buffer = buffer
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._closed = False
        self._fresh = True
        self._twin_due = True
        self.twin: socket.socket | None = None
        self._send_to_client: Callable[[bytes], object] = lambda datagram: sock.sendto(datagram, peer)
        poller.add(sock.fileno(), self._from_anyone, fresh=True)

    @property
    def closed(self) -> bool:
        return self._closed

    def kick(self) -> None:
        self._flush()

    def _twin_up(self) -> None:
        """The connected twin for the rest of the transfer (see the class docstring)."""
        self._twin_due = False
        twin = _connected_twin(self.sock, self.peer)
        if twin is not None:
            self.twin = twin
            self._send_to_client = twin.send
            self._recv_into = twin.recv_into
            self.poller.add(twin.fileno(), self._from_client)

    # One datagram per readiness: the poll is level-triggered, so a second queued datagram comes back
    # in the next round, and a lock-step transfer rarely has one, so draining would only add a failing
    # receive (a syscall and an exception) to every block.
    def _from_client(self, now: float) -> None:
        """The connected twin: the kernel lets only the client's datagrams through."""
        buf = self._buffer
        try:
            size = self._recv_into(buf)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:  # an ICMP error for an earlier send; the retransmission timer copes
            log.debug("tftp: transfer socket for %s: %s", self.peer, exc)
            return
        if not self._next_block(size, now):
            self._received(size, now)

    def _from_anyone(self, now: float) -> None:
        buf = self._buffer
        try:
            size, addr = self.sock.recvfrom_into(buf)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            log.debug("tftp: transfer socket for %s: %s", self.peer, exc)
            return
        if addr != self.peer:
            if size >= 2 and buf[1] != tp.OP_ERROR:
                # RFC 1350 §4: a packet from a wrong TID gets error 5; the transfer goes on.
                self._send(tp.encode(tp.Error(tp.ErrorCode.UNKNOWN_TID, "unknown TID")), addr)
            return
        if not self._next_block(size, now):
            self._received(size, now)
        if self._fresh:  # the client has its first answer: off the fresh set (poller.py)
            self._fresh = False
            self.poller.promote(self.sock.fileno())
        if self._twin_due and self.transfer.blocks_acked >= _TWIN_AFTER_BLOCKS and not self.transfer.done:
            self._twin_up()

    def _next_block(self, size: int, now: float) -> bool:
        """Lock-step: the ACK of the block just sent is answered with the next one at once, without
        the state machine's outbox (its timer deadline moved with it; the lazy timer re-arms itself,
        `_flush`). False: not such an ACK, `_received` takes it."""
        buf = self._buffer
        if size != 4 or buf[1] != tp.OP_ACK or buf[0] != 0:
            return False
        datagram = self.transfer.next_block_for((buf[2] << 8) | buf[3], now)
        if datagram is None:
            return False
        try:
            self._send_to_client(datagram)
        except (BlockingIOError, InterruptedError):
            pass  # as in _flush
        except OSError as exc:
            log.debug("tftp: send to %s failed: %s", self.peer, exc)
        return True

    def _received(self, size: int, now: float) -> None:
        buf = self._buffer
        try:
            if size == 4 and buf[1] == tp.OP_ACK and buf[0] == 0:  # the hot path
                self.transfer.on_ack((buf[2] << 8) | buf[3], now)
            else:
                self.transfer.receive(bytes(buf[:size]), now)
        except Exception:  # the error boundary of this transfer
            log.exception("tftp: datagram from %s:%s broke its transfer", self.peer[0], self.peer[1])
            self.transfer.abort(now, "internal error")
        self._flush()

    def _send(self, datagram: bytes, addr: Address) -> None:
        try:
            self.sock.sendto(datagram, addr)
        except (BlockingIOError, InterruptedError):
            pass  # socket buffer full: as good as lost on the wire; the retransmission timer recovers
        except OSError as exc:
            log.debug("tftp: send to %s failed: %s", addr, exc)

    def _on_timer(self) -> None:
        self._timer = None
        try:
            self.transfer.on_timeout(self.loop.time())
        except Exception:
            log.exception("tftp: timer of transfer to %s failed", self.peer)
            self.transfer.abort(self.loop.time(), "internal error")
        self._flush()

    def _flush(self) -> None:
        if self._closed:
            return
        transfer = self.transfer
        send = self._send_to_client
        for datagram in transfer.datagrams_to_send():
            try:
                send(datagram)
            except (BlockingIOError, InterruptedError):
                pass  # as in _send
            except OSError as exc:
                log.debug("tftp: send to %s failed: %s", self.peer, exc)
        if transfer.done:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            if not self.done.done():
                self.done.set_result(None)
            return
        # Lazy timer: ACKs only move the deadline inside the state machine; the timer re-arms itself
        # when it fires early, so the hot path schedules nothing.
        deadline = transfer.next_timeout()
        if deadline is not None and (self._timer is None or self._timer_at > deadline):
            if self._timer is not None:
                self._timer.cancel()
            self._timer_at = deadline
            self._timer = self.loop.call_at(deadline, self._on_timer)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.poller.remove(self.sock.fileno())
        self.sock.close()
        if self.twin is not None:
            self.poller.remove(self.twin.fileno())
            self.twin.close()


def _discarding(sock: socket.socket) -> Callable[[float], None]:
    """A spare socket's handler: what reaches a port no transfer has yet is read and dropped."""
    def drain(_now: float) -> None:
        with contextlib.suppress(OSError):  # BlockingIOError ends it: nothing more is queued
            while True:
                sock.recv(1)
    return drain


def _connected_twin(sock: socket.socket, peer: Address) -> socket.socket | None:
    """A second socket on `sock`'s port, connected to the peer, or None where the OS will not share.

    SO_REUSEPORT goes on only after `sock` has its ephemeral port: a socket that asks for port 0 with
    the option set may be given a port already in use by another such socket. Linux shares a port only
    between sockets of one user, so no other account can bind it.
    """
    reuse_port = getattr(socket, "SO_REUSEPORT", None)
    if reuse_port is None:
        return None
    twin: socket.socket | None = None
    try:
        sock.setsockopt(socket.SOL_SOCKET, reuse_port, 1)
        twin = socket.socket(sock.family, socket.SOCK_DGRAM)
        twin.setsockopt(socket.SOL_SOCKET, reuse_port, 1)
        twin.setblocking(False)
        twin.bind(sock.getsockname())
        twin.connect(peer)
    except OSError as exc:  # e.g. EMFILE in a storm: the unconnected socket serves alone
        log.debug("tftp: no connected socket for %s: %s", peer, exc)
        if twin is not None:
            twin.close()
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, reuse_port, 0)
        return None
    return twin


class TftpServer:
    _use_epoll = True  # where the OS has epoll; tests turn it off to run the portable path

    def __init__(
        self,
        host: str,
        port: int,
        tree: Tree,
        *,
        blksize_max: int = 1468,
        windowsize_max: int = 64,
        max_transfers: int = 512,
        timeout: float = 1.0,
        retries: int = 5,
        events: EventSink | None = None,
        enabled: Callable[[], bool] = lambda: True,
        on_fatal: Callable[[BaseException], None] | None = None,
        engine: str = "auto",
    ) -> None:
        if engine not in ("auto", "native", "python"):
            raise ValueError("tftp engine must be 'auto', 'native' or 'python'")
        if not tp.MIN_BLKSIZE <= blksize_max <= tp.MAX_BLKSIZE:
            raise ValueError(f"tftp blksize_max must be within {tp.MIN_BLKSIZE}..{tp.MAX_BLKSIZE}")
        if not 1 <= windowsize_max <= tp.MAX_WINDOWSIZE:
            raise ValueError("tftp windowsize_max must be within 1..65535")
        if max_transfers < 1 or retries < 0 or timeout <= 0:
            raise ValueError("tftp max_transfers must be >= 1, retries >= 0, timeout > 0")
        self.host = host
        self.port = port
        self.tree = tree
        self.limits = Limits(blksize_max=blksize_max, windowsize_max=windowsize_max, timeout=timeout, retries=retries)
        self.max_transfers = max_transfers
        self.events = events
        self.enabled = enabled
        # A boot storm's RRQs arrive in bursts while the loop is busy with transfers: take up to 64 per
        # readiness, not one per trip through the loop (the first byte of the 64th waited for 63 trips).
        # Between two requests of a batch the fresh transfers are served: a client that has its OACK
        # gets its first block then, not after the whole batch is set up (poller.py).
        self.listener = UdpListener("tftp", host, port, self._on_request, on_fatal=on_fatal, logger=log,
                                    max_batch=_REQUESTS_PER_WAKEUP, between=self._serve_fresh)
        # A request being served: the task that opens its file (and sees the transfer through), or,
        # for one begun in the listener's callback, its transfer's `done` future (no task at all).
        self._active: dict[tuple[Address, str], asyncio.Future[None]] = {}
        self._conn_by_key: dict[tuple[Address, str], _TransferSocket | _Pumped] = {}
        self._transfers: set[_TransferSocket | _Pumped] = set()
        self._poller: Poller | None = None
        # One receive buffer for all transfers (they run one at a time, on the loop): an ACK read into
        # it is decoded in place, with no bytes object allocated and freed per block.
        self._buffer = bytearray(_TRANSFER_RECV_BYTES)
        self._family = socket.AF_INET
        self._bind_host = host
        self._spares: list[socket.socket] = []
        self._refill_handle: asyncio.TimerHandle | None = None
        self._requests: dict[bytes, tp.Packet] = {}
        # The native pump runs the transfers when the engine allows it and its library is built.
        self.engine = engine
        self._pump: native.Pump | None = None
        self._pumped: dict[int, _Pumped] = {}
        self._prepared: dict[int, tuple[tp.ReadRequest, bytes, native.Prepared]] = {}
        self.stats = TftpStats()

    @property
    def address(self) -> Address:
        if self.listener.transport is None:
            raise RuntimeError("tftp server not started")
        return self.listener.address

    @property
    def active_transfers(self) -> int:
        return len(self._active)

    @property
    def engine_in_use(self) -> Literal["native", "python"]:
        """Who runs the transfers since start: the native pump, or this module's Python."""
        return "native" if self._pump is not None else "python"

    async def start(self) -> None:
        if self.listener.transport is not None:
            return
        self._start_pump()
        try:
            await self.listener.start()
        except BaseException:
            self._stop_pump()
            raise
        self._family = self.listener.family
        self._bind_host = self.address[0]
        log.info("tftp: listening on %s:%s (%s transfers)", *self.address, self.engine_in_use)

    def _start_pump(self) -> None:
        if self.engine == "python":
            return
        try:
            self._pump = native.Pump()
        except native.PumpError as exc:
            if self.engine == "native":
                raise RuntimeError(f"tftp engine 'native': {exc}") from exc
            log.info("tftp: transfers in Python: %s", exc)
            return
        asyncio.get_running_loop().add_reader(self._pump.notify_fd, self._pump_ended)

    def _stop_pump(self) -> None:
        if self._pump is not None:
            pump, self._pump = self._pump, None
            asyncio.get_running_loop().remove_reader(pump.notify_fd)
            pump.close()  # its thread is gone: whatever it still ran is over, its sockets closed
            for pumped in self._pumped.values():
                pumped.done, pumped.outcome = True, pumped.outcome or "aborted"
                if not pumped.finished.done():
                    pumped.finished.set_result(None)
            self._pumped.clear()

    async def stop(self) -> None:
        await self.listener.stop()
        now = asyncio.get_running_loop().time()
        for conn in list(self._transfers):
            if isinstance(conn, _TransferSocket):
                conn.transfer.abort(now, "server shutting down")
                conn.kick()
        if self._pump is not None:
            self._pump.abort_all("server shutting down")  # each ends with its completion, awaited below
        running = list(self._active.values())
        for future in running:
            if isinstance(future, asyncio.Task):  # still opening its file; a begun transfer ended above
                future.cancel()
        if running:
            await asyncio.gather(*running, return_exceptions=True)
        for conn in list(self._transfers):  # begun, but its task was cancelled before it could see it end
            self._transfers.discard(conn)
            conn.close()
        self._stop_pump()
        self._active.clear()
        self._conn_by_key.clear()
        if self._refill_handle is not None:
            self._refill_handle.cancel()
            self._refill_handle = None
        for sock in self._spares:
            if self._poller is not None:
                self._poller.remove(sock.fileno())
            sock.close()
        self._spares.clear()
        if self._poller is not None:
            poller, self._poller = self._poller, None
            poller.close()

    # --- pipeline: decode → decide (tftp_policy, pure) → carry the decision out ---------------------
    def _on_request(self, data: bytes, addr: Address, *, looked_again: bool = False) -> bytes | None:
        """A datagram on the listening port; returns what to answer from that port (a WRQ's refusal)."""
        packet = self._requests.get(data)
        if packet is None:
            try:
                packet = tp.decode(data)
            except tp.TftpPacketError as exc:
                log.debug("tftp: bad request from %s:%s: %s", addr[0], addr[1], exc)
                return None
            if isinstance(packet, (tp.ReadRequest, tp.WriteRequest)):  # frozen, shared read-only
                if len(self._requests) >= _REQUEST_MEMO:
                    self._requests.clear()
                self._requests[data] = packet
        filename = packet.filename if isinstance(packet, (tp.ReadRequest, tp.WriteRequest)) else ""
        key = (addr, filename)
        in_flight = self._in_flight(key)
        if in_flight is policy.InFlight.RUNNING and isinstance(self._conn_by_key.get(key), _Pumped):
            # The client's last word to that transfer may be on its way through the pump's thread (EDK2
            # ends its tsize probe with ERROR 8 and asks again from the same port at once): its end
            # may be queued already, else it gets a moment before this RRQ is taken for a retransmission.
            self._pump_ended()
            in_flight = self._in_flight(key)
            if in_flight is policy.InFlight.RUNNING and not looked_again:
                asyncio.get_running_loop().call_later(_LOOK_AGAIN_AFTER, self._look_again, data, addr)
                return None
        decision = policy.decide(packet, enabled=self.enabled(), in_flight=in_flight,
                                 active=len(self._active), max_transfers=self.max_transfers)
        if isinstance(decision, policy.Serve):
            if decision.replaces:
                self._active.pop(key, None)
                self._conn_by_key.pop(key, None)
            self.stats.started += 1
            loop = asyncio.get_running_loop()
            started = self._start_now(decision.request, addr, loop)
            running: asyncio.Future[None]
            if started is not None:
                # Seen through by callbacks on its `done`: a task per transfer would cost its making and
                # a first step on the loop, both in front of the next client's first block.
                running = started.done
                self._conn_by_key[key] = started.conn
                running.add_done_callback(lambda _: self._ended(started))
            else:
                running = loop.create_task(self._serve(decision.request, addr))
            self._active[key] = running
            running.add_done_callback(lambda f: self._forget(key, f))
            return None
        if isinstance(decision, policy.Ignore):
            log.log(decision.level, "tftp: %s:%s %s: %s", addr[0], addr[1], filename, decision.reason)
            if decision.outcome is not None:
                _count(self.stats.refused, decision.outcome)
                self._event(None, addr, filename, 0, 0.0, decision.outcome)
            return None
        _count(self.stats.refused, decision.outcome)
        self._event(None, addr, filename, 0, 0.0, decision.outcome)
        error = tp.encode(tp.Error(decision.code, decision.message))
        if decision.from_listener:
            return error
        self._send_from_fresh_port(error, addr)
        return None

    def _look_again(self, data: bytes, addr: Address) -> None:
        if self.listener.transport is not None:  # not stopped meanwhile
            self._on_request(data, addr, looked_again=True)  # an RRQ: no answer from the listener's port

    def _in_flight(self, key: tuple[Address, str]) -> policy.InFlight:
        if key not in self._active:
            return policy.InFlight.NONE
        conn = self._conn_by_key.get(key)
        if conn is None or not conn.transfer.done:
            return policy.InFlight.RUNNING  # opening its file, or sending
        return policy.InFlight.FINISHED

    def _forget(self, key: tuple[Address, str], running: asyncio.Future[None]) -> None:
        if self._active.get(key) is running:
            del self._active[key]
            self._conn_by_key.pop(key, None)

    def _start_now(self, request: tp.ReadRequest, addr: Address,
                   loop: asyncio.AbstractEventLoop) -> _Started | None:
        """Begin the transfer at once when the tree can answer without waiting (a cached file, a
        rendered config): its OACK or first DATA leaves in this callback, not a loop trip later when
        the task first runs. None: the task opens the file itself, refusals included (they are rare and
        need the refusal's event, which the task sends)."""
        try:
            opened = self.tree.open_now(request.filename, addr)
        except TreeError:
            return None
        if opened is None:
            return None
        if policy.refuse_netascii(request.mode, opened.data is not None) is not None:
            opened.close()
            return None
        at = loop.time()
        try:
            transfer, conn, done = self._begin(request, addr, opened, loop)
        except OSError as exc:  # no port to spare (EMFILE in a storm): the task tries again, and reports
            log.debug("tftp: %s:%s %s: not started at once: %s", addr[0], addr[1], request.filename, exc)
            opened.close()
            return None
        return _Started(request, addr, opened, transfer, conn, done, at)

    def _begin(self, request: tp.ReadRequest, addr: Address, opened: OpenedFile, loop: asyncio.AbstractEventLoop,
               ) -> tuple[SendTransfer | _Pumped, _TransferSocket | _Pumped, asyncio.Future[None]]:
        done: asyncio.Future[None] = loop.create_future()
        if self._pump is not None:
            pumped = self._begin_pumped(self._pump, request, addr, opened, done)
            if pumped is not None:
                return pumped, pumped, done
        source = opened.source
        if request.mode == "netascii" and opened.data is not None:
            source = BytesSource(to_netascii(opened.data))
        transfer = SendTransfer(source, request.options, self.limits, loop.time())
        poller = self._poller_for(loop)
        conn = _TransferSocket(self._take_socket(), transfer, addr, done, poller, self._buffer)
        self._transfers.add(conn)
        conn.kick()
        return transfer, conn, done

    def _begin_pumped(self, pump: native.Pump, request: tp.ReadRequest, addr: Address, opened: OpenedFile,
                      done: asyncio.Future[None]) -> _Pumped | None:
        """Hand the transfer to the native pump, which sends its first datagram now; None when the pump
        would not take it (then the Python engine serves it, on the same port)."""
        prepared = self._prepared_for(request, opened)
        if prepared is None:
            return None
        sock = self._take_socket()
        fd = sock.detach()  # the pump closes it at the end; should the start fail, it is wrapped again
        try:
            ident = pump.start(prepared, fd, addr)
        except native.PumpError as exc:
            log.warning("tftp: %s:%s %s: %s", addr[0], addr[1], request.filename, exc)
            self._spares.append(socket.socket(self._family, socket.SOCK_DGRAM, fileno=fd))
            return None
        pumped = _Pumped(done)
        self._pumped[ident] = pumped
        self._transfers.add(pumped)
        return pumped

    def _prepared_for(self, request: tp.ReadRequest, opened: OpenedFile) -> native.Prepared | None:
        """The pump's parameters for this request and file. A storm's identical requests (one memoized
        request object) for a loader in memory share them, kept by identity: the same request object and
        the same bytes, so a file replaced since gets new ones. Only small static files, and a bounded
        number: an entry holds its bytes, which the file cache may have let go meanwhile."""
        data = opened.data
        if data is not None and request.mode != "netascii":
            hit = self._prepared.get(id(request))
            if hit is not None and hit[0] is request and hit[1] is data:
                return hit[2]
        elif data is not None:
            data = to_netascii(data)
        file_fd = opened.fileno()
        if data is None and file_fd < 0:
            return None
        size = len(data) if data is not None else opened.size
        params, oack = negotiated(request.options, size, self.limits)
        limits = self.limits
        prepared = native.prepare(
            data=data, file_fd=file_fd, size=size, blksize=params.blksize, windowsize=params.windowsize,
            timeout=params.timeout, timeout_from_client=params.timeout_from_client, retries=limits.retries,
            backoff_max=limits.backoff_max, oack=oack, tsize_accepted="tsize" in params.accepted, family=self._family)
        if data is not None and data is opened.data and opened.kind == "static" and size <= _PREPARED_BYTES:
            if len(self._prepared) >= _PREPARED_MAX:
                self._prepared.clear()
            self._prepared[id(request)] = (request, data, prepared)
        return prepared

    def _pump_ended(self) -> None:
        """The pump's eventfd is readable: transfers have ended; their futures resolve their ends."""
        if self._pump is None:
            return
        for end in self._pump.take():
            pumped = self._pumped.pop(end.id, None)
            if pumped is None:
                continue
            pumped.done = True
            pumped.outcome = end.outcome
            pumped.error = end.error
            pumped.bytes_sent = end.bytes_sent
            pumped.retransmissions = end.retransmissions
            if not pumped.finished.done():
                pumped.finished.set_result(None)

    async def _serve(self, request: tp.ReadRequest, addr: Address) -> None:
        """A request whose file the tree must open first (a name whose resolution expired, a big file
        served from disk, a refusal): open it, then see the transfer through."""
        loop = asyncio.get_running_loop()
        at = loop.time()
        started: _Started | None = None
        try:
            try:
                opened = await self.tree.open(request.filename, addr)
            except TreeError as exc:
                log.info("tftp: %s:%s %s: %s", addr[0], addr[1], request.filename, exc)
                outcome, server = self._refuse(policy.refuse_open(exc), request.filename, addr)
                self._account(server, addr, request.filename, at, outcome)
                return
            refusal = policy.refuse_netascii(request.mode, opened.data is not None)
            if refusal is not None:
                opened.close()
                outcome, _ = self._refuse(refusal, request.filename, addr)
                self._account(opened.server_uuid, addr, request.filename, at, outcome)
                return
            try:
                transfer, conn, done = self._begin(request, addr, opened, loop)
            except BaseException:
                opened.close()
                raise
            started = _Started(request, addr, opened, transfer, conn, done, at)
            # A burst that waited for one resolution resumes here task after task, in one trip
            # through the loop: serve the fresh transfers in between, as the listener does.
            self._serve_fresh()
            key = (addr, request.filename)
            if self._active.get(key) is asyncio.current_task():
                self._conn_by_key[key] = conn
            await done
        except asyncio.CancelledError:
            if started is not None:
                self._ended(started, "aborted")
            else:
                self._account(None, addr, request.filename, at, "aborted")
            raise
        except Exception:
            log.exception("tftp: transfer of %s to %s:%s failed", request.filename, addr[0], addr[1])
            if started is not None:
                self._ended(started, "error")
            else:
                self._account(None, addr, request.filename, at, "error")
            return
        self._ended(started)

    def _ended(self, started: _Started, outcome: str | None = None) -> None:
        """A begun transfer is over (or cut short with `outcome`): its port closed, its file let go,
        its counters and its one event."""
        conn, transfer, request, addr = started.conn, started.transfer, started.request, started.addr
        if conn.closed:  # seen to its end already
            return
        self._transfers.discard(conn)
        conn.close()
        if isinstance(conn, _Pumped) and not conn.done:
            # Cut short here (a stop cancelled its task) while the pump's thread may still read the file:
            # its descriptor is let go once the pump has reported the end, never under a pread.
            opened = started.opened
            conn.finished.add_done_callback(lambda _: opened.close())
        else:
            started.opened.close()
        outcome = outcome or transfer.outcome or "error"
        if outcome not in ("ok", "tsize-probe"):
            log.info("tftp: %s:%s %s: %s (%s)", addr[0], addr[1], request.filename, outcome, transfer.error)
        self.stats.bytes_sent += transfer.bytes_sent
        self.stats.retransmits += transfer.retransmissions
        self._account(started.opened.server_uuid, addr, request.filename, started.at, outcome,
                      transfer.bytes_sent)

    def _account(self, server: str | None, addr: Address, name: str, at: float, outcome: str,
                 nbytes: int = 0) -> None:
        """A request that started ends: its outcome counted, its "tftp" event sent."""
        _count(self.stats.ended, outcome)
        ms = (asyncio.get_running_loop().time() - at) * 1000.0
        self._event(server, addr, name, nbytes, ms, outcome)

    def _refuse(self, refusal: policy.Refuse, name: str, addr: Address) -> tuple[str, str | None]:
        """Carry out a refusal found while serving; its outcome and server go into the transfer's event."""
        if refusal.denied is not None:
            self._denied_event(refusal.denied, name)
        self._send_from_fresh_port(tp.encode(tp.Error(refusal.code, refusal.message)), addr)
        return refusal.outcome, refusal.server

    def _poller_for(self, loop: asyncio.AbstractEventLoop) -> Poller:
        if self._poller is None:
            epoll = platform_epoll() if self._use_epoll else None
            self._poller = Poller(loop, epoll, fresh_epoll=platform_epoll() if epoll is not None else None)
        return self._poller

    def _serve_fresh(self) -> None:
        if self._poller is not None:
            self._poller.poll_fresh()

    def _new_socket(self) -> socket.socket:
        """A fresh ephemeral port on the listening address (the transfer ID), bound without a resolver
        round trip: a boot storm opens hundreds of these at once."""
        sock = socket.socket(self._family, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            sock.bind((self._bind_host, 0))
        except OSError:
            sock.close()
            raise
        return sock

    def _take_socket(self) -> socket.socket:
        """A transfer's port: a spare bound ahead (registered with the poller as fresh already), else a
        new one."""
        if len(self._spares) <= _SPARE_SOCKETS // 2 and self._refill_handle is None:
            self._refill_handle = asyncio.get_running_loop().call_later(_REFILL_AFTER, self._refill)
        if self._spares:
            return self._spares.pop()
        return self._new_socket()

    def _refill(self) -> None:
        """Bind spare ports up to _SPARE_SOCKETS. Each one's handler drops what a stranger sends it
        until a transfer takes it (and the transfer's handler replaces that one)."""
        self._refill_handle = None
        # With the native pump a spare is registered nowhere until the pump takes it: what a stranger
        # sends it waits in its buffer, and is answered (error 5) or ends with the socket.
        poller = None if self._pump is not None else self._poller_for(asyncio.get_running_loop())
        while len(self._spares) < _SPARE_SOCKETS:
            try:
                sock = self._new_socket()
            except OSError as exc:  # out of descriptors: transfers make their own, or are refused
                log.debug("tftp: no spare transfer socket: %s", exc)
                return
            if poller is not None:
                poller.add(sock.fileno(), _discarding(sock), fresh=True)
            self._spares.append(sock)

    def _send_from_fresh_port(self, datagram: bytes, addr: Address) -> None:
        """An error answer to an RRQ, from a fresh TID like a transfer would use."""
        try:
            with self._new_socket() as sock:
                sock.sendto(datagram, addr)
        except OSError as exc:  # as lost on the wire: the client asks again
            log.debug("tftp: error answer to %s:%s not sent: %s", addr[0], addr[1], exc)

    def _denied_event(self, exc: Denied, name: str) -> None:
        if self.events is None:
            return
        try:
            self.events("denied", {"server": exc.server_uuid, "client": exc.client, "file": name, "via": "tftp",
                                   "reason": str(exc)})
        except Exception:
            log.exception("tftp: event sink failed")

    def _event(self, server: str | None, addr: Address, name: str, nbytes: int, ms: float, outcome: str) -> None:
        if self.events is None:
            return
        try:
            self.events(
                "tftp",
                {
                    "server": server,
                    "client": f"{addr[0]}:{addr[1]}",
                    "file": name,
                    "bytes": nbytes,
                    "duration_ms": round(ms, 3),
                    "outcome": outcome,
                },
            )
        except Exception:
            log.exception("tftp: event sink failed")
