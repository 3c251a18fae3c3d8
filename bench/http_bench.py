"""HTTP boot benchmark: Cello's boot-file path against Debian's nginx serving the same files, same run.

What a node's iPXE does with `kernel http://<appliance>:8080/boot/files/…`: Cello is `cello serve`
(the composition root, `Appliance.build` through `appliance serve --config`, TFTP/DHCP off, iSCSI
driver none) and every request takes the whole route a node's takes: the middlewares, the
`http-boot` switch, the boot-client lookup, the path resolution inside the boot files root, the
FileResponse (ranges, conditional requests) and the `http` event. nginx serves the same folder under
the same URL (`location /boot/files/ { alias …; }`) with Debian's stock http settings (sendfile on,
tcp_nopush on, an access log: Cello records every fetch as an event, so nginx keeps its log), twice:
worker_processes 1 (one process, as Cello is — the fair peer and the one the target is checked
against) and worker_processes auto (one per core; printed beside it).

Cells, each a wrk run (Debian's wrk, keep-alive, 1 thread for 1 connection, else 2 on this 2-core box):
  big   a 32 MiB file (kernel/initrd size) at 1, 8, 32 and 128 concurrent clients: aggregate MB/s
        (bytes received in the window, partial responses included, over its length)
  small a 1 KiB file (an iPXE script's size) at 32 clients: requests/s and latency p50/p99
Per cell also the server's CPU (per GB served, or per request) and the client's, from /proc and
getrusage: on one machine the client's copying of what it receives competes with the server for the
same two cores, so the server's CPU per byte says what the throughput alone cannot.

The servers are measured interleaved, in rounds (the order rotated from round to round and cell to
cell, as in tftp_bench.py), each round's figures printed, then per cell the median over the rounds and
the median of the per-round Cello/nginx ratios; the target of issue 15 (HTTP boot >= 0.9x nginx) is
printed per cell as met / NOT met against nginx with one worker. As root everything runs in a network
namespace made and removed here (its own loopback, none of the host's packet taps); else on the host's
127.0.0.1. Every wait is bounded: wrk runs for the window, each process has a timeout, readiness waits
give up after 60 s.

    .venv/bin/python bench/http_bench.py            # full run: 3 rounds of 3 s cells (~3.5 minutes)
    .venv/bin/python bench/http_bench.py --quick    # 1 round, 1 s cells, 1 and 32 clients (~25 s)
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
PYTHON = str(REPO / ".venv" / "bin" / "python") if (REPO / ".venv" / "bin" / "python").exists() else sys.executable
NETNS = "cello-httpb"
HOST = "127.0.0.1"
BIG = "bench/vmlinuz"
SMALL = "bench/boot.ipxe"
BIG_SIZE = 32 << 20
SMALL_SIZE = 1024
SMALL_CLIENTS = 32
ADMIN_TOKEN = "http-bench-admin-token-0123456789"
TARGET = 0.9
READY_TIMEOUT = 60.0

# wrk's summary as one JSON line (its own report goes to stdout before it)
WRK_REPORT = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('\\n{"requests": %d, "bytes": %d, "duration_us": %d, "errors": %d,'
    .. ' "status_errors": %d, "timeouts": %d, "p50_us": %d, "p99_us": %d}\\n',
    summary.requests, summary.bytes, summary.duration, e.connect + e.read + e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99)))
end
"""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


class Namespace:
    """The network namespace everything runs in (as root), or the host when it cannot be made."""

    def __init__(self) -> None:
        self.name: str | None = None

    def up(self) -> None:
        if os.geteuid() != 0 or shutil.which("ip") is None:
            return
        self.down()
        if subprocess.run(["ip", "netns", "add", NETNS], capture_output=True).returncode != 0:
            return
        subprocess.run(["ip", "netns", "exec", NETNS, "ip", "link", "set", "lo", "up"], check=True, timeout=10)
        self.name = NETNS

    def down(self) -> None:
        if not Path(f"/run/netns/{NETNS}").exists():
            return
        pids = subprocess.run(["ip", "netns", "pids", NETNS], capture_output=True, text=True, timeout=10).stdout
        for pid in pids.split():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)
        subprocess.run(["ip", "netns", "del", NETNS], capture_output=True, timeout=10)
        self.name = None

    def wrap(self, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.name, *argv] if self.name else argv


class Server:
    def __init__(self, label: str, argv: list[str], port: int, log: Path) -> None:
        self.label = label
        self.argv = argv
        self.port = port
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         cwd=REPO, start_new_session=True)

    def check(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            code = None if self.proc is None else self.proc.returncode
            raise RuntimeError(f"{self.label} exited ({code}): {self.log.read_text(errors='replace')[-1500:]}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)

    def url(self, rel: str) -> str:
        return f"http://{HOST}:{self.port}/boot/files/{rel}"

    def cpu_seconds(self) -> float:
        """utime + stime of the server's processes: the process `ip netns exec` became, and its children
        (nginx's workers)."""
        assert self.proc is not None
        pids = [self.proc.pid, *_children(self.proc.pid)]
        total = 0
        for pid in pids:
            with contextlib.suppress(OSError):
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                total += int(fields[11]) + int(fields[12])
        return total / os.sysconf("SC_CLK_TCK")


def _children(pid: int) -> list[int]:
    with contextlib.suppress(OSError):
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    return []


def cello_server(ns: Namespace, work: Path, state: Path) -> Server:
    port = free_port()
    config = work / "cello.toml"
    config.write_text(
        f'[appliance]\nstate_dir = "{state}"\nadvertise = "{HOST}"\n'
        f'[api]\nlisten = "{HOST}:{port}"\nadmin_token = "{ADMIN_TOKEN}"\n'
        '[tftp]\nenabled = false\n[dhcp]\nenabled = false\n[iscsi]\ndriver = "none"\n')
    argv = ns.wrap([PYTHON, "-m", "appliance", "serve", "--config", str(config)])
    return Server("cello", argv, port, work / "cello.log")


def nginx_server(ns: Namespace, work: Path, files_root: Path, workers: str) -> Server:
    port = free_port()
    d = work / f"nginx-{workers}"
    (d / "tmp").mkdir(parents=True)
    conf = d / "nginx.conf"
    # Debian's /etc/nginx/nginx.conf http block, with only the listen, root and log paths changed
    conf.write_text(
        f"worker_processes {workers};\npid {d}/nginx.pid;\nerror_log {d}/error.log;\n"
        "events { worker_connections 4096; }\n"
        "http {\n  sendfile on;\n  tcp_nopush on;\n  types_hash_max_size 2048;\n"
        "  default_type application/octet-stream;\n"
        f"  access_log {d}/access.log;\n  client_body_temp_path {d}/tmp;\n"
        f"  server {{\n    listen {HOST}:{port};\n"
        f"    location /boot/files/ {{ alias {files_root}/; }}\n  }}\n}}\n")
    argv = ns.wrap(["nginx", "-c", str(conf), "-g", "daemon off;"])
    return Server(f"nginx-{workers}", argv, port, d / "nginx.out")


def curl(ns: Namespace, url: str, timeout: float = 10) -> tuple[int, bytes]:
    done = subprocess.run(ns.wrap(["curl", "-s", "-o", "-", "-w", "\n%{http_code}", url]), capture_output=True,
                          timeout=timeout)
    body, _, code = done.stdout.rpartition(b"\n")
    return int(code or 0), body


def wait_ready(ns: Namespace, server: Server) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    while True:
        server.check()
        with contextlib.suppress(subprocess.TimeoutExpired, ValueError):
            if curl(ns, server.url(SMALL), timeout=2)[0] == 200:
                return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{server.label}: no answer on port {server.port} within {READY_TIMEOUT:.0f} s")
        time.sleep(0.3)


def verify(ns: Namespace, server: Server, files_root: Path) -> None:
    """Both files arrive whole and right from every server before anything is timed."""
    for rel in (SMALL, BIG):
        status, body = curl(ns, server.url(rel), timeout=30)
        want = (files_root / rel).read_bytes()
        if status != 200 or hashlib.sha256(body).digest() != hashlib.sha256(want).digest():
            raise RuntimeError(f"{server.label}: GET {rel}: status {status}, {len(body)} bytes, not the file")


@dataclass
class Cell:
    """One (server, kind, clients) wrk run of one round."""

    requests: int
    bytes: int
    seconds: float
    errors: int
    p50_ms: float
    p99_ms: float
    server_cpu: float
    client_cpu: float

    @property
    def mbps(self) -> float:
        return self.bytes / self.seconds / 1e6

    @property
    def rps(self) -> float:
        return self.requests / self.seconds

    def line(self, kind: str) -> str:
        cores = f"cpu server {self.server_cpu / self.seconds:4.0%} client {self.client_cpu / self.seconds:4.0%}"
        errors = f"  errors {self.errors}" if self.errors else ""
        if kind == "big":
            per_gb = self.server_cpu / (self.bytes / 1e9) if self.bytes else 0.0
            return (f"{self.mbps:8.1f} MB/s  {self.requests:5d} responses  server {per_gb:5.2f} cpu-s/GB  "
                    f"{cores}{errors}")
        per_req = self.server_cpu / self.requests * 1e6 if self.requests else 0.0
        return (f"{self.rps:9.0f} req/s  p50 {self.p50_ms:7.2f} ms  p99 {self.p99_ms:7.2f} ms  server "
                f"{per_req:6.1f} cpu-us/req  {cores}{errors}")


def run_wrk(ns: Namespace, server: Server, rel: str, clients: int, window: int, script: Path) -> Cell:
    threads = 1 if clients == 1 else 2
    argv = ns.wrap(["wrk", f"-t{threads}", f"-c{clients}", f"-d{window}s", "--timeout", "30s", "-s", str(script),
                    server.url(rel)])
    cpu0 = server.cpu_seconds()
    usage0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run(argv, capture_output=True, text=True, timeout=window + 60)
    usage1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu1 = server.cpu_seconds()
    if done.returncode != 0:
        raise RuntimeError(f"wrk against {server.label}: exit {done.returncode}: {done.stderr.strip()[-500:]}")
    report: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return Cell(requests=report["requests"], bytes=report["bytes"], seconds=report["duration_us"] / 1e6,
                errors=report["errors"] + report["status_errors"] + report["timeouts"],
                p50_ms=report["p50_us"] / 1000, p99_ms=report["p99_us"] / 1000, server_cpu=cpu1 - cpu0,
                client_cpu=(usage1.ru_utime + usage1.ru_stime) - (usage0.ru_utime + usage0.ru_stime))


def cpu_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine, from /proc/stat."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)


def busy_share(seconds: float = 0.2) -> float:
    """The machine's busy share while this benchmark is idle: what other work does to the figures."""
    busy0, total0 = cpu_ticks()
    time.sleep(seconds)
    busy1, total1 = cpu_ticks()
    return (busy1 - busy0) / max(1, total1 - total0)


def rotated(servers: list[Server], shift: int) -> list[Server]:
    k = shift % len(servers)
    return servers[k:] + servers[:k]


def write_files(files_root: Path) -> None:
    (files_root / "bench").mkdir(parents=True, exist_ok=True)
    with open(files_root / BIG, "wb") as f:
        for _ in range(BIG_SIZE >> 20):
            f.write(os.urandom(1 << 20))
    # an iPXE script's worth of text (Cello's rendered scripts are about this long)
    script = "#!ipxe\n" + "".join(f"echo line {i:04d} of a boot script that is about one KiB long\n"
                                  for i in range(64))
    (files_root / SMALL).write_bytes(script.encode()[:SMALL_SIZE])
    for path in (files_root / BIG, files_root / SMALL):
        path.chmod(0o644)


def median_ratio(mine: list[Cell], theirs: list[Cell], value: str) -> tuple[float, list[float]] | None:
    ratios = [getattr(c, value) / getattr(p, value) for c, p in zip(mine, theirs, strict=False)
              if getattr(p, value) > 0]
    return (statistics.median(ratios), ratios) if ratios else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1 round of 1 s cells, 1 and 32 clients (~25 s)")
    ap.add_argument("--window", type=int, default=None, help="seconds per cell (wrk -d)")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds (the median is reported)")
    ap.add_argument("--clients", default=None, help="client counts of the big-file cells (default 1,8,32,128)")
    args = ap.parse_args()
    window = max(1, args.window or (1 if args.quick else 3))
    rounds = max(1, args.rounds or (1 if args.quick else 3))
    counts = [int(c) for c in (args.clients or ("1,32" if args.quick else "1,8,32,128")).split(",")]
    missing = [tool for tool in ("wrk", "nginx", "curl") if shutil.which(tool) is None]
    if missing:
        print(f"not measured: {', '.join(missing)} missing (scripts/setup.sh installs them)")
        return 1
    cells_of = [("big", n) for n in counts] + [("small", SMALL_CLIENTS)]

    work = Path(tempfile.mkdtemp(prefix="cello-httpbench-"))
    work.chmod(0o755)
    state = work / "state"
    files_root = state / "boot"  # the appliance's boot files root (<state_dir>/boot)
    write_files(files_root)
    for path in (work, state, files_root):
        path.chmod(0o755)
    (files_root / "bench").chmod(0o755)
    script = work / "report.lua"
    script.write_text(WRK_REPORT)
    ns = Namespace()
    ns.up()
    servers = [cello_server(ns, work, state), nginx_server(ns, work, files_root, "1"),
               nginx_server(ns, work, files_root, "auto")]
    results: dict[tuple[str, str, int], list[Cell]] = {}
    try:
        for server in servers:
            server.start()
        for server in servers:
            wait_ready(ns, server)
            verify(ns, server, files_root)
        for server in servers:  # warm-up, not counted
            run_wrk(ns, server, BIG, 8, 1, script)
            run_wrk(ns, server, SMALL, SMALL_CLIENTS, 1, script)
        where = f"network namespace {ns.name}" if ns.name else "the host's loopback"
        print(f"{len(servers)} servers on {where}; {rounds} round(s) of {window} s cells; "
              f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}", flush=True)
        for r in range(rounds):
            print(f"round {r + 1}/{rounds}", flush=True)
            outside: list[float] = []
            for i, (kind, n) in enumerate(cells_of):
                for server in rotated(servers, r + i):
                    server.check()
                    cell = run_wrk(ns, server, BIG if kind == "big" else SMALL, n, window, script)
                    outside.append(busy_share())
                    results.setdefault((server.label, kind, n), []).append(cell)
                    print(f"  {server.label:11s} {kind:5s} n={n:<4d} {cell.line(kind)}", flush=True)
            print(f"  other work between cells: median {statistics.median(outside):.0%}, max {max(outside):.0%}"
                  " of the machine's CPU", flush=True)
    finally:
        for server in servers:
            server.stop()
        ns.down()
        shutil.rmtree(work, ignore_errors=True)

    print()
    print(f"Median of {rounds} round(s), {window} s cells")
    for kind, n in cells_of:
        for server in servers:
            runs = results.get((server.label, kind, n), [])
            if not runs:
                continue
            if kind == "big":
                per_round = " ".join(f"{c.mbps:.0f}" for c in runs)
                print(f"  {server.label:11s} {kind:5s} n={n:<4d} {statistics.median(c.mbps for c in runs):8.1f} MB/s"
                      f" [{per_round}]")
            else:
                per_round = " ".join(f"{c.rps:.0f}" for c in runs)
                print(f"  {server.label:11s} {kind:5s} n={n:<4d} {statistics.median(c.rps for c in runs):9.0f} req/s"
                      f" [{per_round}]  p50 {statistics.median(c.p50_ms for c in runs):.2f} ms"
                      f"  p99 {statistics.median(c.p99_ms for c in runs):.2f} ms")
    print()
    print("Cello/nginx: median of the per-round ratios [per round]; > 1 means Cello is faster")
    verdicts: list[str] = []
    for kind, n in cells_of:
        mine = results.get(("cello", kind, n), [])
        parts = []
        for peer in servers[1:]:
            value = "mbps" if kind == "big" else "rps"
            got = median_ratio(mine, results.get((peer.label, kind, n), []), value)
            if got is None:
                parts.append(f"{peer.label} -")
                continue
            med, ratios = got
            parts.append(f"{peer.label} x{med:.2f} [{' '.join(f'{x:.2f}' for x in ratios)}]")
            if peer.label == "nginx-1":
                what = "MB/s" if kind == "big" else "req/s"
                verdicts.append(f"  {kind:5s} n={n:<4d} {what:5s} >= {TARGET}x nginx-1: "
                                f"{'met' if med >= TARGET else 'NOT met'} (x{med:.2f})")
        print(f"  {kind:5s} n={n:<4d} " + "   ".join(parts))
    print("target (issue 15: HTTP boot >= 0.9x nginx; one process each, nginx worker_processes 1):")
    print("\n".join(verdicts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
