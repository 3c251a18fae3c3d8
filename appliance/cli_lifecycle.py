"""`cello server upgrade|rollback|snapshot|power|label|bmc` and `cello template capture`: a server's life on
its clone, through the API (stdlib only, like the other client commands).

A root swap waits for its answer (with --reboot: until the node is back on its root), so these commands
take --timeout. A group upgrade (--selector) first prints which servers it would touch; --yes goes ahead.
"""

from __future__ import annotations

import argparse
import time
import urllib.parse
from collections.abc import Callable
from typing import Any, TextIO

from appliance.cli_client import Client, Handler, emit, table

SWAP_TIMEOUT = 900.0


def _path(uuid: str, *rest: str) -> str:
    return "/api/v1/servers/" + "/".join(urllib.parse.quote(p, safe="") for p in (uuid, *rest))


def _swap_lines(r: dict[str, Any], out: TextIO) -> None:
    print(f"{r['action']} {r['server']}: {r['before']} -> {r['after']}", file=out)
    if r.get("restore_point"):
        print(f"  restore point: {r['restore_point']}", file=out)
    if r.get("powered"):
        print(f"  power: {', '.join(r['powered'])}", file=out)
    for p in r.get("problems", []):
        print(f"  problem: {p}", file=out)


def _long(c: Client, args: argparse.Namespace) -> Client:
    c.timeout = args.timeout
    return c


def server_upgrade(c: Client, args: argparse.Namespace, out: TextIO) -> int:
    if args.selector:
        return _rolling(_long(c, args), args, out)
    if not args.uuid:
        print("cello: name a server (UUID) or a group (--selector key=value)", file=out)
        return 2
    body: dict[str, Any] = {"discard_old": args.discard_old, "reboot": args.reboot}
    if args.to:
        body["to"] = args.to
    report = _long(c, args).call("POST", _path(args.uuid, "rebuild"), body)
    emit(args, report, out, lambda: _swap_lines(report, out))
    return 0


def _selector(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"cello: --selector {item!r}: must be key=value")
        out[key] = value
    return out


def _rolling(c: Client, args: argparse.Namespace, out: TextIO) -> int:
    body: dict[str, Any] = {"selector": _selector(args.selector), "batch": args.batch,
                            "max_failures": args.max_failures, "reboot": args.reboot, "discard_old": args.discard_old}
    if args.to:
        body["to"] = args.to
    plan = c.call("POST", "/api/v1/upgrades", body)
    if not args.yes:
        emit(args, plan, out, lambda: print(f"would upgrade {plan['count']} server(s) in waves of {args.batch}: "
                                            f"{' '.join(plan['servers']) or '-'}\nrun again with --yes", file=out))
        return 2
    job = c.call("POST", "/api/v1/upgrades", {**body, "confirm": True})
    print(f"upgrading {sum(len(w) for w in job['waves'])} server(s) in {len(job['waves'])} wave(s)", file=out)
    while job["state"] == "running":
        time.sleep(args.poll)
        job = c.call("GET", f"/api/v1/upgrades/{urllib.parse.quote(job['id'])}")

    def render() -> None:
        table([(u, n["state"], n.get("after", ""), n.get("why", "")) for u, n in job["nodes"].items()],
              ["server", "result", "now on", "why"], out)
        print(f"upgrade {job['state']} ({job['failures']} failed, budget {job['max_failures']})", file=out)

    emit(args, job, out, render)
    return 0 if job["state"] == "done" else 1


def server_rollback(c: Client, args: argparse.Namespace, out: TextIO) -> int:
    report = _long(c, args).call("POST", _path(args.uuid, "rollback"), {"reboot": args.reboot})
    emit(args, report, out, lambda: _swap_lines(report, out))
    return 0


def snapshot_list(c: Client, args: argparse.Namespace, out: TextIO) -> int:
    snaps = c.call("GET", _path(args.uuid, "snapshots"))
    emit(args, snaps, out, lambda: table([(s["name"], s["volume"], time.strftime(
        "%Y-%m-%d %H:%M:%S", time.localtime(s["created_at"]))) for s in snaps], ["name", "volume", "taken"], out))
    return 0


def snapshot_create(c: Client, args: argparse.Namespace, out: TextIO) -> int:
    made = c.call("POST", _path(args.uuid, "snapshots"), {"name": args.name})
    emit(args, made, out, lambda: print(f"snapshot {args.name} of {args.uuid}", file=out))
    return 0


def snapshot_delete(c: Client, args: argparse.Namespace, out: TextIO) -> int:
    c.call("DELETE", _path(args.uuid, "snapshots", args.name))
    emit(args, {"deleted": args.name}, out, lambda: print(f"deleted snapshot {args.name}", file=out))
    return 0


def snapshot_restore(c: Client, args: argparse.Namespace, out: TextIO) -> int:
    report = _long(c, args).call("POST", _path(args.uuid, "snapshots", args.name, "restore"), {"reboot": args.reboot})
    emit(args, report, out, lambda: _swap_lines(report, out))
    return 0


def server_power(c: Client, args: argparse.Namespace, out: TextIO) -> int:
    state = _long(c, args).call("POST", _path(args.uuid, "power"), {"action": args.action})
    emit(args, state, out, lambda: print(f"{args.uuid}: {state['state']}", file=out))
    return 0


def server_label(c: Client, args: argparse.Namespace, out: TextIO) -> int:
    labels = c.call("PUT", _path(args.uuid, "labels"), {"labels": _selector(args.labels)})
    emit(args, labels, out, lambda: print(" ".join(f"{k}={v}" for k, v in labels["labels"].items()) or "-",
                                          file=out))
    return 0


def server_bmc(c: Client, args: argparse.Namespace, out: TextIO) -> int:
    bmc = c.call("PUT", _path(args.uuid, "bmc"), {"url": args.url, "user": args.user, "password": args.password})
    emit(args, bmc, out, lambda: print(f"{args.uuid}: BMC {bmc['url'] or 'none'}", file=out))
    return 0


def template_capture(c: Client, args: argparse.Namespace, out: TextIO) -> int:
    tv = _long(c, args).call("POST", f"/api/v1/templates/{urllib.parse.quote(args.as_name, safe='')}/captures",
                             {"server": args.uuid, "power_off": args.power_off})
    emit(args, tv, out, lambda: print(f"captured {args.uuid} as {tv['template']}@{tv['version']}", file=out))
    return 0


def add_lifecycle_commands(server: Any, template: Any, common: Callable[[argparse.ArgumentParser, Handler],
                                                                         argparse.ArgumentParser]) -> None:
    def swap(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--reboot", action="store_true",
                       help="power the node off through its BMC first, then PXE-boot it onto the new root and wait")
        p.add_argument("--timeout", type=float, default=SWAP_TIMEOUT, help="seconds to wait for the answer")
        return p

    p = swap(common(server.add_parser("upgrade", help="move a server (or a labelled group) to a template version"),
                    server_upgrade))
    p.add_argument("uuid", nargs="?", help="the server (or --selector for a group)")
    p.add_argument("--to", help="tiny@v3, or a template name for its newest (default: its template's newest)")
    p.add_argument("--discard-old", action="store_true", help="keep no restore point")
    p.add_argument("--selector", action="append", default=[], metavar="KEY=VALUE", help="a group by its labels")
    p.add_argument("--batch", type=int, default=1, help="servers per wave (a group)")
    p.add_argument("--max-failures", type=int, default=0, help="failures before the group upgrade halts")
    p.add_argument("--yes", action="store_true", help="a group: go ahead (without it, only say what it would do)")
    p.add_argument("--poll", type=float, default=2.0, help=argparse.SUPPRESS)
    p = swap(common(server.add_parser("rollback", help="swap back to the restore point"), server_rollback))
    p.add_argument("uuid")
    p = common(server.add_parser("power", help="on | off | cycle | status through the node's BMC"), server_power)
    p.add_argument("uuid")
    p.add_argument("action", choices=("on", "off", "cycle", "status"))
    p.add_argument("--timeout", type=float, default=120.0, help=argparse.SUPPRESS)
    p = common(server.add_parser("label", help="set a server's labels (replaces them)"), server_label)
    p.add_argument("uuid")
    p.add_argument("labels", nargs="*", metavar="KEY=VALUE")
    p = common(server.add_parser("bmc", help="set a server's BMC (admin)"), server_bmc)
    p.add_argument("uuid")
    p.add_argument("url", help="redfish://host[:port]/SystemId, ipmi://host[:port], or '' for none")
    p.add_argument("--user", default="")
    p.add_argument("--password", default="")

    snap = server.add_parser("snapshot", help="snapshots of a server's root").add_subparsers(
        dest="snapshot_action", metavar="ACTION", required=True)
    common(snap.add_parser("list", help="list them"), snapshot_list).add_argument("uuid")
    for name, handler, text in (("create", snapshot_create, "take one"), ("delete", snapshot_delete, "delete one")):
        p = common(snap.add_parser(name, help=text), handler)
        p.add_argument("uuid")
        p.add_argument("name")
    p = swap(common(snap.add_parser("restore", help="the root goes back to a snapshot"), snapshot_restore))
    p.add_argument("uuid")
    p.add_argument("name")

    p = common(template.add_parser("capture", help="a server's root as a new template version (admin)"),
               template_capture)
    p.add_argument("uuid")
    p.add_argument("--as", dest="as_name", required=True, metavar="NAME", help="the template it becomes a version of")
    p.add_argument("--power-off", action="store_true", help="power the node off through its BMC first")
    p.add_argument("--timeout", type=float, default=SWAP_TIMEOUT, help=argparse.SUPPRESS)
