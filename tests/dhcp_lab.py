"""Run the proxyDHCP (and optionally the DNS responder) on its own, with a static boot policy.

For the lab, the tests and the benchmark (test code: it ships in no package) — the appliance wires
`ProxyDHCP` with its real policy.

    python -m tests.dhcp_lab --advertise 10.78.0.2 --interface dhv1 --node UUID=MAC --profile pxelinux
    python -m tests.dhcp_lab --advertise 10.78.0.2 --any --profile ipxe        # answer every PXE client

`--responder` chooses where DHCP is answered, as `[dhcp] responder` does in the appliance: a child
process (`dhcp/process.py`, the default), the responder's own threads, or the main loop.

With `--files DIR` the same process also serves DIR over TFTP (port 69, `bootfiles.tftp_server`) and over
HTTP (`--http-port`, aiohttp's sendfile FileResponse under /boot/files/, as the appliance's HTTP boot
does), on the main loop, as in the appliance: bench/dhcp_bench.py loads them while it measures DHCP.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import logging
import pathlib
import signal
import sys
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from bootfiles.spec import BootSpec, IscsiRoot, Profile, PxeClient
from dhcp.process import RESPONDER_NICE, ProcessProxyDHCP
from dhcp.proxy import GIL_SWITCH_INTERVAL, ProxyDHCP


@dataclass
class StaticPolicy:
    """A BootPolicy over in-memory maps: by UUID, then by MAC, then the unknown-node spec (None: ignore)."""

    by_uuid: dict[str, BootSpec] = field(default_factory=dict)
    by_mac: dict[str, BootSpec] = field(default_factory=dict)
    unknown: BootSpec | None = None
    seen: dict[str, str] = field(default_factory=dict)  # server uuid -> address its DHCP said it holds
    unknown_clients: list[PxeClient] = field(default_factory=list)  # what client_unknown was told

    def boot_spec(self, *, uuid: str | None, mac: str | None) -> BootSpec | None:
        if uuid is not None and uuid in self.by_uuid:
            return self.by_uuid[uuid]
        if mac is not None and mac in self.by_mac:
            return self.by_mac[mac]
        return self.unknown

    def client_seen(self, *, mac: str, uuid: str | None, address: str) -> None:
        spec = self.by_uuid.get(uuid) if uuid is not None else None
        spec = spec or self.by_mac.get(mac)
        if spec is not None:
            self.seen[spec.server_uuid] = address

    def client_unknown(self, client: PxeClient) -> None:
        self.unknown_clients.append(client)

    def may_fetch(self, spec: BootSpec, address: str) -> bool:
        return spec.root is None or self.seen.get(spec.server_uuid) == address


PROFILES = {
    "pxelinux": Profile("pxelinux", loader="pxelinux", bios_loader="pxelinux.0", efi_loader="ipxe.efi"),
    "ipxe": Profile("ipxe", loader="ipxe", bios_loader="undionly.kpxe", efi_loader="ipxe.efi"),
}


def make_spec(server_uuid: str, profile: Profile, http_base: str, hostname: str | None = None) -> BootSpec:
    return BootSpec(
        server_uuid=server_uuid,
        profile=profile,
        kernel="templates/tiny/v1/vmlinuz",
        initrd="templates/tiny/v1/initrd.img",
        root=IscsiRoot(f"iqn.2026-11.io.cello:{server_uuid}", "10.78.0.2", 3260, 1, f"iqn.node:{server_uuid}"),
        http_base=http_base,
        hostname=hostname,
    )


def _event_printer(kind: str, fields: Mapping[str, object]) -> None:
    print(json.dumps({"kind": kind, **fields}), flush=True)


async def _run(args: argparse.Namespace) -> None:
    profile = PROFILES[args.profile]
    http_base = args.http_base or f"http://{args.advertise}:8080"
    policy = StaticPolicy()
    for node in args.node:
        uuid, _, mac = node.partition("=")
        spec = make_spec(uuid.lower(), profile, http_base)
        policy.by_uuid[uuid.lower()] = spec
        if mac:
            policy.by_mac[mac.lower()] = spec
    if args.nodes_file:
        text = await asyncio.to_thread(pathlib.Path(args.nodes_file).read_text)
        for line in text.splitlines():
            if line.strip():
                uuid, mac = line.split()
                spec = make_spec(uuid, profile, http_base)
                policy.by_uuid[uuid] = spec
                policy.by_mac[mac] = spec
    if args.any:
        policy.unknown = make_spec("00000000-0000-4000-8000-000000000000", profile, http_base)
    # Long-lived objects (the policy index) out of the cyclic GC's way: a full collection over a large
    # index is a multi-millisecond pause in the reply path. The appliance's composition root should do
    # the same once its boot index is loaded.
    gc.freeze()
    responder = "loop" if args.dhcp_on_main_loop else args.responder
    if responder == "thread":
        sys.setswitchinterval(GIL_SWITCH_INTERVAL)  # as the appliance does: see dhcp/proxy.py
    options = {"interface": args.interface, "port": args.port, "pxe_port": args.pxe_port,
               "events": _event_printer if args.events else None, "raw_fallback": not args.no_raw}
    proxy: ProxyDHCP | None = None
    if args.no_dhcp:
        pass
    elif responder == "process":  # the policy is static: the child's mirror is the policy itself
        proxy = ProcessProxyDHCP(policy, args.advertise, mirror=lambda: policy, nice=args.responder_nice, **options)  # type: ignore[arg-type]
    else:
        proxy = ProxyDHCP(policy, args.advertise, own_thread=responder == "thread", **options)  # type: ignore[arg-type]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with _file_servers(args, policy):
        lags: list[float] = []
        lag = loop.create_task(_loop_lag(lags))
        if proxy is not None:
            await proxy.start()
        print(json.dumps({"kind": "ready", "bound": {k: list(v) for k, v in proxy.bound.items()} if proxy else {},
                          "raw": proxy.raw_mode if proxy else False}), flush=True)
        try:
            await stop.wait()
        finally:
            lag.cancel()
            if proxy is not None:
                await proxy.stop()
            lags.sort()
            print(json.dumps({"kind": "stats", **(vars(proxy.stats) if proxy else {}),
                              "loop_lag_p99_ms": lags[int(0.99 * len(lags))] * 1000 if lags else 0.0,
                              "loop_lag_max_ms": lags[-1] * 1000 if lags else 0.0}), flush=True)


async def _loop_lag(into: list[float]) -> None:
    """How late the main loop runs a 10 ms timer: shows how saturated the load kept it."""
    loop = asyncio.get_running_loop()
    while True:
        due = loop.time() + 0.01
        await asyncio.sleep(0.01)
        into.append(max(0.0, loop.time() - due))


@contextlib.asynccontextmanager
async def _file_servers(args: argparse.Namespace, policy: StaticPolicy) -> AsyncIterator[None]:
    """TFTP and HTTP of --files on this loop (nothing without --files)."""
    if not args.files:
        yield
        return
    from aiohttp import web

    from bootfiles.tftp_server import TftpServer
    from bootfiles.tree import BootTree

    root = Path(args.files)
    tftp = TftpServer("0.0.0.0", 69, BootTree([root], None, policy), max_transfers=1024)
    files = await asyncio.to_thread(lambda: {f.name: f for f in root.iterdir() if f.is_file()})

    async def boot_file(request: web.Request) -> web.StreamResponse:
        path = files.get(request.match_info["path"])
        if path is None:
            raise web.HTTPNotFound()
        return web.FileResponse(path, headers={"Cache-Control": "no-cache"})

    app = web.Application()
    app.router.add_get("/boot/files/{path:.+}", boot_file)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await tftp.start()
    try:
        await web.TCPSite(runner, "0.0.0.0", args.http_port).start()
        yield
    finally:
        await runner.cleanup()
        await tftp.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.dhcp_lab",
                                 description=__doc__.splitlines()[0] if __doc__ else "")
    ap.add_argument("--advertise", required=True)
    ap.add_argument("--interface", default="")
    ap.add_argument("--port", type=int, default=67)
    ap.add_argument("--pxe-port", type=int, default=4011)
    ap.add_argument("--profile", choices=sorted(PROFILES), default="pxelinux")
    ap.add_argument("--http-base", default="")
    ap.add_argument("--node", action="append", default=[], help="UUID[=MAC] of a known node (repeatable)")
    ap.add_argument("--nodes-file", default="", help="file of 'UUID MAC' lines (known nodes)")
    ap.add_argument("--any", action="store_true", help="answer unknown nodes too")
    ap.add_argument("--events", action="store_true", help="print boot events as JSON lines")
    ap.add_argument("--no-raw", action="store_true", help="no raw-socket fallback when :67 is taken")
    ap.add_argument("--no-dhcp", action="store_true", help="no proxyDHCP (only the --files servers)")
    ap.add_argument("--responder", choices=("process", "thread", "loop"), default="process",
                    help="where DHCP is answered, as the appliance's [dhcp] responder (default: process)")
    ap.add_argument("--dhcp-on-main-loop", action="store_true", help="the same as --responder loop")
    ap.add_argument("--responder-nice", type=int, default=RESPONDER_NICE,
                    help=f"--responder process: the child's niceness (default {RESPONDER_NICE}, as the appliance's)")
    ap.add_argument("--files", default="", help="also serve this folder over TFTP (:69) and HTTP, on this loop")
    ap.add_argument("--http-port", type=int, default=8080, help="the --files HTTP port")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    asyncio.run(_run(args))
    return 0


if __name__ == "__main__":  # run as the module: the responder process unpickles tests.dhcp_lab.StaticPolicy
    from tests.dhcp_lab import main as _main

    sys.exit(_main())
