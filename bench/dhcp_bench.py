"""Boot-storm benchmark: Cello's proxyDHCP against dnsmasq in proxy mode, measured in the same run.

    .venv/bin/python bench/dhcp_bench.py            # full run: 3 rounds (~8 min), as root
    .venv/bin/python bench/dhcp_bench.py --quick    # 4,000 clients, one round (~2 min)

10,000 distinct PXE BIOS clients (distinct MACs, GUIDs and xids) send DHCPDISCOVERs from netns
celdb-cli over a veth pair to the server in netns celdb-srv (10.79.0.0/24). The sender is a raw
(AF_PACKET) socket writing whole Ethernet frames, as the ROMs do: source MAC = the client's, source
address 0.0.0.0, broadcast to 255.255.255.255:67; the replies, broadcast to :68, are read on a UDP
socket with kernel receive timestamps (latency = that timestamp minus the send time).

  (a) quiet: all the clients at fixed rates of 2,000, 5,000 and 10,000 DISCOVERs/s; share answered,
      p50 / p99 / max latency;
  (b) loaded: 2,000/s while Cello's TFTP (32 lock-step clients fetching a 32 MiB file) and HTTP boot
      (16 clients fetching it over and over) run at full load in the server's process, on its main loop
      (`tests/dhcp_lab.py --files`: `bootfiles.tftp_server` and aiohttp's sendfile FileResponse, as in
      the appliance). Both loads come over the server's loopback, so that the veth carries only the
      DHCP traffic: what is measured is the server's process kept busy, not a congested link (1 GB/s
      of HTTP over the same veth delays and drops dnsmasq's replies as much as Cello's). For dnsmasq
      the same TFTP/HTTP load runs against the same Cello process with its DHCP off, so both DHCP
      servers share the machine with the same work.

Servers: Cello (`cello`: the responder in a child process of its own, `[dhcp] responder = "process"`,
the default), Cello with the responder on threads of the server's process (`cello-thread`), Cello with
it on the main loop (`cello-main-loop`, how it was before issue 15), and dnsmasq. Each cell (a server, a mode, a rate)
starts its server afresh and warms it up for a second; the servers take turns within every cell, in an
order that rotates, and the summary gives medians over the rounds and the median of the per-round
Cello/dnsmasq ratios, so that other work on the machine does not land on one server only. Cello knows
all the nodes (its policy index); dnsmasq answers any PXE client (`dhcp-range=…,proxy` plus a
`pxe-service=` line). Neither logs per packet (dnsmasq: quiet-dhcp; Cello: no event printer). Every
load loop is bounded by count and by time; the namespaces are removed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import select
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid as uuidlib
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dhcp import packet as p  # noqa: E402
from dhcp.raw import BROADCAST_MAC, build_udp_frame  # noqa: E402

SRV, CLI = "celdb-srv", "celdb-cli"
SRV_IF, CLI_IF = "celdb0", "celdb1"
SRV_IP, CLI_IP = "10.79.0.2", "10.79.0.3"
HTTP_PORT = 8080
LOAD_FILE = "load32.img"
LOAD_BYTES = 32 << 20
TFTP_CLIENTS, HTTP_CLIENTS = 32, 16
SO_TIMESTAMPNS = 35
SO_RCVBUFFORCE = 33
SO_SNDBUFFORCE = 32
ETH_P_ALL = 0x0003


def client_ident(i: int) -> tuple[str, bytes]:
    mac = bytes([0x52, 0x54, 0x01, (i >> 16) & 0xFF, (i >> 8) & 0xFF, i & 0xFF])
    uuid = str(uuidlib.UUID(int=(0x7E11 << 112) | (0x4000 << 64) | i))
    return uuid, mac


def discover(i: int, xid: int) -> bytes:
    uuid, mac = client_ident(i)
    opts = p.Options.of([
        (p.OPT_MESSAGE_TYPE, bytes([p.DHCPDISCOVER])),
        (p.OPT_MAX_MESSAGE_SIZE, struct.pack("!H", 1260)),
        (p.OPT_PARAMETER_LIST, bytes([1, 3, 6, 12, 43, 60, 66, 67, 128, 129, 130])),
        (p.OPT_CLIENT_ARCH, b"\x00\x00"),
        (p.OPT_CLIENT_NII, b"\x01\x02\x01"),
        (p.OPT_CLIENT_GUID, b"\x00" + uuidlib.UUID(uuid).bytes_le),
        (p.OPT_VENDOR_CLASS, b"PXEClient:Arch:00000:UNDI:002001"),
    ])
    return p.encode(p.DhcpPacket(op=p.BOOTREQUEST, xid=xid, chaddr=mac, flags=p.FLAG_BROADCAST, options=opts),
                    min_size=0)


# ---- load generators (run inside the client namespace) ------------------------------------------------


def generate(count: int, rate: float, base_xid: int, drain: float) -> dict[str, object]:
    """Send `count` DISCOVER frames at `rate`/s from a raw socket; collect the replies by xid."""
    frames = [build_udp_frame(client_ident(i)[1], BROADCAST_MAC, "0.0.0.0", "255.255.255.255", 68, 67,
                              discover(i, base_xid + i)) for i in range(count)]
    out = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)  # protocol 0: sends only, receives nothing
    out.bind((CLI_IF, 0))
    out.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, 8 * 1024 * 1024)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, CLI_IF.encode())
    sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 32 * 1024 * 1024)
    sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
    sock.bind(("0.0.0.0", 68))
    sock.setblocking(False)
    sent_at = [0.0] * count
    latency: dict[int, float] = {}
    send_fail = 0

    def drain_socket() -> None:
        for _ in range(count + 1):  # bounded: at most one reply per client is counted anyway
            try:
                data, anc, _flags, _addr = sock.recvmsg(2048, 64)
            except BlockingIOError:
                return
            if len(data) < 240 or data[0] != p.BOOTREPLY:
                continue
            xid = struct.unpack_from("!I", data, 4)[0] - base_xid
            if not 0 <= xid < count or xid in latency:
                continue
            ts = time.time()
            for level, kind, cdata in anc:
                if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                    sec, nsec = struct.unpack("qq", cdata[:16])
                    ts = sec + nsec / 1e9
            latency[xid] = ts - sent_at[xid]

    start = time.monotonic()
    give_up = start + 3 * count / rate + 10  # bounded in time too: a stuck sender cannot run on
    i = 0
    while i < count and time.monotonic() < give_up:
        due = min(count, int((time.monotonic() - start) * rate) + 1)
        while i < due:
            sent_at[i] = time.time()
            try:
                out.send(frames[i])
            except BlockingIOError:
                select.select([], [out], [], 0.001)
                continue
            except OSError:
                send_fail += 1
            i += 1
        drain_socket()
        if i < count:
            delay = start + i / rate - time.monotonic()
            if delay > 0:
                select.select([sock], [], [], min(delay, 0.0005))
    send_time = time.monotonic() - start
    deadline = time.monotonic() + drain
    last, quiet_since = len(latency), time.monotonic()
    while time.monotonic() < deadline and len(latency) < count:
        select.select([sock], [], [], 0.05)
        drain_socket()
        if len(latency) != last:
            last, quiet_since = len(latency), time.monotonic()
        elif time.monotonic() - quiet_since > 0.5:
            break
    out.close()
    sock.close()
    lat = sorted(latency.values())

    def pct(q: float) -> float:
        return lat[min(len(lat) - 1, int(q * len(lat)))] * 1000 if lat else float("nan")

    return {"sent": i, "answered": len(latency), "send_rate": i / send_time if send_time else 0.0,
            "p50_ms": pct(0.50), "p99_ms": pct(0.99), "max_ms": lat[-1] * 1000 if lat else float("nan"),
            "send_fail": send_fail}


def tftp_load(seconds: float) -> dict[str, object]:
    """TFTP_CLIENTS lock-step fetches of the load file for `seconds` (tftp_bench's client, which binds
    127.0.0.1: it runs in the server's namespace, over its loopback)."""
    sys.path.insert(0, str(ROOT / "bench"))
    from tftp_bench import client_main

    r = client_main("127.0.0.1", 69, LOAD_FILE, TFTP_CLIENTS, seconds, 1468)
    return {"mb_per_s": float(r["bytes"]) / float(r["elapsed"]) / 1e6 if r.get("elapsed") else 0.0,  # type: ignore[arg-type]
            "error": r.get("error")}


def http_load(seconds: float) -> dict[str, object]:
    """HTTP_CLIENTS threads fetching the load file over and over for `seconds` (at most 10,000 fetches),
    over the server's loopback (it runs in the server's namespace)."""
    end = time.monotonic() + seconds
    received = [0] * HTTP_CLIENTS
    fetches = [0] * HTTP_CLIENTS
    errors = [0] * HTTP_CLIENTS
    request = (f"GET /boot/files/{LOAD_FILE} HTTP/1.1\r\nHost: {SRV_IP}\r\nConnection: close\r\n\r\n").encode()

    def worker(n: int) -> None:
        buf = bytearray(1 << 20)
        while time.monotonic() < end and fetches[n] < 10_000:
            try:
                with socket.create_connection(("127.0.0.1", HTTP_PORT), timeout=5) as s:
                    s.sendall(request)
                    while time.monotonic() < end:
                        got = s.recv_into(buf)
                        if not got:
                            break
                        received[n] += got
            except OSError:
                errors[n] += 1
                time.sleep(0.05)
            fetches[n] += 1

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(HTTP_CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 10)
    return {"mb_per_s": sum(received) / seconds / 1e6, "fetches": sum(fetches), "errors": sum(errors)}


# ---- orchestration (host namespace) ---------------------------------------------------------------------


def run(argv: list[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, check=True, capture_output=True, text=True, timeout=timeout)


def ns(name: str, *argv: str) -> list[str]:
    return ["ip", "netns", "exec", name, *argv]


def setup_netns() -> None:
    teardown_netns()
    run(["ip", "netns", "add", SRV])
    run(["ip", "netns", "add", CLI])
    run(["ip", "link", "add", SRV_IF, "netns", SRV, "type", "veth", "peer", "name", CLI_IF, "netns", CLI])
    for name, dev, ip in ((SRV, SRV_IF, SRV_IP), (CLI, CLI_IF, CLI_IP)):
        run(ns(name, "ip", "link", "set", "lo", "up"))
        run(ns(name, "ip", "addr", "add", f"{ip}/24", "dev", dev))
        run(ns(name, "ip", "link", "set", dev, "up"))


def teardown_netns() -> None:
    for name in (SRV, CLI):
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


def me(*argv: str) -> list[str]:
    return ns(CLI, sys.executable, __file__, *argv)


def load(count: int, rate: float, base_xid: int, drain: float = 3.0) -> dict[str, object]:
    out = run(me("--generate", str(count), str(rate), str(base_xid), str(drain)), timeout=3 * count / rate + 60)
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def wait_ready(proc: subprocess.Popen[str], what: str) -> None:
    if proc.stdout is None:
        return
    line = proc.stdout.readline()
    if '"ready"' not in line:
        raise RuntimeError(f"{what} did not start: {line}")


def start_cello(work: pathlib.Path, count: int, *extra: str) -> subprocess.Popen[str]:
    nodes = work / "nodes.txt"
    nodes.write_text("".join(f"{u} {':'.join(f'{b:02x}' for b in m)}\n"
                             for u, m in (client_ident(i) for i in range(count))))
    proc = subprocess.Popen(
        ns(SRV, sys.executable, "-m", "tests.dhcp_lab", "--advertise", SRV_IP, "--interface", SRV_IF, "--no-raw",
           "--nodes-file", str(nodes), "--profile", "ipxe", "--files", str(work / "files"),
           "--http-port", str(HTTP_PORT), *extra),
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    wait_ready(proc, "cello")
    return proc


def start_dnsmasq(work: pathlib.Path) -> subprocess.Popen[str]:
    conf = work / "dnsmasq.conf"
    conf.write_text(
        f"port=0\nuser=root\ninterface={SRV_IF}\nbind-interfaces\nno-resolv\nno-hosts\nquiet-dhcp\n"
        f"dhcp-range=10.79.0.0,proxy,255.255.255.0\npxe-service=x86PC,\"Cello\",undionly\n"
        f"log-facility={work / 'dnsmasq.log'}\n")
    proc = subprocess.Popen(ns(SRV, "dnsmasq", f"--conf-file={conf}", "--keep-in-foreground"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True)
    time.sleep(1.0)
    if proc.poll() is not None:
        raise RuntimeError(f"dnsmasq exited: {(work / 'dnsmasq.log').read_text()[-500:]}")
    return proc


def stop(proc: subprocess.Popen[str]) -> dict[str, Any]:
    """Stop a server; Cello's lab prints its counters (and main-loop lag) as its last line."""
    proc.terminate()
    try:
        out, _ = proc.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    for line in reversed((out or "").splitlines()):
        if '"stats"' in line:
            return dict(json.loads(line))
    return {}


LOAD_NICE = [0]  # --load-nice: the load clients' niceness


def loaded(count: int, rate: float, xid: int) -> tuple[dict[str, object], dict[str, object], dict[str, object]]:
    """DHCP at `rate` while TFTP and HTTP load the server's process; (dhcp, tftp, http) figures."""
    seconds = count / rate + 6  # the load starts 2 s before the DHCP and ends after its drain
    nice = ["nice", "-n", str(LOAD_NICE[0])]
    loaders = [subprocess.Popen(ns(netns, *nice, sys.executable, __file__, f"--load-{kind}", str(seconds)),
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
               for kind, netns in (("tftp", SRV), ("http", SRV))]
    try:
        time.sleep(2.0)
        dhcp = load(count, rate, xid)
    finally:
        results = []
        for proc in loaders:
            try:
                out, _ = proc.communicate(timeout=seconds + 30)
                results.append(dict(json.loads(out.strip().splitlines()[-1])))
            except (subprocess.TimeoutExpired, ValueError, IndexError):
                proc.kill()
                proc.communicate()
                results.append({"mb_per_s": float("nan")})
    return dhcp, results[0], results[1]


def line(name: str, what: str, r: dict[str, Any]) -> str:
    text = (f"  {name:15} {what:13} answered {r['answered']}/{r['sent']} (sent at {r['send_rate']:.0f}/s)"
            f"  p50 {r['p50_ms']:.2f} ms  p99 {r['p99_ms']:.2f} ms  max {r['max_ms']:.2f} ms")
    if "tftp" in r:
        text += f"  (TFTP {r['tftp']['mb_per_s']:.1f} MB/s, HTTP {r['http']['mb_per_s']:.0f} MB/s"
        text += f", main loop timer lag p99 {r['lag'].get('loop_lag_p99_ms', 0):.0f} ms)"
    return text


SERVERS = ("cello", "cello-thread", "cello-main-loop", "dnsmasq")
# tests/dhcp_lab.py's arguments per Cello variant; cello-nice0 (only with --only): the child at the parent's niceness
RESPONDER = {"cello": ["--responder", "process"], "cello-thread": ["--responder", "thread"],
             "cello-main-loop": ["--responder", "loop"],
             "cello-nice0": ["--responder", "process", "--responder-nice", "0"]}
_xid = [0x10000000]


def next_xid() -> int:
    _xid[0] = (_xid[0] + 0x00100000) & 0xFFFFFFFF
    return _xid[0]


def run_cell(name: str, work: pathlib.Path, count: int, mode: str, rate: int) -> dict[str, Any]:
    """One server freshly started, warmed up, measured once in one mode at one rate, stopped."""
    if name == "dnsmasq":  # Cello's process serves the TFTP/HTTP load (its DHCP off)
        procs = [start_dnsmasq(work), start_cello(work, count, "--no-dhcp")]
    else:
        procs = [start_cello(work, count, *RESPONDER[name])]
    stats: dict[str, Any] = {}
    try:
        load(2000, 2000, next_xid())  # warm-up: a second at the slowest rate (ARP, caches, first allocations)
        if mode == "quiet":
            r: dict[str, Any] = load(count, rate, next_xid())
        else:
            r, tftp, http = loaded(count, rate, next_xid())
            r.update(tftp=tftp, http=http)
    finally:
        for proc in reversed(procs):
            stats = stop(proc) or stats
    r["lag"] = stats
    return r


def median(values: list[float]) -> float:
    v = sorted(values)
    return v[len(v) // 2] if len(v) % 2 else (v[len(v) // 2 - 1] + v[len(v) // 2]) / 2


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    ap.add_argument("--quick", action="store_true", help="about two minutes: 4,000 clients, one round")
    ap.add_argument("--rounds", type=int, default=0, help="rounds of every cell (default 3, --quick 1)")
    ap.add_argument("--only", choices=[*SERVERS, "cello-nice0"], action="append",
                    help="measure only these servers (repeatable)")
    ap.add_argument("--only-loaded", action="store_true", help="only the loaded cell")
    ap.add_argument("--load-nice", type=int, default=0,
                    help="niceness of the TFTP/HTTP load clients (10: they yield the CPU to the servers, as"
                         " clients on other machines would; 0: they compete with them)")
    ap.add_argument("--generate", nargs=4, help=argparse.SUPPRESS)
    ap.add_argument("--load-tftp", type=float, help=argparse.SUPPRESS)
    ap.add_argument("--load-http", type=float, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.generate:
        count, rate, base, drain = args.generate
        print(json.dumps(generate(int(count), float(rate), int(base), float(drain))))
        return 0
    if args.load_tftp:
        print(json.dumps(tftp_load(args.load_tftp)))
        return 0
    if args.load_http:
        print(json.dumps(http_load(args.load_http)))
        return 0
    if os.geteuid() != 0:
        print("needs root (network namespaces)", file=sys.stderr)
        return 2
    count = 4000 if args.quick else 10000
    rounds = args.rounds or (1 if args.quick else 3)
    cells = [("quiet", 2000), ("quiet", 5000), ("quiet", 10000), ("loaded", 2000)]
    if args.only_loaded:
        cells = cells[-1:]
    LOAD_NICE[0] = args.load_nice
    servers = [s for s in [*SERVERS, "cello-nice0"] if s in (args.only or SERVERS)]
    results: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="celdb-") as tmp:
        work = pathlib.Path(tmp)
        (work / "files").mkdir()
        with open(work / "files" / LOAD_FILE, "wb") as f:
            f.write(os.urandom(LOAD_BYTES))
        try:
            setup_netns()
            print(f"boot storm: {count} distinct clients per cell, raw sender; {rounds} round(s) of"
                  f" {', '.join(f'{m} {r}/s' for m, r in cells)}, servers interleaved and freshly started per"
                  f" cell; loaded = {TFTP_CLIENTS} TFTP + {HTTP_CLIENTS} HTTP clients at nice {args.load_nice};"
                  f" load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs", flush=True)
            for rnd in range(rounds):
                for n, (mode, rate) in enumerate(cells):
                    shift = (rnd + n) % len(servers)  # the order rotates, so no server always goes first
                    for name in servers[shift:] + servers[:shift]:
                        r = run_cell(name, work, count, mode, rate)
                        results.setdefault((name, mode, rate), []).append(r)
                        print(line(name, f"{mode} {rate}/s", r) + f"  [round {rnd + 1}]", flush=True)
        finally:
            teardown_netns()
    print(f"\nresult: median over {rounds} round(s) (load average now {os.getloadavg()[0]:.1f})")
    for mode, rate in cells:
        row = []
        for name in servers:
            rs = results[(name, mode, rate)]
            answered, sent = sum(r["answered"] for r in rs), sum(r["sent"] for r in rs)
            row.append(f"{name} {answered / sent:.1%} p50 {median([r['p50_ms'] for r in rs]):.2f}"
                       f" p99 {median([r['p99_ms'] for r in rs]):.2f} ms")
        ratio = ""
        for name in (n for n in servers if n in RESPONDER and "dnsmasq" in servers):
            per_round = [c["p99_ms"] / d["p99_ms"] for c, d in zip(results[(name, mode, rate)],
                                                                    results[("dnsmasq", mode, rate)], strict=True)]
            ratio += (f" | p99 {name}/dnsmasq {median(per_round):.2f}"
                      f" (rounds {', '.join(f'{x:.2f}' for x in per_round)})")
        print(f"  {mode} {rate}/s: " + " | ".join(row) + ratio)
    for name in (n for n in servers if n in RESPONDER and not args.only_loaded):
        quiet, busy = results[(name, "quiet", 10000)], results[(name, "loaded", 2000)]
        met1 = all(r["answered"] == r["sent"] for r in quiet) and median([r["p99_ms"] for r in quiet]) <= 5.0
        met2 = all(r["answered"] == r["sent"] for r in busy) and median([r["p99_ms"] for r in busy]) <= 10.0
        print(f"  targets (issue 15), {name}: all answered at 10,000/s with p99 <= 5 ms:"
              f" {'met' if met1 else 'NOT met'};"
              f" p99 <= 10 ms at 2,000/s under TFTP+HTTP load: {'met' if met2 else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
