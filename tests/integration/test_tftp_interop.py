"""The TFTP server on loopback against real clients: tftp-hpa, atftp, curl, tftpy (and raw sockets)."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import os
import random
import shutil
import socket
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from bootfiles import tftp_packet as tp
from bootfiles import tftp_server
from bootfiles.render import BUILTIN_PROFILES
from bootfiles.spec import BootSpec, IscsiRoot
from bootfiles.tftp_server import TftpServer
from bootfiles.tftp_transfer import ReceiveTransfer
from bootfiles.tree import BootTree

UUID = "3f1c0000-0000-4000-8000-000000000001"
MAC = "52:54:00:77:00:10"
# Every test that does not look into one engine's insides runs on both: the native pump (`make setup`
# builds it; "native", not "auto", so that a missing library fails instead of testing Python twice) and
# the Python engine.
ENGINES = ["native", "python"]


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.fail(f"{tool} is not installed (Debian package tftp-hpa / atftp / curl)")
    return path


def spec(lun: int = 1, kernel: str = "templates/tiny/v1/vmlinuz") -> BootSpec:
    return BootSpec(
        server_uuid=UUID,
        profile=BUILTIN_PROFILES["compute"],
        kernel=kernel,
        initrd="templates/tiny/v1/initrd.img",
        root=IscsiRoot(f"iqn.2026-11.io.cello:{UUID}", "10.77.0.2", 3260, lun, f"iqn.2026-11.io.cello:node-{UUID}"),
        http_base="http://10.77.0.2:8080",
    )


class Store:
    def __init__(self) -> None:
        self.specs: dict[str, BootSpec] = {UUID: spec()}
        self.node_address = "127.0.0.1"  # where the node's DHCP came from: the clients here

    def boot_spec(self, *, uuid: str | None, mac: str | None) -> BootSpec | None:
        if uuid in self.specs:
            return self.specs[uuid]
        if mac == MAC:
            return self.specs.get(UUID)
        return None

    def client_seen(self, *, mac: str, uuid: str | None, address: str) -> None:
        raise AssertionError("no DHCP here")

    def may_fetch(self, spec: BootSpec, address: str) -> bool:
        return spec.root is None or address == self.node_address


@dataclass
class Env:
    server: TftpServer
    root: Path
    store: Store
    events: list[Mapping[str, object]]
    switch: dict[str, bool] = field(default_factory=lambda: {"on": True})

    @property
    def port(self) -> int:
        return self.server.address[1]


def blob(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def make_env(tmp_path: Path, host: str = "127.0.0.1", **server_kw: object) -> Env:
    files = tmp_path / "files"
    (files / "templates/tiny/v1").mkdir(parents=True)
    (files / "templates/tiny/v1/vmlinuz").write_bytes(blob(300_000, 1))
    loaders = tmp_path / "loaders"
    loaders.mkdir()
    (loaders / "pxelinux.0").write_bytes(blob(42_430, 2))
    (loaders / "rollover.bin").write_bytes(blob(70_000 * 8 + 5, 3))
    (loaders / "notes.txt").write_bytes(b"line one\nline two\r\nbare\rcr\n")
    (tmp_path / "secret").mkdir()
    (tmp_path / "secret/passwd").write_bytes(b"root:x:0:0:SECRET")
    os.symlink(tmp_path / "secret/passwd", loaders / "escape")
    store = Store()
    events: list[Mapping[str, object]] = []
    env_switch = {"on": True}

    def sink(kind: str, fields: Mapping[str, object]) -> None:
        assert kind == "tftp"
        events.append(fields)

    tree = BootTree([loaders], files, store, cache_bytes=64 << 20, max_entry_bytes=200_000)
    kw: dict[str, object] = {"events": sink, "enabled": lambda: env_switch["on"], "timeout": 0.5}
    kw.update(server_kw)
    server = TftpServer(host, 0, tree, **kw)  # type: ignore[arg-type]
    return Env(server, loaders, store, events, env_switch)


@pytest.fixture(params=ENGINES)
async def env(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Env]:
    e = make_env(tmp_path, engine=request.param)
    await e.server.start()
    assert e.server.engine_in_use == request.param
    try:
        yield e
    finally:
        await e.server.stop()


@pytest.fixture
async def py_env(tmp_path: Path) -> AsyncIterator[Env]:
    """The Python engine, for the tests of its sockets and poller."""
    e = make_env(tmp_path, engine="python")
    await e.server.start()
    try:
        yield e
    finally:
        await e.server.stop()


async def run(*argv: str, limit: float = 60.0, stdin: bytes | None = None) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(stdin), limit)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace")


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def wait_events(env: Env, n: int) -> None:
    for _ in range(200):
        if len(env.events) >= n:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"expected {n} events, got {env.events}")


# --- real clients -------------------------------------------------------------------------------


async def test_tftp_hpa_binary_and_netascii(env: Env, tmp_path: Path) -> None:
    tftp = need("tftp")
    out = tmp_path / "pxe.out"
    code, text = await run(tftp, "-m", "binary", "127.0.0.1", str(env.port), "-c", "get", "pxelinux.0", str(out))
    assert code == 0, text
    assert sha(out.read_bytes()) == sha((env.root / "pxelinux.0").read_bytes())
    # tftp-hpa's default mode is netascii: the server converts, the client converts back.
    txt = tmp_path / "notes.out"
    code, text = await run(tftp, "127.0.0.1", str(env.port), "-c", "get", "notes.txt", str(txt))
    assert code == 0, text
    assert txt.read_bytes() == (env.root / "notes.txt").read_bytes()
    await wait_events(env, 2)
    assert [e["outcome"] for e in env.events] == ["ok", "ok"]


async def test_atftp_blksize_tsize(env: Env, tmp_path: Path) -> None:
    atftp = need("atftp")
    out = tmp_path / "k.out"
    argv = [atftp, "--option", "blksize 1468", "--option", "tsize 0", "-g", "-r", "/templates/tiny/v1/vmlinuz"]
    code, text = await run(*argv, "-l", str(out), "127.0.0.1", str(env.port))
    assert code == 0, text
    assert "blksize = 1468" in text or out.exists()
    assert sha(out.read_bytes()) == sha(blob(300_000, 1))


async def test_curl(env: Env, tmp_path: Path) -> None:
    curl = need("curl")
    for extra in ([], ["--tftp-blksize", "1468"]):
        out = tmp_path / "c.out"
        url = f"tftp://127.0.0.1:{env.port}/templates/tiny/v1/vmlinuz"
        code, text = await run(curl, "-sS", *extra, "-o", str(out), url)
        assert code == 0, text
        assert sha(out.read_bytes()) == sha(blob(300_000, 1))


async def test_tftpy_client(env: Env, tmp_path: Path) -> None:
    import tftpy

    out = tmp_path / "py.out"

    def fetch() -> None:
        client = tftpy.TftpClient("127.0.0.1", env.port, options={"blksize": 1468, "tsize": 0})
        client.download("pxelinux.0", str(out), timeout=2)

    await asyncio.to_thread(fetch)
    assert sha(out.read_bytes()) == sha((env.root / "pxelinux.0").read_bytes())


async def test_rollover_with_atftp(env: Env, tmp_path: Path) -> None:
    """70001 blocks of 8 bytes: the block counter wraps past 65535 and the file arrives intact."""
    atftp = need("atftp")
    out = tmp_path / "r.out"
    argv = [atftp, "--option", "blksize 8", "-g", "-r", "rollover.bin", "-l", str(out), "127.0.0.1", str(env.port)]
    code, text = await run(*argv, limit=80)
    assert code == 0, text
    assert sha(out.read_bytes()) == sha((env.root / "rollover.bin").read_bytes())


async def test_large_windowed_file_over_udp(env: Env, tmp_path: Path) -> None:
    """> 65535 blocks at blksize 1468 with windowsize 64, through the server's real sockets."""
    big = env.root / "big.img"
    size = 66_000 * 1468 + 77
    with big.open("wb") as f:
        f.truncate(size)
        f.seek(12345)
        f.write(b"middle")
        f.seek(size - 5)
        f.write(b"tail!")
    got = await fetch_windowed(env.port, "big.img", {"blksize": "1468", "windowsize": "64", "tsize": "0"})
    assert got.tsize == size
    assert sha(bytes(got.data)) == sha(big.read_bytes())


async def fetch_windowed(port: int, name: str, options: dict[str, str]) -> ReceiveTransfer:
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    client = ReceiveTransfer(name, loop.time(), options=options, timeout=0.5)

    class Proto(asyncio.DatagramProtocol):
        peer: tuple[str, int] = ("127.0.0.1", port)
        transport: asyncio.DatagramTransport

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport  # type: ignore[assignment]
            self.flush()

        def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
            self.peer = addr
            client.receive(data, loop.time())
            self.flush()

        def flush(self) -> None:
            for d in client.datagrams_to_send():
                self.transport.sendto(d, self.peer)
            if client.done and not done.done():
                done.set_result(None)

    transport, proto = await loop.create_datagram_endpoint(Proto, local_addr=("127.0.0.1", 0))
    try:
        while not done.done():
            await asyncio.wait([done], timeout=0.1)
            client.on_timeout(loop.time())
            proto.flush()
    finally:
        transport.close()
    assert client.outcome == "ok", client.error
    return client


# --- raw packets: exact codes ---------------------------------------------------------------------


class Raw:
    def __init__(self, port: int) -> None:
        self.port = port
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(2.0)

    def rrq(self, name: bytes, mode: bytes = b"octet", options: bytes = b"") -> None:
        self.sock.sendto(b"\x00\x01" + name + b"\x00" + mode + b"\x00" + options, ("127.0.0.1", self.port))

    def recv(self, timeout: float = 2.0) -> tuple[tp.Packet, tuple[str, int]]:
        self.sock.settimeout(timeout)
        data, addr = self.sock.recvfrom(70000)
        return tp.decode(data), addr

    def close(self) -> None:
        self.sock.close()


async def in_thread(fn: Callable[[], object]) -> object:
    return await asyncio.to_thread(fn)


TRAVERSALS = [
    (b"../secret/passwd", 2),
    (b"templates/../../secret/passwd", 2),
    (b"..\\secret\\passwd", 2),
    (b"/etc/passwd", 1),
    (b"//etc/passwd", 2),
    (b"escape", 2),
    (b"a" * 300, 2),
    (b".hidden", 2),
    ("pxe\u00e9".encode("latin-1"), 0),  # non-ASCII name: not a TFTP request at all → no answer
]


@pytest.mark.parametrize(("name", "code"), TRAVERSALS)
async def test_traversal_refused(env: Env, name: bytes, code: int) -> None:
    raw = Raw(env.port)
    try:
        raw.rrq(name)
        if code == 0:
            with pytest.raises(TimeoutError):
                await in_thread(lambda: raw.recv(0.5))
            return
        packet, _ = await in_thread(raw.recv)  # type: ignore[misc]
        assert packet == tp.Error(code, {1: "not found", 2: "refused"}[code])
    finally:
        raw.close()


async def test_traversal_with_curl_and_tftpy(env: Env, tmp_path: Path) -> None:
    import tftpy

    curl = need("curl")
    out = tmp_path / "leak"
    for name in ("../secret/passwd", "escape", "%2e%2e/secret/passwd", "/etc/passwd"):
        code, _ = await run(curl, "-sS", "-o", str(out), f"tftp://127.0.0.1:{env.port}/{name}")
        assert code in (68, 69), name  # CURLE_TFTP_NOTFOUND / CURLE_TFTP_PERM
        assert not out.exists() or b"SECRET" not in out.read_bytes()

    def fetch() -> None:
        tftpy.TftpClient("127.0.0.1", env.port).download("../secret/passwd", str(out), timeout=1)

    with pytest.raises(tftpy.TftpException):
        await asyncio.to_thread(fetch)
    assert not out.exists() or b"SECRET" not in out.read_bytes()


async def test_write_request_refused(env: Env, tmp_path: Path) -> None:
    raw = Raw(env.port)
    try:
        raw.sock.sendto(b"\x00\x02new.bin\x00octet\x00", ("127.0.0.1", env.port))
        packet, _ = await in_thread(raw.recv)  # type: ignore[misc]
        assert isinstance(packet, tp.Error) and packet.code == 2
    finally:
        raw.close()
    local = tmp_path / "up.bin"
    local.write_bytes(b"upload")
    await run(need("tftp"), "-m", "binary", "127.0.0.1", str(env.port), "-c", "put", str(local), "up.bin", limit=20)
    assert not (env.root / "up.bin").exists()
    await wait_events(env, 2)
    assert [e["outcome"] for e in env.events] == ["refused-write", "refused-write"]


async def test_mail_mode_refused(env: Env) -> None:
    raw = Raw(env.port)
    try:
        raw.rrq(b"pxelinux.0", b"mail")
        packet, _ = await in_thread(raw.recv)  # type: ignore[misc]
        assert isinstance(packet, tp.Error) and packet.code == 4
    finally:
        raw.close()


async def test_uefi_tsize_probe_then_fetch(env: Env) -> None:
    raw = Raw(env.port)
    try:
        raw.rrq(b"pxelinux.0", options=b"tsize\x000\x00blksize\x001468\x00")
        packet, addr = await in_thread(raw.recv)  # type: ignore[misc]
        assert packet == tp.OptionAck({"blksize": "1468", "tsize": "42430"})
        raw.sock.sendto(tp.encode(tp.Error(8, "User aborted the transfer")), addr)
        await wait_events(env, 1)
        got = await fetch_windowed(env.port, "pxelinux.0", {"blksize": "1468", "tsize": "0"})
        assert bytes(got.data) == (env.root / "pxelinux.0").read_bytes()
    finally:
        raw.close()
    await wait_events(env, 2)
    assert [e["outcome"] for e in env.events] == ["tsize-probe", "ok"]


async def retransmits_and_refuses_a_stranger(raw: Raw, stranger: Raw) -> tuple[tp.Data, tuple[str, int]]:
    """RRQ, no ACK: block 1 comes again after the (0.5 s) timeout; a packet from another port gets error 5
    and does not disturb the transfer, which goes on to block 2 once ACKed. Returns block 2 and its port."""
    raw.rrq(b"pxelinux.0")
    first, addr = await in_thread(raw.recv)  # type: ignore[misc]
    assert isinstance(first, tp.Data) and first.block == 1
    again, addr2 = await in_thread(raw.recv)  # type: ignore[misc]
    assert again == first and addr2 == addr
    stranger.sock.sendto(tp.encode_ack(1), addr)
    err, _ = await in_thread(stranger.recv)  # type: ignore[misc]
    assert isinstance(err, tp.Error) and err.code == 5
    raw.sock.sendto(tp.encode_ack(1), addr)
    nxt, _ = await in_thread(raw.recv)  # type: ignore[misc]
    assert isinstance(nxt, tp.Data) and nxt.block == 2
    return nxt, addr


async def test_retransmission_and_wrong_tid(env: Env) -> None:
    raw, stranger = Raw(env.port), Raw(env.port)
    try:
        nxt, addr = await retransmits_and_refuses_a_stranger(raw, stranger)
        # A retransmitted RRQ does not start a second transfer.
        raw.rrq(b"pxelinux.0")
        with pytest.raises(TimeoutError):
            while True:  # only retransmissions of block 2 from the same port may arrive
                pkt, a = await in_thread(lambda: raw.recv(0.3))  # type: ignore[misc]
                assert a == addr and pkt == nxt
    finally:
        raw.close()
        stranger.close()


@pytest.mark.parametrize(("use_epoll", "twin"), [(True, True), (False, True), (True, False), (False, False)])
async def test_every_socket_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, use_epoll: bool, twin: bool) -> None:
    """Each way a transfer can hold its port: behind the server's epoll or as a reader on the loop (no
    epoll: FreeBSD), with or without the connected twin socket (no SO_REUSEPORT, no descriptor to spare).
    Each serves a windowed fetch, retransmits, and answers a stranger with error 5."""
    monkeypatch.setattr(TftpServer, "_use_epoll", use_epoll)
    monkeypatch.setattr(tftp_server, "_TWIN_AFTER_BLOCKS", 1)  # the twin after the first ACKed block
    if not twin:
        monkeypatch.setattr(tftp_server, "_connected_twin", lambda sock, peer: None)
    e = make_env(tmp_path, engine="python")
    await e.server.start()
    raw, stranger = Raw(e.port), Raw(e.port)
    try:
        got = await fetch_windowed(e.port, "pxelinux.0", {"blksize": "1468", "windowsize": "8"})
        assert bytes(got.data) == (e.root / "pxelinux.0").read_bytes()
        # the transfer is still running here, so its sockets can be looked at
        await retransmits_and_refuses_a_stranger(raw, stranger)
        assert [c.twin is not None for c in e.server._transfers] == [twin]
    finally:
        raw.close()
        stranger.close()
        await e.server.stop()


async def test_disabled_gives_no_answer(env: Env) -> None:
    env.switch["on"] = False
    raw = Raw(env.port)
    try:
        raw.rrq(b"pxelinux.0")
        with pytest.raises(TimeoutError):
            await in_thread(lambda: raw.recv(0.5))
        env.switch["on"] = True
        raw.rrq(b"pxelinux.0")
        packet, _ = await in_thread(raw.recv)  # type: ignore[misc]
        assert isinstance(packet, tp.Data)
    finally:
        raw.close()
    assert env.events[0]["outcome"] == "disabled"


@pytest.mark.parametrize("engine", ENGINES)
async def test_concurrent_transfer_bound(tmp_path: Path, engine: str) -> None:
    e = make_env(tmp_path, max_transfers=1, engine=engine)
    await e.server.start()
    a, b = Raw(e.port), Raw(e.port)
    try:
        a.rrq(b"pxelinux.0")
        first, _ = await in_thread(a.recv)  # type: ignore[misc]
        assert isinstance(first, tp.Data)
        b.rrq(b"pxelinux.0")
        with pytest.raises(TimeoutError):
            await in_thread(lambda: b.recv(0.3))
        assert e.server.active_transfers == 1
    finally:
        a.close()
        b.close()
        await e.server.stop()
    assert any(ev["outcome"] == "busy" for ev in e.events)


async def test_per_node_config_follows_the_store(env: Env, tmp_path: Path) -> None:
    curl = need("curl")
    out = tmp_path / "cfg"
    for name in (f"pxelinux.cfg/{UUID}", "pxelinux.cfg/01-52-54-00-77-00-10", f"{UUID}/pxelinux.cfg/default"):
        code, text = await run(curl, "-sS", "-o", str(out), f"tftp://127.0.0.1:{env.port}/{name}")
        assert code == 0, text
        assert b"cello.lun=1" in out.read_bytes() and b"KERNEL /templates/tiny/v1/vmlinuz" in out.read_bytes()
    env.store.specs[UUID] = spec(lun=2, kernel="templates/tiny/v2/vmlinuz")
    code, text = await run(curl, "-sS", "-o", str(out), f"tftp://127.0.0.1:{env.port}/pxelinux.cfg/{UUID}")
    assert code == 0, text
    assert b"cello.lun=2" in out.read_bytes() and b"KERNEL /templates/tiny/v2/vmlinuz" in out.read_bytes()
    # Unknown node with the "ignore" policy: not found, and pxelinux moves on.
    code, _ = await run(curl, "-sS", "-o", str(out), f"tftp://127.0.0.1:{env.port}/pxelinux.cfg/default")
    assert code == 68
    await wait_events(env, 5)
    ok = [ev for ev in env.events if ev["outcome"] == "ok"]
    assert len(ok) == 4 and all(ev["server"] == UUID for ev in ok)
    assert env.events[-1]["outcome"] == "not-found"
    assert all({"server", "client", "file", "bytes", "duration_ms", "outcome"} <= set(ev) for ev in env.events)
    assert isinstance(ok[0]["bytes"], int) and ok[0]["bytes"] > 100


async def test_storm_of_clients_shares_one_cached_copy(env: Env, tmp_path: Path) -> None:
    curl = need("curl")
    results = await asyncio.gather(
        *(run(curl, "-sS", "-o", str(tmp_path / f"s{i}"), f"tftp://127.0.0.1:{env.port}/pxelinux.0") for i in range(12))
    )
    assert all(code == 0 for code, _ in results)
    want = sha((env.root / "pxelinux.0").read_bytes())
    assert all(sha((tmp_path / f"s{i}").read_bytes()) == want for i in range(12))
    tree = env.server.tree
    assert isinstance(tree, BootTree) and tree.cache.misses == 1  # one load, eleven served from memory


@pytest.mark.parametrize("engine", ENGINES)
async def test_stop_is_idempotent_and_ends_transfers(tmp_path: Path, engine: str) -> None:
    e = make_env(tmp_path, engine=engine)
    await e.server.start()
    raw = Raw(e.port)
    try:
        raw.rrq(b"pxelinux.0")
        await in_thread(raw.recv)
        await e.server.stop()
        await e.server.stop()
        packet, _ = await in_thread(raw.recv)  # type: ignore[misc]
        assert packet == tp.Error(0, "server shutting down")
    finally:
        raw.close()


class LossyRelay(asyncio.DatagramProtocol):
    """A UDP relay between one client and the server that drops every `nth` datagram server→client.

    The client talks only to the relay's port; the relay follows the server's transfer port (TID)."""

    def __init__(self, server_port: int, nth: int) -> None:
        self.server_port = server_port
        self.nth = nth
        self.count = 0
        self.dropped = 0
        self.client: tuple[str, int] | None = None
        self.server_tid: tuple[str, int] | None = None
        self.front: asyncio.DatagramTransport | None = None
        self.back: asyncio.DatagramTransport | None = None

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:  # front: from the client
        assert self.back is not None
        self.client = addr
        self.back.sendto(data, self.server_tid or ("127.0.0.1", self.server_port))

    def from_server(self, data: bytes, addr: tuple[str, int]) -> None:
        assert self.front is not None and self.client is not None
        self.server_tid = addr
        self.count += 1
        if self.count % self.nth == 0:
            self.dropped += 1
            return
        self.front.sendto(data, self.client)


async def test_retransmission_through_a_lossy_link_with_tftp_hpa(env: Env, tmp_path: Path) -> None:
    loop = asyncio.get_running_loop()
    relay = LossyRelay(env.port, nth=25)

    class Back(asyncio.DatagramProtocol):
        def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
            relay.from_server(data, addr)

    front, _ = await loop.create_datagram_endpoint(lambda: relay, local_addr=("127.0.0.1", 0))
    back, _ = await loop.create_datagram_endpoint(Back, local_addr=("127.0.0.1", 0))
    relay.front, relay.back = front, back
    try:
        port = front.get_extra_info("sockname")[1]
        out = tmp_path / "lossy.out"
        code, text = await run(
            need("tftp"), "-m", "binary", "127.0.0.1", str(port), "-c", "get", "pxelinux.0", str(out)
        )
        assert code == 0, text
    finally:
        front.close()
        back.close()
    assert relay.dropped >= 3
    assert sha(out.read_bytes()) == sha((env.root / "pxelinux.0").read_bytes())
    await wait_events(env, 1)
    assert env.events[0]["outcome"] == "ok" and env.events[0]["bytes"] == 42_430


async def test_tsize_probe_then_rrq_from_the_same_port_at_once(env: Env) -> None:
    """EDK2 may re-ask from the same port right after its ERROR 8: that RRQ must not be taken for a
    retransmission of the finished probe."""
    raw = Raw(env.port)
    try:
        raw.rrq(b"pxelinux.0", options=b"tsize\x000\x00")
        packet, addr = await in_thread(raw.recv)  # type: ignore[misc]
        assert packet == tp.OptionAck({"tsize": "42430"})
        raw.sock.sendto(tp.encode(tp.Error(8, "User aborted the transfer")), addr)
        raw.rrq(b"pxelinux.0")
        packet, addr2 = await in_thread(lambda: raw.recv(0.3))  # type: ignore[misc]
        assert isinstance(packet, tp.Data) and packet.block == 1 and addr2 != addr
    finally:
        raw.close()


async def test_a_cached_file_is_answered_in_the_listeners_callback(env: Env) -> None:
    """Once a file is resolved and cached, its OACK leaves while the RRQ is handled, before the loop
    turns: no task hop and no await before the first answer (the storm's time to first byte)."""
    await fetch_windowed(env.port, "pxelinux.0", {"blksize": "1468"})  # resolve + cache it
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.bind(("127.0.0.1", 0))
    client.setblocking(False)
    try:
        rrq = tp.encode(tp.ReadRequest("pxelinux.0", "octet", {"blksize": "1468"}))
        env.server._on_request(rrq, client.getsockname())  # as the listener would, with no await after
        answer, peer = client.recvfrom(2048)  # already queued: loopback delivers within the send
        assert tp.decode(answer) == tp.OptionAck({"blksize": "1468"})
        client.sendto(tp.encode_ack(0), peer)
        for _ in range(200):  # and the transfer it began goes on through the task as any other
            await asyncio.sleep(0.01)
            try:
                data = client.recv(2048)
            except BlockingIOError:
                continue
            assert tp.decode(data) == tp.Data(1, (env.root / "pxelinux.0").read_bytes()[:1468])
            break
        else:
            raise AssertionError("no DATA 1")
        client.sendto(tp.encode(tp.Error(0, "enough")), peer)
        host, port = client.getsockname()
        mine = f"{host}:{port}"
        for _ in range(200):
            if any(e["client"] == mine for e in env.events):
                break
            await asyncio.sleep(0.01)
    finally:
        client.close()
    assert [e["outcome"] for e in env.events if e["client"] == mine] == ["aborted"]


async def test_a_burst_serves_first_blocks_between_its_requests(py_env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """A client whose OACK is out gets its first DATA between the requests of a burst that arrived
    before its ACK, not after the whole burst is set up (the storm's time to first byte)."""
    env = py_env
    await fetch_windowed(env.port, "pxelinux.0", {"blksize": "1468"})  # resolve + cache it
    order: list[str] = []
    on_request = env.server._on_request

    def recording(data: bytes, addr: tuple[str, int]) -> bytes | None:
        order.append("rrq")
        return on_request(data, addr)

    monkeypatch.setattr(env.server.listener, "handler", recording)
    received = tftp_server._TransferSocket._received

    def first_ack(self: tftp_server._TransferSocket, size: int, now: float) -> None:
        order.append("ack")
        received(self, size, now)

    monkeypatch.setattr(tftp_server._TransferSocket, "_received", first_ack)
    first = Raw(env.port)
    burst = [Raw(env.port) for _ in range(20)]
    try:
        first.rrq(b"pxelinux.0", options=b"blksize\x001468\x00")
        oack, peer = await in_thread(first.recv)  # type: ignore[misc]
        assert oack == tp.OptionAck({"blksize": "1468"})
        order.clear()
        # No await from here to the sleep: the loop sees all of it queued at once, the burst first.
        for raw in burst:
            raw.rrq(b"pxelinux.0", options=b"blksize\x001468\x00")
        first.sock.sendto(tp.encode_ack(0), peer)
        await asyncio.sleep(0.2)
        data, _ = await in_thread(first.recv)  # type: ignore[misc]
        assert isinstance(data, tp.Data) and data.block == 1
        assert order.count("rrq") == 20 and "ack" in order
        assert order.index("ack") < 5, order  # served after the burst's first request or so, not its 20th
    finally:
        for raw in [first, *burst]:
            raw.close()


async def test_only_a_big_transfer_gets_its_connected_twin(py_env: Env) -> None:
    """The second (connected) socket is made after _TWIN_AFTER_BLOCKS acknowledged blocks: a config-sized
    transfer never pays for it, a kernel-sized one has it for the rest of the way."""
    env = py_env
    raw = Raw(env.port)
    try:
        raw.rrq(b"pxelinux.0", options=b"blksize\x00512\x00")  # 42,430 bytes: 83 blocks of 512
        oack, peer = await in_thread(raw.recv)  # type: ignore[misc]
        assert oack == tp.OptionAck({"blksize": "512"})
        (conn,) = env.server._transfers
        for block in range(tftp_server._TWIN_AFTER_BLOCKS + 2):
            assert (conn.twin is not None) == (block > tftp_server._TWIN_AFTER_BLOCKS), block
            raw.sock.sendto(tp.encode_ack(block), peer)
            data, _ = await in_thread(raw.recv)  # type: ignore[misc]
            assert isinstance(data, tp.Data) and data.block == block + 1
        assert conn.twin is not None and conn.twin.getpeername() == raw.sock.getsockname()
    finally:
        raw.close()


async def spares_bound(server: TftpServer) -> None:
    for _ in range(100):
        if len(server._spares) == tftp_server._SPARE_SOCKETS:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"{len(server._spares)} spare ports, not {tftp_server._SPARE_SOCKETS}")


async def test_a_transfer_takes_a_port_bound_before_its_request(env: Env) -> None:
    """Transfer ports are bound ahead of a burst: a request takes one, what a stranger sent to a spare
    before is dropped (it never reaches the transfer, nor gets an answer), and a burst that takes more
    than half of the spares finds them bound again a moment later."""
    assert env.server._spares == []  # none at start: the first request makes its own port
    await fetch_windowed(env.port, "pxelinux.0", {"blksize": "1468"})  # resolve + cache it
    await spares_bound(env.server)
    spares = {s.getsockname()[1]: s for s in env.server._spares}
    stranger = Raw(env.port)
    next_port = env.server._spares[-1].getsockname()[1]  # the one the next request takes
    stranger.sock.sendto(tp.encode_ack(0), ("127.0.0.1", next_port))
    await asyncio.sleep(0.05)
    raw = Raw(env.port)
    try:
        raw.rrq(b"pxelinux.0", options=b"blksize\x001468\x00")
        oack, peer = await in_thread(raw.recv)  # type: ignore[misc]
        assert oack == tp.OptionAck({"blksize": "1468"}) and peer[1] in spares
        raw.sock.sendto(tp.encode_ack(0), peer)
        data, _ = await in_thread(raw.recv)  # type: ignore[misc]
        assert data == tp.Data(1, (env.root / "pxelinux.0").read_bytes()[:1468])
        with pytest.raises(TimeoutError):
            stranger.recv(0.2)  # dropped while spare: no "unknown TID" for it
    finally:
        raw.close()
        stranger.close()
    burst = [Raw(env.port) for _ in range(tftp_server._SPARE_SOCKETS // 2 + 8)]
    try:
        for client in burst:
            client.rrq(b"pxelinux.0", options=b"blksize\x001468\x00")
        answers = [await in_thread(client.recv) for client in burst]
        assert all(isinstance(a[0], tp.OptionAck) for a in answers)  # type: ignore[index]
        await spares_bound(env.server)
    finally:
        for client in burst:
            client.close()


@pytest.mark.parametrize("engine", ENGINES)
async def test_a_transfer_begun_at_once_needs_no_task(tmp_path: Path, engine: str) -> None:
    """A request answered in the listener's callback is seen through by callbacks on its transfer, not
    by a task of its own (whose making and first step delay the next client's first block); its end is
    reported all the same, and a stop mid-way ends it as "aborted"; the spares' ports are closed."""
    e = make_env(tmp_path, engine=engine)
    await e.server.start()
    await fetch_windowed(e.port, "pxelinux.0", {"blksize": "1468"})  # resolve + cache it
    await wait_events(e, 1)
    await spares_bound(e.server)
    spares = list(e.server._spares)
    raw = Raw(e.port)
    try:
        tasks = len(asyncio.all_tasks())
        raw.rrq(b"pxelinux.0", options=b"blksize\x00512\x00")
        oack, peer = await in_thread(raw.recv)  # type: ignore[misc]
        assert oack == tp.OptionAck({"blksize": "512"})
        for block in range(3):
            raw.sock.sendto(tp.encode_ack(block), peer)
            data, _ = await in_thread(raw.recv)  # type: ignore[misc]
            assert isinstance(data, tp.Data) and data.block == block + 1
        assert len(e.server._active) == 1 and len(asyncio.all_tasks()) == tasks
        await e.server.stop()
        packet, _ = await in_thread(raw.recv)  # type: ignore[misc]
        assert packet == tp.Error(0, "server shutting down")
    finally:
        raw.close()
        await e.server.stop()
    assert [ev["outcome"] for ev in e.events] == ["ok", "aborted"]
    assert e.events[1]["bytes"] == 2 * 512  # blocks 1 and 2 acknowledged
    assert not e.server._active and not e.server._spares and all(s.fileno() == -1 for s in spares)


# --- the state machine's rules over the wire, on both engines ---------------------------------------


@pytest.mark.parametrize("engine", ENGINES)
async def test_a_silent_client_is_given_up_with_backoff(tmp_path: Path, engine: str) -> None:
    """No ACK: the block goes again after 0.1, 0.2, 0.4 s (the back-off doubles), then ERROR 0 "timeout",
    and the transfer ends as "timeout" with its retransmissions counted."""
    e = make_env(tmp_path, engine=engine, timeout=0.1, retries=3)
    await e.server.start()
    raw = Raw(e.port)
    try:
        raw.rrq(b"pxelinux.0")
        first, peer = await in_thread(raw.recv)  # type: ignore[misc]
        assert isinstance(first, tp.Data) and first.block == 1
        loop = asyncio.get_running_loop()
        start = loop.time()
        arrivals: list[tuple[float, tp.Packet]] = []
        for _ in range(4):
            packet, addr = await in_thread(lambda: raw.recv(3.0))  # type: ignore[misc]
            assert addr == peer
            arrivals.append((loop.time() - start, packet))
        assert [p for _, p in arrivals] == [first, first, first, tp.Error(0, "timeout")]
        times = [0.0] + [t for t, _ in arrivals]
        gaps = [b - a for a, b in itertools.pairwise(times)]
        assert 0.08 <= gaps[0] <= 0.35 and gaps[1] >= 0.17 and gaps[2] >= 0.35, gaps
        await wait_events(e, 1)
    finally:
        raw.close()
        await e.server.stop()
    assert e.events[0]["outcome"] == "timeout" and e.events[0]["bytes"] == 0
    assert e.server.stats.retransmits == 3 and e.server.stats.ended == {"timeout": 1}


async def test_a_window_resumes_after_the_last_block_acknowledged(env: Env) -> None:
    """RFC 7440 §4: an ACK inside the window (the client lost what came after) starts the next window
    right after it; a duplicate ACK sends nothing (RFC 1123: no Sorcerer's Apprentice)."""
    data = (env.root / "pxelinux.0").read_bytes()
    raw = Raw(env.port)
    try:
        raw.rrq(b"pxelinux.0", options=b"blksize\x00512\x00windowsize\x004\x00")
        oack, peer = await in_thread(raw.recv)  # type: ignore[misc]
        assert oack == tp.OptionAck({"blksize": "512", "windowsize": "4"})
        raw.sock.sendto(tp.encode_ack(0), peer)
        window = [await in_thread(raw.recv) for _ in range(4)]
        assert [p.block for p, _ in window] == [1, 2, 3, 4]  # type: ignore[attr-defined]
        raw.sock.sendto(tp.encode_ack(2), peer)  # 3 and 4 "lost"
        again = [await in_thread(raw.recv) for _ in range(4)]
        assert [p for p, _ in again] == [tp.Data(b, data[(b - 1) * 512 : b * 512]) for b in (3, 4, 5, 6)]
        raw.sock.sendto(tp.encode_ack(2), peer)  # late duplicate: ignored
        with pytest.raises(TimeoutError):
            await in_thread(lambda: raw.recv(0.2))
        raw.sock.sendto(tp.encode_ack(6), peer)
        nxt, _ = await in_thread(raw.recv)  # type: ignore[misc]
        assert nxt == tp.Data(7, data[6 * 512 : 7 * 512])
    finally:
        raw.close()


async def test_a_file_ending_on_a_block_boundary_ends_with_an_empty_block(env: Env) -> None:
    (env.root / "even.bin").write_bytes(blob(2 * 512, 9))
    raw = Raw(env.port)
    try:
        raw.rrq(b"even.bin", options=b"blksize\x00512\x00")
        _, peer = await in_thread(raw.recv)  # type: ignore[misc]
        got = []
        for block in range(3):
            raw.sock.sendto(tp.encode_ack(block), peer)
            packet, _ = await in_thread(raw.recv)  # type: ignore[misc]
            got.append(packet)
        assert [(p.block, len(p.payload)) for p in got] == [(1, 512), (2, 512), (3, 0)]  # type: ignore[attr-defined]
        raw.sock.sendto(tp.encode_ack(3), peer)
        await wait_events(env, 1)
    finally:
        raw.close()
    assert env.events[0]["outcome"] == "ok" and env.events[0]["bytes"] == 1024


def descriptors_on(path: Path) -> int:
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}") == str(path)
        except OSError:
            continue
    return count


async def test_a_stop_mid_way_through_a_file_from_disk_ends_it_and_lets_the_file_go(env: Env) -> None:
    """rollover.bin is larger than the test's cache entries: served from disk, its descriptor held by
    the transfer. A stop in the middle tells the client, reports "aborted" and closes the file."""
    path = env.root / "rollover.bin"
    raw = Raw(env.port)
    try:
        raw.rrq(b"rollover.bin")
        first, _ = await in_thread(raw.recv)  # type: ignore[misc]
        assert isinstance(first, tp.Data) and first.block == 1
        assert descriptors_on(path) >= 1
        await env.server.stop()
        packet, _ = await in_thread(raw.recv)  # type: ignore[misc]
        while isinstance(packet, tp.Data):  # a retransmission may have crossed the stop
            packet, _ = await in_thread(raw.recv)  # type: ignore[misc]
        assert packet == tp.Error(0, "server shutting down")
    finally:
        raw.close()
    assert [e["outcome"] for e in env.events] == ["aborted"]
    assert descriptors_on(path) == 0


@pytest.mark.parametrize("engine", ENGINES)
async def test_a_whole_fetch_over_ipv6_with_a_stranger_refused(tmp_path: Path, engine: str) -> None:
    """On an IPv6 listener (::1) the transfer's peer is a 4-tuple address: blocks, the end, and error 5
    to a stranger all go to the right IPv6 address."""
    e = make_env(tmp_path, "::1", engine=engine)
    await e.server.start()
    want = (e.root / "pxelinux.0").read_bytes()
    client = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    stranger = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    client.bind(("::1", 0))
    stranger.bind(("::1", 0))
    client.settimeout(2)
    stranger.settimeout(2)
    try:
        client.sendto(tp.encode(tp.ReadRequest("pxelinux.0", "octet", {"blksize": "1468"})), ("::1", e.port))
        oack, peer = await in_thread(lambda: client.recvfrom(2048))  # type: ignore[misc]
        assert tp.decode(oack) == tp.OptionAck({"blksize": "1468"})
        stranger.sendto(tp.encode_ack(0), peer)
        err = await in_thread(lambda: stranger.recvfrom(2048))
        assert tp.decode(err[0]) == tp.Error(5, "unknown TID")  # type: ignore[index]
        got, block = b"", 0
        while True:
            client.sendto(tp.encode_ack(block), peer)
            raw, _ = await in_thread(lambda: client.recvfrom(2048))  # type: ignore[misc]
            packet = tp.decode(raw)
            assert isinstance(packet, tp.Data) and packet.block == block + 1
            got += packet.payload
            block += 1
            if len(packet.payload) < 1468:
                client.sendto(tp.encode_ack(block), peer)
                break
        assert got == want
        await wait_events(e, 1)
    finally:
        client.close()
        stranger.close()
        await e.server.stop()
    assert e.events[0]["outcome"] == "ok" and e.events[0]["bytes"] == len(want)
