"""TFTP benchmark: Cello's server against tftp-hpa's in.tftpd, dnsmasq's TFTP and tftpy's server.

For 1, 8, 32 and 128 concurrent clients fetching the same 32 MiB file at blksize 1468 (lock-step,
windowsize 1, since in.tftpd and dnsmasq have no RFC 7440), prints aggregate throughput and
time-to-first-byte (RRQ sent → first DATA received) per server, and the Cello/peer ratios, all measured
in the same run on the same file.

Each (server, clients) cell runs for at most --window seconds; clients still running then are stopped
with an ERROR packet, and throughput is the bytes received in the window divided by its length. The
client is a lean epoll loop in its own process (it only counts bytes, so it costs less per packet than
any server). dnsmasq's TFTP always listens on port 69, so it and its client run inside a network
namespace made (and removed) by this script; everything else is on 127.0.0.1 with free ports.

    .venv/bin/python bench/tftp_bench.py            # full run (~2 minutes)
    .venv/bin/python bench/tftp_bench.py --quick    # ~20 seconds
"""

from __future__ import annotations

import argparse
import json
import os
import select
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
NETNS = "cello-tftpb"
FILE_NAME = "bench32.img"
BLKSIZE = 1468

# --- the client (runs in a child process) -----------------------------------------------------------


def client_main(host: str, port: int, name: str, n: int, window: float, blksize: int) -> dict[str, object]:
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    probe.settimeout(0.2)
    ready_by = time.monotonic() + 10
    while True:  # wait until the server answers anything (its "file not found" is fine)
        probe.sendto(b"\x00\x01no-such-file\x00octet\x00", (host, port))
        try:
            probe.recvfrom(2048)
            break
        except OSError:
            if time.monotonic() > ready_by:
                return {"error": "server never answered"}
    probe.close()

    rrq = b"\x00\x01" + name.encode() + b"\x00octet\x00blksize\x00" + str(blksize).encode() + b"\x00"
    ep = select.epoll()
    socks: dict[int, socket.socket] = {}
    # per fd: [peer, next_block16, bytes, t_first, last_sent, last_activity, done, tries]
    st: dict[int, list[object]] = {}
    start = time.monotonic()
    for _ in range(n):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        s.setblocking(False)
        s.bind(("127.0.0.1", 0))
        socks[s.fileno()] = s
        st[s.fileno()] = [(host, port), 1, 0, None, rrq, start, False, 0]
        ep.register(s.fileno(), select.EPOLLIN)
    for s in socks.values():
        s.sendto(rrq, (host, port))
    sent_at = time.monotonic()
    end = start + window
    active = n
    ack = struct.Struct("!HH")
    completed = 0
    failed = 0
    while active:
        now = time.monotonic()
        if now >= end:
            break
        for fd, _ in ep.poll(min(0.1, end - now)):
            s = socks[fd]
            state = st[fd]
            if state[6]:
                continue
            while True:
                try:
                    data, addr = s.recvfrom(65536)
                except BlockingIOError:
                    break
                op = data[1]
                if op == 3:
                    block = (data[2] << 8) | data[3]
                    if block != state[1]:
                        if block == (state[1] - 1) & 0xFFFF:
                            s.sendto(state[4], addr)  # type: ignore[arg-type]
                        continue
                    if state[3] is None:
                        state[3] = time.monotonic()
                    state[0] = addr
                    state[2] = state[2] + len(data) - 4  # type: ignore[operator]
                    pkt = ack.pack(4, block)
                    s.sendto(pkt, addr)
                    state[4] = pkt
                    state[1] = (block + 1) & 0xFFFF
                    state[7] = 0
                    if len(data) - 4 < blksize:
                        state[6] = True
                        active -= 1
                        completed += 1
                        break
                elif op == 6:  # OACK
                    state[0] = addr
                    pkt = ack.pack(4, 0)
                    s.sendto(pkt, addr)
                    state[4] = pkt
                elif op == 5:
                    state[6] = True
                    active -= 1
                    failed += 1
                    break
            state[5] = time.monotonic()
        now = time.monotonic()
        for fd, state in st.items():  # retransmit after 1 s of silence, give up after 5 tries
            if not state[6] and now - state[5] > 1.0:  # type: ignore[operator]
                state[7] = state[7] + 1  # type: ignore[operator]
                state[5] = now
                if state[7] > 5:  # type: ignore[operator]
                    state[6] = True
                    active -= 1
                    failed += 1
                else:
                    socks[fd].sendto(state[4], state[0])  # type: ignore[arg-type]
    elapsed = min(time.monotonic(), end) - start
    for fd, state in st.items():
        if not state[6]:
            socks[fd].sendto(b"\x00\x05\x00\x00benchmark window over\x00", state[0])  # type: ignore[arg-type]
        socks[fd].close()
    total = sum(state[2] for state in st.values())  # type: ignore[misc]
    ttfb = [state[3] - sent_at for state in st.values() if state[3] is not None]  # type: ignore[operator]
    return {
        "bytes": total,
        "elapsed": elapsed,
        "completed": completed,
        "failed": failed,
        "ttfb": sorted(ttfb),
        "started": len(ttfb),
    }


# --- the servers ------------------------------------------------------------------------------------

CELLO_SERVER = """
import asyncio, sys, logging
from pathlib import Path
from bootfiles.tree import BootTree
from bootfiles.tftp_server import TftpServer
class NoNodes:
    def boot_spec(self, *, uuid, mac):
        return None
async def main():
    tree = BootTree([Path(sys.argv[1])], None, NoNodes(), cache_bytes=128 << 20)
    server = TftpServer("127.0.0.1", int(sys.argv[2]), tree, max_transfers=1024)
    await server.start()
    await asyncio.Event().wait()
logging.basicConfig(level=logging.WARNING)
asyncio.run(main())
"""

TFTPY_SERVER = """
import sys, logging
import tftpy
logging.getLogger("tftpy").setLevel(logging.CRITICAL)
tftpy.TftpServer(sys.argv[1]).listen("127.0.0.1", int(sys.argv[2]))
"""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Peer:
    def __init__(self, label: str, argv: list[str], port: int, netns: str | None = None) -> None:
        self.label = label
        self.argv = argv
        self.port = port
        self.netns = netns
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = dict(os.environ, PYTHONPATH=str(REPO))
        self.proc = subprocess.Popen(
            self.argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    def measure(self, n: int, window: float) -> dict[str, object]:
        argv = [sys.executable, __file__, "--client", "127.0.0.1", str(self.port), FILE_NAME, str(n), str(window)]
        if self.netns:
            argv = ["ip", "netns", "exec", self.netns, *argv]
        out = subprocess.run(argv, capture_output=True, check=True, timeout=window + 60)
        result: dict[str, object] = json.loads(out.stdout)
        return result


def netns_up() -> bool:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        return False
    subprocess.run(["ip", "netns", "del", NETNS], capture_output=True)
    if subprocess.run(["ip", "netns", "add", NETNS], capture_output=True).returncode != 0:
        return False
    subprocess.run(["ip", "netns", "exec", NETNS, "ip", "link", "set", "lo", "up"], check=True)
    return True


def netns_down() -> None:
    subprocess.run(["ip", "netns", "del", NETNS], capture_output=True)


def make_peers(root: Path, have_netns: bool) -> tuple[list[Peer], list[str]]:
    peers = [Peer("cello", [sys.executable, "-c", CELLO_SERVER, str(root), str(p := free_port())], p)]
    missing: list[str] = []
    if (tftpd := shutil.which("in.tftpd")) is not None:
        p = free_port()
        argv = [tftpd, "--listen", "--foreground", "--address", f"127.0.0.1:{p}", "--blocksize", str(BLKSIZE)]
        if os.geteuid() == 0:
            argv += ["--user", "root"]
        peers.append(Peer("in.tftpd", [*argv, "--secure", str(root)], p))
    else:
        missing.append("in.tftpd (Debian tftpd-hpa)")
    dnsmasq = shutil.which("dnsmasq")
    if dnsmasq is not None and have_netns:
        argv = [
            "ip",
            "netns",
            "exec",
            NETNS,
            dnsmasq,
            "--keep-in-foreground",
            "--port=0",
            "--enable-tftp",
            f"--tftp-root={root}",
            "--tftp-max=1024",
            "--listen-address=127.0.0.1",
            "--bind-interfaces",
            "--no-resolv",
            "--no-hosts",
            "--quiet-tftp",
            "--user=root",
            f"--pid-file={root}/dnsmasq.pid",
            "--log-facility=-",
        ]
        peers.append(Peer("dnsmasq", argv, 69, netns=NETNS))
    else:
        missing.append("dnsmasq (needs the dnsmasq package and root for a network namespace)")
    peers.append(Peer("tftpy", [sys.executable, "-c", TFTPY_SERVER, str(root), str(p := free_port())], p))
    return peers, missing


def fmt_ms(values: list[float], q: float) -> str:
    if not values:
        return "-"
    idx = min(len(values) - 1, int(q * len(values)))
    return f"{values[idx] * 1000:.1f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="shorter windows (about 20 s in all)")
    ap.add_argument("--window", type=float, default=None, help="seconds per (server, clients) cell")
    ap.add_argument("--clients", default="1,8,32,128")
    ap.add_argument("--client", nargs=5, metavar=("HOST", "PORT", "FILE", "N", "WINDOW"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.client:
        host, port, name, n, window = args.client
        print(json.dumps(client_main(host, int(port), name, int(n), float(window), BLKSIZE)))
        return 0
    window = args.window or (0.9 if args.quick else 5.0)
    counts = [int(c) for c in args.clients.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="cello-tftpbench-"))
    tmp.chmod(0o755)
    data = tmp / FILE_NAME
    with data.open("wb") as f:
        f.write(os.urandom(32 * 1024 * 1024))
    data.chmod(0o644)
    have_netns = netns_up()
    peers, missing = make_peers(tmp, have_netns)
    results: dict[tuple[str, int], dict[str, object]] = {}
    try:
        for peer in peers:
            peer.start()
        for n in counts:
            for peer in peers:
                results[(peer.label, n)] = r = peer.measure(n, window)
                time.sleep(0.3)  # let aborted transfers die down before the next cell
                if "error" in r:
                    print(f"{peer.label:9s} n={n:<4d} {r['error']}", flush=True)
                    continue
                mbps = float(r["bytes"]) / float(r["elapsed"]) / 1e6  # type: ignore[arg-type]
                ttfb = list(r["ttfb"])  # type: ignore[call-overload]
                print(
                    f"{peer.label:9s} n={n:<4d} {mbps:8.1f} MB/s  ttfb p50 {fmt_ms(ttfb, 0.5):>7s} ms"
                    f"  p95 {fmt_ms(ttfb, 0.95):>7s} ms  started {r['started']}/{n}"
                    f"  done {r['completed']}  failed {r['failed']}",
                    flush=True,
                )
    finally:
        for peer in peers:
            peer.stop()
        if have_netns:
            netns_down()
        shutil.rmtree(tmp, ignore_errors=True)
    print()
    print(f"Cello/peer ratios (throughput; ttfb p50 as peer/Cello, > 1 means Cello answers sooner), window {window}s")
    for n in counts:
        c = results.get(("cello", n))
        if not c or "error" in c:
            continue
        c_tp = float(c["bytes"]) / float(c["elapsed"])  # type: ignore[arg-type]
        c_ttfb = statistics.median(c["ttfb"]) if c["ttfb"] else None  # type: ignore[arg-type]
        cells = []
        for peer in peers[1:]:
            r = results.get((peer.label, n))
            if not r or "error" in r or not r["bytes"]:
                cells.append(f"{peer.label} -")
                continue
            p_tp = float(r["bytes"]) / float(r["elapsed"])  # type: ignore[arg-type]
            p_ttfb = statistics.median(r["ttfb"]) if r["ttfb"] else None  # type: ignore[arg-type]
            ttfb_ratio = f"{p_ttfb / c_ttfb:.2f}" if c_ttfb and p_ttfb else "-"
            cells.append(f"{peer.label} x{c_tp / p_tp:.2f} (ttfb {ttfb_ratio})")
        print(f"n={n:<4d} " + "   ".join(cells))
    for m in missing:
        print(f"not measured: {m}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
