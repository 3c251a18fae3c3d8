"""What the UDP services (TFTP, proxyDHCP, DNS) share below their protocols.

- `udpio.udp`: `bind_udp` (a bound non-blocking socket, or a `BindError` in one wording for every
  service), `UdpListener` (one listening socket behind a DatagramProtocol: an error boundary per datagram,
  and the loss of the socket reported as the service's fatal error).
- `udpio.ratelimit`: `RateLimitedLog`, so that a flood of bad datagrams cannot flood the log.

Nothing here knows a protocol; the services import this package, never the other way round.
"""
