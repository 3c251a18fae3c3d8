"""proxyDHCP responder and small DNS responder.

- `dhcp.packet`: pure DHCP/BOOTP codec (`decode`, `encode`, `DhcpPacket`, `Options`, `PacketError`).
- `dhcp.pxe`: pure PXE policy (`classify`, `choose_boot`, `build_reply`, `smbios_uuid`, `pxelinux_uuid`).
- `dhcp.proxy`: `ProxyDHCP` — the asyncio responder on :67 and :4011 (raw-socket fallback in `dhcp.raw`).
- `dhcp.dns`: `DnsResponder` — authoritative A/PTR for provisioned servers, everything else REFUSED.
- `dhcp.lab`: run the proxy standalone with a static policy (lab, system tests, benchmark).
"""
