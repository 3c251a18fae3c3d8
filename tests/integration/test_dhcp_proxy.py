"""The responder on loopback ports answering scapy-built DISCOVER/REQUEST for each firmware.

Replies that would be broadcast go to 127.0.0.1 (the `broadcast` knob) so nothing leaves loopback."""

from __future__ import annotations

import asyncio
import os
import re
import socket
import struct
import threading
import time
from collections.abc import AsyncIterator

import pytest
from scapy.layers.dhcp import BOOTP, DHCP

from dhcp import packet as p
from dhcp import pxe
from dhcp.proxy import ProxyDHCP
from tests.dhcp_lab import PROFILES, StaticPolicy, make_spec
from udpio.udp import BindError

BASE = "http://127.0.0.1:8080"


def uuid_for(i: int) -> str:
    return f"3f1c2a4b-5d6e-4f70-8192-{i:012x}"


def discover(i: int, arch: int, vendor: bytes, *, user_class: bytes | None = None, mtype: str = "discover",
             ciaddr: str = "0.0.0.0", extra: list[tuple[str, bytes]] | None = None) -> bytes:
    opts: list[tuple[str, object] | str] = [
        ("message-type", mtype),
        ("pxe_client_architecture", struct.pack("!H", arch)),
        ("pxe_client_network_interface", b"\x01\x03\x10"),
        ("pxe_client_machine_identifier", b"\x00" + pxe.guid_bytes(uuid_for(i))),
        ("vendor_class_id", vendor),
    ]
    if user_class is not None:
        opts.append(("user_class", user_class))
    opts.extend(extra or [])
    mac = bytes([0x52, 0x54, 0x00, 0x78, 0x03, i & 0xFF])
    return bytes(BOOTP(op=1, chaddr=mac + bytes(10), xid=0xC0000000 + i, ciaddr=ciaddr, flags=0x8000)
                 / DHCP(options=[*opts, "end"]))


class Client:
    """A UDP peer on loopback: sends to the proxy, receives its replies."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.setblocking(False)
        self.port = self.sock.getsockname()[1]

    async def ask(self, data: bytes, port: int, wait: float = 2.0) -> p.DhcpPacket:
        loop = asyncio.get_running_loop()
        await loop.sock_sendto(self.sock, data, ("127.0.0.1", port))
        reply = await asyncio.wait_for(loop.sock_recv(self.sock, 4096), wait)
        return p.decode(reply)

    async def silent(self, data: bytes, port: int, wait: float = 0.3) -> None:
        loop = asyncio.get_running_loop()
        await loop.sock_sendto(self.sock, data, ("127.0.0.1", port))
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(loop.sock_recv(self.sock, 4096), wait)


@pytest.fixture(params=[True, False], ids=["own-thread", "main-loop"])
async def setup(request: pytest.FixtureRequest) -> AsyncIterator[
        tuple[ProxyDHCP, Client, list[dict[str, object]], list[bool]]]:
    client = Client()
    events: list[dict[str, object]] = []
    enabled = [True]
    policy = StaticPolicy()
    for i in range(1, 20):
        profile = PROFILES["ipxe"] if i % 2 else PROFILES["pxelinux"]
        policy.by_uuid[uuid_for(i)] = make_spec(uuid_for(i), profile, BASE)
    proxy = ProxyDHCP(policy, "127.0.0.1", listen="127.0.0.1", port=0, pxe_port=0, reply_port=client.port,
                      broadcast="127.0.0.1", events=lambda k, f: events.append({"kind": k, **f}),
                      enabled=lambda: enabled[0], raw_fallback=False, own_thread=request.param)
    await proxy.start()
    yield proxy, client, events, enabled
    await proxy.stop()
    await proxy.stop()  # idempotent
    client.sock.close()


CASES = [  # (node index, arch, vendor, user class, expected file, tftp?)
    (1, 0, b"PXEClient:Arch:00000:UNDI:002001", None, "undionly.kpxe", True),
    (2, 0, b"PXEClient:Arch:00000:UNDI:002001", None, "pxelinux.0", True),
    (3, 0, b"PXEClient:Arch:00000:UNDI:002001", b"iPXE", f"{BASE}/boot/{uuid_for(3)}.ipxe", False),
    (4, 0, b"PXEClient:Arch:00000:UNDI:002001", b"iPXE", "pxelinux.0", True),
    (5, 7, b"PXEClient:Arch:00007:UNDI:003016", None, "ipxe.efi", True),
    (7, 9, b"PXEClient:Arch:00009:UNDI:003016", None, "ipxe.efi", True),
    (9, 11, b"PXEClient:Arch:00011:UNDI:003016", None, "snponly-arm64.efi", True),
    (11, 16, b"HTTPClient:Arch:00016:UNDI:003001", None, f"{BASE}/boot/files/ipxe.efi", False),
    (13, 19, b"HTTPClient:Arch:00019:UNDI:003001", None, f"{BASE}/boot/files/snponly-arm64.efi", False),
]


@pytest.mark.parametrize(("i", "arch", "vendor", "uc", "file", "tftp"), CASES)
async def test_discover_gets_proxy_offer(setup, i, arch, vendor, uc, file, tftp) -> None:  # type: ignore[no-untyped-def]
    proxy, client, events, _ = setup
    reply = await client.ask(discover(i, arch, vendor, user_class=uc), proxy.bound["dhcp"][1])
    assert reply.op == p.BOOTREPLY and reply.xid == 0xC0000000 + i and reply.message_type == p.DHCPOFFER
    assert reply.yiaddr == "0.0.0.0" and reply.siaddr == "127.0.0.1" and reply.server_id == "127.0.0.1"
    assert reply.bootfile == file and (reply.tftp_server == "127.0.0.1") == tftp
    assert reply.vendor_class == (b"HTTPClient" if arch in (16, 19) else b"PXEClient")
    assert reply.client_guid == pxe.guid_bytes(uuid_for(i))
    assert (p.OPT_VENDOR_SPECIFIC in reply.options) == (arch == 0)
    assert events == [{"kind": "dhcp", "server": uuid_for(i), "mac": reply.mac, "arch": arch, "file": file,
                       "client": "127.0.0.1", "reply": "offer", "uuid": uuid_for(i)}]


@pytest.mark.parametrize(("i", "arch", "vendor", "uc", "file", "tftp"), CASES)
async def test_pxe_request_gets_ack_at_its_source(setup, i, arch, vendor, uc, file, tftp) -> None:  # type: ignore[no-untyped-def]
    proxy, client, _, _ = setup
    data = discover(i, arch, vendor, user_class=uc, mtype="request", ciaddr="127.0.0.1",
                    extra=[("vendor_specific", b"\x47\x04\x80\x00\x00\x00\xff")])
    reply = await client.ask(data, proxy.bound["pxe"][1])
    assert reply.message_type == p.DHCPACK and reply.bootfile == file and reply.ciaddr == "127.0.0.1"
    if arch == 0:
        assert reply.pxe_options.get(p.PXE_BOOT_ITEM) == b"\x80\x00\x00\x00"


async def test_silence_for_plain_unknown_disabled_and_survives_garbage(setup) -> None:  # type: ignore[no-untyped-def]
    proxy, client, events, enabled = setup
    port = proxy.bound["dhcp"][1]
    plain = bytes(BOOTP(op=1, chaddr=b"\x02" * 6 + bytes(10), xid=5)
                  / DHCP(options=[("message-type", "discover"), ("vendor_class_id", b"MSFT 5.0"), "end"]))
    await client.silent(plain, port)
    await client.silent(discover(99, 0, b"PXEClient"), port)  # unknown node, policy says None
    await client.silent(discover(1, 0, b"PXEClient", mtype="request"), port)  # REQUEST on :67
    for junk in (b"", b"\x01" * 50, b"\x01\x01\x06" + bytes(400), bytes(5000)):
        await client.silent(junk, port, wait=0.05)
    enabled[0] = False
    await client.silent(discover(1, 0, b"PXEClient"), port)
    enabled[0] = True
    reply = await client.ask(discover(1, 0, b"PXEClient"), port)  # still answering
    assert reply.bootfile == "undionly.kpxe"
    assert proxy.stats.malformed >= 3 and proxy.stats.errors == 0 and len(events) == 1


async def test_many_clients_in_a_burst(setup) -> None:  # type: ignore[no-untyped-def]
    proxy, client, _events, _ = setup
    loop = asyncio.get_running_loop()
    port = proxy.bound["dhcp"][1]
    for i in range(1, 20):
        await loop.sock_sendto(client.sock, discover(i, 0, b"PXEClient"), ("127.0.0.1", port))
    xids = set()
    for _ in range(19):
        xids.add(p.decode(await asyncio.wait_for(loop.sock_recv(client.sock, 4096), 2)).xid)
    assert xids == {0xC0000000 + i for i in range(1, 20)}


async def test_port_in_use_is_a_clear_error() -> None:
    holder = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    holder.bind(("127.0.0.1", 0))
    port = holder.getsockname()[1]
    proxy = ProxyDHCP(StaticPolicy(), "127.0.0.1", listen="127.0.0.1", port=port, pxe_port=0, raw_fallback=False)
    try:
        with pytest.raises(BindError, match=re.escape(f"cannot listen on 127.0.0.1:{port}: Address already in use "
                                                      "(another program is listening there)")):
            await proxy.start()
        assert proxy.bound == {}
        # The :4011 side failing undoes the :67 bind.
        proxy2 = ProxyDHCP(StaticPolicy(), "127.0.0.1", listen="127.0.0.1", port=0, pxe_port=port)
        with pytest.raises(BindError, match=re.escape(f"cannot listen on 127.0.0.1:{port}: Address already in use")):
            await proxy2.start()  # the error names the :4011 side's port, the one that failed
        assert proxy2._sockets == []
    finally:
        holder.close()
        await proxy.stop()


async def test_raw_fallback_when_port_is_taken() -> None:
    """A local 'DHCP server' holds the port: the proxy listens with a raw socket on lo and still answers.

    The reply frame is read with a second packet socket: Linux drops a 127.0.0.1-sourced frame injected
    on lo as a martian, so only the netns system test sees such a reply arrive at a UDP socket."""
    from scapy.arch.linux import L2Socket

    from dhcp.raw import PACKET_OUTGOING, parse_udp_frame

    holder = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    holder.bind(("127.0.0.1", 0))
    port = holder.getsockname()[1]
    client = Client()
    sniffer = L2Socket(iface="lo", filter=f"udp and dst port {client.port}")
    sniffer.ins.settimeout(0)
    policy = StaticPolicy(unknown=make_spec(uuid_for(1), PROFILES["pxelinux"], BASE))
    proxy = ProxyDHCP(policy, "127.0.0.1", listen="127.0.0.1", port=port, pxe_port=0, interface="lo",
                      reply_port=client.port, broadcast="127.0.0.1", raw_fallback=True)
    loop = asyncio.get_running_loop()
    try:
        await proxy.start()
        assert proxy.raw_mode and proxy.bound["dhcp"] == ("raw:lo", port)
        await loop.sock_sendto(client.sock, discover(1, 0, b"PXEClient"), ("127.0.0.1", port))
        deadline = loop.time() + 3
        parsed = None
        while parsed is None and loop.time() < deadline:
            try:
                frame, addr = sniffer.ins.recvfrom(65535)
            except BlockingIOError:
                await asyncio.sleep(0.01)
                continue
            if addr[2] == PACKET_OUTGOING:
                parsed = parse_udp_frame(frame, client.port)
        assert parsed is not None, "no reply frame from the raw listener"
        src, sport, payload = parsed
        assert (src, sport) == ("127.0.0.1", port)
        reply = p.decode(payload)
        assert reply.message_type == p.DHCPOFFER and reply.bootfile == "pxelinux.0"
        holder.setblocking(False)
        assert holder.recv(4096)  # the local server saw the same request
    finally:
        await proxy.stop()
        sniffer.close()
        holder.close()
        client.sock.close()
    assert not proxy.raw_mode and _dhcp_threads() == []  # the raw socket's thread ended too


async def test_bound_to_an_interface() -> None:
    """interface= pins both sockets to one link (SO_BINDTODEVICE); replies leave through it."""
    client = Client()
    policy = StaticPolicy(unknown=make_spec(uuid_for(1), PROFILES["ipxe"], BASE))
    proxy = ProxyDHCP(policy, "127.0.0.1", listen="0.0.0.0", port=0, pxe_port=0, interface="lo",
                      reply_port=client.port, broadcast="127.0.0.1", raw_fallback=False)
    await proxy.start()
    try:
        for sock in proxy._sockets:
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, 16).rstrip(b"\0") == b"lo"
        reply = await client.ask(discover(1, 7, b"PXEClient:Arch:00007:UNDI:003016"), proxy.bound["dhcp"][1])
        assert reply.bootfile == "ipxe.efi"
    finally:
        await proxy.stop()
        client.sock.close()


def _dhcp_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("cello-dhcp")]


def _ask_from_a_thread(data: bytes, port: int, reply_port_sock: socket.socket, when: threading.Event,
                       out: dict[str, object]) -> None:
    """Off the main loop: wait until it is blocked, send, and time the reply (a blocking socket)."""
    when.wait(5)
    start = time.monotonic()
    reply_port_sock.sendto(data, ("127.0.0.1", port))
    try:
        out["reply"] = reply_port_sock.recv(4096)
    except TimeoutError:
        out["reply"] = None
    out["seconds"] = time.monotonic() - start


@pytest.mark.parametrize("own_thread", [True, False], ids=["own-thread", "main-loop"])
async def test_a_blocked_main_loop_does_not_delay_the_reply(own_thread: bool) -> None:
    """The main loop sleeps a second (a saturated loop, a slow SQLite call): the responder's own thread
    answers a DISCOVER in far less; the event it reports reaches the sink on the main loop afterwards.
    On the main loop (as before issue 15) the same reply waits out the second."""
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.bind(("127.0.0.1", 0))
    client.settimeout(3)
    sink_threads: list[int] = []
    policy = StaticPolicy(by_uuid={uuid_for(1): make_spec(uuid_for(1), PROFILES["ipxe"], BASE)})
    proxy = ProxyDHCP(policy, "127.0.0.1", listen="127.0.0.1", port=0, pxe_port=0,
                      reply_port=client.getsockname()[1], broadcast="127.0.0.1", raw_fallback=False,
                      events=lambda k, f: sink_threads.append(threading.get_ident()), own_thread=own_thread)
    await proxy.start()
    loop = asyncio.get_running_loop()
    blocked = threading.Event()
    out: dict[str, object] = {}
    asker = threading.Thread(target=_ask_from_a_thread,
                             args=(discover(1, 0, b"PXEClient"), proxy.bound["dhcp"][1], client, blocked, out))
    try:
        asker.start()

        def block() -> None:
            blocked.set()
            time.sleep(1.0)  # the whole main loop stops here

        loop.call_soon(block)
        await asyncio.sleep(0)  # runs block()
        await asyncio.to_thread(asker.join, 5)
        for _ in range(100):  # the report is drained by the main loop, now free again
            if sink_threads:
                break
            await asyncio.sleep(0.01)
    finally:
        await proxy.stop()
        client.close()
    assert isinstance(out.get("reply"), bytes), "no reply"
    assert p.decode(out["reply"]).message_type == p.DHCPOFFER  # type: ignore[arg-type]
    seconds = float(out["seconds"])  # type: ignore[arg-type]
    if own_thread:
        assert seconds < 0.2, f"the reply took {seconds:.3f} s with the main loop blocked"
    else:
        assert seconds > 0.5, "on the main loop the reply should have waited for it"
    assert sink_threads == [threading.get_ident()]  # the event sink ran on the main loop, once


async def test_stop_leaves_no_thread_and_no_descriptor() -> None:
    fds = len(os.listdir("/proc/self/fd"))
    proxy = ProxyDHCP(StaticPolicy(), "127.0.0.1", listen="127.0.0.1", port=0, pxe_port=0, raw_fallback=False)
    await proxy.start()
    await proxy.start()  # a second start is a no-op: still one thread per socket
    assert len(_dhcp_threads()) == 2  # :67 and :4011
    await proxy.stop()
    await proxy.stop()  # idempotent
    assert _dhcp_threads() == [] and proxy.bound == {}
    assert len(os.listdir("/proc/self/fd")) == fds  # sockets, epoll and the wake pipe all closed
    await proxy.start()  # and it can start again
    assert len(_dhcp_threads()) == 2 and proxy.bound["dhcp"][1] > 0
    await proxy.stop()
    assert _dhcp_threads() == []


async def test_a_failed_bind_starts_no_thread() -> None:
    holder = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    holder.bind(("127.0.0.1", 0))
    proxy = ProxyDHCP(StaticPolicy(), "127.0.0.1", listen="127.0.0.1", port=0, pxe_port=holder.getsockname()[1],
                      raw_fallback=False)
    try:
        with pytest.raises(BindError):
            await proxy.start()
        assert _dhcp_threads() == [] and proxy._sockets == []
    finally:
        holder.close()
