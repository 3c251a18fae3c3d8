"""Read-only asyncio TFTP server: a thin DatagramProtocol around `SendTransfer` and a `BootTree`.

Request pipeline (one listening socket): decode → classify (WRQ refused) → enabled? → duplicate RRQ? →
transfer bound → open the name in the tree → negotiate → serve from a fresh ephemeral port (RFC 1350
§4, the transfer ID). Every request ends in one "tftp" event on the appliance's event stream.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import socket
import threading
from collections.abc import Awaitable, Callable
from typing import Protocol

from bootfiles import tftp_packet as tp
from bootfiles.spec import EventSink
from bootfiles.tftp_transfer import BytesSource, Limits, SendTransfer
from bootfiles.tree import OpenedFile, TreeError

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


class _Sender:
    """Sends datagrams for all transfers; large bursts go to a helper thread.

    A UDP send costs more in the kernel than the Python that produces it, and sendto releases the GIL.
    So when one loop iteration produced a burst (many transfers ACKed at once: a boot storm), the burst
    is handed to one sender thread, whose syscalls run on another core while the loop decodes the next
    ACKs. A lone datagram is sent inline: a thread hand-off would only add latency. Order per socket is
    kept (one thread, FIFO), and a transfer socket is closed by whoever sends last on it.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, burst: int) -> None:
        self.loop = loop
        self.burst = burst
        self._pending: list[tuple[socket.socket, bytes, Address | None]] = []
        self._scheduled = False
        self._queue: queue.SimpleQueue[list[tuple[socket.socket, bytes, Address | None]] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._in_thread = 0  # batches handed to the thread and not yet sent
        self._lock = threading.Lock()

    def send(self, sock: socket.socket, datagram: bytes, addr: Address) -> None:
        self._pending.append((sock, datagram, addr))
        if not self._scheduled:
            self._scheduled = True
            self.loop.call_soon(self._dispatch)

    def close_socket(self, sock: socket.socket) -> None:
        """Close after every datagram queued for it so far has gone out."""
        if self._pending or self._in_thread:
            self._pending.append((sock, b"", None))
            if not self._scheduled:
                self._scheduled = True
                self.loop.call_soon(self._dispatch)
        else:
            sock.close()

    def _dispatch(self) -> None:
        self._scheduled = False
        batch, self._pending = self._pending, []
        if not batch:
            return
        if len(batch) < self.burst and not self._in_thread:
            _send_batch(batch)
            return
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="tftp-sender", daemon=True)
            self._thread.start()
        with self._lock:
            self._in_thread += 1
        self._queue.put(batch)

    def _run(self) -> None:
        while True:
            batch = self._queue.get()
            if batch is None:
                return
            _send_batch(batch)
            with self._lock:
                self._in_thread -= 1

    def finish(self) -> None:
        """On the loop: send what is pending and tell the thread to end after its queue."""
        self._dispatch()
        self._queue.put(None)

    def join(self) -> None:
        """Blocking (run in a thread): wait for the sender thread to drain."""
        if self._thread is not None:
            self._thread.join(timeout=5)


def _send_batch(batch: list[tuple[socket.socket, bytes, Address | None]]) -> None:
    for sock, datagram, addr in batch:
        if addr is None:
            sock.close()
            continue
        try:
            sock.sendto(datagram, addr)
        except (BlockingIOError, InterruptedError):
            pass  # socket buffer full: as good as lost on the wire; the retransmission timer recovers
        except OSError as exc:
            log.debug("tftp: send to %s failed: %s", addr, exc)


class _TransferSocket:
    """One transfer's ephemeral socket: feeds the state machine, sends what it yields, runs its timer.

    The listener is a DatagramProtocol; transfer sockets use add_reader on the raw non-blocking socket
    instead, because this is the per-block hot path of every boot: with no transport layer between the
    socket and the state machine the per-block cost roughly halves.
    UDP gives no delivery promise anyway: a send that would block is dropped and the state machine's
    retransmission covers it, exactly as for a datagram lost on the wire.
    """

    def __init__(
        self,
        sock: socket.socket,
        transfer: SendTransfer,
        peer: Address,
        done: asyncio.Future[None],
        sender: _Sender,
    ) -> None:
        self.sock = sock
        self.sender = sender
        self.transfer = transfer
        self.peer = peer
        self.done = done
        self.loop = asyncio.get_running_loop()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._closed = False
        self.loop.add_reader(sock.fileno(), self._readable)

    def kick(self) -> None:
        self._flush()

    def _readable(self) -> None:
        # One datagram per readiness: the selector is level-triggered, so a second queued datagram
        # calls us again, and a lock-step transfer rarely has one, so draining would only add a failing
        # recvfrom (a syscall and an exception) to every block.
        peer = self.peer
        try:
            try:
                data, addr = self.sock.recvfrom(_TRANSFER_RECV_BYTES)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # e.g. an ICMP error queued on the socket
                log.debug("tftp: transfer socket for %s: %s", peer, exc)
                return
            if addr != peer:
                if len(data) >= 2 and data[1] != tp.OP_ERROR:
                    # RFC 1350 §4: a packet from a wrong TID gets error 5; the transfer goes on.
                    self._send(tp.encode(tp.Error(tp.ErrorCode.UNKNOWN_TID, "unknown TID")), addr)
                return
            if len(data) == 4 and data[1] == tp.OP_ACK and data[0] == 0:  # the hot path
                self.transfer.on_ack((data[2] << 8) | data[3], self.loop.time())
            else:
                self.transfer.receive(data, self.loop.time())
        except Exception:  # the error boundary of this transfer
            log.exception("tftp: datagram from %s:%s broke its transfer", peer[0], peer[1])
            self.transfer.abort(self.loop.time(), "internal error")
        self._flush()

    def _send(self, datagram: bytes, addr: Address) -> None:
        self.sender.send(self.sock, datagram, addr)

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
        for datagram in transfer.datagrams_to_send():
            self._send(datagram, self.peer)
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
        self.loop.remove_reader(self.sock.fileno())
        self.sender.close_socket(self.sock)


class TftpServer:
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
        send_burst: int = 8,
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
        self._sender: _Sender | None = None
        self.send_burst = send_burst
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
        if self._sender is not None:
            sender, self._sender = self._sender, None
            sender.finish()
            await asyncio.to_thread(sender.join)

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
                await self._send_error_once(addr, exc.code, exc.outcome.replace("-", " "))
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
            conn = _TransferSocket(self._transfer_socket(), transfer, addr, done, self._sender_for(loop))
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

    def _sender_for(self, loop: asyncio.AbstractEventLoop) -> _Sender:
        if self._sender is None:
            self._sender = _Sender(loop, self.send_burst)
        return self._sender

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
