"""Bearer tokens: admin tokens manage everything, user tokens only their own servers and volumes; a
token of scope 'read' (admin or user) may look at what its owner may, and every write it tries is a 403.

Only the SHA-256 of a token is stored (domain/users.py). Each route says its access level
in the route table; `guarded` wraps its handler with the check, so no route can forget it.
"""

from __future__ import annotations

import ipaddress
import time

from aiohttp import web

from web import fleetauth
from web.errors import ApiError, Handler
from web.keys import DEPS, PRINCIPAL
from web.routes import Access
from web.state import Principal

READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})  # what a read-only token may do


def clear_text_problem(request: web.Request) -> str | None:
    """Why this request may not carry a token here (None: it may). With an HTTPS listener a token is
    taken over it, or from this host: on the plain listener it crossed the boot LAN in clear, where any
    node could read it. From this host means from loopback, or from the very address it was sent to (a
    connection to one's own address never leaves the host: the CLI run beside `cello serve`)."""
    tls_url = request.app[DEPS].tls_url
    if not tls_url or request.secure or _loopback(request.remote) or _to_itself(request):
        return None
    return f"this listener serves boot files; the API is at {tls_url} (HTTPS)"


def _to_itself(request: web.Request) -> bool:
    sockname = request.transport.get_extra_info("sockname") if request.transport is not None else None
    return isinstance(sockname, tuple) and request.remote is not None and request.remote == sockname[0]


def refuse_clear_text(request: web.Request) -> None:
    if (why := clear_text_problem(request)) is not None:
        raise ApiError(403, "tls_required", why)


def _loopback(remote: str | None) -> bool:
    try:
        address = ipaddress.ip_address((remote or "").split("%")[0])
    except ValueError:  # no peer address (a Unix socket's peer, say): not one to trust
        return False
    mapped = address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) else None
    return (mapped or address).is_loopback


async def authenticate(request: web.Request) -> Principal:
    refuse_clear_text(request)
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    challenge = {"WWW-Authenticate": 'Bearer realm="cello"'}
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(401, "unauthorized", "missing bearer token (Authorization: Bearer <token>)", challenge)
    caller = await request.app[DEPS].domain.users.caller(token.strip())
    if caller is None:
        raise ApiError(401, "unauthorized", "invalid token", challenge)
    return Principal(owner=caller.owner, admin=caller.admin, read_only=caller.read_only)


def guarded(handler: Handler, access: Access) -> Handler:
    if access == "public":
        return handler
    if access == "peer":
        return _peer_only(handler)

    async def check(request: web.Request) -> web.StreamResponse:
        principal = await authenticate(request)
        request[PRINCIPAL] = principal  # before the checks: the audit log names who was refused
        if access == "admin" and not principal.admin:
            raise ApiError(403, "forbidden", "this needs an admin token")
        if principal.read_only and request.method not in READ_METHODS:
            raise ApiError(403, "forbidden", "read-only token")
        return await handler(request)

    check.__name__ = handler.__name__
    check.__doc__ = handler.__doc__
    return check


def _peer_only(handler: Handler) -> Handler:
    """The fleet channel: a request signed with the fleet's shared secret (web/fleetauth.py); no secret
    configured, no channel."""

    async def check(request: web.Request) -> web.StreamResponse:
        secret = request.app[DEPS].domain.fleet.settings.secret
        if not secret:
            raise ApiError(403, "forbidden", "this appliance has no fleet channel ([fleet] secret)")
        why = fleetauth.problem(secret, request.headers.get("Authorization", ""), request.method,
                                request.path_qs, time.time())
        if why is not None:
            raise ApiError(401, "unauthorized", why, {"WWW-Authenticate": fleetauth.SCHEME})
        return await handler(request)

    check.__name__ = handler.__name__
    check.__doc__ = handler.__doc__
    return check


def principal(request: web.Request) -> Principal:
    return request[PRINCIPAL]
