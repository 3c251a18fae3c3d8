"""The domain's errors: the only exceptions the domain raises on purpose (besides iscsi's StorageError
and InUseError). The web edge maps each to a status in one place (web/errors.py `classify`)."""

from __future__ import annotations


class StoreError(Exception):
    """The store could not do what was asked."""


class StoreUnreachable(StoreError):
    """The store's database cannot be reached now (a PostgreSQL store); the next call tries again."""


class Conflict(StoreError):
    """A uniqueness rule was broken (duplicate server UUID or MAC, ...), or the state forbids it now."""


class QuotaExceeded(Conflict):
    """The owner's quota does not allow it."""


class ServiceDisabled(Conflict):
    """The service this needs is switched off."""


class InvalidRequest(ValueError):
    """Bad input; the message is fit for the API's `detail`."""


class NotFound(LookupError):
    """No such thing (or one the caller may not see: both answer alike)."""
