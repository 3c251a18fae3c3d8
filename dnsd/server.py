"""The DNS responder service: `dnsd.answer` behind one listening UDP socket (`udpio.UdpListener`).

So that diskless nodes can find each other by name; off by default in the appliance.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping

from dnslib import DNSError

from udpio.ratelimit import RateLimitedLog
from udpio.udp import Address, UdpListener

from .answer import answer, check_zone

log = logging.getLogger("cello.dns")

Records = Callable[[], Mapping[str, str]]


class DnsResponder:
    """Authoritative A/PTR responder for `zone`. `start()` binds (udpio.BindError), `stop()` is idempotent."""

    def __init__(
        self,
        records: Records,
        zone: str,
        *,
        listen: str = "127.0.0.1",
        port: int = 53,
        clock: Callable[[], float] = time.monotonic,
        on_fatal: Callable[[BaseException], None] | None = None,
    ) -> None:
        check_zone(zone)
        self.records = records
        self.zone = zone
        self.answered = 0
        self.malformed = 0
        self.errors = 0
        self._log = RateLimitedLog(log, clock=clock)
        self.listener = UdpListener("dns", listen, port, self.serve_datagram, on_fatal=on_fatal,
                                    on_socket_error=self._socket_error, logger=log)

    @property
    def bound(self) -> Address | None:
        return self.listener.address if self.listener.transport is not None else None

    async def start(self) -> None:
        await self.listener.start()

    async def stop(self) -> None:
        await self.listener.stop()

    def serve_datagram(self, data: bytes, addr: Address) -> bytes | None:
        try:
            out = answer(data, self.records(), self.zone)
        except DNSError as e:
            self.malformed += 1
            self._log.warning("malformed", "dropped malformed DNS query from %s:%d: %s", addr[0], addr[1], e)
            return None
        except Exception:
            self.errors += 1
            self._log.exception("bug", "error answering DNS query from %s:%d", addr[0], addr[1])
            return None
        if out is not None:
            self.answered += 1
        return out

    def _socket_error(self, exc: Exception) -> None:
        self._log.warning("recv", "DNS socket error: %s", exc)
