"""Every error leaves the API as JSON `{"error": code, "detail": text}` with a status that fits.

The middleware is the error boundary of every request: domain exceptions map to 4xx, aiohttp's own
HTTP exceptions (404 route, 405, 413 body too large) are re-shaped, anything else is logged with the
peer's address and becomes a 500 — never a traceback on the wire. CancelledError always propagates.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from domain.errors import Conflict, InvalidRequest, NotFound, QuotaExceeded, ServiceDisabled, StoreError
from iscsi.model import InUseError, StorageError

log = logging.getLogger("cello.web")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    409: "conflict",
    411: "length_required",
    413: "too_large",
    415: "unsupported_media_type",
    416: "range_not_satisfiable",
    422: "invalid",
    503: "unavailable",
}


class ApiError(Exception):
    def __init__(self, status: int, code: str, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail
        self.headers = headers or {}


def error_response(status: int, code: str, detail: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": code, "detail": detail}, status=status, headers=headers)


def classify(e: BaseException) -> ApiError | None:
    """The API error a domain exception stands for; None for a bug."""
    # Order matters: the specific subclasses before their bases.
    if isinstance(e, ApiError):
        return e
    if isinstance(e, QuotaExceeded):
        return ApiError(409, "quota_exceeded", str(e))
    if isinstance(e, ServiceDisabled):
        return ApiError(409, "service_disabled", str(e))
    if isinstance(e, InUseError):
        return ApiError(409, "in_use", str(e))
    if isinstance(e, Conflict):
        return ApiError(409, "conflict", str(e))
    if isinstance(e, NotFound):
        return ApiError(404, "not_found", str(e))
    if isinstance(e, InvalidRequest):
        return ApiError(422, "invalid", str(e))
    if isinstance(e, StorageError):
        return ApiError(500, "storage_error", str(e))
    if isinstance(e, StoreError):
        # the database is down or unreachable (a PostgreSQL store): the appliance is fine, try again later
        return ApiError(503, "store_unavailable", str(e), {"Retry-After": "5"})
    return None


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        code = _HTTP_CODES.get(e.status, "error")
        detail = e.text if e.text and not e.text.startswith(f"{e.status}:") else e.reason
        headers = {k: v for k, v in e.headers.items() if k.lower() in ("allow", "www-authenticate")}
        return error_response(e.status, code, detail or code, headers)
    except Exception as e:
        api = classify(e)
        if api is None:
            log.exception("%s %s from %s failed", request.method, request.path, request.remote)
            return error_response(500, "internal", f"internal error ({type(e).__name__}); see the appliance log")
        if api.status >= 500:
            log.warning("%s %s from %s: %s", request.method, request.path, request.remote, api.detail)
        return error_response(api.status, api.code, api.detail, api.headers)


def _no_constants(value: str) -> Any:
    raise ValueError(f"{value} is not JSON")


async def json_body(request: web.Request, *, required: bool = True) -> dict[str, Any]:
    """The request's JSON object, or an ApiError (415 wrong type, 413 too big, 400 malformed, 422 not an object)."""
    if not request.body_exists:
        if required:
            raise ApiError(400, "bad_request", "a JSON object body is required")
        return {}
    if request.content_type != "application/json":
        raise ApiError(415, "unsupported_media_type",
                       f"send Content-Type: application/json (got {request.content_type or 'none'})")
    raw = await request.read()  # raises HTTPRequestEntityTooLarge past client_max_size
    if not raw.strip() and not required:
        return {}
    try:
        value = json.loads(raw.decode("utf-8"), parse_constant=_no_constants)
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ApiError(400, "bad_request", f"malformed JSON: {str(e)[:200]}") from None
    if not isinstance(value, dict):
        raise ApiError(422, "invalid", "the body must be a JSON object")
    return value


def require_fields(body: dict[str, Any], allowed: set[str]) -> None:
    extra = set(body) - allowed
    if extra:
        raise ApiError(422, "invalid", f"unknown field(s): {', '.join(sorted(map(str, extra)))}")


def int_field(body: dict[str, Any], key: str, lo: int, hi: int, default: int | None = None,
              where: str | None = None) -> int:
    value = body.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ApiError(422, "invalid", f"{where or key}: must be an integer {lo}..{hi}")
    return value
