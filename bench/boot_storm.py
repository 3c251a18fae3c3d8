"""Whole-boot storm: N simulated nodes boot at once against Cello and against the classic hand-built stack.

    .venv/bin/python bench/boot_storm.py --quick        # 16 nodes, both profiles, no loss run (~2 min)
    .venv/bin/python bench/boot_storm.py                # 64 and 256 nodes, both profiles, + a 1 % loss run
    .venv/bin/python bench/boot_storm.py --nodes 64 --profiles ipxe --loss-nodes 64

Every simulated node does what a real BIOS node does, in order, timing each step:
  1. PXE ROM: DHCPDISCOVER (broadcast) → the proxy's OFFER; the DHCPREQUEST for the site server's address
     (broadcast, option 50: the proxy sees it); the :4011 boot-server REQUEST where the ROM would (no
     discovery-control bit 3 with a file in the offer) → the boot file.
  2. the loader over TFTP (pxelinux.0 / undionly.kpxe, the real files).
  3. profile `pxelinux` (Cello's `pxelinux-tftp`): ldlinux.c32, then the pxelinux.cfg names in pxelinux's order
     until one exists, then KERNEL and INITRD, all over TFTP.
     profile `ipxe` (Cello's `ipxe`, the path of its default `compute`): iPXE's own DHCP (user class
     "iPXE": DISCOVER → OFFER → REQUEST → :4011 REQUEST →
     ACK naming the script), the script over HTTP, run by a small iPXE interpreter (set, inc, iseq,
     goto, labels, &&/||, sleep, chain, sanhook, kernel, initrd, boot): so Cello's retry loops run as
     written and the classic stack's stock script gives up at its first error, as iPXE would. sanhook is
     an iSCSI login + a read of the first 4 KiB; kernel and initrd come over HTTP.
  4. the kernel's initramfs: an iSCSI login to its own target with what the command line says
     (ISCSI_INITIATOR, ISCSI_TARGET_*, ISCSI_USERNAME/PASSWORD, cello.lun / netroot's LUN) and a read of
     the first 32 MiB of the root, 512 KiB per READ(10), through libiscsi (the C initiator of
     libiscsi-bin, via ctypes, one thread per node); the login is tried again with a growing wait
     (1, 2, … s, 8 tries) for both stacks — it is the node's image, not the boot server, that retries.
The client retransmits as firmware does: DHCP after 1, 2, 4, 8, 16 s; TFTP after 250 ms without
data (iPXE's least timeout), doubling up to 8 s, 12 tries a packet; TFTP servers ignore a repeated
ACK and resend a lost DATA on their own timer (in.tftpd: 1 s), so with loss lock-step TFTP pays about
a second a lost packet. Every wait is bounded; a node not done within --node-timeout seconds (the
loss run: twice that) counts as failed.

The stacks, each started inside netns bstorm-srv (10.79.0.2/16; the nodes are 10.79.1.x.. on a veth
from netns bstorm-cli, both made and removed here), one after the other, on the same nodes, files and
iSCSI volumes (reflink clones of one template on a loop-mounted xfs, the first 32 MiB real data, read
once into the page cache before each run):
  Cello:   `cello serve` with a file backend, its own tgtd (CHAP on); the template version registered in
           the store before it starts, the N servers created through the API (profile, MAC, address).
  classic: dnsmasq in proxy mode (pxe-service lines, `dhcp-userclass` for iPXE), in.tftpd (tftp-hpa)
           on the same files, nginx (the per-node iPXE scripts behind a generic `chain …/${uuid}.ipxe`),
           tgtd with one target per node (the node's initiator name bound, CHAP), all configured for the
           same nodes by hand, as an operator would.
Kernel 8 MiB and initrd 6 MiB (random bytes) per template. Printed per run: per-node total p50/p99, the
time until the last node is done, each step's p50, the retries, the CPU seconds each server process
and the nodes' process spent (read off /proc), and the Cello/classic ratios. The loss
run drops 1 % of the packets each end of the veth receives (tc netem's job; this kernel has no
sch_netem, so iptables' statistic match does it) and prints how many it dropped.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import os
import random
import re
import resource
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import traceback
import uuid as uuidlib
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dhcp import packet as p  # noqa: E402

PYTHON = str(ROOT / ".venv" / "bin" / "python") if (ROOT / ".venv" / "bin" / "python").exists() else sys.executable
SRV, CLI = "bstorm-srv", "bstorm-cli"
SRV_IF, CLI_IF = "bst0", "bst1"
SRV_IP, CLI_IP = "10.79.0.2", "10.79.0.3"
SITE_IP = "10.79.0.1"  # the site DHCP server the nodes' REQUESTs name (not running: the proxy only sees them)
PREFIX = 16
SO_RCVBUFFORCE = 33
API_PORT = 8080
CELLO_TGT_PORT = 78  # tgtd control ports (/var/run/tgtd/socket.N) of this benchmark alone
CLASSIC_TGT_PORT = 79
ADMIN_TOKEN = "boot-storm-admin-token-0123456789"
IQN = "iqn.2026-11.io.cello"
CLASSIC_IQN = "iqn.2026-11.lab.classic"
TEMPLATE = "storm"
VERSION = "v1"
KERNEL_SIZE = 8 << 20
INITRD_SIZE = 6 << 20
ROOT_READ = 32 << 20
ROOT_SIZE = 64 << 20
READ_CHUNK = 512 << 10
BLOCK = 512
BLKSIZE = 1468
LOADERS = {"pxelinux.0": Path("/usr/lib/PXELINUX/pxelinux.0"),
           "ldlinux.c32": Path("/usr/lib/syslinux/modules/bios/ldlinux.c32"),
           "undionly.kpxe": Path("/usr/lib/ipxe/undionly.kpxe")}
PROFILE_NAME = {"pxelinux": "pxelinux-tftp", "ipxe": "ipxe"}  # Cello's built-ins (`compute` boots as `ipxe`)


# ---- node identities ---------------------------------------------------------------------------------


def node_uuid(i: int) -> str:
    return f"5b007570-0000-4000-8000-{i:012x}"


def node_mac(i: int) -> str:
    return f"52:54:02:{(i >> 16) & 0xFF:02x}:{(i >> 8) & 0xFF:02x}:{i & 0xFF:02x}"


def node_ip(i: int) -> str:
    return f"10.79.{1 + i // 250}.{1 + i % 250}"


def pxelinux_uuid(uuid: str) -> str:
    """The text pxelinux puts in pxelinux.cfg/<uuid> (option 97's bytes in wire order)."""
    return str(uuidlib.UUID(bytes=uuidlib.UUID(uuid).bytes_le))


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# ==== the simulated nodes (run inside netns bstorm-cli) ===================================================


class BootFailed(Exception):
    pass


@dataclass
class NodeResult:
    index: int
    ok: bool = False
    error: str = ""
    total: float = 0.0
    steps: dict[str, float] = field(default_factory=dict)
    dhcp_retries: int = 0
    tftp_retries: int = 0  # client retransmissions (RRQ or ACK)
    tftp_dup: int = 0  # duplicate DATA received: the server's retransmissions
    ipxe_retries: int = 0  # failed script commands that a retry loop took up
    iscsi_retries: int = 0
    bytes: int = 0
    requests_4011: int = 0  # boot-server exchanges on :4011 (the ROM's where the offer asks, iPXE's)


class DhcpHub(asyncio.DatagramProtocol):
    """One socket on 0.0.0.0:68 for every node's broadcast exchange; replies matched by xid."""

    def __init__(self) -> None:
        self.waiting: dict[int, asyncio.Future[p.DhcpPacket]] = {}
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        try:
            packet = p.decode(data)
        except p.PacketError:
            return
        fut = self.waiting.get(packet.xid)
        if packet.op == p.BOOTREPLY and fut is not None and not fut.done():
            fut.set_result(packet)

    def send(self, data: bytes, dest: tuple[str, int]) -> None:
        assert self.transport is not None
        self.transport.sendto(data, dest)


def _udp_socket(bind: tuple[str, int], device: str | None = None) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
    if device:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, device.encode())
        # the hub stands in for N NICs: its buffer must not drop the replies N ROMs would each have taken
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 16 << 20)
    sock.bind(bind)
    sock.setblocking(False)
    return sock


class _Waiter(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.queue.put_nowait(data)


DHCP_WAITS = (1.0, 2.0, 4.0, 8.0, 16.0)


class Firmware:
    """The DHCP side of one node: the PXE ROM's exchange, and iPXE's."""

    def __init__(self, hub: DhcpHub, index: int, result: NodeResult) -> None:
        self.hub = hub
        self.index = index
        self.uuid = node_uuid(index)
        self.mac = bytes.fromhex(node_mac(index).replace(":", ""))
        self.ip = node_ip(index)
        self.result = result

    def _packet(self, mtype: int, xid: int, ipxe: bool, extra: list[tuple[int, bytes]],
                ciaddr: str = "0.0.0.0") -> bytes:
        opts: list[tuple[int, bytes]] = [
            (p.OPT_MESSAGE_TYPE, bytes([mtype])),
            (p.OPT_MAX_MESSAGE_SIZE, struct.pack("!H", 1472)),
            (p.OPT_PARAMETER_LIST, bytes([1, 3, 6, 12, 15, 17, 43, 54, 60, 66, 67, 128, 129, 130, 175])),
            (p.OPT_CLIENT_ARCH, b"\x00\x00"),
            (p.OPT_CLIENT_NII, b"\x01\x02\x01"),
            (p.OPT_CLIENT_GUID, b"\x00" + uuidlib.UUID(self.uuid).bytes_le),
            (p.OPT_VENDOR_CLASS, b"PXEClient:Arch:00000:UNDI:002001"),
            *extra,
        ]
        if ipxe:
            opts.append((p.OPT_USER_CLASS, b"iPXE"))  # as iPXE sends it: the bare string
        return p.encode(p.DhcpPacket(op=p.BOOTREQUEST, xid=xid, chaddr=self.mac, flags=p.FLAG_BROADCAST,
                                     ciaddr=ciaddr, options=p.Options.of(opts)), min_size=0)

    async def _exchange(self, send: Callable[[], None], fut_for: Callable[[], Awaitable[p.DhcpPacket]],
                        what: str) -> p.DhcpPacket:
        for n, wait in enumerate(DHCP_WAITS):
            if n:
                self.result.dhcp_retries += 1
            send()
            try:
                async with asyncio.timeout(wait):
                    return await fut_for()
            except TimeoutError:
                continue
        raise BootFailed(f"{what}: no answer after {len(DHCP_WAITS)} tries")

    async def boot_file(self, ipxe: bool) -> tuple[str, str]:
        """(server, boot file) as the ROM (ipxe False) or iPXE (ipxe True) would end up with."""
        xid = random.getrandbits(32)
        loop = asyncio.get_running_loop()
        holder: dict[str, asyncio.Future[p.DhcpPacket]] = {}

        def discover() -> None:
            holder["f"] = self.hub.waiting[xid] = loop.create_future()
            self.hub.send(self._packet(p.DHCPDISCOVER, xid, ipxe, []), ("255.255.255.255", 67))

        try:
            offer = await self._exchange(discover, lambda: holder["f"], "DHCPDISCOVER")
        finally:
            self.hub.waiting.pop(xid, None)
        # the REQUEST for the site server's offer: broadcast, seen by the proxy (no answer from it expected)
        self.hub.send(self._packet(p.DHCPREQUEST, xid, ipxe, [(50, socket.inet_aton(self.ip)),
                                                              (p.OPT_SERVER_ID, socket.inet_aton(SITE_IP))]),
                      ("255.255.255.255", 67))
        server = offer.server_id or offer.siaddr
        pxe = offer.pxe_options
        control = pxe.get(p.PXE_DISCOVERY_CONTROL)
        use_file = bool(control and control[0] & 0x08)
        file = offer.bootfile
        if not ipxe and file and (use_file or not pxe.codes()):
            return (offer.siaddr if offer.siaddr != "0.0.0.0" else server), file
        # boot server discovery on :4011, unicast from the node's address: the ROM asks with the menu's
        # boot item; iPXE first makes its ProxyDHCP REQUEST (no item), then, if that names no file and the
        # offer had a boot menu, the PXE boot-server request with the item (its pxebs)
        menu = pxe.get(p.PXE_BOOT_MENU)
        tries = [False, True] if ipxe else [True]
        reply: p.DhcpPacket | None = None
        for with_item in tries:
            if with_item and ipxe and not menu:
                break
            reply = await self._boot_server(server, xid, ipxe, menu if with_item else None)
            if reply.bootfile:
                break
        file = (reply.bootfile if reply is not None else None) or file
        if not file or reply is None:
            raise BootFailed("no boot file in the offer or the :4011 ACK")
        return (reply.siaddr if reply.siaddr != "0.0.0.0" else server), file

    async def _boot_server(self, server: str, xid: int, ipxe: bool, menu: bytes | None) -> p.DhcpPacket:
        extra: list[tuple[int, bytes]] = []
        if menu is not None:
            item = menu[:2] if len(menu) >= 2 else b"\x80\x00"
            extra.append((p.OPT_VENDOR_SPECIFIC, p.encode_encapsulated(p.Options.of([(p.PXE_BOOT_ITEM,
                                                                                       item + b"\x00\x00")]))))
        self.result.requests_4011 += 1
        loop = asyncio.get_running_loop()
        sock = _udp_socket((self.ip, 68))
        transport, proto = await loop.create_datagram_endpoint(_Waiter, sock=sock)
        try:
            req = self._packet(p.DHCPREQUEST, xid, ipxe, extra, ciaddr=self.ip)

            async def ack() -> p.DhcpPacket:
                while True:
                    data = await proto.queue.get()
                    with contextlib.suppress(p.PacketError):
                        packet = p.decode(data)
                        if packet.xid == xid and packet.op == p.BOOTREPLY:
                            return packet

            return await self._exchange(lambda: transport.sendto(req, (server, 4011)), ack, ":4011 REQUEST")
        finally:
            transport.close()


# ---- TFTP (lock-step, blksize 1468, as the ROM, pxelinux and iPXE fetch) ------------------------------


class TftpError(BootFailed):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"TFTP error {code}: {message}")
        self.code = code


class _TftpTransfer(asyncio.DatagramProtocol):
    RTO0, RTO_MAX, TRIES = 0.25, 8.0, 12  # iPXE: 250 ms at least, doubling (pxelinux starts lower)

    def __init__(self, rrq: bytes, server: tuple[str, int], keep: bool, result: NodeResult) -> None:
        self.rrq = rrq
        self.server = server
        self.peer: tuple[str, int] | None = None
        self.keep = keep
        self.result = result
        self.data = bytearray()
        self.size = 0
        self.block = 0  # last block received
        self.blksize = 512
        self.last = b""
        self.last_rx = time.monotonic()
        self.rto = self.RTO0
        self.tries = 0
        self.transport: asyncio.DatagramTransport | None = None
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)
        self._send(self.rrq, self.server)
        self._arm()

    def _send(self, data: bytes, dest: tuple[str, int]) -> None:
        self.last = data
        assert self.transport is not None
        self.transport.sendto(data, dest)

    def _arm(self) -> None:
        self.timer = asyncio.get_running_loop().call_later(self.rto, self._tick)

    def _tick(self) -> None:
        if self.done.done():
            return
        if time.monotonic() - self.last_rx >= self.rto - 0.01:
            self.tries += 1
            if self.tries >= self.TRIES:
                self.done.set_exception(BootFailed(f"TFTP: no data after {self.tries} tries"))
                return
            self.result.tftp_retries += 1
            self.rto = min(self.RTO_MAX, self.rto * 2)
            self._send(self.last, self.peer or self.server)
        self._arm()

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if self.done.done() or len(data) < 4:
            return
        if self.peer is None:
            self.peer = addr
        elif addr != self.peer:
            return
        op, num = struct.unpack_from("!HH", data)
        if op == 5:
            self.done.set_exception(TftpError(num, data[4:].split(b"\0")[0].decode("latin-1", "replace")))
            return
        if op == 6:  # OACK
            fields = data[2:].split(b"\0")
            opts = {fields[i].decode().lower(): fields[i + 1].decode() for i in range(0, len(fields) - 1, 2)}
            self.blksize = int(opts.get("blksize", 512))
            self._progress()
            self._send(b"\x00\x04\x00\x00", addr)
            return
        if op != 3:
            return
        if num == (self.block + 1) & 0xFFFF:
            self.block = num
            payload = len(data) - 4
            self.size += payload
            if self.keep:
                self.data += data[4:]
            self._progress()
            self._send(b"\x00\x04" + data[2:4], addr)
            if payload < self.blksize:
                self.done.set_result(None)
        else:
            self.result.tftp_dup += 1
            if num == self.block & 0xFFFF:  # our ACK was lost: ACK again
                assert self.transport is not None
                self.transport.sendto(b"\x00\x04" + data[2:4], addr)

    def _progress(self) -> None:
        self.last_rx = time.monotonic()
        self.tries = 0
        self.rto = self.RTO0

    def close(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
        if self.transport is not None:
            self.transport.close()


async def tftp_get(server: str, name: str, local_ip: str, result: NodeResult, keep: bool = False) -> bytes:
    rrq = (b"\x00\x01" + name.encode() + b"\0octet\0blksize\0" + str(BLKSIZE).encode() + b"\0tsize\x000\0")
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    sock.bind((local_ip, 0))
    sock.setblocking(False)
    _transport, proto = await loop.create_datagram_endpoint(
        lambda: _TftpTransfer(rrq, (server, 69), keep, result), sock=sock)
    try:
        await proto.done
    finally:
        proto.close()
    result.bytes += proto.size
    return bytes(proto.data)


# ---- iSCSI through libiscsi (ctypes; the sync API in one thread per node) --------------------------------


class Libiscsi:
    def __init__(self) -> None:
        lib = ctypes.CDLL("libiscsi.so.7")
        vp, cp, ci = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int
        lib.iscsi_create_context.restype = vp
        lib.iscsi_create_context.argtypes = [cp]
        for name, args in (("iscsi_set_targetname", [vp, cp]), ("iscsi_set_session_type", [vp, ci]),
                           ("iscsi_set_header_digest", [vp, ci]), ("iscsi_set_timeout", [vp, ci]),
                           ("iscsi_set_initiator_username_pwd", [vp, cp, cp]),
                           ("iscsi_full_connect_sync", [vp, cp, ci]), ("iscsi_logout_sync", [vp]),
                           ("iscsi_disconnect", [vp]), ("iscsi_destroy_context", [vp])):
            getattr(lib, name).argtypes = args
            getattr(lib, name).restype = ci
        lib.iscsi_get_error.argtypes = [vp]
        lib.iscsi_get_error.restype = cp
        lib.iscsi_read10_sync.argtypes = [vp, ci, ctypes.c_uint32, ctypes.c_uint32, ci, ci, ci, ci, ci, ci]
        lib.iscsi_read10_sync.restype = ctypes.POINTER(ctypes.c_int)  # struct scsi_task *: status first
        lib.scsi_free_scsi_task.argtypes = [ctypes.c_void_p]
        lib.scsi_free_scsi_task.restype = None
        self.lib = lib

    def login_and_read(self, initiator: str, target: str, portal: str, lun: int, user: str | None,
                       secret: str | None, nbytes: int) -> int:
        """Log in, READ(10) the first `nbytes`, log out; the bytes read. Raises BootFailed."""
        lib = self.lib
        ctx = lib.iscsi_create_context(initiator.encode())
        if not ctx:
            raise BootFailed("iscsi_create_context failed")
        try:
            lib.iscsi_set_targetname(ctx, target.encode())
            lib.iscsi_set_session_type(ctx, 2)  # ISCSI_SESSION_NORMAL
            lib.iscsi_set_header_digest(ctx, 0)  # ISCSI_HEADER_DIGEST_NONE
            lib.iscsi_set_timeout(ctx, 30)
            if user and secret:
                lib.iscsi_set_initiator_username_pwd(ctx, user.encode(), secret.encode())
            if lib.iscsi_full_connect_sync(ctx, portal.encode(), lun) != 0:
                raise BootFailed(f"iSCSI login to {target}: {lib.iscsi_get_error(ctx).decode(errors='replace')}")
            done = 0
            while done < nbytes:
                n = min(READ_CHUNK, nbytes - done)
                task = lib.iscsi_read10_sync(ctx, lun, done // BLOCK, n, BLOCK, 0, 0, 0, 0, 0)
                if not task:
                    raise BootFailed(f"READ(10): {lib.iscsi_get_error(ctx).decode(errors='replace')}")
                status = task[0]
                lib.scsi_free_scsi_task(task)
                if status != 0:
                    raise BootFailed(f"READ(10) status {status}")
                done += n
            lib.iscsi_logout_sync(ctx)
            return done
        finally:
            lib.iscsi_disconnect(ctx)
            lib.iscsi_destroy_context(ctx)


@dataclass
class IscsiParams:
    initiator: str
    target: str
    ip: str
    port: int
    lun: int
    user: str | None = None
    secret: str | None = None


def params_from_cmdline(cmdline: str) -> IscsiParams:
    kv = dict(tok.split("=", 1) for tok in cmdline.split() if "=" in tok)
    try:
        net = re.fullmatch(r"iscsi:(?:[^@]*@)?(\[[^\]]+\]|[^:]+):[^:]*:(\d*):(\d*):(.+)", kv.get("netroot", ""))
        lun = int(kv["cello.lun"]) if "cello.lun" in kv else int(net.group(3) or "0") if net else 0
        return IscsiParams(kv["ISCSI_INITIATOR"], kv["ISCSI_TARGET_NAME"], kv["ISCSI_TARGET_IP"],
                           int(kv.get("ISCSI_TARGET_PORT", "3260")), lun, kv.get("ISCSI_USERNAME"),
                           kv.get("ISCSI_PASSWORD"))
    except (KeyError, ValueError, IndexError) as e:
        raise BootFailed(f"kernel command line without the iSCSI root ({e}): {cmdline[:200]}") from None


# ---- HTTP ---------------------------------------------------------------------------------------------


async def http_get(session: Any, url: str, result: NodeResult, keep: bool = False) -> bytes:
    import aiohttp

    try:
        async with session.get(url) as resp:
            if resp.status != 200:
                raise BootFailed(f"HTTP {resp.status} for {url}")
            out = bytearray()
            async for chunk in resp.content.iter_chunked(1 << 16):
                result.bytes += len(chunk)
                if keep:
                    out += chunk
            return bytes(out)
    except (aiohttp.ClientError, OSError, TimeoutError) as e:
        raise BootFailed(f"HTTP {url}: {type(e).__name__} {e}") from None


# ---- one node -------------------------------------------------------------------------------------------


class Node:
    def __init__(self, index: int, hub: DhcpHub, iscsi: Libiscsi, pool: ThreadPoolExecutor) -> None:
        self.i = index
        self.r = NodeResult(index)
        self.fw = Firmware(hub, index, self.r)
        self.ip = node_ip(index)
        self.iscsi = iscsi
        self.pool = pool
        self.t = 0.0

    def step(self, name: str) -> None:
        now = time.monotonic()
        self.r.steps[name] = self.r.steps.get(name, 0.0) + now - self.t
        self.t = now

    async def boot(self, start: float) -> NodeResult:
        self.t = start
        try:
            server, file = await self.fw.boot_file(ipxe=False)
            self.step("dhcp")
            await tftp_get(server, file, self.ip, self.r)
            self.step("loader")
            if file.endswith("pxelinux.0"):
                cmdline = await self.pxelinux(server)
            else:
                cmdline = await self.ipxe()
            await self.kernel(cmdline)
            self.step("root")
            self.r.ok = True
        except BootFailed as e:
            self.r.error = str(e)
        except Exception as e:  # reported per node, the run goes on
            where = traceback.extract_tb(e.__traceback__)[-1]
            self.r.error = f"{type(e).__name__}: {e} (line {where.lineno})"
        self.r.total = time.monotonic() - start
        return self.r

    async def pxelinux(self, server: str) -> str:
        await tftp_get(server, "ldlinux.c32", self.ip, self.r)
        hexip = "".join(f"{int(o):02X}" for o in self.ip.split("."))
        names = [f"pxelinux.cfg/{pxelinux_uuid(self.fw.uuid)}", "pxelinux.cfg/01-" + node_mac(self.i).replace(":", "-"),
                 *(f"pxelinux.cfg/{hexip[:n]}" for n in range(8, 0, -1)), "pxelinux.cfg/default"]
        config = None
        for name in names:
            try:
                config = (await tftp_get(server, name, self.ip, self.r, keep=True)).decode()
                break
            except TftpError as e:
                if e.code != 1:
                    raise
        if config is None:
            raise BootFailed("no pxelinux config found")
        self.step("config")
        kernel = re.search(r"^\s*KERNEL\s+(\S+)", config, re.M | re.I)
        initrd = re.search(r"^\s*INITRD\s+(\S+)", config, re.M | re.I)
        append = re.search(r"^\s*APPEND\s+(.*)$", config, re.M | re.I)
        if not (kernel and initrd and append):
            raise BootFailed(f"pxelinux config without KERNEL/INITRD/APPEND: {config[:200]}")
        await tftp_get(server, kernel.group(1), self.ip, self.r)
        await tftp_get(server, initrd.group(1), self.ip, self.r)
        self.step("kernel+initrd")
        return append.group(1)

    async def ipxe(self) -> str:
        import aiohttp

        server, url = await self.fw.boot_file(ipxe=True)
        self.step("ipxe-dhcp")
        timeout = aiohttp.ClientTimeout(total=120, sock_connect=10, sock_read=30)
        connector = aiohttp.TCPConnector(local_addr=(self.ip, 0), limit=1)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
            interp = Ipxe(self, http, server)
            return await interp.run(url)

    async def kernel(self, cmdline: str) -> None:
        params = params_from_cmdline(cmdline)
        loop = asyncio.get_running_loop()
        for attempt in range(8):
            try:
                self.r.bytes += await loop.run_in_executor(
                    self.pool, self.iscsi.login_and_read, params.initiator, params.target,
                    f"{params.ip}:{params.port}", params.lun, params.user, params.secret, ROOT_READ)
                return
            except BootFailed:
                if attempt == 7:
                    raise
                self.r.iscsi_retries += 1
                await asyncio.sleep(attempt + 1)


class Ipxe:
    """Enough of iPXE's script language for boot scripts: run line by line, with gotos and &&/||."""

    MAX_STEPS = 5000

    def __init__(self, node: Node, http: Any, server: str) -> None:
        self.node = node
        self.http = http
        self.server = server
        self.vars: dict[str, str] = {"uuid": node.fw.uuid, "mac": node_mac(node.i), "net0/mac": node_mac(node.i),
                                     "ip": node.ip, "next-server": server}
        self.cmdline = ""
        self.booted = False
        self.first_fetch = True

    def expand(self, text: str) -> str:
        return re.sub(r"\$\{([^}:]+)(?::[a-z]+)?\}", lambda m: self.vars.get(m.group(1), ""), text)

    async def fetch(self, url: str, keep: bool = False) -> bytes:
        if url.startswith(("http://", "https://")):
            return await http_get(self.http, url, self.node.r, keep)
        return await tftp_get(self.server, url.removeprefix("tftp://" + self.server + "/"), self.node.ip,
                              self.node.r, keep)

    async def run(self, url: str) -> str:
        script = (await self.fetch(url, keep=True)).decode()
        self.node.step("config")
        steps = 0
        while True:
            lines = [ln.strip() for ln in script.splitlines()]
            labels = {ln[1:].split()[0]: n for n, ln in enumerate(lines) if ln.startswith(":") and len(ln) > 1}
            pc = 0
            chained: str | None = None
            while pc < len(lines):
                steps += 1
                if steps > self.MAX_STEPS:
                    raise BootFailed("iPXE script: too many steps")
                line = lines[pc]
                pc += 1
                if not line or line.startswith(("#", ":")):
                    continue
                # "a && b || c": a runs; b if it succeeded; c (maybe empty) if what ran last failed
                parts = re.split(r"\s+(&&|\|\|)\s*|\s*(\|\|)$", line)
                tokens = [t for t in parts if t is not None]
                ok, jump, chained = await self.command(tokens[0])
                i = 1
                while i < len(tokens) - 1 and jump is None:
                    op, cmd = tokens[i], tokens[i + 1]
                    i += 2
                    if (op == "&&" and ok) or (op == "||" and not ok):
                        if cmd.strip():
                            ok, jump, chained = await self.command(cmd)
                        else:
                            ok = True
                if len(tokens) == 2 and tokens[1] == "||":
                    ok = True
                if tokens[-1] == "||" and not ok:
                    ok = True
                if not ok:
                    raise BootFailed(f"iPXE: {self.last_error}")
                if jump is not None:
                    if jump not in labels:
                        raise BootFailed(f"iPXE: no label {jump}")
                    pc = labels[jump] + 1
                if self.booted:
                    return self.cmdline
                if chained is not None:
                    break
            if chained is None:
                raise BootFailed("iPXE script ended without boot")
            script = (await self.fetch(chained, keep=True)).decode()
            self.node.step("config")

    last_error = ""

    async def command(self, text: str) -> tuple[bool, str | None, str | None]:
        """(succeeded, label to jump to, script to chain to)."""
        words = self.expand(text).split()
        if not words:
            return True, None, None
        cmd, args = words[0], words[1:]
        try:
            if cmd == "set":
                self.vars[args[0]] = " ".join(args[1:])
            elif cmd == "inc":
                self.vars[args[0]] = str(int(self.vars.get(args[0], "0") or 0) + 1)
            elif cmd == "iseq":
                pair = [*args, "", ""]
                return pair[0] == pair[1], None, None
            elif cmd == "goto":
                return True, args[0], None
            elif cmd == "echo" or cmd == "dhcp":
                pass
            elif cmd == "sleep":
                await asyncio.sleep(min(float(args[0]), 30))
            elif cmd == "chain":
                return True, None, args[-1]
            elif cmd == "sanhook":
                uri = args[-1]
                m = re.fullmatch(r"iscsi:([^:]+)::(\d*):([0-9a-fA-F]*):(.+)", uri)
                if m is None:
                    raise BootFailed(f"sanhook URI {uri}")
                lun = int(m.group(3) or "0", 16)
                loop = asyncio.get_running_loop()
                self.node.r.bytes += await loop.run_in_executor(
                    self.node.pool, self.node.iscsi.login_and_read, self.vars.get("initiator-iqn", ""),
                    m.group(4), f"{m.group(1)}:{m.group(2) or 3260}", lun, self.vars.get("username"),
                    self.vars.get("password"), 4096)
                self.node.step("sanhook")
            elif cmd == "kernel":
                await self.fetch(args[0])
                self.cmdline = " ".join(args[1:])
            elif cmd == "initrd":
                await self.fetch(args[-1])
                self.node.step("kernel+initrd")
            elif cmd == "boot":
                self.booted = True
            elif cmd == "exit":
                self.last_error = "script exited (gave up)"
                return False, None, None
            else:
                self.last_error = f"unknown command {cmd}"
                return False, None, None
        except BootFailed as e:
            self.last_error = str(e)
            self.node.r.ipxe_retries += 1
            return False, None, None
        return True, None, None


async def client_run(spec: dict[str, Any]) -> dict[str, Any]:
    count, timeout = int(spec["nodes"]), float(spec["node_timeout"])
    loop = asyncio.get_running_loop()
    hub = DhcpHub()
    transport, _ = await loop.create_datagram_endpoint(lambda: hub, sock=_udp_socket(("0.0.0.0", 68), CLI_IF))
    hub.transport = transport
    iscsi = Libiscsi()
    pool = ThreadPoolExecutor(max_workers=count + 4, thread_name_prefix="iscsi")
    nodes = [Node(i, hub, iscsi, pool) for i in range(count)]
    start = time.monotonic()

    async def one(node: Node) -> NodeResult:
        try:
            async with asyncio.timeout(timeout):
                return await node.boot(start)
        except TimeoutError:
            node.r.error = node.r.error or f"not done within {timeout:.0f} s"
            node.r.total = time.monotonic() - start
            return node.r

    results = await asyncio.gather(*(one(n) for n in nodes))
    wall = time.monotonic() - start
    transport.close()
    pool.shutdown(wait=False, cancel_futures=True)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {"wall": wall, "client_cpu": usage.ru_utime + usage.ru_stime, "nodes": [asdict(r) for r in results]}


# ==== the stacks (orchestration in the host namespace; daemons inside netns bstorm-srv) ====================


def run(argv: list[str], timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:8])}: exit {done.returncode}: {done.stderr.strip()[-500:]}")
    return done


def ns(name: str, *argv: str) -> list[str]:
    return ["ip", "netns", "exec", name, *argv]


def kill_netns_processes(name: str) -> None:
    if not Path(f"/run/netns/{name}").exists():
        return
    for pid in run(["ip", "netns", "pids", name], check=False).stdout.split():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)
    deadline = time.monotonic() + 5
    while run(["ip", "netns", "pids", name], check=False).stdout.split() and time.monotonic() < deadline:
        time.sleep(0.1)


def teardown_netns() -> None:
    for name in (SRV, CLI):
        kill_netns_processes(name)
        run(["ip", "netns", "del", name], check=False)
    for port in (CELLO_TGT_PORT, CLASSIC_TGT_PORT):
        for leftover in (f"socket.{port}", f"socket.{port}.lock"):
            with contextlib.suppress(FileNotFoundError):
                Path("/var/run/tgtd", leftover).unlink()


def setup_netns(count: int, work: Path) -> None:
    teardown_netns()
    run(["ip", "netns", "add", SRV])
    run(["ip", "netns", "add", CLI])
    run(["ip", "link", "add", SRV_IF, "netns", SRV, "type", "veth", "peer", "name", CLI_IF, "netns", CLI])
    for name, dev, ip in ((SRV, SRV_IF, SRV_IP), (CLI, CLI_IF, CLI_IP)):
        run(ns(name, "ip", "link", "set", "lo", "up"))
        run(ns(name, "ip", "addr", "add", f"{ip}/{PREFIX}", "dev", dev))
        run(ns(name, "ip", "link", "set", dev, "up"))
    batch = work / "addrs.batch"
    batch.write_text("".join(f"addr add {node_ip(i)}/{PREFIX} dev {CLI_IF}\n" for i in range(count)))
    run(ns(CLI, "ip", "-batch", str(batch)))
    for name in (SRV, CLI):  # room for a storm's bursts
        run(ns(name, "sysctl", "-q", "-w", "net.core.rmem_max=16777216", "net.core.wmem_max=16777216"))


def set_loss(percent: float) -> None:
    """Drop `percent` % of the packets each end of the veth receives. tc netem would be the usual tool;
    this machine's kernel has no sch_netem, so it is iptables' statistic match on INPUT (a drop there
    is silent to the sender, as loss on the wire is)."""
    for name, dev in ((SRV, SRV_IF), (CLI, CLI_IF)):
        run(ns(name, "iptables", "-F", "INPUT"), check=False)
        if percent > 0:
            run(ns(name, "iptables", "-A", "INPUT", "-i", dev, "-m", "statistic", "--mode", "random",
                   "--probability", f"{percent / 100:.4f}", "-j", "DROP"))
            run(ns(name, "iptables", "-A", "INPUT", "-i", dev, "-j", "ACCEPT"))


def udp_drops() -> dict[str, int]:
    """UDP datagrams each namespace dropped for a full socket buffer (/proc/net/snmp RcvbufErrors)."""
    out: dict[str, int] = {}
    for name in (SRV, CLI):
        lines = [ln.split() for ln in run(ns(name, "cat", "/proc/net/snmp"), check=False).stdout.splitlines()
                 if ln.startswith("Udp:")]
        if len(lines) >= 2 and "RcvbufErrors" in lines[0]:
            out[name] = int(lines[1][lines[0].index("RcvbufErrors")])
    return out


def netns_cpu(name: str) -> dict[int, tuple[str, float]]:
    """pid -> (command, CPU seconds so far, user + system, all its threads) of each process in netns
    `name`: what each server daemon spent is read off the kernel, not estimated."""
    hz = os.sysconf("SC_CLK_TCK")
    out: dict[int, tuple[str, float]] = {}
    for pid in run(["ip", "netns", "pids", name], check=False).stdout.split():
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:  # gone meanwhile
            continue
        comm = stat[stat.index("(") + 1:stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2:].split()  # from field 3 (state) on: utime, stime are 14 and 15
        out[int(pid)] = (comm, (int(fields[11]) + int(fields[12])) / hz)
    return out


def cpu_spent(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]) -> dict[str, float]:
    """Command -> CPU seconds between two netns_cpu readings (a process started meanwhile from zero;
    one that ended meanwhile, such as a tgtadm, is not counted)."""
    spent: dict[str, float] = {}
    for pid, (comm, cpu) in after.items():
        was = before.get(pid)
        spent[comm] = spent.get(comm, 0.0) + cpu - (was[1] if was and was[0] == comm else 0.0)
    return {k: round(v, 2) for k, v in sorted(spent.items(), key=lambda kv: -kv[1]) if v >= 0.05}


def loss_counts() -> tuple[int, int]:
    """(dropped, received) packets on both ends since set_loss."""
    dropped = seen = 0
    for name in (SRV, CLI):
        out = run(ns(name, "iptables", "-L", "INPUT", "-v", "-x", "-n"), check=False).stdout
        rules = [ln.split() for ln in out.splitlines()[2:] if ln.strip()]
        for r in rules:
            if r[2] == "DROP":
                dropped += int(r[0])
            seen += int(r[0])
    return dropped, seen


@contextlib.contextmanager
def reflink_xfs(work: Path, size: str) -> Iterator[Path]:
    image, mnt = work / "xfs.img", work / "vol"
    mnt.mkdir()
    run(["truncate", "-s", size, str(image)])
    run(["mkfs.xfs", "-q", "-m", "reflink=1", str(image)])
    run(["mount", "-o", "loop", str(image), str(mnt)])
    try:
        yield mnt
    finally:
        for _ in range(10):
            if run(["umount", str(mnt)], check=False).returncode == 0:
                break
            time.sleep(0.5)


class Daemon:
    def __init__(self, label: str, argv: list[str], log: Path) -> None:
        self.label = label
        out = open(log, "ab")
        self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     cwd=ROOT, start_new_session=True)
        out.close()
        self.log = log

    def check(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.label} exited ({self.proc.returncode}): {self.log.read_text()[-1500:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)


def write_random(path: Path, size: int, seed: int) -> None:
    rnd = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        for _ in range(size // (1 << 20)):
            f.write(rnd.randbytes(1 << 20))


def http_json(method: str, path: str, body: object | None = None, timeout: float = 30) -> tuple[int, Any]:
    """One API call from inside bstorm-srv (a helper process there: the host has no route to it)."""
    code = ("import json,sys,urllib.request,urllib.error\n"
            "m,u,b,t=sys.argv[1:5]\n"
            "r=urllib.request.Request(u,method=m,data=b.encode() if b else None,headers={'Authorization':"
            f"'Bearer {ADMIN_TOKEN}','Content-Type':'application/json'}})\n"
            "try:\n with urllib.request.urlopen(r,timeout=float(t)) as f: s,d=f.status,f.read()\n"
            "except urllib.error.HTTPError as e: s,d=e.code,e.read()\n"
            "print(json.dumps([s,d.decode()]))\n")
    out = run(ns(SRV, PYTHON, "-c", code, method, f"http://{SRV_IP}:{API_PORT}{path}",
                 json.dumps(body) if body is not None else "", str(timeout)), timeout=timeout + 10)
    status, text = json.loads(out.stdout)
    try:
        return int(status), json.loads(text) if text else None
    except ValueError:
        return int(status), text


class CelloStack:
    label = "cello"

    def __init__(self, work: Path, volumes: Path, profile: str, count: int) -> None:
        self.work = work / "cello"
        self.volumes = volumes / "cello"
        self.profile = profile
        self.count = count
        self.daemon: Daemon | None = None
        self.config = self.work / "cello.toml"

    def start(self) -> None:
        self.work.mkdir(parents=True, exist_ok=True)
        self.volumes.mkdir(parents=True, exist_ok=True)
        roots = ", ".join(f'"{d}"' for d in ("/usr/lib/PXELINUX", "/usr/lib/syslinux/modules/bios", "/usr/lib/ipxe"))
        self.config.write_text(
            f'[appliance]\nstate_dir = "{self.work / "state"}"\nadvertise = "{SRV_IP}"\n'
            f'[api]\nlisten = "{SRV_IP}:{API_PORT}"\nadmin_token = "{ADMIN_TOKEN}"\n'
            f'[tftp]\nlisten = "0.0.0.0:69"\nroots = [{roots}]\n'
            f'[dhcp]\nlisten = "0.0.0.0"\ninterface = "{SRV_IF}"\n'
            f'[storage]\nbackend = "file"\npath = "{self.volumes}"\n'
            f'[iscsi]\ndriver = "tgt"\nportals = ["{SRV_IP}:3260"]\ntgt_control_port = {CELLO_TGT_PORT}\n'
            f'[boot]\ndefault_profile = "{PROFILE_NAME[self.profile]}"\n')
        run([PYTHON, __file__, "--seed-cello", str(self.config)], timeout=300)
        self.daemon = Daemon("cello serve", ns(SRV, PYTHON, "-m", "appliance", "serve", "--config", str(self.config)),
                             self.work / "cello.log")
        deadline = time.monotonic() + 60
        while True:
            self.daemon.check()
            with contextlib.suppress(Exception):
                if http_json("GET", "/api/v1/health", timeout=2)[0] == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError("cello serve: no /api/v1/health within 60 s")
            time.sleep(0.5)
        status, body = http_json("POST", "/api/v1/users", {"name": "storm", "max_volumes": 100000,
                                                           "max_data_gb": 100000})
        if status not in (201, 409):
            raise RuntimeError(f"create user: {status} {body}")
        # the creates, 16 at a time, from one helper inside the namespace
        bodies = [{"uuid": node_uuid(i), "template": TEMPLATE, "user": "storm", "profile": PROFILE_NAME[self.profile],
                   "macs": [node_mac(i)], "address": node_ip(i)} for i in range(self.count)]
        (self.work / "creates.json").write_text(json.dumps(bodies))
        run(ns(SRV, PYTHON, __file__, "--create-cello", str(self.work / "creates.json")), timeout=900)
        self.daemon.check()

    def images(self, n: int) -> list[Path]:
        return [self.volumes / f"{TEMPLATE}-OS-{node_uuid(i)}.img" for i in range(n)]

    def stop(self) -> None:
        if self.daemon is not None:
            self.daemon.stop()
            self.daemon = None
        if self.config.exists():
            run(ns(SRV, PYTHON, "-m", "appliance", "teardown", "--config", str(self.config), "--yes"),
                timeout=300, check=False)
        stop_tgtd(CELLO_TGT_PORT)


def seed_cello(config_path: str) -> None:
    """Before `cello serve` starts: the template volume (32 MiB of data) and its version in the store."""
    from appliance.app import Appliance
    from appliance.config import load_config
    from domain.store import TemplateVersion
    from iscsi.exports import NullDriver

    async def main() -> None:
        appliance = Appliance.build(load_config(Path(config_path)), driver=NullDriver("seeding"),
                                    template_builds=False)
        domain = appliance.built
        backend = domain.backend
        await backend.create_template(TEMPLATE, ROOT_SIZE)
        image = Path(backend.path(f"{TEMPLATE}-template"))  # type: ignore[attr-defined]
        await asyncio.to_thread(write_random_into, image, ROOT_READ, 7)
        await backend.snapshot_template(TEMPLATE, VERSION)
        kernel, initrd = f"templates/{TEMPLATE}/{VERSION}/vmlinuz", f"templates/{TEMPLATE}/{VERSION}/initrd.img"
        write_random(appliance.files_root / kernel, KERNEL_SIZE, 1)
        write_random(appliance.files_root / initrd, INITRD_SIZE, 2)
        await domain.store.call(domain.store.sync.add_template_version,
                                TemplateVersion(TEMPLATE, VERSION, "boot-storm", ROOT_SIZE, kernel, initrd,
                                                time.time()))

    asyncio.run(main())


def write_random_into(image: Path, size: int, seed: int) -> None:
    rnd = random.Random(seed)
    with open(image, "r+b") as f:
        for _ in range(size // (1 << 20)):
            f.write(rnd.randbytes(1 << 20))


def create_cello(path: str) -> None:
    """Inside bstorm-srv: POST every server, 16 at a time, then wait until all are available."""
    import aiohttp

    bodies = json.loads(Path(path).read_text())

    async def main() -> None:
        base = f"http://{SRV_IP}:{API_PORT}"
        sem = asyncio.Semaphore(16)
        async with aiohttp.ClientSession(base, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as http:
            async def create(body: dict[str, Any]) -> None:
                async with sem, http.post("/api/v1/servers", json=body) as r:
                    if r.status not in (201, 202):
                        raise RuntimeError(f"POST /api/v1/servers: {r.status} {await r.text()}")

            await asyncio.gather(*(create(b) for b in bodies))
            deadline = time.monotonic() + 600
            while True:
                async with http.get("/api/v1/servers") as r:
                    servers = await r.json()
                states = [s["state"] for s in servers]
                if all(s == "available" for s in states) and len(states) >= len(bodies):
                    return
                if "error" in states:
                    raise RuntimeError(f"a server went to error: {[s for s in servers if s['state'] == 'error'][:1]}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"servers not available after 600 s: {sorted(set(states))}")
                await asyncio.sleep(0.5)

    asyncio.run(main())


def tgtadm(port: int, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return run(["tgtadm", "-C", str(port), "--lld", "iscsi", *args], check=check)


def stop_tgtd(port: int) -> None:
    """tgtd ignores SIGTERM while it has targets: force-delete them, then stop the system."""
    if not Path(f"/var/run/tgtd/socket.{port}").exists():
        return
    show = tgtadm(port, "--op", "show", "--mode", "target", check=False).stdout
    for tid in re.findall(r"^Target (\d+):", show, re.M):
        tgtadm(port, "--op", "delete", "--force", "--mode", "target", "--tid", tid, check=False)
    run(["tgtadm", "-C", str(port), "--op", "delete", "--mode", "system"], check=False)


class ClassicStack:
    """dnsmasq (proxy) + in.tftpd + nginx + tgtd, configured by hand for the same nodes."""

    label = "classic"

    def __init__(self, work: Path, volumes: Path, profile: str, count: int) -> None:
        self.work = work / "classic"
        self.volumes = volumes / "classic"
        self.profile = profile
        self.count = count
        self.daemons: list[Daemon] = []
        self.tftp = self.work / "tftp"

    def start(self) -> None:
        w, t = self.work, self.tftp
        (t / "pxelinux.cfg").mkdir(parents=True, exist_ok=True)
        (t / "nodes").mkdir(exist_ok=True)
        self.volumes.mkdir(parents=True, exist_ok=True)
        for name, src in LOADERS.items():
            shutil.copyfile(src, t / name)
        kernel, initrd = "images/vmlinuz", "images/initrd.img"
        write_random(t / kernel, KERNEL_SIZE, 1)
        write_random(t / initrd, INITRD_SIZE, 2)
        template = self.volumes / "template.img"
        with open(template, "wb") as f:
            f.truncate(ROOT_SIZE)
        write_random_into(template, ROOT_READ, 7)
        secrets: list[str] = []
        for i in range(self.count):
            uuid = node_uuid(i)
            secret = f"s{uuidlib.UUID(int=random.getrandbits(128)).hex[:20]}"
            secrets.append(secret)
            run(["cp", "--reflink=always", str(template), str(self.volumes / f"{uuid}.img")])
            iqn, initiator = f"{CLASSIC_IQN}:{uuid}", f"{CLASSIC_IQN}:node-{uuid}"
            cmdline = (f"console=ttyS0 ISCSI_INITIATOR={initiator} ISCSI_TARGET_NAME={iqn} ISCSI_TARGET_IP={SRV_IP} "
                       f"ISCSI_TARGET_PORT=3260 ISCSI_TARGET_GROUP=1 ISCSI_USERNAME=node{i} ISCSI_PASSWORD={secret} "
                       f"netroot=iscsi:node{i}:{secret}@{SRV_IP}::3260:1:{iqn} rd.iscsi.initiator={initiator}")
            (t / "pxelinux.cfg" / pxelinux_uuid(uuid)).write_text(
                f"DEFAULT linux\nPROMPT 0\nTIMEOUT 0\nLABEL linux\n  KERNEL /{kernel}\n  INITRD /{initrd}\n"
                f"  APPEND {cmdline}\n")
            (t / "nodes" / f"{uuid}.ipxe").write_text(
                f"#!ipxe\nset initiator-iqn {initiator}\nset username node{i}\nset password {secret}\n"
                f"sanhook --drive 0x80 iscsi:{SRV_IP}::3260:1:{iqn}\n"
                f"kernel http://{SRV_IP}/{kernel} {cmdline}\ninitrd http://{SRV_IP}/{initrd}\nboot\n")
        (t / "boot.ipxe").write_text(f"#!ipxe\nchain http://{SRV_IP}/nodes/${{uuid}}.ipxe\n")
        for path in [t, *t.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        # dnsmasq: the proxy; iPXE (user class) is handed the generic script over HTTP
        conf = w / "dnsmasq.conf"
        loader = "pxelinux" if self.profile == "pxelinux" else "undionly.kpxe"  # dnsmasq adds .0 without a dot
        ipxe_lines = ("dhcp-userclass=set:ipxe,iPXE\n"
                      f"pxe-service=tag:ipxe,x86PC,\"iPXE\",http://{SRV_IP}/boot.ipxe,{SRV_IP}\n"
                      f"pxe-service=tag:!ipxe,x86PC,\"boot\",{loader},{SRV_IP}\n") if self.profile == "ipxe" else \
            f"pxe-service=x86PC,\"boot\",{loader},{SRV_IP}\n"
        conf.write_text(f"port=0\nuser=root\ninterface={SRV_IF}\nbind-interfaces\nno-resolv\nno-hosts\n"
                        f"dhcp-range=10.79.0.0,proxy,255.255.0.0\n{ipxe_lines}quiet-dhcp\n"
                        f"log-facility={w / 'dnsmasq.log'}\npid-file={w / 'dnsmasq.pid'}\n")
        self.daemons.append(Daemon("dnsmasq", ns(SRV, "dnsmasq", f"--conf-file={conf}", "--keep-in-foreground"),
                                   w / "dnsmasq.out"))
        self.daemons.append(Daemon("in.tftpd", ns(SRV, "in.tftpd", "--listen", "--foreground", "--user", "root",
                                                  "--address", f"{SRV_IP}:69", "--blocksize", str(BLKSIZE),
                                                  "--secure", str(t)), w / "tftpd.out"))
        nginx = w / "nginx.conf"
        nginx.write_text(
            "worker_processes auto;\n"
            f"pid {w}/nginx.pid;\nerror_log {w}/nginx-error.log;\n"
            "events { worker_connections 4096; }\n"
            "http {\n  access_log off;\n  sendfile on;\n  tcp_nopush on;\n  default_type application/octet-stream;\n"
            f"  client_body_temp_path {w}/nginx-tmp;\n"
            f"  server {{ listen {SRV_IP}:80; root {t}; }}\n}}\n")
        (w / "nginx-tmp").mkdir(exist_ok=True)
        self.daemons.append(Daemon("nginx", ns(SRV, "nginx", "-c", str(nginx), "-g", "daemon off;"),
                                   w / "nginx.out"))
        self.daemons.append(Daemon("tgtd", ns(SRV, "tgtd", "-f", "-C", str(CLASSIC_TGT_PORT), "--iscsi",
                                              f"portal={SRV_IP}:3260"), w / "tgtd.out"))
        deadline = time.monotonic() + 20
        while tgtadm(CLASSIC_TGT_PORT, "--op", "show", "--mode", "target", check=False).returncode != 0:
            if time.monotonic() > deadline:
                raise RuntimeError("tgtd: no control socket after 20 s")
            time.sleep(0.2)
        a = ("--op",)
        for i in range(self.count):
            uuid, tid = node_uuid(i), str(i + 1)
            tgtadm(CLASSIC_TGT_PORT, *a, "new", "--mode", "target", "--tid", tid, "-T", f"{CLASSIC_IQN}:{uuid}")
            tgtadm(CLASSIC_TGT_PORT, *a, "new", "--mode", "logicalunit", "--tid", tid, "--lun", "1",
                   "-b", str(self.volumes / f"{uuid}.img"))
            tgtadm(CLASSIC_TGT_PORT, *a, "bind", "--mode", "target", "--tid", tid, "-Q", f"{CLASSIC_IQN}:node-{uuid}")
            tgtadm(CLASSIC_TGT_PORT, *a, "new", "--mode", "account", "--user", f"node{i}", "--password", secrets[i])
            tgtadm(CLASSIC_TGT_PORT, *a, "bind", "--mode", "account", "--tid", tid, "--user", f"node{i}")
        time.sleep(0.5)
        for d in self.daemons:
            d.check()

    def images(self, n: int) -> list[Path]:
        return [self.volumes / f"{node_uuid(i)}.img" for i in range(n)]

    def stop(self) -> None:
        stop_tgtd(CLASSIC_TGT_PORT)
        for d in reversed(self.daemons):
            d.stop()
        self.daemons = []


# ---- runs and figures -----------------------------------------------------------------------------------


def warm(images: list[Path]) -> float:
    """Read the first ROOT_READ bytes of each root image, so that every run starts with the roots in the
    page cache (as after an earlier boot): the iSCSI step then measures tgtd and the network, not the
    disk, and a run does not find what the one before it left. Seconds it took."""
    t0 = time.monotonic()
    for image in images:
        with open(image, "rb") as f:
            left = ROOT_READ
            while left > 0 and (chunk := f.read(min(left, 4 << 20))):
                left -= len(chunk)
    return time.monotonic() - t0


def storm(count: int, node_timeout: float) -> dict[str, Any]:
    spec = json.dumps({"nodes": count, "node_timeout": node_timeout})
    out = run(ns(CLI, PYTHON, __file__, "--client", spec), timeout=node_timeout + 120)
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


@dataclass
class Summary:
    label: str
    nodes: int
    done: int
    p50: float
    p99: float
    last: float
    steps: dict[str, float]
    retries: dict[str, int]
    errors: list[str]
    dropped: tuple[int, int] = (0, 0)  # packets dropped by the loss rule, of those received
    client_cpu: float = 0.0  # the simulated nodes' process: CPU seconds per wall second
    client_cpu_s: float = 0.0  # the same, CPU seconds in all
    server_cpu: dict[str, float] = field(default_factory=dict)  # CPU seconds of each server command
    buffer_drops: tuple[int, int] = (0, 0)  # UDP datagrams dropped at a full socket buffer: servers, clients

    @classmethod
    def of(cls, label: str, res: dict[str, Any]) -> Summary:
        nodes = res["nodes"]
        ok = [n for n in nodes if n["ok"]]
        totals = [n["total"] for n in ok]
        steps: dict[str, float] = {}
        for name in ("dhcp", "loader", "ipxe-dhcp", "config", "sanhook", "kernel+initrd", "root"):
            vals = [n["steps"][name] for n in ok if name in n["steps"]]
            if vals:
                steps[name] = statistics.median(vals)
        retries = {k: sum(int(n[k]) for n in nodes) for k in ("dhcp_retries", "tftp_retries", "tftp_dup",
                                                              "ipxe_retries", "iscsi_retries")}
        errors = sorted({n["error"] for n in nodes if not n["ok"]})
        return cls(label, len(nodes), len(ok), pct(totals, 0.5), pct(totals, 0.99),
                   max(totals) if len(ok) == len(nodes) and ok else float("inf"), steps, retries, errors,
                   client_cpu=float(res.get("client_cpu", 0.0)) / max(float(res["wall"]), 1e-9),
                   client_cpu_s=float(res.get("client_cpu", 0.0)))

    def floor(self) -> float:
        """Seconds this storm needs at least on this machine for any boot server: the CPU time of tgtd
        (the iSCSI target, the same daemon in both stacks) and of the nodes' process, spread perfectly
        over every CPU."""
        return (self.server_cpu.get("tgtd", 0.0) + self.client_cpu_s) / (os.cpu_count() or 1)

    def line(self) -> str:
        steps = " ".join(f"{k} {v:.2f}" for k, v in self.steps.items())
        retries = " ".join(f"{k.replace('_retries', '')} {v}" for k, v in self.retries.items() if v)
        last = f"{self.last:.1f} s" if self.last != float("inf") else "never (nodes failed)"
        out = (f"  {self.label:8} done {self.done}/{self.nodes}  per node p50 {self.p50:.2f} s  p99 {self.p99:.2f} s"
               f"  last node done {last}  (the clients' process used {self.client_cpu:.0%} of a core)\n"
               f"           step p50 (s): {steps}\n"
               f"           retries: {retries or 'none'}")
        if self.server_cpu:
            used = ", ".join(f"{k} {v:.1f}" for k, v in self.server_cpu.items())
            out += (f"\n           CPU seconds: servers {used}; the nodes' process {self.client_cpu_s:.1f}"
                    f" (tgtd + nodes alone: {self.floor():.1f} s of wall time at least on {os.cpu_count()} CPUs)")
        if any(self.buffer_drops):
            out += (f"\n           UDP datagrams dropped at a full socket buffer: {self.buffer_drops[0]} on the"
                    f" servers' side, {self.buffer_drops[1]} on the nodes' side")
        if self.dropped[1]:
            out += (f"\n           loss rule dropped {self.dropped[0]} of {self.dropped[1]} packets received"
                    f" ({self.dropped[0] / self.dropped[1]:.2%})")
        for e in self.errors[:3]:
            out += f"\n           failed: {e[:160]}"
        return out


def ratio(a: float, b: float) -> str:
    if not (a == a and b == b) or b in (0.0, float("inf")) or a == float("inf"):
        return "-"
    return f"{a / b:.2f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="16 nodes, both profiles, no loss run")
    ap.add_argument("--nodes", default=None, help="comma-separated node counts (default 64,256)")
    ap.add_argument("--profiles", default="ipxe,pxelinux", help="ipxe and/or pxelinux")
    ap.add_argument("--loss-nodes", type=int, default=None, help="nodes in the 1 %% loss run (0: none)")
    ap.add_argument("--node-timeout", type=float, default=None, help="seconds a node may take (default 300)")
    ap.add_argument("--client", help=argparse.SUPPRESS)
    ap.add_argument("--seed-cello", help=argparse.SUPPRESS)
    ap.add_argument("--create-cello", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.client:
        print(json.dumps(asyncio.run(client_run(json.loads(args.client)))))
        return 0
    if args.seed_cello:
        seed_cello(args.seed_cello)
        return 0
    if args.create_cello:
        create_cello(args.create_cello)
        return 0
    if os.geteuid() != 0:
        print("needs root (network namespaces, tgtd, a loop mount)", file=sys.stderr)
        return 2
    missing = [t for t in ("dnsmasq", "in.tftpd", "nginx", "tgtd", "tgtadm", "iptables", "mkfs.xfs")
               if shutil.which(t, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin") is None]
    if missing:
        print(f"not installed: {', '.join(missing)}", file=sys.stderr)
        return 2
    counts = [int(c) for c in (args.nodes or ("16" if args.quick else "64,256")).split(",")]
    profiles = [x for x in args.profiles.split(",") if x]
    loss_nodes = args.loss_nodes if args.loss_nodes is not None else (0 if args.quick else min(64, max(counts)))
    node_timeout = args.node_timeout or (120.0 if args.quick else 300.0)
    most = max([*counts, loss_nodes])
    results: dict[tuple[str, int, float, str], Summary] = {}
    print(f"boot storm: nodes {counts}, profiles {profiles}, loss run {loss_nodes or 'none'}; "
          f"kernel {KERNEL_SIZE >> 20} MiB + initrd {INITRD_SIZE >> 20} MiB, root read {ROOT_READ >> 20} MiB; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs", flush=True)
    with tempfile.TemporaryDirectory(prefix="boot-storm-") as tmp:
        work = Path(tmp)
        work.chmod(0o755)
        stacks: list[CelloStack | ClassicStack] = []
        try:
            setup_netns(most, work)
            size = f"{max(2, (most * 2 * 40) // 1024 + 2)}G"
            with reflink_xfs(work, size) as volumes:
                for pi, profile in enumerate(profiles):
                    order: list[type[CelloStack] | type[ClassicStack]] = [CelloStack, ClassicStack]
                    if pi % 2:
                        order.reverse()
                    for kind in order:
                        stack = kind(work / profile, volumes / profile, profile, most)
                        stacks.append(stack)
                        t0 = time.monotonic()
                        stack.start()
                        print(f"[{profile}] {stack.label}: {most} nodes configured in {time.monotonic() - t0:.1f} s",
                              flush=True)
                        try:
                            cells = [(n, 0.0) for n in counts] + ([(loss_nodes, 1.0)] if loss_nodes else [])
                            for n, loss in cells:
                                warm(stack.images(n))
                                set_loss(loss)
                                drops0 = udp_drops()
                                cpu0 = netns_cpu(SRV)
                                try:
                                    s = Summary.of(stack.label, storm(n, node_timeout * (2 if loss else 1)))
                                    s.server_cpu = cpu_spent(cpu0, netns_cpu(SRV))
                                    drops1 = udp_drops()
                                    s.buffer_drops = (drops1.get(SRV, 0) - drops0.get(SRV, 0),
                                                      drops1.get(CLI, 0) - drops0.get(CLI, 0))
                                    if loss:
                                        s.dropped = loss_counts()
                                finally:
                                    set_loss(0)
                                results[(profile, n, loss, stack.label)] = s
                                print(f"[{profile}] {n} nodes, loss {loss:.0f} %:\n{s.line()}", flush=True)
                        finally:
                            stack.stop()
                            stacks.remove(stack)
        finally:
            for stack in stacks:
                with contextlib.suppress(Exception):
                    stack.stop()
            teardown_netns()
    print(f"\nresult (load average now {os.getloadavg()[0]:.1f}); ratios Cello/classic, < 1: Cello faster")
    for (profile, n, loss, label), s in sorted(results.items()):
        if label != "cello":
            continue
        c = results.get((profile, n, loss, "classic"))
        if c is None:
            continue
        print(f"  {profile:8} {n:4d} nodes loss {loss:.0f} %: done {s.done}/{n} vs {c.done}/{n};"
              f" p50 {s.p50:.2f} vs {c.p50:.2f} s (x{ratio(s.p50, c.p50)}); p99 {s.p99:.2f} vs {c.p99:.2f} s"
              f" (x{ratio(s.p99, c.p99)}); last node {s.last:.1f} vs {c.last:.1f} s (x{ratio(s.last, c.last)});"
              f" retransmissions {sum(s.retries.values())} vs {sum(c.retries.values())}")
        if n == 256 and loss == 0:
            target = s.last <= 0.5 * c.last
            print(f"    target (256 nodes: last node <= 0.5x classic): {'met' if target else 'NOT met'}")
            if not target and c.server_cpu:
                print(f"    the target asks for {0.5 * c.last:.1f} s; tgtd and the nodes' process alone need"
                      f" {s.floor():.1f} s of this machine's {os.cpu_count()} CPUs (classic: {c.floor():.1f} s)"
                      f" — {'below' if s.floor() < 0.5 * c.last else 'above'} it with any boot server")
        if loss > 0:
            print(f"    target (every node done in the loss run): {'met' if s.done == n else 'NOT met'}")
        if profile == "ipxe" and (x := results.get(("pxelinux", n, loss, "classic"))) is not None:
            print(f"    Cello on iPXE (HTTP) vs the classic stack on pxelinux (all TFTP): last node {s.last:.1f} vs"
                  f" {x.last:.1f} s (x{ratio(s.last, x.last)}), p99 x{ratio(s.p99, x.p99)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
