"""The audit trail of the API: every write (POST, PUT, PATCH, DELETE under /api/) is recorded with who
made it, what it was and how it ended, and `GET /api/v1/audit` lists it for admins.

The middleware sits outside the error boundary (web/errors.py), so it sees the status the caller got,
errors included, and inside the route's guard's result: the principal `guarded` found (none for a
request refused at 401). The detail is the operation's name, its query string and, for a refusal, the
error code — never the body, so no password, CHAP secret or BMC credential reaches the log.
"""

from __future__ import annotations

import asyncio
import json

from aiohttp import web

from web.errors import ApiError, Handler
from web.keys import DEPS, PRINCIPAL
from web.routes import Param, Route
from web.schemas import array_of

WRITES = frozenset({"POST", "PUT", "PATCH", "DELETE"})
CLIENT_GONE = 499  # the client went away before its answer (nginx's number); the write may have happened
MAX_QUERY = 120


def _who(request: web.Request) -> str:
    principal = request.get(PRINCIPAL)
    if principal is None:
        return "-"  # not authenticated (a 401), or a public route
    return principal.owner or "admin"  # admin tokens have no owner


def _operation(request: web.Request) -> str:
    handler = request.match_info.route.handler
    return getattr(handler, "__name__", "") if request.match_info.route.resource is not None else "unmatched"


def _error_code(resp: web.StreamResponse | None) -> str:
    if not isinstance(resp, web.Response) or resp.status < 400 or not isinstance(resp.body, bytes):
        return ""
    try:
        body = json.loads(resp.body)
    except ValueError:
        return ""
    code = body.get("error") if isinstance(body, dict) else None
    return code if isinstance(code, str) else ""


def detail_of(request: web.Request, resp: web.StreamResponse | None) -> str:
    parts = [_operation(request)]
    if request.query_string:
        parts.append("?" + request.query_string[:MAX_QUERY])
    if code := _error_code(resp):
        parts.append(code)
    return " ".join(p for p in parts if p)


@web.middleware
async def audit_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.method not in WRITES or not request.path.startswith("/api/"):
        return await handler(request)
    status, resp = 500, None
    try:
        resp = await handler(request)
        status = resp.status
        return resp
    except web.HTTPException as e:
        status = e.status
        raise
    except asyncio.CancelledError:
        status = CLIENT_GONE
        raise
    finally:
        request.app[DEPS].domain.audit.record(_who(request), request.method, request.path, status,
                                              detail_of(request, resp))


def _int_query(request: web.Request, key: str, default: int | None, lo: int, hi: int) -> int | None:
    raw = request.query.get(key)
    if raw is None:
        return default
    if not raw.isascii() or not raw.isdigit() or len(raw) > 18 or not lo <= int(raw) <= hi:
        raise ApiError(422, "invalid", f"{key}: must be an integer {lo}..{hi}")
    return int(raw)


async def list_audit(request: web.Request) -> web.StreamResponse:
    """API writes, oldest first: `?since=ID` those after that entry, else the newest `limit` (default 100)."""
    since = _int_query(request, "since", None, 0, 10**18)
    limit = _int_query(request, "limit", 100, 1, 1000) or 100
    entries = await request.app[DEPS].domain.audit.list(since, limit)
    return web.json_response([e.as_json() for e in entries])


ROUTES: tuple[Route, ...] = (
    Route("GET", "/api/v1/audit", list_audit, "The audit log of API writes (who, what, when, status)", "admin",
          "misc", params=(Param("since", {"type": "integer", "minimum": 0}, "entries after this id"),
                          Param("limit", {"type": "integer", "minimum": 1, "maximum": 1000}, "at most N (100)")),
          responses={200: ("entries, oldest first", array_of("AuditEntry"))}),
)
