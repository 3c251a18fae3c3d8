"""`cello audit` (who changed what through the API) and `cello token create` (admin or user tokens, full or
read-only), through the API — stdlib only, like the other client commands.
"""

from __future__ import annotations

import argparse
import time
import urllib.parse
from collections.abc import Callable
from typing import Any, TextIO

from appliance.cli_client import Client, Handler, emit, table


def _when(at: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(at)) + "Z"


def _rows(entries: list[dict[str, Any]]) -> list[list[object]]:
    return [[e["id"], _when(e["at"]), e["who"], e["method"], e["path"], e["status"], e["detail"]] for e in entries]


HEADERS = ("id", "when (utc)", "who", "method", "path", "status", "detail")


def audit(c: Client, args: argparse.Namespace, out: TextIO) -> int:
    query: dict[str, str] = {"limit": str(args.limit)}
    if args.since is not None:
        query["since"] = str(args.since)
    entries: list[dict[str, Any]] = c.call("GET", "/api/v1/audit?" + urllib.parse.urlencode(query))
    emit(args, entries, out, lambda: table(_rows(entries), HEADERS, out))
    if not args.follow:
        return 0
    last = entries[-1]["id"] if entries else (args.since or 0)
    try:
        while True:
            time.sleep(args.poll)
            query = {"since": str(last), "limit": "1000"}
            more: list[dict[str, Any]] = c.call("GET", "/api/v1/audit?" + urllib.parse.urlencode(query))
            for row in _rows(more):
                print("  ".join(str(v) for v in row), file=out, flush=True)
            if more:
                last = more[-1]["id"]
    except KeyboardInterrupt:
        return 0


def token_create(c: Client, args: argparse.Namespace, out: TextIO) -> int:
    body = {"scope": "read" if args.read else "full"}
    path = (f"/api/v1/users/{urllib.parse.quote(args.user, safe='')}/tokens" if args.user
            else "/api/v1/admin/tokens")
    made = c.call("POST", path, body)
    emit(args, made, out, lambda: print(
        f"{made['scope']} token for {made['user'] or 'admin'} (shown once): {made['token']}", file=out))
    return 0


def add_audit_commands(subparsers: Any,
                       common: Callable[[argparse.ArgumentParser, Handler], argparse.ArgumentParser]) -> None:
    p = common(subparsers.add_parser("audit", help="the audit log of API writes (admin)"), audit)
    p.add_argument("--since", type=int, help="entries after this id (default: the newest --limit)")
    p.add_argument("--limit", type=int, default=100, help="at most N entries (1..1000)")
    p.add_argument("--follow", "-f", action="store_true", help="keep printing new entries")
    p.add_argument("--poll", type=float, default=2.0, help=argparse.SUPPRESS)

    token = subparsers.add_parser("token", help="API tokens (admin)").add_subparsers(
        dest="action", metavar="ACTION", required=True)
    p = common(token.add_parser("create", help="a new token, shown once (an admin one unless --user)"), token_create)
    p.add_argument("--user", help="a token of this user (default: an admin token)")
    p.add_argument("--read", action="store_true", help="read-only: sees what its owner may, changes nothing")
