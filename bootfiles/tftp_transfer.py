"""TFTP transfers as pure state machines: datagrams and the time in, datagrams and the next timeout out.

`SendTransfer` is the server side of one read request (RFC 1350 §6 as fixed by RFC 1123 §4.2.3.1,
options RFC 2347/2348/2349, windows RFC 7440). `ReceiveTransfer` is the client side; the tests and the
benchmark drive the two against each other, and a real client against the server.

Nothing here knows sockets or asyncio: the caller feeds `receive(datagram, now)` and `on_timeout(now)`,
and sends what `datagrams_to_send()` returns. Block numbers are tracked as absolute integers and
mapped to the 16-bit wire field modulo 65536, so files of more than 65535 blocks roll over to 0 the way
tftp-hpa, atftp, curl and iPXE expect.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Literal, Protocol

from bootfiles import tftp_packet as tp


class BlockSource(Protocol):
    """What a transfer reads from: an in-memory file or a file-backed reader."""

    @property
    def size(self) -> int: ...

    def read(self, offset: int, length: int) -> bytes | memoryview: ...


class BytesSource:
    """A whole file in memory (the cache, a rendered config). Slices are zero-copy."""

    __slots__ = ("_view",)

    def __init__(self, data: bytes) -> None:
        self._view = memoryview(data)

    @property
    def size(self) -> int:
        return len(self._view)

    def read(self, offset: int, length: int) -> memoryview:
        return self._view[offset : offset + length]


@dataclass(frozen=True)
class Limits:
    """Server-side bounds applied while negotiating (from config)."""

    blksize_max: int = 1468  # fits one Ethernet frame: 1500 - IP 20 - UDP 8 - TFTP 4
    windowsize_max: int = 64
    timeout: float = 1.0  # initial retransmission timeout when the client names none
    retries: int = 5  # retransmissions of one window/OACK before the transfer is abandoned
    backoff_max: float = 8.0  # the back-off doubles the timeout up to this


@dataclass(frozen=True)
class Negotiated:
    blksize: int
    windowsize: int
    timeout: float
    timeout_from_client: bool
    accepted: dict[str, str]  # what goes into the OACK (empty: no OACK, RFC 1350 behaviour)


def _int_option(value: str) -> int | None:
    value = value.strip()
    if not value.isdigit() or len(value) > 12:
        return None
    return int(value)


def negotiate(requested: dict[str, str], size: int, limits: Limits) -> Negotiated:
    """RFC 2347 §3: the server answers the options it understands; the rest are silently dropped.
    Values out of range are ignored rather than refused, as tftp-hpa does, so the client falls back to
    RFC 1350 defaults instead of failing."""
    accepted: dict[str, str] = {}
    blksize = tp.DEFAULT_BLKSIZE
    windowsize = 1
    timeout = limits.timeout
    from_client = False
    raw = requested.get("blksize")
    if raw is not None and (value := _int_option(raw)) is not None and value >= tp.MIN_BLKSIZE:
        blksize = min(value, tp.MAX_BLKSIZE, limits.blksize_max)  # RFC 2348 §2: server may lower it
        accepted["blksize"] = str(blksize)
    raw = requested.get("tsize")
    if raw is not None and _int_option(raw) is not None:
        accepted["tsize"] = str(size)  # RFC 2349 §3: in an RRQ the client sends 0, the server the size
    raw = requested.get("timeout")
    if raw is not None and (value := _int_option(raw)) is not None:
        if tp.MIN_TIMEOUT <= value <= tp.MAX_TIMEOUT:  # RFC 2349 §2: echo it, or ignore it
            timeout = float(value)
            from_client = True
            accepted["timeout"] = str(value)
    raw = requested.get("windowsize")
    if raw is not None and (value := _int_option(raw)) is not None and value >= tp.MIN_WINDOWSIZE:
        windowsize = min(value, tp.MAX_WINDOWSIZE, limits.windowsize_max)  # RFC 7440 §4
        accepted["windowsize"] = str(windowsize)
    return Negotiated(blksize, windowsize, timeout, from_client, accepted)


# A boot storm's requests ask for the same options of the same file: negotiate each combination once.
_NEGOTIATED: dict[tuple[tuple[tuple[str, str], ...], int, Limits], tuple[Negotiated, bytes]] = {}
_NEGOTIATED_MAX = 1024  # bounded: a flood of odd option values costs no memory


def negotiated(requested: dict[str, str], size: int, limits: Limits) -> tuple[Negotiated, bytes]:
    """`negotiate`, remembered, with its OACK encoded (b"" when nothing was accepted)."""
    key = (tuple(requested.items()), size, limits)
    hit = _NEGOTIATED.get(key)
    if hit is None:
        params = negotiate(requested, size, limits)
        hit = (params, tp.encode(tp.OptionAck(params.accepted)) if params.accepted else b"")
        if len(_NEGOTIATED) >= _NEGOTIATED_MAX:
            _NEGOTIATED.clear()
        _NEGOTIATED[key] = hit
    return hit


Outcome = Literal["ok", "tsize-probe", "aborted", "timeout", "error"]

_ACK = struct.Struct("!HH")  # opcode + block: the header of ACK and DATA
_OP_DATA = tp.OP_DATA


class SendTransfer:
    """The server side of one RRQ.

    Retransmission happens only on timeout, never on a duplicate ACK (the Sorcerer's Apprentice fix of
    RFC 1123 §4.2.3.1): an ACK that does not advance the window is dropped. An ACK inside the window
    that is not its last block means the client lost the block after it (RFC 7440 §4), so the next
    window starts right after that ACK.
    """

    def __init__(self, source: BlockSource, requested: dict[str, str], limits: Limits, now: float) -> None:
        self.source = source
        self.size = source.size
        self.limits = limits
        self.params, self._oack = negotiated(requested, self.size, limits)
        self.requested = requested
        self.blksize = self.params.blksize
        self.windowsize = self.params.windowsize
        # A file of n*blksize bytes ends with an empty block (RFC 1350 §6).
        self.total_blocks = self.size // self.blksize + 1
        self.done = False
        self.outcome: Outcome | None = None
        self.error: str | None = None  # the client's error message, or why we gave up
        self.started = now
        self.finished: float | None = None
        self.retransmissions = 0
        self._acked = 0  # absolute number of the last block the client acknowledged
        self._sent_upto = 0
        self._retries = 0
        self._timeout = self.params.timeout  # of the current attempt: _current_timeout(), kept at hand
        self._read = source.read
        self._outbox: list[bytes] = []
        self._deadline: float | None = None
        if self.params.accepted:
            self._state: Literal["oack", "data"] = "oack"
            self._send_oack(now)
        else:
            self._state = "data"
            self._send_window(now)

    # --- results ---------------------------------------------------------------------------------
    @property
    def bytes_sent(self) -> int:
        """Payload bytes the client has acknowledged."""
        return min(self._acked * self.blksize, self.size)

    @property
    def blocks_acked(self) -> int:
        return self._acked

    def datagrams_to_send(self) -> list[bytes]:
        out, self._outbox = self._outbox, []
        return out

    def next_timeout(self) -> float | None:
        return None if self.done else self._deadline

    # --- input -----------------------------------------------------------------------------------
    def receive(self, datagram: bytes, now: float) -> None:
        """Feed one datagram from the client's TID. Malformed datagrams are dropped."""
        if self.done:
            return
        if len(datagram) >= 4 and datagram[1] == tp.OP_ACK and datagram[0] == 0:
            self.on_ack(_ACK.unpack_from(datagram)[1], now)
            return
        try:
            packet = tp.decode(datagram)
        except tp.TftpPacketError:
            return
        if isinstance(packet, tp.Error):
            self._finish_on_client_error(packet, now)
        # Anything else (DATA, a stray request, OACK) on a read transfer is ignored: answering it
        # could only start a packet storm with a confused peer.

    def on_ack(self, block: int, now: float) -> None:
        """The hot path: an ACK's 16-bit block number."""
        if self.done:
            return
        if self._state == "oack":
            if block == 0:
                self._state = "data"
                self._reset_retries()
                self._send_window(now)
            return
        acked = self._acked
        advance = (block - acked) % tp.BLOCK_MODULO
        if advance == 0 or advance > self._sent_upto - acked:
            return  # duplicate or late ACK (or one from far away): never triggers a retransmission
        acked += advance
        self._acked = acked
        if self._retries:
            self._reset_retries()
        if acked >= self.total_blocks:
            self._finish("ok", now)
            return
        self._send_window(now)

    def next_block_for(self, block: int, now: float) -> bytes | None:
        """The lock-step hot path: for the ACK of the block just sent (windowsize 1, not the last
        block), the next DATA, with the state moved on exactly as `on_ack` + `datagrams_to_send` would;
        None for every other ACK, which then goes to `on_ack`. One call and no list per block."""
        acked = self._acked + 1
        if (block != acked & 0xFFFF or self.windowsize != 1 or self._sent_upto != acked or self.done
                or acked >= self.total_blocks or self._state != "data" or self._outbox):
            return None
        self._acked = acked
        if self._retries:
            self._reset_retries()
        self._sent_upto = acked + 1
        self._deadline = now + self._timeout
        blksize = self.blksize
        return _ACK.pack(_OP_DATA, (acked + 1) & 0xFFFF) + self._read(acked * blksize, blksize)

    def on_timeout(self, now: float) -> None:
        """Call at or after next_timeout(); earlier calls are ignored."""
        if self.done or self._deadline is None or now < self._deadline:
            return
        if self._retries >= self.limits.retries:
            self.error = f"no ACK after {self._retries} retransmissions"
            self._outbox.append(tp.encode(tp.Error(tp.ErrorCode.NOT_DEFINED, "timeout")))
            self._finish("timeout", now)
            return
        self._retries += 1
        self._timeout = self._current_timeout()
        self.retransmissions += 1
        if self._state == "oack":
            self._send_oack(now)
        else:
            self._send_window(now)

    def abort(self, now: float, reason: str) -> None:
        """Stop from outside (server shutdown); tells the client."""
        if self.done:
            return
        self.error = reason
        self._outbox.append(tp.encode(tp.Error(tp.ErrorCode.NOT_DEFINED, reason)))
        self._finish("aborted", now)

    # --- internals -------------------------------------------------------------------------------
    def _current_timeout(self) -> float:
        base = self.params.timeout
        if self._retries == 0 or self.params.timeout_from_client:
            return base  # no back-off yet, or RFC 2349: the client said how long to wait
        return min(base * (1 << min(self._retries, 16)), max(base, self.limits.backoff_max))

    def _reset_retries(self) -> None:
        self._retries = 0
        self._timeout = self.params.timeout

    def _send_oack(self, now: float) -> None:
        self._outbox.append(self._oack)
        self._deadline = now + self._timeout

    def _send_window(self, now: float) -> None:
        # Once per block in lock-step: locals and one running offset instead of attribute lookups.
        acked = self._acked
        last = acked + self.windowsize
        if last > self.total_blocks:
            last = self.total_blocks
        blksize = self.blksize
        read = self._read
        append = self._outbox.append
        pack = _ACK.pack
        offset = acked * blksize
        for block in range(acked + 1, last + 1):
            append(pack(_OP_DATA, block & 0xFFFF) + read(offset, blksize))
            offset += blksize
        if last > self._sent_upto:
            self._sent_upto = last
        self._deadline = now + self._timeout

    def _finish_on_client_error(self, packet: tp.Error, now: float) -> None:
        self.error = f"client error {packet.code}: {packet.message}"
        # RFC 2347 §4: a client that dislikes the OACK answers ERROR 8. UEFI (EDK2's MTFTP GetInfo)
        # does exactly that on purpose to learn tsize, then asks again: that is not a failure.
        if self._state == "oack" and "tsize" in self.params.accepted:
            self._finish("tsize-probe", now)
        else:
            self._finish("aborted", now)

    def _finish(self, outcome: Outcome, now: float) -> None:
        self.done = True
        self.outcome = outcome
        self.finished = now
        self._deadline = None


class ReceiveTransfer:
    """The client side of one RRQ (used by tests and the benchmark; tolerant like a real client)."""

    def __init__(
        self,
        filename: str,
        now: float,
        *,
        options: dict[str, str] | None = None,
        mode: str = "octet",
        timeout: float = 1.0,
        retries: int = 5,
    ) -> None:
        self.options = dict(options or {})
        self.blksize = tp.DEFAULT_BLKSIZE
        self.windowsize = 1
        self.tsize: int | None = None
        self.timeout = timeout
        self.retries = retries
        self.data = bytearray()
        self.done = False
        self.outcome: Literal["ok", "error", "timeout"] | None = None
        self.error: tp.Error | None = None
        self.first_data_at: float | None = None
        self._received = 0  # absolute number of the last in-order block
        self._since_ack = 0
        self._gap_reported = False
        self._state: Literal["request", "data"] = "request"
        self._tries = 0
        self._last = tp.encode(tp.ReadRequest(filename, mode, self.options))
        self._outbox = [self._last]
        self._deadline: float | None = now + timeout

    def datagrams_to_send(self) -> list[bytes]:
        out, self._outbox = self._outbox, []
        return out

    def next_timeout(self) -> float | None:
        return None if self.done else self._deadline

    def _send(self, datagram: bytes, now: float) -> None:
        self._last = datagram
        self._outbox.append(datagram)
        self._deadline = now + self.timeout

    def receive(self, datagram: bytes, now: float) -> None:
        if self.done:
            return
        if len(datagram) >= 4 and datagram[0] == 0 and datagram[1] == tp.OP_DATA:
            self._on_data(_ACK.unpack_from(datagram)[1], memoryview(datagram)[4:], now)
            return
        try:
            packet = tp.decode(datagram)
        except tp.TftpPacketError:
            return
        if isinstance(packet, tp.OptionAck) and self._state == "request":
            self._apply_oack(packet.options)
            self._state = "data"
            self._tries = 0
            self._send(tp.encode_ack(0), now)
        elif isinstance(packet, tp.OptionAck) and self._received == 0:
            self._send(tp.encode_ack(0), now)  # the server did not see our ACK of its OACK
        elif isinstance(packet, tp.Error):
            self.error = packet
            self.done = True
            self.outcome = "error"
            self._deadline = None

    def _apply_oack(self, options: dict[str, str]) -> None:
        if "blksize" in options:
            self.blksize = int(options["blksize"])
        if "windowsize" in options:
            self.windowsize = int(options["windowsize"])
        if "tsize" in options:
            self.tsize = int(options["tsize"])

    def _on_data(self, block: int, payload: memoryview, now: float) -> None:
        if self._state == "request":
            self._state = "data"  # the server ignored our options: RFC 1350 defaults apply
        if self.first_data_at is None:
            self.first_data_at = now
        expected = (self._received + 1) % tp.BLOCK_MODULO
        if block != expected:
            behind = (self._received - block) % tp.BLOCK_MODULO
            if behind < 0x8000:
                # An old block again: our ACK was lost. Re-ACK in lock-step only; in a window the
                # sender's timeout recovers, and re-ACKing every duplicate would flood it.
                if self.windowsize == 1:
                    self._send(tp.encode_ack(self._received), now)
            elif not self._gap_reported:
                self._gap_reported = True  # RFC 7440 §4: ACK the last good block once per gap
                self._since_ack = 0
                self._send(tp.encode_ack(self._received), now)
            return
        self._received += 1
        self._gap_reported = False
        self._tries = 0
        self.data += payload
        if len(payload) < self.blksize:
            self._outbox.append(tp.encode_ack(self._received))
            self.done = True
            self.outcome = "ok"
            self._deadline = None
            return
        self._since_ack += 1
        if self._since_ack >= self.windowsize:
            self._since_ack = 0
            self._send(tp.encode_ack(self._received), now)
        else:
            self._deadline = now + self.timeout

    def on_timeout(self, now: float) -> None:
        if self.done or self._deadline is None or now < self._deadline:
            return
        if self._tries >= self.retries:
            self.done = True
            self.outcome = "timeout"
            self._deadline = None
            return
        self._tries += 1
        if self._state == "data" and self._since_ack:
            # Mid-window silence: tell the sender where we are.
            self._since_ack = 0
            self._last = tp.encode_ack(self._received)
        self._send(self._last, now)
