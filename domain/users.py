"""Users, their quotas and their API tokens.

Every call is one trip through the store's thread; the checks and the write share that trip, so two
callers cannot both pass a check that only one of them should (a name taken twice, say). Tokens are
stored as SHA-256 hashes; a new one is shown once, to the caller that made it.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass

import naming
from domain.errors import Conflict, InvalidRequest, NotFound
from domain.requests import Quota, QuotaChange
from domain.store import AsyncStore, Store, User

GiB = 1 << 30
TOKEN_PREFIX = "cello_"
MAX_TOKEN_LEN = 256
SCOPES = ("", "read")  # '' = all its owner may do; 'read' = look, not touch (monitoring)


@dataclass(frozen=True)
class UserView:
    """A user with its quota and what its servers use of it."""

    name: str
    max_volumes: int
    max_data_gb: int
    used_volumes: int
    used_data_bytes: int


@dataclass(frozen=True)
class Caller:
    """Who a token speaks for: an admin, or one user."""

    owner: str | None
    admin: bool
    scope: str = ""

    @property
    def read_only(self) -> bool:
        return self.scope == "read"


def scope_of(value: str) -> str:
    """A token scope from a request: "read", or "" / "full" for everything its owner may do."""
    scope = "" if value == "full" else value
    if scope not in SCOPES:
        raise InvalidRequest(f"scope: must be 'read' or 'full', not {value!r}")
    return scope


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def quota_check(user: User) -> Callable[[int, int], str | None]:
    """For the store's create transactions: the reason a new total breaks the user's quota, or None."""
    def check(volumes: int, data_bytes: int) -> str | None:
        if volumes > user.max_volumes:
            return f"quota: user {user.name} may have {user.max_volumes} volumes, this needs {volumes}"
        if data_bytes > user.max_data_gb * GiB:
            return (f"quota: user {user.name} may have {user.max_data_gb} GB of data volumes, "
                    f"this needs {data_bytes // GiB}")
        return None

    return check


class Users:
    def __init__(self, store: AsyncStore) -> None:
        self._store = store

    async def create(self, name: str, quota: Quota) -> UserView:
        naming.USER.check(name, InvalidRequest, "name")
        return await self._store.call(_create, self._store.sync, User(name, *_q(quota.checked())))

    async def list(self) -> list[UserView]:
        return await self._store.call(_list, self._store.sync)

    async def show(self, name: str) -> UserView:
        return await self._store.call(_show, self._store.sync, name)

    async def get(self, name: str) -> User:
        """The user a server is made for (InvalidRequest: the request names no such user)."""
        user = await self._store.call(self._store.sync.user, name)
        if user is None:
            raise InvalidRequest(f"user: no user {name!r}")
        return user

    async def set_quota(self, name: str, change: QuotaChange) -> UserView:
        return await self._store.call(_set_quota, self._store.sync, name, change)

    async def delete(self, name: str) -> None:
        """The user and its tokens; Conflict while it owns servers."""
        await self._store.call(_delete, self._store.sync, name)

    async def new_token(self, name: str, scope: str = "") -> str:
        token = new_token()
        await self._store.call(_add_user_token, self._store.sync, name, token, scope_of(scope))
        return token

    async def new_admin_token(self, scope: str = "") -> str:
        """Another admin token (a read-only one for monitoring, say), shown once to its maker."""
        token = new_token()
        await self._store.call(self._store.sync.add_token, token, None, True, scope_of(scope))
        return token

    async def ensure_admin_token(self, configured: str) -> str | None:
        """First-start admin token. A configured token is (re)registered and None returned; otherwise, if
        the store holds no admin token yet, a new one is made and returned — the caller prints it once."""
        sync = self._store.sync
        if configured:
            await self._store.call(sync.add_token, configured, None, True)
            return None
        if await self._store.call(sync.has_admin_token):
            return None
        token = new_token()
        await self._store.call(sync.add_token, token, None, True)
        return token

    async def caller(self, token: str) -> Caller | None:
        """Whom a bearer token speaks for; None for an unknown (or malformed) one."""
        if len(token) > MAX_TOKEN_LEN or not token.isprintable():
            return None
        found = await self._store.call(self._store.sync.token_with_scope, token)
        return None if found is None else Caller(*found)


def _q(quota: Quota) -> tuple[int, int]:
    return quota.max_volumes, quota.max_data_gb


def _view(store: Store, user: User) -> UserView:
    used_n, used_bytes = store.usage(user.name)
    return UserView(user.name, user.max_volumes, user.max_data_gb, used_n, used_bytes)


def _existing(store: Store, name: str) -> User:
    user = store.user(name)
    if user is None:
        raise NotFound(f"no user {name}")
    return user


def _create(store: Store, user: User) -> UserView:
    if store.user(user.name) is not None:
        raise Conflict(f"user {user.name} already exists")
    store.put_user(user)
    return _view(store, user)


def _list(store: Store) -> list[UserView]:
    return [_view(store, u) for u in store.users()]


def _show(store: Store, name: str) -> UserView:
    return _view(store, _existing(store, name))


def _set_quota(store: Store, name: str, change: QuotaChange) -> UserView:
    user = _existing(store, name)
    quota = Quota(user.max_volumes if change.max_volumes is None else change.max_volumes,
                  user.max_data_gb if change.max_data_gb is None else change.max_data_gb).checked()
    user = User(name, *_q(quota))
    store.put_user(user)
    return _view(store, user)


def _delete(store: Store, name: str) -> None:
    _existing(store, name)
    store.delete_user(name)  # Conflict while the user owns servers


def _add_user_token(store: Store, name: str, token: str, scope: str) -> None:
    _existing(store, name)
    store.add_token(token, name, False, scope)
