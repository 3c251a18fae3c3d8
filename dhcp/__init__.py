"""proxyDHCP responder.

- `dhcp.packet`: pure DHCP/BOOTP codec (`decode`, `encode`, `DhcpPacket`, `Options`, `PacketError`).
- `dhcp.pxe`: pure PXE policy (`classify`, `choose_boot`, `build_reply`, `reply_destination`, `smbios_uuid`,
  `pxelinux_uuid`).
- `dhcp.proxy`: `ProxyDHCP` — the asyncio responder on :67 and :4011 (raw-socket fallback in `dhcp.raw`).
- `dhcp.binding`: which address a client's packet says it holds (learned for the boot policy).

The DNS responder is `dnsd/`; the proxy run alone with a static policy (lab, tests, benchmark) is
`tests/dhcp_lab.py`.
"""
