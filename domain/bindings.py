"""Pure: which IPv4 address each known node's DHCP traffic put it at, for a short while.

The boot policy feeds it from what the proxyDHCP saw (`dhcp.binding.seen_client`) and asks it before a
boot config that carries a CHAP secret is served: MAC → address and SMBIOS UUID → address, each entry
valid for `ttl` seconds after the last packet that named it (DEFAULT_TTL, 10 minutes: a PXE boot
fetches its config seconds after its DHCP, and a reboot does DHCP again). A newer packet naming
another address replaces the old one (the node re-DHCPed; its old address may be someone else's now).

Bounded: at most `capacity` entries, the least recently learned going first. The policy only records
MACs and UUIDs of known servers, so strangers cannot fill it; the bound is a second line.
"""

from __future__ import annotations

import ipaddress
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Literal

DEFAULT_TTL = 600.0  # seconds
DEFAULT_CAPACITY = 16384  # entries (two per node: its MAC and its UUID)

_Key = tuple[Literal["mac", "uuid"], str]


def ipv4_of(text: str) -> str | None:
    """Canonical IPv4 text of a peer address (an IPv4-mapped IPv6 one included), else None."""
    try:
        ip = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address):
        mapped = ip.ipv4_mapped
        return None if mapped is None else str(mapped)
    return str(ip)


class BindingTable:
    """MAC / SMBIOS UUID → (IPv4 address, expiry). Time comes from `clock` (monotonic seconds)."""

    def __init__(self, ttl: float = DEFAULT_TTL, capacity: int = DEFAULT_CAPACITY,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if ttl <= 0 or capacity <= 0:
            raise ValueError("ttl and capacity must be positive")
        self.ttl = ttl
        self.capacity = capacity
        self._clock = clock
        # Oldest first: every learn moves its key to the end, and ttl is the same for all entries,
        # so the expired ones are always at the front.
        self._entries: OrderedDict[_Key, tuple[str, float]] = OrderedDict()

    def learn(self, address: str, *, mac: str | None = None, uuid: str | None = None) -> None:
        """Bind `mac` and/or `uuid` (lower-cased) to `address` for the next `ttl` seconds."""
        ip = ipv4_of(address)
        if ip is None:
            raise ValueError(f"not an IPv4 address: {address!r}")
        now = self._clock()
        self._expire(now)
        for key in self._keys(mac, uuid):
            self._entries[key] = (ip, now + self.ttl)
            self._entries.move_to_end(key)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)

    def address_of_mac(self, mac: str) -> str | None:
        return self._get(("mac", mac.lower()))

    def address_of_uuid(self, uuid: str) -> str | None:
        return self._get(("uuid", uuid.lower()))

    def __len__(self) -> int:
        self._expire(self._clock())
        return len(self._entries)

    def _get(self, key: _Key) -> str | None:
        hit = self._entries.get(key)
        if hit is None or hit[1] <= self._clock():
            return None
        return hit[0]

    def _expire(self, now: float) -> None:
        while self._entries:
            key, (_ip, until) = next(iter(self._entries.items()))
            if until > now:
                return
            del self._entries[key]

    @staticmethod
    def _keys(mac: str | None, uuid: str | None) -> list[_Key]:
        keys: list[_Key] = []
        if mac:
            keys.append(("mac", mac.lower()))
        if uuid:
            keys.append(("uuid", uuid.lower()))
        return keys
