"""JSON bodies parsed into the domain's typed requests (domain/requests.py).

Here: types and shapes only (a string where a string belongs, a list of at most N, no unknown field),
each refused with 422 naming the field. The rules of the names and values inside are the domain's.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from domain.requests import (
    DEFAULT_QUOTA,
    MAX_DATA_GB,
    MAX_DATA_VOLUMES,
    MAX_MACS,
    MAX_QUOTA_GB,
    MAX_QUOTA_VOLUMES,
    CreateServer,
    Quota,
    QuotaChange,
)
from web.errors import ApiError, int_field, require_fields

CREATE_SERVER_FIELDS = {"uuid", "template", "profile", "macs", "data_volumes", "hostname", "address", "user",
                        "appliance", "appliance_labels"}


def _invalid(detail: str) -> ApiError:
    return ApiError(422, "invalid", detail)


def string(body: Mapping[str, Any], key: str, *, required: bool = False, limit: int = 4096) -> str:
    value = body.get(key, None if required else "")
    if not isinstance(value, str) or (required and not value) or len(value) > limit:
        raise _invalid(f"{key}: {'required ' if required else ''}string of at most {limit} chars")
    return value


def create_server(body: Mapping[str, Any], owner: str) -> CreateServer:
    require_fields(dict(body), CREATE_SERVER_FIELDS)
    macs = body.get("macs", [])
    if not isinstance(macs, list) or len(macs) > MAX_MACS or not all(isinstance(m, str) for m in macs):
        raise _invalid(f"macs: must be a list of up to {MAX_MACS} MAC addresses")
    volumes = body.get("data_volumes", [])
    if not isinstance(volumes, list) or len(volumes) > MAX_DATA_VOLUMES:
        raise _invalid(f"data_volumes: must be a list of at most {MAX_DATA_VOLUMES}")
    sizes = []
    for i, v in enumerate(volumes):
        if not isinstance(v, dict) or set(v) != {"size_gb"}:
            raise _invalid(f'data_volumes[{i}]: must be {{"size_gb": N}}')
        sizes.append(int_field(v, "size_gb", 1, MAX_DATA_GB, None, where=f"data_volumes[{i}].size_gb"))
    return CreateServer(uuid=string(body, "uuid", required=True, limit=64),
                        template=string(body, "template", required=True, limit=64), owner=owner,
                        profile=string(body, "profile", limit=64), macs=tuple(macs), data_gb=tuple(sizes),
                        hostname=string(body, "hostname", limit=253), address=string(body, "address", limit=64))


def size_gb(body: Mapping[str, Any]) -> int:
    require_fields(dict(body), {"size_gb"})
    return int_field(dict(body), "size_gb", 1, MAX_DATA_GB)


def new_user(body: Mapping[str, Any]) -> tuple[str, Quota]:
    require_fields(dict(body), {"name", "max_volumes", "max_data_gb"})
    b = dict(body)
    return string(b, "name", required=True, limit=64), Quota(
        int_field(b, "max_volumes", 0, MAX_QUOTA_VOLUMES, DEFAULT_QUOTA.max_volumes),
        int_field(b, "max_data_gb", 0, MAX_QUOTA_GB, DEFAULT_QUOTA.max_data_gb))


def quota_change(body: Mapping[str, Any]) -> QuotaChange:
    b = dict(body)
    require_fields(b, {"max_volumes", "max_data_gb"})
    return QuotaChange(int_field(b, "max_volumes", 0, MAX_QUOTA_VOLUMES) if "max_volumes" in b else None,
                       int_field(b, "max_data_gb", 0, MAX_QUOTA_GB) if "max_data_gb" in b else None)


def enabled(body: Mapping[str, Any]) -> bool:
    require_fields(dict(body), {"enabled"})
    value = body.get("enabled")
    if not isinstance(value, bool):
        raise _invalid("enabled: must be true or false")
    return value


def build_source(body: Mapping[str, Any]) -> str:
    require_fields(dict(body), {"source"})
    source = body.get("source")
    if not isinstance(source, str) or not source or len(source) > 4096:
        raise _invalid("source: required string (tiny, debian[:SUITE] or tar:/path/rootfs.tar)")
    return source


def token_scope(body: Mapping[str, Any]) -> str:
    """`{"scope": "read" | "full"}` (no body, or no scope: full)."""
    require_fields(dict(body), {"scope"})
    return string(body, "scope", limit=16) or "full"


def placement_wish(body: Mapping[str, Any]) -> tuple[str, dict[str, str]]:
    """A create's `appliance` (pin) and `appliance_labels` (labels the appliance must carry)."""
    pin = string(body, "appliance", limit=63)
    labels = body.get("appliance_labels", {})
    if not isinstance(labels, dict) or len(labels) > 16 or not all(
            isinstance(k, str) and isinstance(v, str) and len(k) <= 63 and len(v) <= 63 for k, v in labels.items()):
        raise _invalid("appliance_labels: must be an object of up to 16 label: value strings")
    return pin, dict(labels)
