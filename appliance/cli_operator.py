"""`cello discovered list|forget`, `cello server adopt MAC` and `cello server diagnose UUID`: the operator's
view through the API (stdlib only, like the other client commands).

`diagnose` exits 0 when the node booted (or nothing is wrong), 1 when it names a problem, so a script can
ask "is node X up?".
"""

from __future__ import annotations

import argparse
import time
import urllib.parse
from collections.abc import Callable
from typing import Any, TextIO

from appliance.cli_client import Client, Handler, emit, table

ARCH_NAMES = {0: "bios", 6: "efi-ia32", 7: "efi-x64", 9: "efi-x64", 11: "efi-arm64", 16: "efi-x64-http",
              19: "efi-arm64-http"}


def _stamp(at: float | None) -> str:
    return "-" if at is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at))


def _arch(arch: int | None) -> str:
    return "-" if arch is None else f"{arch} ({ARCH_NAMES[arch]})" if arch in ARCH_NAMES else str(arch)


def discovered_list(c: Client, args: argparse.Namespace, out: TextIO) -> int:
    nodes = c.call("GET", "/api/v1/discovered")
    emit(args, nodes, out, lambda: table(
        [(n["mac"], n["uuid"] or "-", _arch(n["arch"]), n["vendor_class"] or "-", n["address"] or "-",
          _stamp(n["first_seen"]), _stamp(n["last_seen"]), n["count"]) for n in nodes],
        ("mac", "uuid", "arch", "vendor class", "address", "first seen", "last seen", "count"), out))
    return 0


def discovered_forget(c: Client, args: argparse.Namespace, out: TextIO) -> int:
    c.call("DELETE", f"/api/v1/discovered/{urllib.parse.quote(args.mac, safe='')}")
    emit(args, {"forgotten": args.mac}, out, lambda: print(f"forgot {args.mac}", file=out))
    return 0


def server_adopt(c: Client, args: argparse.Namespace, out: TextIO) -> int:
    body: dict[str, Any] = {"template": args.template, "user": args.user}
    if args.profile:
        body["profile"] = args.profile
    if args.hostname:
        body["hostname"] = args.hostname
    if args.data_gb:
        body["data_volumes"] = [{"size_gb": n} for n in args.data_gb]
    server = c.call("POST", f"/api/v1/discovered/{urllib.parse.quote(args.mac, safe='')}/adopt", body)
    emit(args, server, out, lambda: print(f"adopted {args.mac} as server {server['uuid']} "
                                          f"({server['template']}@{server['version']}, {server['state']})", file=out))
    return 0


def _diagnosis_lines(d: dict[str, Any], out: TextIO) -> None:
    print(f"server:  {d['server']}", file=out)
    print(f"reached: {d['reached_text']}", file=out)
    print(("ok:      " if d["ok"] else f"problem: {d['problem']}: ") + d["summary"], file=out)
    for hint in d["hints"]:
        print(f"  - {hint}", file=out)
    print(file=out)
    table([("yes" if s["seen"] else "no", s["text"], _stamp(s["at"]) if s["seen"] else "", s["detail"])
           for s in d["steps"]], ("seen", "step", "at", "detail"), out)


def server_diagnose(c: Client, args: argparse.Namespace, out: TextIO) -> int:
    d = c.call("GET", f"/api/v1/servers/{urllib.parse.quote(args.uuid, safe='')}/diagnose")
    emit(args, d, out, lambda: _diagnosis_lines(d, out))
    return 0 if d["ok"] else 1


def add_operator_commands(subparsers: Any, server: Any,
                          common: Callable[[argparse.ArgumentParser, Handler], argparse.ArgumentParser]) -> None:
    discovered = subparsers.add_parser("discovered", help="PXE clients no server names (admin)").add_subparsers(
        dest="action", metavar="ACTION", required=True)
    common(discovered.add_parser("list", help="list them, most recently seen first"), discovered_list)
    common(discovered.add_parser("forget", help="forget one"), discovered_forget).add_argument("mac")

    p = common(server.add_parser("adopt", help="create a server from a discovered node (admin)"), server_adopt)
    p.add_argument("mac", help="the discovered node's MAC (its UUID comes from its record)")
    p.add_argument("--template", required=True)
    p.add_argument("--user", required=True, help="owner")
    p.add_argument("--profile")
    p.add_argument("--hostname")
    p.add_argument("--data-gb", type=int, action="append", help="a data volume of N GB (repeatable)")
    p = common(server.add_parser("diagnose", help="why didn't it boot: the last step its node reached"),
               server_diagnose)
    p.add_argument("uuid")
