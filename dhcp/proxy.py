"""The proxyDHCP responder: boot server and boot file for PXE / iPXE / UEFI HTTP clients, never an address.

Mechanism only: `handle()` runs the pipeline decode → learn → enabled? → classify → policy → choose →
build and encode (`pxe.reply_bytes`, from a template per reply shape), pure apart from the policy calls,
which are synchronous and cheap by contract, and the socket code around it stays small. Port 67 gets
DHCPDISCOVERs (proxy OFFER, PXE 2.1 §2.2.3); port 4011 gets the boot server DHCPREQUEST (ACK, PXE 2.1
§2.2.5). "learn" tells the policy which address a client's packet says it holds (`dhcp/binding.py`),
for every packet, answered or not — the REQUEST to the site server on :67 too, which the raw listener's
filter and the :67 socket both receive. A boot request that no server record names (no boot spec, or
the unknown-node profile's) is told to the policy too (`client_unknown`: discovered nodes, to adopt).
When port 67 is already bound on the host (a local DHCP server), the responder can listen on a raw
socket instead (scapy; see `dhcp/raw.py`).

Threads: by default each socket is served by a thread of the responder's own, blocked in its receive,
so that a saturated main loop (TFTP, HTTP, the API, SQLite calls) does not delay the replies (issue 15).
On those threads run the decode, `policy.boot_spec` and `enabled()` — reads of state the main loop
replaces whole (the appliance's boot index is an immutable snapshot swapped in when the store changes),
never an await on the main loop. What the responder reports back — `client_seen`, `client_unknown`,
the boot events — mutates main-loop state, so it is queued and run on the loop that called `start()`
(one `call_soon_threadsafe` per batch, never a wait). A report is queued before the reply is sent, so
the main loop learns a node's address before it can see the TFTP or HTTP request that follows the
reply. `own_thread=False` serves the sockets on the calling loop instead (as before issue 15).
`dhcp/process.py` runs this responder, on these threads, in a child process of its own, so that it
shares no GIL with the main loop at all (the appliance's default, `[dhcp] responder`); what it reports
is the same `Report`, run by `dispatch` in the parent. The benchmark measures all three.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import errno
import functools
import ipaddress
import logging
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from bootfiles.spec import BootPolicy, EventSink, PxeClient
from udpio.ratelimit import RateLimitedLog
from udpio.udp import bind_udp

from . import binding, pxe
from . import packet as p
from .raw import RawListener  # the module is light; scapy is imported only when a listener opens

log = logging.getLogger("cello.dhcp")

IP_PKTINFO = 8  # <linux/in.h>; not exported by Python's socket module
_PKTINFO = struct.Struct("@I4s4s")  # struct in_pktinfo
_CMSG_SPACE = socket.CMSG_SPACE(_PKTINFO.size)
_RECV_BATCH = 256  # datagrams read per wake-up before yielding to the loop
_BUFSIZE = p.MAX_PACKET_SIZE + 1  # one more, so that an oversized datagram is seen as such
# A boot storm arrives in bursts (a rack powering on): room for a few thousand requests in the kernel.
_RCVBUF = 4 * 1024 * 1024
SO_RCVBUFFORCE = 33  # <asm-generic/socket.h>; beyond net.core.rmem_max, needs CAP_NET_ADMIN
# Reports (bindings, unknown clients, events) waiting for the main loop: bounded, so that a main loop
# stuck for a long time in a flood costs memory in proportion to this, not to the flood.
_MAX_REPORTS = 65536
_STOP_JOIN_SECONDS = 5.0  # a thread ends within one datagram; this only bounds a bug
# For the process that runs the responder's threads (set by its composition root: it is the
# interpreter's, not this module's). A thread that gets a datagram waits for the GIL until the main loop
# gives it up: at its next system call, or after this interval at the latest (CPython's default, 5 ms,
# made a busy loop's TFTP and HTTP work show up in the replies' p99: measured 13-16 ms at 2,000/s under
# full TFTP+HTTP load against 8-11 ms at 1 ms, TFTP and HTTP throughput unchanged; bench/dhcp_bench.py).
GIL_SWITCH_INTERVAL = 0.001
_RAW_POLL_SECONDS = 0.25  # a packet socket cannot be woken by shutdown(): its thread looks this often

Address = tuple[str, int]


@dataclass(frozen=True, slots=True)
class Reply:
    data: bytes
    dest: Address
    ifindex: int  # interface the request came in on (0: let the kernel route)
    chaddr: bytes  # for the raw path's Ethernet destination


@dataclass
class Stats:
    received: int = 0
    offers: int = 0
    acks: int = 0
    ignored: int = 0  # not a boot request, service disabled, unknown node, no loader for the firmware
    malformed: int = 0  # dropped by the codec
    errors: int = 0  # anything else: a bug (tests assert this stays 0)
    send_failures: int = 0  # a reply the socket would not take (UDP is lossy anyway)
    recv_errors: int = 0  # a receive that failed (an ICMP error reported on the socket, a raw socket's error)
    reports_dropped: int = 0  # bindings / events not handed to a main loop that stayed busy too long
    by_reason: dict[str, int] = field(default_factory=dict)
    # by the client's firmware arch (option 93, RFC 4578 §2.1), for boot requests only (bounded: the
    # supported arches); for /metrics
    requests_by_arch: dict[int, int] = field(default_factory=dict)
    offers_by_arch: dict[int, int] = field(default_factory=dict)
    acks_by_arch: dict[int, int] = field(default_factory=dict)


K = TypeVar("K")


def _counted(table: dict[K, int], key: K) -> dict[K, int]:
    """`table` with one more `key`. The responder's thread counts while /metrics on the main thread
    iterates: a new key goes into a new dict (a reader iterating the old one never sees it change
    size); an existing one is bumped in place."""
    if key in table:
        table[key] += 1
        return table
    return {**table, key: 1}


class Report(enum.Enum):
    """What the responder tells the policy and the event sink (`ProxyDHCP.dispatch` runs it there)."""

    SEEN = "seen"  # (binding.SeenClient,): the address a client's packet says it holds
    UNKNOWN = "unknown"  # (PxeClient,): a boot request no server record names
    BOOT = "boot"  # (server, BootRequest, BootChoice, source, Kind): an offer or ACK sent, for the event sink


class ProxyDHCP:
    """proxyDHCP + PXE boot server. `start()` binds; `stop()` releases and may be called any time."""

    def __init__(
        self,
        policy: BootPolicy,
        advertise: str,
        *,
        listen: str = "0.0.0.0",
        port: int = 67,
        pxe_port: int = 4011,
        interface: str = "",
        reply_port: int = 68,
        events: EventSink | None = None,
        enabled: Callable[[], bool] = lambda: True,
        raw_fallback: bool = True,
        broadcast: str = "255.255.255.255",
        pxe_config: pxe.PxeConfig = pxe.DEFAULT_CONFIG,
        clock: Callable[[], float] = time.monotonic,
        own_thread: bool = True,
    ) -> None:
        ipaddress.IPv4Address(advertise)  # refuse a bad address here, not on the first packet
        self.policy = policy
        self.advertise = advertise
        self.listen = listen
        self.port = port
        self.pxe_port = pxe_port
        self.interface = interface
        self.reply_port = reply_port
        self.events = events
        self.enabled = enabled
        self.raw_fallback = raw_fallback
        self.broadcast = broadcast  # tests on loopback use 127.0.0.1: a real broadcast would leave lo
        self.pxe_config = pxe_config
        self.clock = clock
        self.own_thread = own_thread
        self.stats = Stats()
        self.raw_mode = False
        self._log = RateLimitedLog(log, clock=clock)
        self._sockets: list[socket.socket] = []
        self._raw: RawListener | None = None  # when in raw mode
        self._loop: asyncio.AbstractEventLoop | None = None  # the loop start() ran on: where reports go
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()
        # (what, args) for the main loop; deque append/popleft are atomic, so the thread needs no lock
        self._reports: collections.deque[tuple[Report, tuple[object, ...]]] = collections.deque()
        self._drain_scheduled = False
        self.report_errors = 0  # reports the policy or the event sink failed on (also in stats.errors)
        self.bound: dict[str, Address] = {}

    # ---- lifecycle ------------------------------------------------------------------------------------

    async def start(self) -> None:
        if self._sockets or self._raw is not None:
            return
        self._loop = asyncio.get_running_loop()
        try:
            taken = self._bind_ports()
            raw = await self._start_raw(taken) if taken is not None else None
            if self.own_thread:
                self._start_threads(raw)
            else:
                for sock in self._sockets:
                    self._loop.add_reader(sock.fileno(), self._on_readable, sock, self._kind_of(sock))
                if raw is not None:
                    self._loop.add_reader(raw.fileno(), raw.on_readable)
        except BaseException:
            await self.stop()
            raise
        log.info("proxyDHCP on %s (advertise %s%s%s)", self.bound, self.advertise, ", raw :67" * self.raw_mode,
                 ", own thread" * self.own_thread)
        if self.listen not in ("0.0.0.0", "") and not self.listen.startswith("127.") and not self.raw_mode:
            log.warning("listening on %s: broadcast DISCOVERs only reach a socket bound to 0.0.0.0 "
                        "(use interface= to restrict the responder to one link)", self.listen)

    def _bind_ports(self) -> OSError | None:
        """Bind :67 and :4011 (into `_sockets` and `bound`). When :67 is taken and the raw fallback may
        listen there instead, only :4011 is bound and the :67 bind's error returned."""
        taken = None
        try:
            dhcp_sock = self._bind(self.port)
        except OSError as e:
            if e.errno != errno.EADDRINUSE or not self.raw_fallback:
                raise
            taken = e
        else:
            self._sockets.append(dhcp_sock)
            self.bound["dhcp"] = dhcp_sock.getsockname()
        pxe_sock = self._bind(self.pxe_port)
        self._sockets.append(pxe_sock)
        self.bound["pxe"] = pxe_sock.getsockname()
        return taken

    def _kind_of(self, sock: socket.socket) -> pxe.Kind:
        return pxe.Kind.DISCOVER if sock.getsockname() == self.bound.get("dhcp") else pxe.Kind.REQUEST

    async def _start_raw(self, cause: OSError) -> RawListener:
        listener = RawListener(self.interface, self.advertise, self.port, self.reply_port, self._on_raw,
                               self.stats)
        try:
            await asyncio.to_thread(listener.open)
        except Exception as e:  # scapy raises several types for a missing interface or capability
            raise RuntimeError(f"{cause}, and the raw-socket fallback failed: {e}") from e
        self._raw = listener
        self.raw_mode = True
        self.bound["dhcp"] = (f"raw:{listener.interface}", self.port)
        log.warning("port %d is taken by another DHCP server: listening on a raw socket on %s",
                    self.port, listener.interface)
        return listener

    def serve_sockets(self, dhcp_sock: socket.socket | None, pxe_sock: socket.socket,
                      raw: RawListener | None = None) -> None:
        """Serve sockets bound elsewhere (by the parent process of `dhcp/process.py`) on this object's
        threads: `dhcp_sock` for :67 (None with `raw`, an opened listener instead), `pxe_sock` for :4011."""
        if dhcp_sock is not None:
            self._sockets.append(dhcp_sock)
            self.bound["dhcp"] = dhcp_sock.getsockname()
        if raw is not None:
            self._raw = raw
            self.raw_mode = True
            self.bound["dhcp"] = (f"raw:{raw.interface}", self.port)
        self._sockets.append(pxe_sock)
        self.bound["pxe"] = pxe_sock.getsockname()
        self._start_threads(raw)

    def _start_threads(self, raw: RawListener | None) -> None:
        """One thread per socket, each blocked in its receive: per datagram the thread gives up the GIL
        only for the receive and the send. (A poller would add the poll and a last receive that finds
        nothing, and each time the GIL is given up a busy main loop may keep it for a switch interval.)"""
        self._stopping.clear()
        serve: list[tuple[str, Callable[[], object]]] = []
        for sock in self._sockets:
            sock.setblocking(True)
            serve.append((f"cello-dhcp:{sock.getsockname()[1]}",
                          functools.partial(self._receive_one, sock, self._kind_of(sock))))
        if raw is not None:
            raw.settimeout(_RAW_POLL_SECONDS)
            serve.append((f"cello-dhcp:raw:{self.port}", raw.on_readable))
        for name, receive in serve:
            thread = threading.Thread(target=self._serve, args=(receive,), name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def _serve(self, receive: Callable[[], object]) -> None:
        """A responder thread: receive and answer until stop(); nothing escapes."""
        while not self._stopping.is_set():
            try:
                receive()
            except Exception:  # the handlers have their own boundaries: this is a bug, not a packet
                self.stats.errors += 1
                self._log.exception("bug", "a DHCP thread's handler failed")

    def _bind(self, port: int) -> socket.socket:
        return bind_udp(self.listen, port, configure=lambda sock: self._configure(sock, port))

    def _configure(self, sock: socket.socket, port: int) -> None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, _RCVBUF)
        except OSError:  # unprivileged: the kernel caps this at net.core.rmem_max
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _RCVBUF)
        if self.interface:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, self.interface.encode())
            except OSError as e:
                raise RuntimeError(
                    f"cannot bind {self.listen}:{port} to interface {self.interface!r}: {e.strerror}"
                    + (" (needs root or CAP_NET_RAW)" if e.errno == errno.EPERM else "")
                ) from e

    async def stop(self) -> None:
        threads, self._threads = self._threads, []
        self._stopping.set()
        for sock in self._sockets:
            # Wakes a thread blocked in recvmsg (it returns empty). On an unconnected UDP socket Linux
            # says ENOTCONN, and wakes the receiver all the same.
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        for thread in threads:
            # Joined here, not in an executor: the threads end within a receive (the raw one within
            # _RAW_POLL_SECONDS), and a stop during the loop's shutdown must not need the default executor.
            thread.join(_STOP_JOIN_SECONDS)
            if thread.is_alive():
                log.error("DHCP thread %s did not end within %.0f s", thread.name, _STOP_JOIN_SECONDS)
        loop_open = self._loop is not None and not self._loop.is_closed()
        for sock in self._sockets:
            if loop_open and not self.own_thread:
                self._loop.remove_reader(sock.fileno())  # type: ignore[union-attr]
            sock.close()
        self._sockets.clear()
        raw, self._raw = self._raw, None
        if raw is not None:
            if loop_open and not self.own_thread:
                self._loop.remove_reader(raw.fileno())  # type: ignore[union-attr]
            raw.close()
        self.raw_mode = False
        self.bound.clear()
        self._drain_reports()  # what the threads reported last still reaches the policy and the event bus

    # ---- reports to the main loop ---------------------------------------------------------------------

    def _report(self, what: Report, *args: object) -> None:
        """Have `dispatch(what, args)` run on the main loop: now when there is no thread (handle() called
        directly, or own_thread=False), else queued for it without waiting."""
        if not self._threads:
            self.dispatch(what, args)
            return
        if len(self._reports) >= _MAX_REPORTS:
            self.stats.reports_dropped += 1
            return
        self._reports.append((what, args))
        if not self._drain_scheduled:
            self._drain_scheduled = True
            loop = self._loop
            try:
                if loop is not None:
                    loop.call_soon_threadsafe(self._drain_reports)
            except RuntimeError:  # the main loop is closed: nobody is left to tell
                self._reports.clear()

    def _drain_reports(self) -> None:
        # The flag is cleared before the queue is read: a report appended meanwhile either is read
        # below or schedules another drain (an empty one at worst), never none.
        self._drain_scheduled = False
        for _ in range(len(self._reports)):
            try:
                what, args = self._reports.popleft()
            except IndexError:
                return
            self.dispatch(what, args)

    def dispatch(self, what: Report, args: tuple[object, ...]) -> None:
        """On the main loop: tell the policy or the event sink what the responder reported."""
        try:
            if what is Report.SEEN:
                self._tell_seen(*args)  # type: ignore[arg-type]
            elif what is Report.UNKNOWN:
                self.policy.client_unknown(*args)  # type: ignore[arg-type]
            else:
                self._emit(*args)  # type: ignore[arg-type]
        except Exception:
            self.stats.errors += 1
            self.report_errors += 1
            self._log.exception("report", "reporting a DHCP client to the boot policy failed")

    # ---- the pipeline (pure apart from the policy call) ------------------------------------------------

    def handle(self, data: bytes, source: Address, kind: pxe.Kind, ifindex: int = 0) -> Reply | None:
        """Answer one datagram, or None. Raises PacketError for a malformed packet."""
        self.stats.received += 1
        request_packet = p.decode(data)
        # Before anything decides not to answer: the client's REQUEST to the site server on :67 is never
        # answered, yet it is what says which address the node got (dhcp/binding.py).
        self._learn(request_packet, source, kind)
        if not self.enabled():
            return self._ignore("service disabled")
        request = pxe.classify(request_packet, kind)
        if request is None:
            return self._ignore("not a boot request")
        stats = self.stats
        stats.requests_by_arch = _counted(stats.requests_by_arch, request.arch)
        spec = self.policy.boot_spec(uuid=request.uuid, mac=request.mac)
        if spec is None or spec.root is None:  # no server record: none, or the unknown-node profile's
            self._report(Report.UNKNOWN, _pxe_client(request_packet, request, source, kind))
        if spec is None:
            return self._ignore("no boot spec (unknown node)")
        choice = pxe.choose_boot(request, spec, self.pxe_config)
        if choice is None:
            return self._ignore(f"no loader for arch {request.arch}")
        out = pxe.reply_bytes(request_packet, request, choice, self.advertise, kind)
        if kind is pxe.Kind.DISCOVER:
            stats.offers += 1
            stats.offers_by_arch = _counted(stats.offers_by_arch, request.arch)
        else:
            stats.acks += 1
            stats.acks_by_arch = _counted(stats.acks_by_arch, request.arch)
        if self.events is not None:
            self._report(Report.BOOT, spec.server_uuid, request, choice, source, kind)
        dest = pxe.reply_destination(request_packet, source, kind, relay_port=self.port, client_port=self.reply_port,
                                     broadcast=self.broadcast)
        return Reply(out, dest, ifindex, request_packet.chaddr)

    def _learn(self, packet: p.DhcpPacket, source: Address, kind: pxe.Kind) -> None:
        seen = binding.seen_client(packet, source, kind)
        if seen is not None:
            self._report(Report.SEEN, seen)

    def _tell_seen(self, seen: binding.SeenClient) -> None:
        self.policy.client_seen(mac=seen.mac, uuid=seen.uuid, address=seen.address)

    def _ignore(self, reason: str) -> Reply | None:
        self.stats.ignored += 1
        self.stats.by_reason = _counted(self.stats.by_reason, reason)
        return None

    def _emit(
        self, server: str, request: pxe.BootRequest, choice: pxe.BootChoice, source: Address, kind: pxe.Kind
    ) -> None:
        """On the main loop (through `dispatch`): the event's fields are made there, off the reply path."""
        if self.events is None:
            return
        fields = {
            "server": server,
            "mac": request.mac,
            "arch": request.arch,
            "file": choice.file,
            "client": source[0],
            "reply": "offer" if kind is pxe.Kind.DISCOVER else "ack",
            "uuid": request.uuid,
        }
        try:
            self.events("dhcp", fields)
        except Exception:
            self._log.exception("event-sink", "event sink failed for %s", request.mac)

    # ---- the error boundary ----------------------------------------------------------------------------

    def serve_datagram(self, data: bytes, source: Address, kind: pxe.Kind, ifindex: int) -> Reply | None:
        """`handle` inside the error boundary: never raises (except CancelledError and friends)."""
        try:
            return self.handle(data, source, kind, ifindex)
        except p.PacketError as e:
            self.stats.malformed += 1
            self._log.warning("malformed", "dropped malformed packet from %s:%d: %s", source[0], source[1], e)
        except Exception:
            self.stats.errors += 1
            self._log.exception("bug", "error answering %s:%d", source[0], source[1])
        return None

    # ---- sockets --------------------------------------------------------------------------------------

    def _on_readable(self, sock: socket.socket, kind: pxe.Kind) -> None:
        """A non-blocking socket is readable (the main-loop mode): answer a batch, then yield."""
        for _ in range(_RECV_BATCH):
            if not self._receive_one(sock, kind):
                return

    def _receive_one(self, sock: socket.socket, kind: pxe.Kind) -> bool:
        """Receive and answer one datagram; False when there was none (nothing queued, an error, or the
        socket shut down by stop())."""
        try:
            data, ancdata, _flags, source = sock.recvmsg(_BUFSIZE, _CMSG_SPACE)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError as e:  # e.g. ICMP errors reported on the socket; the socket stays usable
            self.stats.recv_errors += 1
            self._log.warning("recv", "receive error on %s: %s", kind.value, e)
            return False
        if source is None:  # shut down: a receive on it returns at once, empty and from nobody
            return False
        ifindex = 0
        for level, ctype, cdata in ancdata:
            if level == socket.IPPROTO_IP and ctype == IP_PKTINFO and len(cdata) >= _PKTINFO.size:
                ifindex = _PKTINFO.unpack_from(cdata)[0]
        reply = self.serve_datagram(data, source, kind, ifindex)
        if reply is not None:
            self._send(sock, reply)
        return True

    def _send(self, sock: socket.socket, reply: Reply) -> None:
        anc = []
        if reply.ifindex and not self.interface:
            # Send a broadcast out of the interface the request came in on (not the default route).
            anc = [(socket.IPPROTO_IP, IP_PKTINFO, _PKTINFO.pack(reply.ifindex, bytes(4), bytes(4)))]
        try:
            sock.sendmsg([reply.data], anc, 0, reply.dest)
        except OSError as e:  # a full socket buffer or an unreachable client: UDP is lossy anyway
            self.stats.send_failures += 1
            self._log.warning("send", "cannot send reply to %s:%d: %s", reply.dest[0], reply.dest[1], e)

    def _on_raw(self, data: bytes, source: Address, ifindex: int) -> Reply | None:
        return self.serve_datagram(data, source, pxe.Kind.DISCOVER, ifindex)


_CLASS_TEXT_MAX = 128  # an operator's listing shows the class options; nobody needs more of them


def _class_text(raw: bytes) -> str:
    """Printable ASCII of a class option (anything else shown as '?'), bounded."""
    return "".join(ch if " " <= ch <= "~" else "?" for ch in raw[:_CLASS_TEXT_MAX].decode("latin-1"))


def _pxe_client(packet: p.DhcpPacket, request: pxe.BootRequest, source: Address, kind: pxe.Kind) -> PxeClient:
    """Pure: what the proxy tells the policy of an unknown client (its discovered-node record)."""
    return PxeClient(mac=request.mac, uuid=request.uuid, arch=request.arch,
                     vendor_class=_class_text(packet.vendor_class or b""),
                     user_class=",".join(_class_text(c) for c in packet.user_classes)[:_CLASS_TEXT_MAX],
                     address=binding.client_address(packet, source, kind))
