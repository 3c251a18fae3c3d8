"""The native TFTP pump on its own (bootfiles/tftp_native.py) and how the server picks its engine.

What a transfer does on the wire is tested on both engines with real clients in test_tftp_interop.py;
here: the library is built and current, the hand-over's ownership rules, and the engine choice.
"""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path

import pytest

from bootfiles import tftp_native as native
from bootfiles import tftp_packet as tp
from bootfiles.tftp_server import TftpServer
from bootfiles.tree import BootTree


def test_the_library_is_built_from_the_current_source() -> None:
    """make setup builds it (scripts/setup.sh); a stale or missing one would silently mean Python."""
    assert native.unavailable_reason() is None
    assert native.LIBRARY.stat().st_mtime_ns >= native.SOURCE.stat().st_mtime_ns


def test_a_library_whose_structures_differ_is_not_used(monkeypatch: pytest.MonkeyPatch) -> None:
    """ctypes mirrors two C structures: a library built from a source that laid them out otherwise
    would read the wrong fields, so it is refused and Python serves."""
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setattr(native, "_load_error", None)
    monkeypatch.setattr(native, "abi", lambda: 0)
    assert native.load() is None
    assert "does not match tftp_native.py's structures" in (native.unavailable_reason() or "")


def prepared(content: bytes | None, **kw: object) -> native.Prepared:
    fields: dict[str, object] = {
        "data": content, "file_fd": -1, "size": len(content or b""), "blksize": 512, "windowsize": 1,
        "timeout": 0.2, "timeout_from_client": False, "retries": 2, "backoff_max": 8.0, "oack": b"",
        "tsize_accepted": False, "family": socket.AF_INET,
    }
    fields.update(kw)
    return native.prepare(**fields)  # type: ignore[arg-type]


async def completions(pump: native.Pump, n: int) -> list[native.Completion]:
    out: list[native.Completion] = []
    for _ in range(300):
        out += pump.take()
        if len(out) >= n:
            return out
        await asyncio.sleep(0.01)
    raise AssertionError(f"{len(out)} completions, not {n}")


async def test_a_refused_start_leaves_the_socket_to_the_caller() -> None:
    pump = native.Pump()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    try:
        good = prepared(b"x" * 100)
        refused = [(prepared(b"x" * 100, blksize=4), ("127.0.0.1", 9)),
                   (prepared(b"x" * 100, windowsize=0), ("127.0.0.1", 9)),
                   (prepared(None), ("127.0.0.1", 9)),  # neither bytes nor a descriptor
                   (good, ("not-an-address", 9)),
                   (good, ("1" * 64, 9)),  # longer than the address field: refused before the C call
                   (good, ("127.0.0.1", 70000))]
        for params, peer in refused:
            with pytest.raises(native.PumpError):
                pump.start(params, sock.fileno(), peer)
            os.fstat(sock.fileno())  # still open: the pump did not take it
        assert pump.running == 0
        with pytest.raises(ValueError, match="its length"):
            prepared(b"x" * 100, size=200)  # the pump would read past the bytes
    finally:
        sock.close()
        pump.close()


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


async def test_a_transfer_from_a_descriptor_and_its_completion(tmp_path: Path) -> None:
    """A file served from disk is read with pread from the caller's descriptor, which the pump leaves
    open; the transfer's socket is the pump's and is closed at its end."""
    data = os.urandom(1300)
    (tmp_path / "f.bin").write_bytes(data)
    fd = os.open(tmp_path / "f.bin", os.O_RDONLY)
    pump = native.Pump()
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.bind(("127.0.0.1", 0))
    client.settimeout(2)
    server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    server.bind(("127.0.0.1", 0))
    port = server.getsockname()[1]
    try:
        ident = pump.start(prepared(None, file_fd=fd, size=len(data)), server.fileno(), client.getsockname())
        server.detach()
        got = b""
        for block in (1, 2, 3):
            raw, addr = client.recvfrom(2048)
            packet = tp.decode(raw)
            assert isinstance(packet, tp.Data) and packet.block == block and addr[1] == port
            got += packet.payload
            client.sendto(tp.encode_ack(block), addr)
        assert got == data
        (done,) = await completions(pump, 1)
        assert done == native.Completion(ident, "ok", 0, len(data), None)
        assert pump.running == 0
        os.fstat(fd)  # still open: the caller's to close
        assert port_is_free(port)  # the pump closed the transfer's socket
    finally:
        client.close()
        pump.close()
        os.close(fd)


async def test_close_ends_running_transfers_and_their_sockets() -> None:
    pump = native.Pump()
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.bind(("127.0.0.1", 0))
    client.settimeout(2)
    ports = []
    try:
        for _ in range(3):
            server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            server.bind(("127.0.0.1", 0))
            ports.append(server.getsockname()[1])
            pump.start(prepared(os.urandom(5000), timeout=5.0), server.fileno(), client.getsockname())
            server.detach()
            assert isinstance(tp.decode(client.recvfrom(2048)[0]), tp.Data)
        assert pump.running == 3 and not any(port_is_free(p) for p in ports)
    finally:
        pump.close()
        client.close()
    assert all(port_is_free(p) for p in ports)
    assert pump.take() == []  # closed: nothing more to report


def server_on(tmp_path: Path, engine: str) -> TftpServer:
    (tmp_path / "pxelinux.0").write_bytes(b"loader" * 100)

    class NoNodes:
        def boot_spec(self, *, uuid: str | None, mac: str | None) -> None:
            return None

    tree = BootTree([tmp_path], None, NoNodes())  # type: ignore[arg-type]
    return TftpServer("127.0.0.1", 0, tree, engine=engine)


@pytest.fixture
def no_library(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(native, "LIBRARY", tmp_path / "missing.so")
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setattr(native, "_load_error", None)


async def test_auto_serves_from_python_where_the_library_is_missing(
        tmp_path: Path, no_library: None, caplog: pytest.LogCaptureFixture) -> None:
    server = server_on(tmp_path, "auto")
    with caplog.at_level("INFO", logger="bootfiles.tftp_server"):
        await server.start()
    try:
        assert server.engine_in_use == "python"
        assert "transfers in Python" in caplog.text and "is not built" in caplog.text
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            client.settimeout(2)
            client.sendto(tp.encode(tp.ReadRequest("pxelinux.0", "octet", {})), server.address)
            packet = await asyncio.to_thread(lambda: tp.decode(client.recvfrom(2048)[0]))
            assert packet == tp.Data(1, b"loader" * 85 + b"lo")
    finally:
        await server.stop()


async def test_native_refuses_to_start_without_the_library(tmp_path: Path, no_library: None) -> None:
    server = server_on(tmp_path, "native")
    with pytest.raises(RuntimeError, match=r"tftp engine 'native': .*missing\.so is not built \(make setup"):
        await server.start()
    assert server.listener.transport is None  # nothing left listening


async def test_auto_takes_the_pump_where_it_is_built(tmp_path: Path) -> None:
    server = server_on(tmp_path, "auto")
    await server.start()
    try:
        assert server.engine_in_use == "native"
    finally:
        await server.stop()
    assert server.engine_in_use == "python"  # stopped: the pump and its thread are gone


def test_an_unknown_engine_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="tftp engine must be"):
        server_on(tmp_path, "fast")


async def test_a_storms_requests_share_their_parameters_until_the_file_changes(tmp_path: Path) -> None:
    """Identical requests for one loader in memory reuse the pump's parameters; other bytes for the same
    name (a file replaced), a rendered config or a big file get their own, and the table is bounded."""
    from bootfiles import tftp_server
    from bootfiles.tftp_transfer import BytesSource
    from bootfiles.tree import OpenedFile

    server = server_on(tmp_path, "native")
    request = tp.ReadRequest("pxelinux.0", "octet", {"blksize": "1468"})

    def opened(data: bytes, kind: str = "static") -> OpenedFile:
        return OpenedFile(BytesSource(data), len(data), None, kind, data)  # type: ignore[arg-type]

    old, new = b"a" * 3000, b"b" * 3000
    first = server._prepared_for(request, opened(old))
    assert first is not None and server._prepared_for(request, opened(old)) is first
    replaced = server._prepared_for(request, opened(new))
    assert replaced is not None and replaced is not first and replaced.data is new
    assert server._prepared_for(request, opened(new)) is replaced
    config = opened(b"c" * 100, "rendered")
    assert server._prepared_for(request, config) is not server._prepared_for(request, config)
    big = opened(b"k" * (tftp_server._PREPARED_BYTES + 1))
    assert server._prepared_for(request, big) is not server._prepared_for(request, big)
    for i in range(tftp_server._PREPARED_MAX * 2):
        server._prepared_for(tp.ReadRequest(f"f{i}", "octet", {}), opened(old))
    assert len(server._prepared) <= tftp_server._PREPARED_MAX


async def test_a_file_cut_short_is_let_go_only_when_the_pump_has_ended(tmp_path: Path) -> None:
    """A stop cancels a task whose transfer the pump still runs: the file's descriptor must not be
    closed (and its number reused) while the pump's thread may pread it; it goes when the end is in."""
    from bootfiles import tftp_server

    server = server_on(tmp_path, "native")
    closed: list[str] = []

    class Opened:
        server_uuid = None

        def close(self) -> None:
            closed.append("file")

    loop = asyncio.get_running_loop()
    pumped = tftp_server._Pumped(loop.create_future())
    started = tftp_server._Started(tp.ReadRequest("big.img", "octet", {}), ("127.0.0.1", 9), Opened(),  # type: ignore[arg-type]
                                   pumped, pumped, pumped.finished, loop.time())
    server._ended(started, "aborted")
    assert closed == [] and pumped.closed
    pumped.done = True
    pumped.finished.set_result(None)
    await asyncio.sleep(0)
    assert closed == ["file"]
    assert server.stats.ended == {"aborted": 1}
