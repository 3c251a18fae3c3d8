"""Bearer tokens: admin tokens manage everything, user tokens only their own servers and volumes.

Only the SHA-256 of a token is stored (domain.store.hash_token). Each route says its access level
in the route table; `guarded` wraps its handler with the check, so no route can forget it.
"""

from __future__ import annotations

import secrets

from aiohttp import web

from domain.store import AsyncStore
from web.errors import ApiError, Handler
from web.keys import DEPS, PRINCIPAL
from web.routes import Access
from web.state import Principal

TOKEN_PREFIX = "cello_"
MAX_TOKEN_LEN = 256


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


async def ensure_admin_token(store: AsyncStore, configured: str) -> str | None:
    """First-start admin token. A configured token is (re)registered and None returned; otherwise, if
    the store holds no admin token yet, a new one is made and returned — the caller prints it once."""
    if configured:
        await store.call(store.sync.add_token, configured, None, True)
        return None
    if await store.call(store.sync.has_admin_token):
        return None
    token = new_token()
    await store.call(store.sync.add_token, token, None, True)
    return token


async def authenticate(request: web.Request) -> Principal:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    challenge = {"WWW-Authenticate": 'Bearer realm="cello"'}
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(401, "unauthorized", "missing bearer token (Authorization: Bearer <token>)", challenge)
    token = token.strip()
    if len(token) > MAX_TOKEN_LEN or not token.isprintable():
        raise ApiError(401, "unauthorized", "invalid token", challenge)
    store = request.app[DEPS].store
    found = await store.call(store.sync.token, token)
    if found is None:
        raise ApiError(401, "unauthorized", "invalid token", challenge)
    owner, admin = found
    return Principal(owner=owner, admin=admin)


def guarded(handler: Handler, access: Access) -> Handler:
    if access == "public":
        return handler

    async def check(request: web.Request) -> web.StreamResponse:
        principal = await authenticate(request)
        if access == "admin" and not principal.admin:
            raise ApiError(403, "forbidden", "this needs an admin token")
        request[PRINCIPAL] = principal
        return await handler(request)

    check.__name__ = handler.__name__
    check.__doc__ = handler.__doc__
    return check


def principal(request: web.Request) -> Principal:
    return request[PRINCIPAL]
