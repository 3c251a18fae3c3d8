"""Small per-app and per-request state objects (kept apart from the handlers so web/keys.py can name them)."""

from __future__ import annotations

from collections import Counter, OrderedDict
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Principal:
    """Who a bearer token speaks for: an admin, or one user."""

    owner: str | None
    admin: bool
    read_only: bool = False  # a 'read' scope token: every write is refused (403)

    def may_act_for(self, user: str) -> bool:
        return self.admin or self.owner == user


class ClientMemory:
    """Which server a client address last fetched its iPXE script for, so that its kernel and initrd
    fetches can be logged against that server. Bounded: the oldest addresses are forgotten."""

    def __init__(self, limit: int = 4096) -> None:
        self.limit = limit
        self._servers: OrderedDict[str, str] = OrderedDict()

    def remember(self, client: str, server: str) -> None:
        self._servers[client] = server
        self._servers.move_to_end(client)
        while len(self._servers) > self.limit:
            self._servers.popitem(last=False)

    def server_of(self, client: str) -> str | None:
        return self._servers.get(client)


# Upper bounds (seconds) of the request-duration histogram buckets.
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass
class HttpMetrics:
    requests: Counter[tuple[str, str, int]] = field(default_factory=Counter)  # (route, method, status)
    buckets: Counter[tuple[str, float]] = field(default_factory=Counter)  # (route, le) cumulative later
    duration_sum: dict[str, float] = field(default_factory=dict)
    duration_count: Counter[str] = field(default_factory=Counter)
    boot_bytes: int = 0
    boot_fetches: Counter[tuple[str, int]] = field(default_factory=Counter)  # (script | file, status)

    def observe(self, route: str, method: str, status: int, seconds: float) -> None:
        self.requests[(route, method, status)] += 1
        self.duration_sum[route] = self.duration_sum.get(route, 0.0) + seconds
        self.duration_count[route] += 1
        for le in DURATION_BUCKETS:
            if seconds <= le:
                self.buckets[(route, le)] += 1
                break
