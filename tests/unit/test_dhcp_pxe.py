"""PXE policy: which requests are boot requests, which machine, which loader, and the reply's shape."""

from __future__ import annotations

import dataclasses
import struct

import pytest

from bootfiles.spec import Profile
from dhcp import packet as p
from dhcp import pxe
from dhcp.proxy import ProxyDHCP
from tests.dhcp_lab import PROFILES, StaticPolicy, make_spec

UUID = "3f1c2a4b-5d6e-4f70-8192-a3b4c5d6e7f8"
MAC = b"\x52\x54\x00\x78\x02\x01"
BASE = "http://10.78.0.2:8080"


def request(arch: int | None = 0, *, vendor: bytes = b"PXEClient:Arch:00000:UNDI:002001",
            user_class: bytes | None = None, guid: bytes | None = None, mtype: int = p.DHCPDISCOVER,
            extra: dict[int, bytes] | None = None) -> p.DhcpPacket:
    opts: dict[int, bytes] = {p.OPT_MESSAGE_TYPE: bytes([mtype])}
    if vendor:
        opts[p.OPT_VENDOR_CLASS] = vendor
    if arch is not None:
        opts[p.OPT_CLIENT_ARCH] = struct.pack("!H", arch)
    if user_class is not None:
        opts[p.OPT_USER_CLASS] = user_class
    opts[p.OPT_CLIENT_GUID] = b"\x00" + (guid if guid is not None else pxe.guid_bytes(UUID))
    opts.update(extra or {})
    return p.DhcpPacket(op=p.BOOTREQUEST, xid=0x1234, chaddr=MAC, flags=p.FLAG_BROADCAST,
                        options=p.Options.of(opts))


def choose(packet: p.DhcpPacket, profile: str | Profile = "pxelinux",
           kind: pxe.Kind = pxe.Kind.DISCOVER) -> pxe.BootChoice | None:
    req = pxe.classify(packet, kind)
    assert req is not None
    prof = PROFILES[profile] if isinstance(profile, str) else profile
    return pxe.choose_boot(req, make_spec(UUID, prof, BASE + "/"))


@pytest.mark.parametrize(
    ("arch", "vendor", "user_class", "profile", "file", "tftp"),
    [
        (0, b"PXEClient", None, "pxelinux", "pxelinux.0", True),
        (0, b"PXEClient", None, "ipxe", "undionly.kpxe", True),
        (0, b"PXEClient", b"iPXE", "ipxe", f"{BASE}/boot/{UUID}.ipxe", False),
        (0, b"PXEClient", b"\x04iPXE", "ipxe", f"{BASE}/boot/{UUID}.ipxe", False),  # RFC 3004 form too
        (0, b"PXEClient", b"iPXE", "pxelinux", "pxelinux.0", True),
        (6, b"PXEClient", None, "ipxe", "ipxe.efi", True),
        (7, b"PXEClient", None, "pxelinux", "ipxe.efi", True),
        (9, b"PXEClient", None, "ipxe", "ipxe.efi", True),
        (7, b"PXEClient", b"iPXE", "ipxe", f"{BASE}/boot/{UUID}.ipxe", False),
        (7, b"PXEClient", b"iPXE", "pxelinux", f"{BASE}/boot/{UUID}.ipxe", False),
        (11, b"PXEClient", None, "ipxe", "snponly-arm64.efi", True),
        (16, b"HTTPClient", None, "ipxe", f"{BASE}/boot/files/ipxe.efi", False),
        (19, b"HTTPClient", None, "ipxe", f"{BASE}/boot/files/snponly-arm64.efi", False),
        (None, b"PXEClient", None, "pxelinux", "pxelinux.0", True),  # PXE 2.0 ROM without option 93
    ],
)
def test_loader_table(arch: int | None, vendor: bytes, user_class: bytes | None, profile: str, file: str,
                      tftp: bool) -> None:
    choice = choose(request(arch, vendor=vendor, user_class=user_class), profile)
    assert choice is not None
    assert (choice.file, choice.tftp) == (file, tftp)
    assert choice.vendor == (b"HTTPClient" if vendor == b"HTTPClient" else b"PXEClient")
    assert choice.pxe_discovery == (arch in (0, None))


def test_efi_loader_comes_from_profile_and_arm64_is_configurable() -> None:
    prof = Profile("custom", loader="ipxe", bios_loader="ipxe.pxe", efi_loader="snponly.efi")
    assert choose(request(7), prof) == pxe.BootChoice("snponly.efi", True, b"PXEClient", False)
    req = pxe.classify(request(11), pxe.Kind.DISCOVER)
    assert req is not None
    c = pxe.choose_boot(req, make_spec(UUID, prof, BASE), pxe.PxeConfig(arm64_loader="arm64/ipxe.efi"))
    assert c is not None and c.file == "arm64/ipxe.efi"


@pytest.mark.parametrize(
    "packet",
    [
        request(vendor=b""),  # plain DHCP client
        request(vendor=b"MSFT 5.0"),
        request(vendor=b"pxeclient"),  # case matters (PXE 2.1: "PXEClient")
        request(arch=2),  # IA64: no loader
        request(arch=10),  # ARM32 UEFI: no loader
        request(mtype=p.DHCPREQUEST),  # on :67 the REQUEST belongs to the site server
        request(mtype=p.DHCPRELEASE),
        p.DhcpPacket(op=p.BOOTREPLY, xid=1, chaddr=MAC,
                     options=p.Options.of({53: b"\x02", 60: b"PXEClient"})),
        p.DhcpPacket(op=p.BOOTREQUEST, xid=1, chaddr=MAC[:4],
                     options=p.Options.of({53: b"\x01", 60: b"PXEClient"})),
        p.DhcpPacket(op=p.BOOTREQUEST, xid=1, chaddr=MAC, dhcp=False),
    ],
)
def test_not_boot_requests(packet: p.DhcpPacket) -> None:
    assert pxe.classify(packet, pxe.Kind.DISCOVER) is None


def test_pxe_port_takes_request_and_inform_only() -> None:
    assert pxe.classify(request(mtype=p.DHCPREQUEST), pxe.Kind.REQUEST) is not None
    assert pxe.classify(request(mtype=p.DHCPINFORM), pxe.Kind.REQUEST) is not None
    assert pxe.classify(request(mtype=p.DHCPDISCOVER), pxe.Kind.REQUEST) is None


@pytest.mark.parametrize(("guid", "expected"), [
    (pxe.guid_bytes(UUID), UUID), (bytes(16), None), (b"\xff" * 16, None),
])
def test_guid_identity(guid: bytes, expected: str | None) -> None:
    req = pxe.classify(request(guid=guid), pxe.Kind.DISCOVER)
    assert req is not None and req.uuid == expected and req.mac == "52:54:00:78:02:01"


def test_malformed_guid_is_ignored_not_fatal() -> None:
    packet = dataclasses.replace(request(0), options=p.Options.of({53: b"\x01", 60: b"PXEClient",
                                                                   97: b"\x01" + bytes(8)}))
    req = pxe.classify(packet, pxe.Kind.DISCOVER)
    assert req is not None and req.uuid is None and req.guid_option is None


def test_policy_falls_back_to_mac_for_broken_guid() -> None:
    spec = make_spec("11111111-2222-4333-8444-555555555555", PROFILES["pxelinux"], BASE)
    policy = StaticPolicy(by_mac={"52:54:00:78:02:01": spec})
    asked: list[tuple[str | None, str | None]] = []

    class Recording:
        def boot_spec(self, *, uuid: str | None, mac: str | None):  # type: ignore[no-untyped-def]
            asked.append((uuid, mac))
            return policy.boot_spec(uuid=uuid, mac=mac)

    proxy = ProxyDHCP(Recording(), "10.78.0.2")
    reply = proxy.handle(p.encode(request(guid=b"\xff" * 16)), ("0.0.0.0", 68), pxe.Kind.DISCOVER)
    assert asked == [(None, "52:54:00:78:02:01")]
    assert reply is not None and p.decode(reply.data).bootfile == "pxelinux.0"


def test_bios_offer_shape() -> None:
    packet = request(0)
    req = pxe.classify(packet, pxe.Kind.DISCOVER)
    assert req is not None
    choice = pxe.choose_boot(req, make_spec(UUID, PROFILES["pxelinux"], BASE))
    assert choice is not None
    reply = p.decode(p.encode(pxe.build_reply(packet, req, choice, "10.78.0.2", pxe.Kind.DISCOVER)))
    assert reply.op == p.BOOTREPLY and reply.xid == 0x1234 and reply.chaddr == MAC
    assert reply.yiaddr == "0.0.0.0" and reply.siaddr == "10.78.0.2"
    assert reply.message_type == p.DHCPOFFER and reply.server_id == "10.78.0.2"
    assert reply.vendor_class == b"PXEClient"
    assert reply.client_guid == pxe.guid_bytes(UUID)
    assert reply.tftp_server == "10.78.0.2" and reply.bootfile == "pxelinux.0" and reply.file == b"pxelinux.0"
    assert reply.pxe_options.get(p.PXE_DISCOVERY_CONTROL) == b"\x08"
    assert reply.flags == p.FLAG_BROADCAST


def test_uefi_reply_has_no_option_43_and_ack_echoes_boot_item() -> None:
    packet = request(7)
    req = pxe.classify(packet, pxe.Kind.DISCOVER)
    assert req is not None
    choice = pxe.choose_boot(req, make_spec(UUID, PROFILES["ipxe"], BASE))
    assert choice is not None
    reply = pxe.build_reply(packet, req, choice, "10.78.0.2", pxe.Kind.DISCOVER)
    assert p.OPT_VENDOR_SPECIFIC not in reply.options
    bios = request(0, mtype=p.DHCPREQUEST, extra={43: b"\x47\x04\x80\x00\x00\x01\xff"})
    breq = pxe.classify(bios, pxe.Kind.REQUEST)
    assert breq is not None
    bchoice = pxe.choose_boot(breq, make_spec(UUID, PROFILES["ipxe"], BASE))
    assert bchoice is not None
    ack = pxe.build_reply(bios, breq, bchoice, "10.78.0.2", pxe.Kind.REQUEST)
    assert ack.message_type == p.DHCPACK
    assert ack.pxe_options.get(p.PXE_BOOT_ITEM) == b"\x80\x00\x00\x01"


def test_long_url_goes_in_option_67_only() -> None:
    packet = request(0, user_class=b"iPXE")
    req = pxe.classify(packet, pxe.Kind.DISCOVER)
    assert req is not None
    spec = make_spec(UUID, PROFILES["ipxe"], "http://" + "a" * 120 + ":8080")
    choice = pxe.choose_boot(req, spec)
    assert choice is not None
    reply = p.decode(p.encode(pxe.build_reply(packet, req, choice, "10.78.0.2", pxe.Kind.DISCOVER)))
    assert reply.file == b"" and reply.bootfile == choice.file


def test_handle_disabled_unknown_and_events() -> None:
    events: list[tuple[str, dict[str, object]]] = []
    enabled = [True]
    policy = StaticPolicy(by_uuid={UUID: make_spec(UUID, PROFILES["pxelinux"], BASE)})
    proxy = ProxyDHCP(policy, "10.78.0.2", events=lambda k, f: events.append((k, dict(f))),
                      enabled=lambda: enabled[0])
    data = p.encode(request(0))
    reply = proxy.handle(data, ("0.0.0.0", 68), pxe.Kind.DISCOVER, ifindex=3)
    assert reply is not None and reply.dest == ("255.255.255.255", 68) and reply.ifindex == 3
    assert events == [("dhcp", {"server": UUID, "mac": "52:54:00:78:02:01", "arch": 0, "file": "pxelinux.0",
                                "client": "0.0.0.0", "reply": "offer", "uuid": UUID})]
    enabled[0] = False
    assert proxy.handle(data, ("0.0.0.0", 68), pxe.Kind.DISCOVER) is None
    enabled[0] = True
    unknown = p.encode(request(0, guid=pxe.guid_bytes("00000000-1111-4222-8333-444444444444")))
    assert proxy.handle(unknown, ("0.0.0.0", 68), pxe.Kind.DISCOVER) is None
    assert proxy.stats.offers == 1 and proxy.stats.ignored == 2 and len(events) == 1


def test_destinations() -> None:
    policy = StaticPolicy(unknown=make_spec(UUID, PROFILES["pxelinux"], BASE))
    proxy = ProxyDHCP(policy, "10.78.0.2", reply_port=6868)
    with_ci = p.encode(dataclasses.replace(request(0), ciaddr="10.78.0.9"))
    relayed = p.encode(dataclasses.replace(request(0), giaddr="10.78.5.1"))
    pxe_req = p.encode(request(0, mtype=p.DHCPREQUEST))
    r1 = proxy.handle(with_ci, ("10.78.0.9", 68), pxe.Kind.DISCOVER)
    r2 = proxy.handle(relayed, ("10.78.5.1", 67), pxe.Kind.DISCOVER)
    r3 = proxy.handle(pxe_req, ("10.78.0.9", 4011), pxe.Kind.REQUEST)
    assert r1 is not None and r1.dest == ("10.78.0.9", 6868)
    assert r2 is not None and r2.dest == ("10.78.5.1", 67)
    assert r3 is not None and r3.dest == ("10.78.0.9", 4011)


def test_error_boundary_counts_and_survives() -> None:
    class Broken:
        def boot_spec(self, *, uuid: str | None, mac: str | None):  # type: ignore[no-untyped-def]
            raise KeyError("store index corrupt")

    proxy = ProxyDHCP(Broken(), "10.78.0.2")
    assert proxy.serve_datagram(b"\x01junk", ("1.2.3.4", 68), pxe.Kind.DISCOVER, 0) is None
    assert proxy.serve_datagram(p.encode(request(0)), ("1.2.3.4", 68), pxe.Kind.DISCOVER, 0) is None
    assert proxy.stats.malformed == 1 and proxy.stats.errors == 1


def test_rate_limited_log() -> None:
    import logging

    from udpio.ratelimit import RateLimitedLog

    records: list[str] = []

    class H(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    logger = logging.getLogger("test.ratelimit")
    logger.addHandler(H())
    logger.propagate = False
    now = [0.0]
    rl = RateLimitedLog(logger, clock=lambda: now[0], interval=10, burst=3)
    for i in range(100):
        rl.warning("k", "bad %d", i)
    assert records == ["bad 0", "bad 1", "bad 2"]
    now[0] = 11.0
    rl.warning("k", "bad %d", 100)
    assert records[3].startswith("97 more 'k' messages suppressed") and records[4] == "bad 100"


SHAPES = [  # (arch, vendor, user class, profile): every kind of choice choose_boot makes
    (0, b"PXEClient", None, "pxelinux"), (0, b"PXEClient", None, "ipxe"), (0, b"PXEClient", b"iPXE", "ipxe"),
    (0, b"PXEClient", b"iPXE", "pxelinux"), (7, b"PXEClient", None, "ipxe"), (7, b"PXEClient", b"iPXE", "ipxe"),
    (11, b"PXEClient", None, "ipxe"), (16, b"HTTPClient", None, "ipxe"), (19, b"HTTPClient", None, "ipxe"),
]


@pytest.mark.parametrize(("arch", "vendor", "user_class", "profile"), SHAPES)
@pytest.mark.parametrize("kind", [pxe.Kind.DISCOVER, pxe.Kind.REQUEST])
@pytest.mark.parametrize("guid", [True, False])
def test_reply_bytes_is_the_encoded_reply(arch: int, vendor: bytes, user_class: bytes | None, profile: str,
                                          kind: pxe.Kind, guid: bool) -> None:
    """The template path gives, byte for byte, what build_reply + encode give — for clients that differ
    in every field it writes (xid, flags, ciaddr, giaddr, chaddr, option 97, the boot item)."""
    for n, (ciaddr, giaddr, flags, item) in enumerate([("0.0.0.0", "0.0.0.0", p.FLAG_BROADCAST, None),
                                                       ("10.78.0.9", "10.78.5.1", 0, b"\x80\x00\x00\x01")]):
        extra = {} if item is None else {p.OPT_VENDOR_SPECIFIC: b"\x47\x04" + item + b"\xff"}
        mtype = p.DHCPDISCOVER if kind is pxe.Kind.DISCOVER else p.DHCPREQUEST
        packet = request(arch, vendor=vendor, user_class=user_class, mtype=mtype, extra=extra,
                         guid=bytes([n + 1]) * 16)
        if not guid:
            packet = packet.with_options(p.Options(tuple((c, v) for c, v in packet.options
                                                         if c != p.OPT_CLIENT_GUID)))
        packet = dataclasses.replace(packet, xid=0xA1B2C3D4 + n, ciaddr=ciaddr, giaddr=giaddr, flags=flags,
                                     chaddr=bytes([2, 0, 0, 0, 0, n + 1]))
        req = pxe.classify(packet, kind)
        assert req is not None and (req.guid_option is not None) == guid
        choice = pxe.choose_boot(req, make_spec(UUID, PROFILES[profile], BASE))
        assert choice is not None
        expected = p.encode(pxe.build_reply(packet, req, choice, "10.78.0.2", kind))
        assert pxe.reply_bytes(packet, req, choice, "10.78.0.2", kind) == expected


def test_smbios_uuid_is_uuid_modules_text() -> None:
    import os
    import uuid

    for raw in [os.urandom(16) for _ in range(200)] + [bytes(range(16))]:
        assert pxe.smbios_uuid(raw) == str(uuid.UUID(bytes_le=raw))
    assert pxe.smbios_uuid(bytes(16)) is None and pxe.smbios_uuid(b"\xff" * 16) is None
    assert pxe.smbios_uuid(b"\x01" * 15) is None
