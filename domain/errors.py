"""The domain's errors: the only exceptions the domain raises on purpose (besides iscsi's StorageError
and InUseError). The web edge maps each to a status in one place (web/errors.py `classify`)."""

from __future__ import annotations


class StoreError(Exception):
    """The store could not do what was asked."""


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
