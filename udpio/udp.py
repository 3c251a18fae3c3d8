"""Binding UDP sockets with errors that say what to do, and one listening socket per service.

`bind_error_text` is the one wording of a failed bind for the whole appliance (the composition root
uses it for the API's TCP port too). `UdpListener` is the listening side of the TFTP server and the DNS
responder: a DatagramProtocol whose handler maps a datagram to an optional reply. asyncio closes a
datagram transport only on an error it cannot go on from, so a listener that loses its socket has ended
its service: it says so through `on_fatal`, and the composition root stops the appliance.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
from collections.abc import Callable

log = logging.getLogger(__name__)

Address = tuple[str, int]
Handler = Callable[[bytes, Address], "bytes | None"]  # a datagram in, the reply to send back (or None)


def bind_error_text(host: str, port: int, e: OSError) -> str:
    """`cannot listen on HOST:PORT: <reason> (<what to do>)`, from the errno rather than the words of
    whichever layer raised (aiohttp and asyncio wrap bind errors in their own)."""
    if isinstance(e, socket.gaierror) or not e.errno:  # a resolver error's errno is an EAI_ code
        reason = e.strerror or str(e)
    else:
        reason = os.strerror(e.errno)
    if e.errno in (errno.EACCES, errno.EPERM) and port < 1024:
        reason += f" (port {port} needs root or CAP_NET_BIND_SERVICE)"
    elif e.errno == errno.EADDRINUSE:
        reason += " (another program is listening there)"
    elif e.errno == errno.EADDRNOTAVAIL:
        reason += " (no interface has this address)"
    return f"cannot listen on {host}:{port}: {reason}"


class BindError(OSError):
    """A socket could not be bound: `errno` as the OS said, the message as `bind_error_text` words it."""

    def __init__(self, host: str, port: int, cause: OSError) -> None:
        super().__init__(cause.errno, bind_error_text(host, port, cause))
        self.host = host
        self.port = port

    def __str__(self) -> str:
        return str(self.strerror)


def bind_udp(
    host: str,
    port: int,
    *,
    family: socket.AddressFamily = socket.AF_INET,
    configure: Callable[[socket.socket], None] | None = None,
) -> socket.socket:
    """A non-blocking UDP socket bound to host:port; `configure` sets its options before the bind.

    A failed bind raises BindError; whatever `configure` raises goes through as it is (it knows better
    what its option needs)."""
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.setblocking(False)
        if configure is not None:
            configure(sock)
        try:
            sock.bind((host, port))
        except OSError as e:
            raise BindError(host, port, e) from e
    except BaseException:
        sock.close()
        raise
    return sock


class _Protocol(asyncio.DatagramProtocol):
    def __init__(self, owner: UdpListener) -> None:
        self.owner = owner

    def datagram_received(self, data: bytes, addr: Address) -> None:
        self.owner._datagram(data, addr)
        self.owner._drain()

    def error_received(self, exc: Exception) -> None:
        self.owner.on_socket_error(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self.owner._lost(exc)


def _log_socket_error(exc: Exception) -> None:
    log.debug("listener socket error: %s", exc)


class UdpListener:
    """One listening UDP socket of service `name`. `start()` binds (BindError), `stop()` is idempotent."""

    def __init__(
        self,
        name: str,
        host: str,
        port: int,
        handler: Handler,
        *,
        on_fatal: Callable[[BaseException], None] | None = None,
        on_socket_error: Callable[[Exception], None] = _log_socket_error,
        logger: logging.Logger = log,
        max_batch: int = 1,
        between: Callable[[], None] | None = None,
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self.name = name
        self.host = host
        self.port = port
        self.handler = handler
        self.on_fatal = on_fatal
        self.on_socket_error = on_socket_error  # an ICMP error for an earlier reply: the socket goes on
        self.log = logger
        # asyncio's transport reads one datagram per readiness, i.e. per trip through the event loop.
        # A service whose loop is busy with other sockets (TFTP transfers) would then take a burst of
        # n requests in n trips; with max_batch > 1 the datagrams already queued are read at once,
        # from a duplicate of the socket's descriptor (same socket, same queue), up to the bound.
        self.max_batch = max_batch
        # Called between two datagrams of a batch: the service's chance to answer what the ones before
        # produced (TFTP: the first blocks of the transfers just begun) before it reads the next one.
        self.between = between
        self._drain_sock: socket.socket | None = None
        self.transport: asyncio.DatagramTransport | None = None

    @property
    def address(self) -> Address:
        if self.transport is None:
            raise RuntimeError(f"{self.name}: not listening")
        sockname = self.transport.get_extra_info("sockname")
        return (sockname[0], sockname[1])

    @property
    def family(self) -> socket.AddressFamily:
        sock = self.transport.get_extra_info("socket") if self.transport is not None else None
        return sock.family if sock is not None else socket.AF_INET

    async def start(self) -> None:
        if self.transport is not None:
            return
        loop = asyncio.get_running_loop()
        try:
            # local_addr, not a socket of ours: asyncio resolves the host and picks the family (IPv6 too).
            transport, _ = await loop.create_datagram_endpoint(lambda: _Protocol(self),
                                                               local_addr=(self.host, self.port))
        except OSError as e:
            raise BindError(self.host, self.port, e) from e
        self.transport = transport
        if self.max_batch > 1:
            self._drain_sock = transport.get_extra_info("socket").dup()
            self._drain_sock.setblocking(False)

    async def stop(self) -> None:
        transport, self.transport = self.transport, None
        if transport is not None:
            transport.close()
        self._close_drain()

    def _close_drain(self) -> None:
        sock, self._drain_sock = self._drain_sock, None
        if sock is not None:
            sock.close()

    def sendto(self, data: bytes, addr: Address) -> None:
        if self.transport is not None:
            self.transport.sendto(data, addr)

    def _datagram(self, data: bytes, addr: Address) -> None:
        try:
            reply = self.handler(data, addr)
        except Exception:  # the error boundary: one bad datagram never stops the service
            self.log.exception("%s: datagram from %s:%s failed", self.name, addr[0], addr[1])
            return
        if reply is not None:
            self.sendto(reply, addr)

    def _drain(self) -> None:
        """After the datagram asyncio read: the ones queued behind it, up to max_batch in all."""
        sock = self._drain_sock
        between = self.between
        for _ in range(self.max_batch - 1):
            if between is not None:
                try:
                    between()
                except Exception:  # the error boundary, as for a datagram's handler
                    self.log.exception("%s: serving between datagrams failed", self.name)
            if sock is None or self._drain_sock is None:  # stopped by a handler
                return
            try:
                data, addr = sock.recvfrom(65536)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # an ICMP error for an earlier reply, as asyncio reports it
                self.on_socket_error(exc)
                return
            self._datagram(data, addr)

    def _lost(self, exc: Exception | None) -> None:
        if self.transport is None:
            return  # stop() closed it
        self.transport = None
        self._close_drain()
        error = RuntimeError(f"listening socket closed: {exc or 'closed'}")
        self.log.error("%s: %s", self.name, error)
        if self.on_fatal is not None:
            self.on_fatal(error)
