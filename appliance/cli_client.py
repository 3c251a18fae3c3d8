"""The `cello` commands that drive a running appliance through its HTTP API.

They read CELLO_API (default http://127.0.0.1:8080), CELLO_TOKEN and, for an https:// API whose
certificate no system CA signed (the appliance's self-signed one), CELLO_CACERT. Output is a readable table by
default and JSON with `--json`; an API error prints its detail on one line and exits 1.
`appliance/cli.py` mounts them with `add_client_commands(subparsers)` and runs them with `run(args)`.
"""

from __future__ import annotations

import argparse
import json
import os
import ssl
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TextIO

DEFAULT_API = "http://127.0.0.1:8080"
Handler = Callable[["Client", argparse.Namespace, TextIO], int]


class ClientError(Exception):
    """One line for the operator: what the API (or the connection) said."""


class Client:
    def __init__(self, api: str, token: str, timeout: float = 30.0, cacert: str = "") -> None:
        self.api = api.rstrip("/")
        self.token = token
        self.timeout = timeout
        self.cacert = cacert
        self._context: ssl.SSLContext | None = None

    def _open(self, req: urllib.request.Request, timeout: float | None) -> Any:
        if self.api.startswith("https://") and self._context is None:
            try:
                self._context = ssl.create_default_context(cafile=self.cacert or None)
            except (OSError, ssl.SSLError) as e:
                raise ClientError(f"the CA file {self.cacert!r} (--cacert / CELLO_CACERT) cannot be used: "
                                  f"{getattr(e, 'strerror', None) or e}") from None
        return urllib.request.urlopen(req, timeout=timeout, context=self._context)

    def _request(self, method: str, path: str, body: Any = None) -> urllib.request.Request:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.api + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        if self.token:
            req.add_header("Authorization", f"Bearer {self.token}")
        return req

    def _unreachable(self, e: OSError) -> ClientError:
        reason = getattr(e, "reason", e)
        hint = ""
        if isinstance(reason, ssl.SSLCertVerificationError):
            hint = (" (for the appliance's self-signed certificate give --cacert or CELLO_CACERT its "
                    "<state_dir>/tls/cert.pem; `cello serve` logs its fingerprint)")
        return ClientError(f"cannot reach the Cello API at {self.api}: {reason}{hint}")

    def call(self, method: str, path: str, body: Any = None) -> Any:
        try:
            with self._open(self._request(method, path, body), self.timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            raise ClientError(_error_line(e)) from None
        except (urllib.error.URLError, OSError) as e:
            raise self._unreachable(e) from None
        return json.loads(raw) if raw else None

    def stream(self, path: str) -> Iterator[str]:
        """Lines of a long response (server-sent events); no read timeout while following."""
        try:
            resp = self._open(self._request("GET", path), None)
        except urllib.error.HTTPError as e:
            raise ClientError(_error_line(e)) from None
        except (urllib.error.URLError, OSError) as e:
            raise self._unreachable(e) from None
        with resp:
            for raw in resp:
                yield raw.decode("utf-8", "replace").rstrip("\r\n")


def _error_line(e: urllib.error.HTTPError) -> str:
    try:
        body = json.loads(e.read())
        return f"{body['error']}: {body['detail']}"
    except Exception:
        return f"HTTP {e.code} {e.reason}"


# --- output ----------------------------------------------------------------------------------


def table(rows: Sequence[Sequence[object]], headers: Sequence[str], out: TextIO) -> None:
    cells = [[str(h).upper() for h in headers]] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for row in cells:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip(), file=out)


def emit(args: argparse.Namespace, data: Any, out: TextIO, render: Callable[[], None]) -> None:
    if args.json:
        print(json.dumps(data, indent=2, sort_keys=True), file=out)
    else:
        render()


def _gb(size: int) -> str:
    gb = size / (1 << 30)
    return f"{gb:.0f}G" if gb >= 1 and gb.is_integer() else f"{size / (1 << 20):.0f}M"


def _luns(server: dict[str, Any]) -> str:
    return ",".join(str(lun["lun"]) for lun in server["target"]["luns"] if lun["lun"] is not None) or "-"


# --- servers ---------------------------------------------------------------------------------


def server_create(c: Client, args: argparse.Namespace, out: TextIO) -> int:
    body: dict[str, Any] = {"uuid": args.uuid, "template": args.template}
    if args.profile:
        body["profile"] = args.profile
    if args.mac:
        body["macs"] = args.mac
    if args.user:
        body["user"] = args.user
    if args.data_gb:
        body["data_volumes"] = [{"size_gb": n} for n in args.data_gb]
    if args.hostname:
        body["hostname"] = args.hostname
    if args.address:
        body["address"] = args.address
    if args.appliance:
        body["appliance"] = args.appliance
    if args.appliance_label:
        body["appliance_labels"] = dict(kv.partition("=")[::2] for kv in args.appliance_label)
    server = c.call("POST", "/api/v1/servers", body)
    placement = server.get("placement") or {}
    if len(placement.get("weights", {})) + len(placement.get("rejected", {})) > 1 and not args.json:
        print(f"placement: {placement['explain']}", file=out)  # a fleet chose: say where and why
    if args.wait:
        deadline = time.monotonic() + args.wait_timeout
        while server["state"] in ("creating", "exporting") and time.monotonic() < deadline:
            time.sleep(0.2)
            server = c.call("GET", f"/api/v1/servers/{server['uuid']}")
    emit(args, server, out, lambda: _show_server(server, out))
    if server["state"] == "error":
        print(f"error: {server['reason']}", file=sys.stderr)
        return 1
    return 0


def server_list(c: Client, args: argparse.Namespace, out: TextIO) -> int:
    query = f"?user={urllib.parse.quote(args.user)}" if args.user else ""
    servers = c.call("GET", f"/api/v1/servers{query}")
    emit(args, servers, out, lambda: table(
        [(s["uuid"], s["user"], f"{s['template']}@{s['version']}", s["state"], len(s["volumes"]), _luns(s),
          s["reason"][:60]) for s in servers],
        ("uuid", "user", "template", "state", "volumes", "luns", "reason"), out))
    return 0


def _show_server(s: dict[str, Any], out: TextIO) -> None:
    t = s["target"]
    for key, value in (("uuid", s["uuid"]), ("user", s["user"]), ("template", f"{s['template']}@{s['version']}"),
                       ("profile", s["profile"]), ("state", s["state"]), ("reason", s["reason"] or "-"),
                       ("macs", ", ".join(s["macs"]) or "-"), ("target", t["iqn"]), ("portal", t["portal"]),
                       ("exported", "yes" if t["exported"] else "no")):
        print(f"{key + ':':10} {value}", file=out)
    print(file=out)
    _volume_table(s["volumes"], out)


def _volume_table(volumes: list[dict[str, Any]], out: TextIO) -> None:
    table([(v["name"], v["kind"], v["index"], _gb(v["size"]), v["state"], "-" if v["lun"] is None else v["lun"])
           for v in volumes], ("volume", "kind", "index", "size", "state", "lun"), out)


def server_show(c: Client, args: argparse.Namespace, out: TextIO) -> int:
    server = c.call("GET", f"/api/v1/servers/{urllib.parse.quote(args.uuid)}")
    emit(args, server, out, lambda: _show_server(server, out))
    return 0


def server_delete(c: Client, args: argparse.Namespace, out: TextIO) -> int:
    c.call("DELETE", f"/api/v1/servers/{urllib.parse.quote(args.uuid)}")
    emit(args, {"deleted": args.uuid}, out, lambda: print(f"deleted {args.uuid}", file=out))
    return 0


# --- volumes ---------------------------------------------------------------------------------


def volume_list(c: Client, args: argparse.Namespace, out: TextIO) -> int:
    path = f"/api/v1/servers/{urllib.parse.quote(args.server)}/volumes" if args.server else "/api/v1/volumes"
    volumes = c.call("GET", path)
    emit(args, volumes, out, lambda: _volume_table(volumes, out))
    return 0


def volume_add(c: Client, args: argparse.Namespace, out: TextIO) -> int:
    vol = c.call("POST", f"/api/v1/servers/{urllib.parse.quote(args.server)}/volumes", {"size_gb": args.size_gb})
    emit(args, vol, out, lambda: _volume_table([vol], out))
    return 0


def volume_remove(c: Client, args: argparse.Namespace, out: TextIO) -> int:
    c.call("DELETE", f"/api/v1/servers/{urllib.parse.quote(args.server)}/volumes/{urllib.parse.quote(args.name)}")
    emit(args, {"removed": args.name}, out, lambda: print(f"removed {args.name}", file=out))
    return 0


# --- templates -------------------------------------------------------------------------------


def template_list(c: Client, args: argparse.Namespace, out: TextIO) -> int:
    templates = c.call("GET", "/api/v1/templates")
    emit(args, templates, out, lambda: table(
        [(t["name"], v["version"], v["source"], _gb(v["size"]), v["clones"]) for t in templates
         for v in t["versions"]], ("template", "version", "source", "size", "clones"), out))
    return 0


def template_build(c: Client, args: argparse.Namespace, out: TextIO) -> int:
    job = c.call("POST", f"/api/v1/templates/{urllib.parse.quote(args.name)}/builds", {"source": args.source})
    shown = 0
    while True:
        for line in job["progress"][shown:]:
            if not args.json:
                print(line, file=out, flush=True)
        shown = len(job["progress"])
        if job["state"] != "running":
            break
        time.sleep(args.poll)
        job = c.call("GET", f"/api/v1/templates/builds/{urllib.parse.quote(job['id'])}")
    if args.json:
        print(json.dumps(job, indent=2, sort_keys=True), file=out)
    if job["state"] != "done":
        print(f"error: build {job['id']} failed: {job['error']}", file=sys.stderr)
        return 1
    return 0


def template_delete(c: Client, args: argparse.Namespace, out: TextIO) -> int:
    c.call("DELETE", f"/api/v1/templates/{urllib.parse.quote(args.name)}/versions/{urllib.parse.quote(args.version)}")
    emit(args, {"deleted": f"{args.name}@{args.version}"}, out,
         lambda: print(f"deleted {args.name}@{args.version}", file=out))
    return 0


# --- users, services, reconcile ----------------------------------------------------------------


def user_create(c: Client, args: argparse.Namespace, out: TextIO) -> int:
    body: dict[str, Any] = {"name": args.name}
    if args.max_volumes is not None:
        body["max_volumes"] = args.max_volumes
    if args.max_data_gb is not None:
        body["max_data_gb"] = args.max_data_gb
    user = c.call("POST", "/api/v1/users", body)
    token = c.call("POST", f"/api/v1/users/{urllib.parse.quote(args.name)}/tokens") if args.with_token else None
    data = {**user, **({"token": token["token"]} if token else {})}

    def render() -> None:
        print(f"created user {user['name']} (quota: {user['max_volumes']} volumes, {user['max_data_gb']} GB)",
              file=out)
        if token:
            print(f"token (shown once): {token['token']}", file=out)

    emit(args, data, out, render)
    return 0


def user_list(c: Client, args: argparse.Namespace, out: TextIO) -> int:
    users = c.call("GET", "/api/v1/users")
    emit(args, users, out, lambda: table(
        [(u["name"], f"{u['used_volumes']}/{u['max_volumes']}", f"{u['used_data_gb']:g}/{u['max_data_gb']}")
         for u in users], ("user", "volumes", "data_gb"), out))
    return 0


def service_list(c: Client, args: argparse.Namespace, out: TextIO) -> int:
    services = c.call("GET", "/api/v1/services")
    emit(args, services, out, lambda: table(
        [(s["name"], "yes" if s["enabled"] else "no", s["state"], s["detail"]) for s in services],
        ("service", "enabled", "state", "detail"), out))
    return 0


def _service_set(enabled: bool) -> Handler:
    def handler(c: Client, args: argparse.Namespace, out: TextIO) -> int:
        s = c.call("PUT", f"/api/v1/services/{urllib.parse.quote(args.name)}", {"enabled": enabled})
        emit(args, s, out, lambda: print(f"{s['name']}: {'enabled' if s['enabled'] else 'disabled'}", file=out))
        return 0

    return handler


def reconcile(c: Client, args: argparse.Namespace, out: TextIO) -> int:
    report = c.call("POST", "/api/v1/reconcile")

    def render() -> None:
        for line in report["repaired"]:
            print(f"repaired: {line}", file=out)
        for line in report["problems"]:
            print(f"problem:  {line}", file=out)
        if not report["repaired"] and not report["problems"]:
            print("nothing to do", file=out)

    emit(args, report, out, render)
    return 1 if report["problems"] else 0


# --- events ----------------------------------------------------------------------------------

_SUMMARY_KEYS = {
    "http": ("status", "file", "bytes", "client"),
    "tftp": ("file", "bytes", "client", "status"),
    "dhcp": ("type", "mac", "client", "file", "bootfile"),
    "workflow": ("workflow", "step", "volume", "state", "reason"),
    "export": ("reason", "targets", "available", "detail"),
}


def summarize(event: dict[str, Any]) -> str:
    """One readable line: time, kind, server, then the event's own fields (the telling ones first)."""
    stamp = float(event.get("at", 0))
    at = time.strftime("%H:%M:%S", time.localtime(stamp)) + f".{int(stamp * 1000) % 1000:03d}"
    kind = str(event.get("kind", "?"))
    server = event.get("server") or "-"
    rest = {k: v for k, v in event.items() if k not in ("id", "at", "kind", "server")}
    first = [k for k in _SUMMARY_KEYS.get(kind, ()) if k in rest]
    parts = [f"{k}={_short(rest[k])}" for k in first + sorted(set(rest) - set(first)) if rest[k] not in ("", None)]
    return f"{at}  {kind:<9} {server:<36}  {' '.join(parts)}"


def _short(value: object) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= 80 and " " not in text else json.dumps(text[:80])


def parse_sse(lines: Iterator[str]) -> Iterator[dict[str, Any]]:
    data: list[str] = []
    for line in lines:
        if line == "":
            if data:
                yield json.loads("\n".join(data))
                data = []
        elif line.startswith("data:"):
            data.append(line[5:].lstrip(" "))


def events(c: Client, args: argparse.Namespace, out: TextIO) -> int:
    query = {"follow": "true" if args.follow else "false", "since": str(args.since)}
    try:
        for event in parse_sse(c.stream("/api/v1/events?" + urllib.parse.urlencode(query))):
            if args.server and event.get("server") != args.server:
                continue
            print(json.dumps(event, sort_keys=True) if args.json else summarize(event), file=out, flush=True)
    except KeyboardInterrupt:
        pass
    return 0


# --- wiring ----------------------------------------------------------------------------------


def _common(p: argparse.ArgumentParser, handler: Handler) -> argparse.ArgumentParser:
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--api", default=None, help=f"API base URL (default $CELLO_API or {DEFAULT_API})")
    p.add_argument("--token", default=None, help="bearer token (default $CELLO_TOKEN)")
    p.add_argument("--cacert", default=None, help="PEM file an https API's certificate is checked against, such "
                   "as the appliance's <state_dir>/tls/cert.pem (default $CELLO_CACERT; none: the system's CAs)")
    p.set_defaults(client_handler=handler)
    return p


def add_client_commands(subparsers: Any) -> None:
    """Add server/template/volume/user/service/events/reconcile to `cello`'s subparsers."""
    server = subparsers.add_parser("server", help="servers (nodes) and their root disks").add_subparsers(
        dest="action", metavar="ACTION", required=True)
    p = _common(server.add_parser("create", help="create a server (clone its OS volume, export it)"), server_create)
    p.add_argument("uuid", help="the node's SMBIOS UUID")
    p.add_argument("--template", required=True)
    p.add_argument("--profile")
    p.add_argument("--mac", action="append", help="a MAC address of the node (repeatable)")
    p.add_argument("--data-gb", type=int, action="append", help="a data volume of N GB (repeatable)")
    p.add_argument("--user", help="owner (required with an admin token)")
    p.add_argument("--hostname", help="DNS name (the DNS responder answers it with --address)")
    p.add_argument("--address", help="the node's IPv4 address, for DNS")
    p.add_argument("--appliance", help="fleet: place it on this appliance")
    p.add_argument("--appliance-label", action="append", metavar="KEY=VALUE",
                   help="fleet: the appliance must carry this label (repeatable)")
    p.add_argument("--wait", action="store_true", help="wait until available (exit 1 on error)")
    p.add_argument("--wait-timeout", type=float, default=300.0)
    p = _common(server.add_parser("list", help="list servers"), server_list)
    p.add_argument("--user", help="admin: only this user's servers")
    _common(server.add_parser("show", help="show a server"), server_show).add_argument("uuid")
    _common(server.add_parser("delete", help="delete a server and its volumes"), server_delete).add_argument("uuid")

    template = subparsers.add_parser("template", help="OS templates").add_subparsers(
        dest="action", metavar="ACTION", required=True)
    _common(template.add_parser("list", help="list templates and versions"), template_list)
    p = _common(template.add_parser("build", help="build a new version and follow it"), template_build)
    p.add_argument("name")
    p.add_argument("--from", dest="source", required=True, help="tiny | debian[:SUITE] | tar:/path/rootfs.tar")
    p.add_argument("--poll", type=float, default=0.5, help=argparse.SUPPRESS)
    p = _common(template.add_parser("delete", help="delete a template version"), template_delete)
    p.add_argument("name")
    p.add_argument("version")

    volume = subparsers.add_parser("volume", help="volumes").add_subparsers(
        dest="action", metavar="ACTION", required=True)
    p = _common(volume.add_parser("list", help="list volumes (all of yours, or one server's)"), volume_list)
    p.add_argument("server", nargs="?")
    p = _common(volume.add_parser("add", help="add a data volume to a server"), volume_add)
    p.add_argument("server")
    p.add_argument("size_gb", type=int)
    p = _common(volume.add_parser("remove", help="remove a data volume"), volume_remove)
    p.add_argument("server")
    p.add_argument("name")

    user = subparsers.add_parser("user", help="users and quotas (admin)").add_subparsers(
        dest="action", metavar="ACTION", required=True)
    p = _common(user.add_parser("create", help="create a user"), user_create)
    p.add_argument("name")
    p.add_argument("--max-volumes", type=int)
    p.add_argument("--max-data-gb", type=int)
    p.add_argument("--with-token", action="store_true", help="also make the user a token (shown once)")
    _common(user.add_parser("list", help="list users"), user_list)

    service = subparsers.add_parser("service", help="services").add_subparsers(
        dest="action", metavar="ACTION", required=True)
    _common(service.add_parser("list", help="list services"), service_list)
    _common(service.add_parser("enable", help="enable a service"), _service_set(True)).add_argument("name")
    _common(service.add_parser("disable", help="disable a service"), _service_set(False)).add_argument("name")

    p = _common(subparsers.add_parser("events", help="the boot log: one line per event"), events)
    p.add_argument("--follow", "-f", action="store_true", help="keep following live events")
    p.add_argument("--since", type=int, default=0, help="replay recent events after this id")
    p.add_argument("--server", help="only this server's events")
    _common(subparsers.add_parser("reconcile", help="reconcile store, volumes and exports (admin)"), reconcile)
    from appliance.cli_lifecycle import add_lifecycle_commands

    add_lifecycle_commands(server, template, _common)
    from appliance.cli_operator import add_operator_commands

    add_operator_commands(subparsers, server, _common)
    from appliance.cli_audit import add_audit_commands

    add_audit_commands(subparsers, _common)
    from appliance.cli_fleet import add_fleet_commands

    add_fleet_commands(subparsers, server, _common)


def run(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Run a parsed client command; API errors print one line to stderr and return 1."""
    out = out or sys.stdout
    handler: Handler | None = getattr(args, "client_handler", None)
    if handler is None:
        print("cello: not an API client command", file=sys.stderr)
        return 2
    client = Client(args.api or os.environ.get("CELLO_API") or DEFAULT_API,
                    args.token or os.environ.get("CELLO_TOKEN", ""),
                    cacert=args.cacert or os.environ.get("CELLO_CACERT", ""))
    try:
        return handler(client, args, out)
    except ClientError as e:
        print(f"cello: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cello")
    add_client_commands(parser.add_subparsers(dest="command", metavar="COMMAND", required=True))
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
