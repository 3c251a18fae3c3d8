"""Read-only asyncio TFTP server: a thin DatagramProtocol around `SendTransfer` and a `BootTree`.

Request pipeline (one listening socket): decode → classify (WRQ refused) → enabled? → duplicate RRQ? →
transfer bound → open the name in the tree → negotiate → serve from a fresh ephemeral port (RFC 1350
§4, the transfer ID). Every request ends in one "tftp" event on the appliance's event stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import select
import socket
from collections.abc import Awaitable, Callable
from typing import Protocol

from bootfiles import tftp_packet as tp
from bootfiles.spec import EventSink
from bootfiles.tftp_transfer import BytesSource, Limits, SendTransfer
from bootfiles.tree import Denied, OpenedFile, TreeError

log = logging.getLogger(__name__)

Address = tuple[str, int]
_TRANSFER_RECV_BYTES = 4096


class Tree(Protocol):
    def open(self, name: str, client: Address) -> Awaitable[OpenedFile]: ...


def to_netascii(data: bytes) -> bytes:
    """RFC 1350 §5 / RFC 764: CR → CR NUL, then LF → CR LF."""
    return data.replace(b"\r", b"\r\0").replace(b"\n", b"\r\n")


class _Listener(asyncio.DatagramProtocol):
    def __init__(self, server: TftpServer) -> None:
        self.server = server

    def datagram_received(self, data: bytes, addr: Address) -> None:
        try:
            self.server._on_request(data, addr)
        except Exception:  # the error boundary: one bad datagram never stops the service
            log.exception("tftp: request from %s:%s failed", addr[0], addr[1])

    def error_received(self, exc: Exception) -> None:
        log.debug("tftp: listener socket error: %s", exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server._listener_lost(exc)


Handler = Callable[[float], None]  # called with the loop's time when its socket is readable


class _TransferPoller:
    """Calls a transfer socket's handler when a datagram waits on it.

    A lock-step transfer costs one ACK in and one DATA out per block, so whatever the event loop spends
    per readiness (a selector key, a Handle, one trip through its run loop per socket) is spent per
    block. With epoll (Linux) every transfer socket of the server sits behind one epoll that is a single
    reader on the loop: the loop wakes once for all the ready transfers, one poll returns them all, and
    each costs a dict lookup and a call. Level-triggered like the loop's own selector, so a socket with a
    second datagram queued is simply returned again. Elsewhere (kqueue on FreeBSD) each socket is a
    reader on the loop, as asyncio offers it.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, *, use_epoll: bool) -> None:
        self.loop = loop
        self._handlers: dict[int, Handler] = {}
        # One receive buffer for all transfers (they run one at a time, on the loop): an ACK read into
        # it is decoded in place, with no bytes object allocated and freed per block.
        self.buffer = bytearray(_TRANSFER_RECV_BYTES)
        self._epoll = select.epoll() if use_epoll else None
        if self._epoll is not None:
            loop.add_reader(self._epoll.fileno(), self._ready)

    def add(self, fd: int, handler: Handler) -> None:
        self._handlers[fd] = handler
        if self._epoll is not None:
            self._epoll.register(fd, select.EPOLLIN)
        else:
            self.loop.add_reader(fd, self._call, handler)

    def remove(self, fd: int) -> None:
        if self._handlers.pop(fd, None) is None:
            return
        if self._epoll is not None:
            self._epoll.unregister(fd)
        else:
            self.loop.remove_reader(fd)

    def close(self) -> None:
        for fd in list(self._handlers):
            self.remove(fd)
        if self._epoll is not None and not self._epoll.closed:
            self.loop.remove_reader(self._epoll.fileno())
            self._epoll.close()

    def _call(self, handler: Handler) -> None:
        try:
            handler(self.loop.time())
        except Exception:  # the error boundary: one transfer's bug never stops the loop
            log.exception("tftp: transfer socket handler failed")

    def _ready(self) -> None:
        assert self._epoll is not None
        poll = self._epoll.poll
        handlers = self._handlers
        clock = self.loop.time
        # Under load the ACKs answering the DATA just sent are queued by the time a round ends: polling
        # again at once serves them without a trip through the event loop. Only a busy round pays for
        # that extra poll, and the rounds are bounded so that the other services still get the loop.
        for _ in range(_DRAIN_ROUNDS):
            events = poll(0, _POLL_EVENTS)
            now = clock()  # one clock read per round: the timeouts are counted in seconds
            for fd, _mask in events:
                handler = handlers.get(fd)
                if handler is None:
                    continue  # closed by an earlier handler of this round
                try:
                    handler(now)
                except Exception:  # the error boundary: one transfer's bug never stalls the others
                    log.exception("tftp: transfer socket handler failed")
            if len(events) < _DRAIN_MIN_EVENTS:
                return


_POLL_EVENTS = 256
_DRAIN_ROUNDS = 4
_DRAIN_MIN_EVENTS = 4


class _TransferSocket:
    """One transfer's port: feeds the state machine, sends what it yields, runs its timer.

    The listener is a DatagramProtocol; a transfer uses raw non-blocking sockets polled by the
    `_TransferPoller`, because this is the per-block hot path of every boot. Where the OS lets two
    sockets share the port (SO_REUSEPORT), a second one connected to the client receives exactly the
    client's datagrams and sends without naming an address: the kernel keeps the route, and neither side
    converts an address per block, which takes about 15 % off the cost of a block. The first socket,
    unconnected, then hears only strangers (RFC 1350 §4: they get error 5 and the transfer goes on).
    Without the twin (no SO_REUSEPORT, no descriptor to spare) the first socket does both jobs.
    UDP gives no delivery promise anyway: a send that would block is dropped and the state machine's
    retransmission covers it, exactly as for a datagram lost on the wire.
    """

    def __init__(
        self,
        sock: socket.socket,
        transfer: SendTransfer,
        peer: Address,
        done: asyncio.Future[None],
        poller: _TransferPoller,
    ) -> None:
        self.sock = sock
        self.transfer = transfer
        self.peer = peer
        self.done = done
        self.poller = poller
        self.loop = poller.loop
        self._buffer = poller.buffer
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._closed = False
        self.twin = _connected_twin(sock, peer)
        poller.add(sock.fileno(), self._from_anyone)
        if self.twin is not None:
            self._send_to_client: Callable[[bytes], object] = self.twin.send
            self._recv_into = self.twin.recv_into
            poller.add(self.twin.fileno(), self._from_client)
        else:
            self._send_to_client = lambda datagram: sock.sendto(datagram, peer)

    def kick(self) -> None:
        self._flush()

    # One datagram per readiness: the poll is level-triggered, so a second queued datagram comes back
    # in the next round, and a lock-step transfer rarely has one, so draining would only add a failing
    # receive (a syscall and an exception) to every block.
    def _from_client(self, now: float) -> None:
        """The connected twin: the kernel lets only the client's datagrams through."""
        try:
            size = self._recv_into(self._buffer)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:  # an ICMP error for an earlier send; the retransmission timer copes
            log.debug("tftp: transfer socket for %s: %s", self.peer, exc)
            return
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
        self._received(size, now)

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
    _use_epoll = hasattr(select, "epoll")  # tests turn it off to run the portable path

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
    ) -> None:
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
        self.on_fatal = on_fatal
        self._transport: asyncio.DatagramTransport | None = None
        self._active: dict[tuple[Address, str], asyncio.Task[None]] = {}
        self._conn_by_key: dict[tuple[Address, str], _TransferSocket] = {}
        self._transfers: set[_TransferSocket] = set()
        self._poller: _TransferPoller | None = None
        self._family = socket.AF_INET
        self._bind_host = host

    @property
    def address(self) -> Address:
        if self._transport is None:
            raise RuntimeError("tftp server not started")
        sockname = self._transport.get_extra_info("sockname")
        return (sockname[0], sockname[1])

    @property
    def active_transfers(self) -> int:
        return len(self._active)

    async def start(self) -> None:
        if self._transport is not None:
            return
        loop = asyncio.get_running_loop()
        try:
            transport, _ = await loop.create_datagram_endpoint(
                lambda: _Listener(self), local_addr=(self.host, self.port)
            )
        except OSError as exc:
            raise OSError(exc.errno, f"tftp: cannot bind {self.host}:{self.port}: {exc.strerror}") from exc
        self._transport = transport
        sock = transport.get_extra_info("socket")
        self._family = sock.family if sock is not None else socket.AF_INET
        self._bind_host = self.address[0]
        log.info("tftp: listening on %s:%s", *self.address)

    def _listener_lost(self, exc: Exception | None) -> None:
        if self._transport is None:
            return  # stop() closed it
        # The transport closes itself only on an error it cannot go on from: no more requests can
        # arrive, so this is the service's end, not one transfer's.
        self._transport = None
        error = RuntimeError(f"listening socket closed: {exc or 'closed'}")
        log.error("%s: %s", __name__, error)
        if self.on_fatal is not None:
            self.on_fatal(error)

    async def stop(self) -> None:
        if self._transport is not None:
            transport, self._transport = self._transport, None
            transport.close()
        now = asyncio.get_running_loop().time()
        for conn in list(self._transfers):
            conn.transfer.abort(now, "server shutting down")
            conn.kick()
        tasks = list(self._active.values())
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        self._active.clear()
        self._conn_by_key.clear()
        if self._poller is not None:
            poller, self._poller = self._poller, None
            poller.close()

    # --- pipeline --------------------------------------------------------------------------------
    def _on_request(self, data: bytes, addr: Address) -> None:
        try:
            packet = tp.decode(data)
        except tp.TftpPacketError as exc:
            log.debug("tftp: bad request from %s:%s: %s", addr[0], addr[1], exc)
            return
        if isinstance(packet, tp.WriteRequest):
            self._reply_error(addr, tp.ErrorCode.ACCESS_VIOLATION, "read-only server")
            self._event(None, addr, packet.filename, 0, 0.0, "refused-write")
            return
        if not isinstance(packet, tp.ReadRequest):
            return  # stray DATA/ACK/ERROR on the request port: no transfer to answer for
        if not self.enabled():
            self._event(None, addr, packet.filename, 0, 0.0, "disabled")
            return
        key = (addr, packet.filename)
        running = self._active.get(key)
        if running is not None:
            conn = self._conn_by_key.get(key)
            if conn is None or not conn.transfer.done:
                return  # the client re-sent its RRQ; the running transfer retransmits on its own timer
            # The old transfer is over (a UEFI tsize probe answered with ERROR 8 just before this
            # RRQ from the same port) but its task has not cleaned up yet: this is a new request.
            self._active.pop(key, None)
            self._conn_by_key.pop(key, None)
        if len(self._active) >= self.max_transfers:
            # No answer: the client re-sends its RRQ later, which is the back-pressure we want.
            log.warning("tftp: %d transfers running, dropping RRQ from %s:%s", len(self._active), *addr)
            self._event(None, addr, packet.filename, 0, 0.0, "busy")
            return
        task = asyncio.get_running_loop().create_task(self._serve(packet, addr))
        self._active[key] = task
        task.add_done_callback(lambda t: self._forget(key, t))

    def _forget(self, key: tuple[Address, str], task: asyncio.Task[None]) -> None:
        if self._active.get(key) is task:
            del self._active[key]
            self._conn_by_key.pop(key, None)

    def _reply_error(self, addr: Address, code: int, message: str) -> None:
        if self._transport is not None:
            self._transport.sendto(tp.encode(tp.Error(code, message)), addr)

    async def _serve(self, request: tp.ReadRequest, addr: Address) -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        server: str | None = None
        opened: OpenedFile | None = None
        outcome = "error"
        nbytes = 0
        try:
            if request.mode not in ("octet", "netascii"):
                await self._send_error_once(addr, tp.ErrorCode.ILLEGAL_OPERATION, f"mode {request.mode} refused")
                outcome = "bad-mode"
                return
            try:
                opened = await self.tree.open(request.filename, addr)
            except TreeError as exc:
                log.info("tftp: %s:%s %s: %s", addr[0], addr[1], request.filename, exc)
                if isinstance(exc, Denied):
                    server = exc.server_uuid
                    self._denied_event(exc, request.filename)
                await self._send_error_once(addr, exc.code, exc.reply_text())
                outcome = exc.outcome
                return
            server = opened.server_uuid
            source = opened.source
            if request.mode == "netascii":
                if opened.data is None:
                    await self._send_error_once(addr, tp.ErrorCode.NOT_DEFINED, "netascii not available here")
                    outcome = "bad-mode"
                    return
                source = BytesSource(to_netascii(opened.data))
            transfer = SendTransfer(source, request.options, self.limits, loop.time())
            done: asyncio.Future[None] = loop.create_future()
            conn = _TransferSocket(self._transfer_socket(), transfer, addr, done, self._poller_for(loop))
            self._transfers.add(conn)
            key = (addr, request.filename)
            if self._active.get(key) is asyncio.current_task():
                self._conn_by_key[key] = conn
            try:
                conn.kick()
                await done
            finally:
                self._transfers.discard(conn)
                conn.close()
            outcome = transfer.outcome or "error"
            nbytes = transfer.bytes_sent
            if outcome not in ("ok", "tsize-probe"):
                log.info("tftp: %s:%s %s: %s (%s)", addr[0], addr[1], request.filename, outcome, transfer.error)
        except asyncio.CancelledError:
            outcome = "aborted"
            raise
        except Exception:
            log.exception("tftp: transfer of %s to %s:%s failed", request.filename, addr[0], addr[1])
            outcome = "error"
        finally:
            if opened is not None:
                opened.close()
            self._event(server, addr, request.filename, nbytes, (loop.time() - started) * 1000.0, outcome)

    def _poller_for(self, loop: asyncio.AbstractEventLoop) -> _TransferPoller:
        if self._poller is None:
            self._poller = _TransferPoller(loop, use_epoll=self._use_epoll)
        return self._poller

    def _transfer_socket(self) -> socket.socket:
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

    async def _send_error_once(self, addr: Address, code: int, message: str) -> None:
        """An error answer to an RRQ, from a fresh TID like a transfer would use."""
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(asyncio.DatagramProtocol, sock=self._transfer_socket())
        try:
            transport.sendto(tp.encode(tp.Error(code, message)), addr)
        finally:
            transport.close()

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
