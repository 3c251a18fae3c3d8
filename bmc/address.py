"""A BMC's address, parsed and checked from the URL a server record carries. Pure: no sockets, no I/O.

    redfish://host[:port][/SystemId]                 Redfish over plain http (port 80), e.g. sushy-emulator
    redfish+https://host[:port][/SystemId]           Redfish over https (port 443), certificate verified
    redfish+https://host[:port][/SystemId]?verify=off    … certificate not verified (self-signed BMCs)
    ipmi://host[:port]                               IPMI v2.0 over LAN (RMCP+, UDP port 623)
    ipmi://host[:port]?cipher=3                      … with that RMCP+ cipher suite, not ipmitool's pick

Plain `redfish://` is http because that is what the emulators and most lab BMC proxies speak; https must
be asked for, and skipping certificate checks must be asked for in so many words. An IPMI cipher suite
is worth naming for a BMC that cannot list its suites (ipmitool then retries for ~10 s per command, as
against OpenIPMI's ipmi_sim); suite 0 (no authentication at all) is refused. SystemId may be left
out when the BMC manages exactly one system (it is then looked up). Credentials never go in the URL: they
are stored apart, like CHAP secrets, so a URL can be logged and shown.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Literal
from urllib.parse import parse_qsl, unquote, urlsplit

Scheme = Literal["redfish", "ipmi"]
Transport = Literal["http", "https"]

DEFAULT_PORTS: dict[str, int] = {"redfish": 80, "redfish+https": 443, "ipmi": 623}
# A DNS name of labels (RFC 1123 §2.1), or an IPv4/IPv6 literal (checked by ipaddress).
_HOST_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
# Redfish resource ids in the wild: "1", "System.Embedded.1", "437XR1138R2", libvirt names and UUIDs.
_SYSTEM_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")


@dataclass(frozen=True)
class BmcAddress:
    scheme: Scheme
    host: str  # a DNS name or an IP literal, IPv6 without brackets
    port: int
    system_id: str | None  # Redfish ComputerSystem id; None = the BMC's only system (always None for IPMI)
    transport: Transport = "http"  # Redfish only
    verify_tls: bool = True  # Redfish over https only
    cipher_suite: int | None = None  # IPMI only: RMCP+ cipher suite; None = ipmitool's choice

    def __str__(self) -> str:
        """The URL again, normalised (for log lines and errors: it holds no secret)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        if self.scheme == "ipmi":
            return f"ipmi://{host}:{self.port}" + (f"?cipher={self.cipher_suite}" if self.cipher_suite else "")
        scheme = "redfish+https" if self.transport == "https" else "redfish"
        path = f"/{self.system_id}" if self.system_id else ""
        query = "?verify=off" if self.transport == "https" and not self.verify_tls else ""
        return f"{scheme}://{host}:{self.port}{path}{query}"

    @property
    def base_url(self) -> str:
        """http(s)://host:port of a Redfish service."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.transport}://{host}:{self.port}"


def parse_bmc_url(url: str) -> BmcAddress:
    """`url` as a BmcAddress; ValueError naming what is wrong with it."""
    if not isinstance(url, str) or not url:
        raise ValueError("BMC URL is empty: expected redfish://host[:port]/SystemId or ipmi://host[:port]")
    if len(url) > 512 or any(c.isspace() or ord(c) < 0x20 or ord(c) == 0x7F for c in url):
        raise ValueError(f"BMC URL {_shown(url)} has spaces or control characters (or is over 512 chars)")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"BMC URL {_shown(url)} is malformed: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS:
        raise ValueError(f"BMC URL {_shown(url)}: scheme must be redfish, redfish+https or ipmi, not {scheme!r}")
    if "@" in parts.netloc:
        raise ValueError(f"BMC URL {_shown(url)}: credentials do not belong in the URL (they are stored apart)")
    if parts.fragment:
        raise ValueError(f"BMC URL {_shown(url)}: a '#' fragment means nothing here")
    host = _check_host(parts.hostname or "", url)
    if port == 0:
        raise ValueError(f"BMC URL {_shown(url)}: port must be 1-65535")
    port = port or DEFAULT_PORTS[scheme]

    if scheme == "ipmi":
        if parts.path not in ("", "/"):
            raise ValueError(f"BMC URL {_shown(url)}: an ipmi:// URL is only ipmi://host[:port][?cipher=N]")
        return BmcAddress("ipmi", host, port, None, cipher_suite=_check_cipher(parts.query, url))

    system_id = _check_system_id(parts.path, url)
    transport: Transport = "https" if scheme == "redfish+https" else "http"
    options = parse_qsl(parts.query, keep_blank_values=True) if parts.query else []
    if options and (transport != "https" or len(options) != 1 or options[0] not in (("verify", "off"),
                                                                                     ("verify", "on"))):
        raise ValueError(f"BMC URL {_shown(url)}: the only option is ?verify=off, on redfish+https:// URLs")
    verify = options != [("verify", "off")]
    return BmcAddress("redfish", host, port, system_id, transport, verify)


def _check_cipher(query: str, url: str) -> int | None:
    if not query:
        return None
    options = parse_qsl(query, keep_blank_values=True)
    if len(options) != 1 or options[0][0] != "cipher" or options[0][1] not in {str(n) for n in range(1, 18)}:
        raise ValueError(f"BMC URL {_shown(url)}: the only option of an ipmi:// URL is ?cipher=N, "
                         "an RMCP+ cipher suite from 1 to 17")
    return int(options[0][1])


def _check_host(host: str, url: str) -> str:
    if not host:
        raise ValueError(f"BMC URL {_shown(url)} names no host")
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    labels = host.split(".")
    if len(host) > 253 or not all(_HOST_LABEL.fullmatch(label) for label in labels) or labels[-1].isdigit():
        raise ValueError(f"BMC URL {_shown(url)}: host {host!r} is neither a DNS name nor an IP address")
    return host.lower()


def _check_system_id(path: str, url: str) -> str | None:
    if path in ("", "/"):
        return None
    system_id = unquote(path[1:])
    if system_id.endswith("/"):
        system_id = system_id[:-1]
    if not _SYSTEM_ID.fullmatch(system_id):
        raise ValueError(f"BMC URL {_shown(url)}: SystemId {system_id!r} must be one path segment of "
                         "letters, digits and . _ : - (up to 128 chars), like /1 or /System.Embedded.1")
    return system_id


def _shown(url: str) -> str:
    """The URL for an error message, with any user:password@ masked (it may be a secret pasted by mistake)."""
    url = re.sub(r"//[^/?#]*@", "//…@", url)
    return repr(url if len(url) <= 80 else url[:77] + "…")
