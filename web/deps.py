"""What the web app needs from the rest of the appliance; built by the composition root."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from bootfiles.tftp_server import TftpStats
from dhcp.proxy import Stats as DhcpStats
from domain.core import Domain

HealthReport = Mapping[str, Mapping[str, str]]  # {service: {"state": ..., "detail": ...}}


@dataclass(frozen=True)
class ServiceCounters:
    """The counters the composition root's services keep, read at each /metrics scrape (None: that
    service is not running in this process)."""

    dhcp: DhcpStats | None = None
    tftp: TftpStats | None = None
    tftp_active: int = 0


@dataclass
class WebDeps:
    domain: Domain
    files_root: Path  # kernels and initrds served under /boot/files/
    health: Callable[[], HealthReport | Awaitable[HealthReport]]
    version: str
    client_max_size: int = 1 << 20  # request bodies above this get 413
    sse_heartbeat: float = 15.0  # seconds between keep-alive comments on /events
    loader_roots: Sequence[Path] = ()  # static loader folders, also under /boot/files/ (UEFI HTTP boot)
    collect: Callable[[], ServiceCounters] = ServiceCounters  # the DHCP and TFTP counters, for /metrics
    tls_url: str = ""  # the HTTPS listener ('' = none): then a token is taken over TLS or loopback only
