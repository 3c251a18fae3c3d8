"""`cello appliance list|show|disable|enable` and `cello server move UUID --to NAME`: the fleet through the
API (stdlib only, like the other client commands)."""

from __future__ import annotations

import argparse
import urllib.parse
from collections.abc import Callable
from typing import Any, TextIO

from appliance.cli_client import Client, Handler, emit, table

GiB = 1 << 30


def _gb(n: int) -> str:
    return f"{n / GiB:.1f}"


def appliance_list(c: Client, args: argparse.Namespace, out: TextIO) -> int:
    rows = c.call("GET", "/api/v1/appliances")
    emit(args, rows, out, lambda: table(
        [(a["name"], a["state"] + (f" ({a['disabled_reason']})" if a["disabled_reason"] else ""), a["api_url"],
          a["servers"], f"{_gb(a['placed_bytes'])}/{_gb(a['capacity_bytes'])}", ",".join(a["templates"]) or "-",
          ",".join(a["copying"]) or "-", f"{a['heartbeat_age_s']:.1f}s")
         for a in rows],
        ("name", "state", "api", "servers", "placed/capacity GiB", "templates", "copying", "heartbeat"), out))
    return 0


def appliance_show(c: Client, args: argparse.Namespace, out: TextIO) -> int:
    a = c.call("GET", f"/api/v1/appliances/{urllib.parse.quote(args.name, safe='')}")
    emit(args, a, out, lambda: print("\n".join(f"{k}: {v}" for k, v in a.items()), file=out))
    return 0


def _set(enabled: bool) -> Handler:
    def handler(c: Client, args: argparse.Namespace, out: TextIO) -> int:
        body: dict[str, Any] | None = None if enabled else {"reason": args.reason or "disabled"}
        a = c.call("POST", f"/api/v1/appliances/{urllib.parse.quote(args.name, safe='')}/"
                           f"{'enable' if enabled else 'disable'}", body)
        emit(args, a, out, lambda: print(f"appliance {a['name']}: {a['state']}", file=out))
        return 0
    return handler


def server_move(c: Client, args: argparse.Namespace, out: TextIO) -> int:
    server = c.call("POST", f"/api/v1/servers/{urllib.parse.quote(args.uuid, safe='')}/move",
                    {"appliance": args.to})
    emit(args, server, out, lambda: print(f"server {server['uuid']} is on {server['appliance']} "
                                          f"({server['state']})", file=out))
    return 0


def add_fleet_commands(subparsers: Any, server: Any,
                       common: Callable[[argparse.ArgumentParser, Handler], argparse.ArgumentParser]) -> None:
    appliance = subparsers.add_parser("appliance", help="the fleet's appliances (admin)").add_subparsers(
        dest="action", metavar="ACTION", required=True)
    common(appliance.add_parser("list", help="list them: state, capacity, templates held"), appliance_list)
    common(appliance.add_parser("show", help="show one"), appliance_show).add_argument("name")
    p = common(appliance.add_parser("disable", help="no new placement there"), _set(False))
    p.add_argument("name")
    p.add_argument("--reason", help="shown with its state")
    common(appliance.add_parser("enable", help="placement there again"), _set(True)).add_argument("name")
    p = common(server.add_parser("move", help="move a powered-off server to another appliance (admin)"), server_move)
    p.add_argument("uuid")
    p.add_argument("--to", required=True, help="the appliance it moves to")
