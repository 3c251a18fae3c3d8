"""A small authoritative DNS responder for the provisioned servers' names (not `dns`: that is dnspython's).

- `dnsd.answer`: `answer(query, records, zone)` — pure; A/PTR for known servers, everything else REFUSED.
- `dnsd.server`: `DnsResponder` — the service on one UDP socket.
"""
